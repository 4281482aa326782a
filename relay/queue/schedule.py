"""When to try a recipient again: the configured steps, the last one repeating, with jitter.

Jitter (±`JITTER` of each step) spreads the retries of messages deferred together (an
upstream outage defers everything at once) so that they do not all come back in the same
second when it recovers (chasquid perturbs its delays for the same reason). A retry is
never scheduled past the message's `max_age`: the last try happens at the deadline, and
whatever is still pending after it fails for good.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

JITTER = 0.1


@dataclass(frozen=True)
class RetryPolicy:
    steps: Sequence[float]
    max_age: float
    jitter: float = JITTER

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """The wait after the `attempts`-th failed attempt (1 = after the first)."""
        step = self.steps[min(max(attempts, 1), len(self.steps)) - 1]
        spread = step * self.jitter
        return step + (rng or random).uniform(-spread, spread)

    def next_attempt(self, now: float, attempts: int, since: float, rng: random.Random | None = None) -> float:
        return min(now + self.delay(attempts, rng), self.deadline(since))

    def deadline(self, since: float) -> float:
        return since + self.max_age

    def expired(self, now: float, since: float) -> bool:
        return now >= self.deadline(since)

    def longest_wait(self) -> float:
        """The furthest off a retry is ever scheduled (the longest step, with its jitter)."""
        return max(self.steps) * (1 + self.jitter)

    def beyond_schedule(self, when: float, now: float) -> bool:
        """Whether a retry time lies further ahead than any step: the wall clock stepped back
        since it was scheduled (an operator, an NTP step after a bad clock at boot). It is
        due now, else the step would add itself to the wait."""
        return when > now + self.longest_wait() + 1.0
