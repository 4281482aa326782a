"""The counter contract every backend keeps, and the counting itself.

    refusal = counters.peek(demands)            # at RCPT: would these pass? changes nothing
    taken = await counters.take(demands)        # at DATA: all or nothing
    if isinstance(taken, Excess): ...           #   nothing was counted: refuse
    await counters.give_back(taken)             # the message was not delivered after all

Rules every backend keeps:
- `take` is atomic over all its demands: either every one fits and all are counted, or
  none is counted and the first limit that would be passed is returned.
- `peek` never waits on the network; it may answer from the state last seen (so it can
  miss an excess that `take` will find, but never invents one that is not there).
- `give_back` undoes one `take` and never raises.
- No method raises for a broken backend: a limit is a protection, not a condition of
  delivery, so a backend that cannot count lets mail through and says so (metric, log,
  `problem`).

The counting (`CounterState`) is the same for every backend; the Redis backend runs the
same steps in Lua (see `redis_counters.py`).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter

from relay.limits.rules import DAILY, DAILY_RECIPIENTS, RATE, SLOT_SECONDS, WINDOW_SLOTS, Entity, Limits

FAIL_OPEN = Counter(
    "relay_limit_fail_open_total",
    "Messages counted without the configured counters (Redis unreachable: on this host's "
    "counters; local counter file broken: not counted at all).",
    ["backend"],
)


@dataclass(frozen=True, slots=True)
class Demand:
    """What one message asks of one entity's limits."""

    entity: Entity
    limits: Limits
    messages: int
    recipients: int

    @property
    def tokens(self) -> int:
        """What the demand takes from the entity's bucket."""
        return self.recipients if self.limits.rate_recipients else self.messages


@dataclass(frozen=True, slots=True)
class Excess:
    """The limit a demand would pass."""

    entity: Entity
    kind: str  # RATE, DAILY or DAILY_RECIPIENTS
    used: float  # of the limit, at the time of the check (for the log only)
    limit: float
    retry_after: float  # seconds until the demand could fit, as far as is known now


@dataclass(frozen=True, slots=True)
class Taken:
    """A receipt for one `take`, to give it back."""

    demands: tuple[Demand, ...]
    slot: int  # the window slot it was counted in
    backend: str  # which counters counted it (the fallback, when Redis was unreachable)


@dataclass(frozen=True, slots=True)
class Usage:
    messages: int
    recipients: int

    def ratio(self, limits: Limits) -> float:
        """The highest share used of the entity's daily quotas."""
        shares = [0.0]
        if limits.daily is not None:
            shares.append(self.messages / limits.daily if limits.daily else 1.0)
        if limits.daily_recipients is not None:
            shares.append(self.recipients / limits.daily_recipients if limits.daily_recipients else 1.0)
        return max(shares)


class Counters(Protocol):
    name: str

    def peek(self, demands: Sequence[Demand]) -> Excess | None: ...

    async def take(self, demands: Sequence[Demand]) -> Taken | Excess: ...

    async def give_back(self, taken: Taken) -> None: ...

    async def usage(self, entities: Sequence[Entity]) -> dict[Entity, Usage]: ...

    def problem(self) -> str | None:
        """None while the counters work; else what is wrong, for /readyz detail."""
        ...

    async def close(self) -> None: ...


# A clock this far behind the last time a bucket was computed has been stepped back (a
# smaller difference is workers reading the clock in one order and committing in another).
CLOCK_STEP = 1.0


def slot_of(now: float) -> int:
    return int(now // SLOT_SECONDS)


def window_totals(
    slot: int,
    messages: int,
    recipients: int,
    now: float,
    ring: Callable[[], tuple[Sequence[int], Sequence[int]]],
) -> tuple[int, int]:
    """Totals kept as of `slot`, seen at `now`: minus the slots that have left the window
    since (`ring()` gives the per-slot messages and recipients, indexed by slot % WINDOW_SLOTS;
    asked only when some slot has left)."""
    current = slot_of(now)
    if current <= slot:
        return messages, recipients  # same slot, or a clock that went back: nothing left
    passed = current - slot
    if passed >= WINDOW_SLOTS:
        return 0, 0
    ring_messages, ring_recipients = ring()
    start = (slot + 1) % WINDOW_SLOTS
    end = start + passed

    def left(counts: Sequence[int]) -> int:
        return sum(counts[start:end]) + (sum(counts[: end - WINDOW_SLOTS]) if end > WINDOW_SLOTS else 0)

    return messages - left(ring_messages), recipients - left(ring_recipients)


class CounterState:
    """One entity's counters: a token bucket and a ring of per-slot counts with totals.

    `advance` moves the window to the current slot, dropping the slots that fell out of it;
    totals are kept as running sums, so a check costs the same however busy the day was.
    Stored as a fixed header and the ring as packed pairs, which are only unpacked where a
    slot is touched (this runs on every message).
    """

    _HEADER = struct.Struct("<ddqqq")  # tokens, at, slot, messages, recipients
    _PAIR = struct.Struct("<qq")  # one slot: messages, recipients
    _RING = struct.Struct(f"<{2 * WINDOW_SLOTS}q")
    _SIZE = _HEADER.size + WINDOW_SLOTS * _PAIR.size
    __slots__ = ("tokens", "at", "slot", "messages", "recipients", "_ring")

    def __init__(self) -> None:
        self.tokens = math.nan  # a full bucket, whatever the burst turns out to be
        self.at = 0.0
        self.slot = 0
        self.messages = 0
        self.recipients = 0
        self._ring = bytearray(WINDOW_SLOTS * self._PAIR.size)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview | None) -> CounterState:
        if data is None or len(data) != cls._SIZE:
            return cls()
        state = cls.__new__(cls)
        state.tokens, state.at, state.slot, state.messages, state.recipients = cls._HEADER.unpack_from(data)
        state._ring = bytearray(memoryview(data)[cls._HEADER.size :])
        return state

    def to_bytes(self) -> bytes:
        return self._HEADER.pack(self.tokens, self.at, self.slot, self.messages, self.recipients) + self._ring

    def in_slot(self, slot: int) -> tuple[int, int]:
        """Messages and recipients counted in `slot` (if it is still in the ring)."""
        return self._PAIR.unpack_from(self._ring, (slot % WINDOW_SLOTS) * self._PAIR.size)

    def _set_slot(self, slot: int, messages: int, recipients: int) -> None:
        self._PAIR.pack_into(self._ring, (slot % WINDOW_SLOTS) * self._PAIR.size, messages, recipients)

    def advance(self, now: float, limits: Limits) -> None:
        current = slot_of(now)
        if current > self.slot:
            if current - self.slot >= WINDOW_SLOTS:
                self.messages = self.recipients = 0
                self._ring[:] = bytes(len(self._ring))
            else:
                # The ring entry a new slot reuses held the slot WINDOW_SLOTS earlier,
                # which has just left the window.
                for slot in range(self.slot + 1, current + 1):
                    messages, recipients = self.in_slot(slot)
                    if messages or recipients:
                        self.messages -= messages
                        self.recipients -= recipients
                        self._set_slot(slot, 0, 0)
            self.slot = current
        elif self.slot > current + 1:
            # The clock was stepped back (after a step forward, or a boot with a wrong RTC):
            # the window follows it back. What was counted meanwhile stays in the ring,
            # under the slots it reuses, and leaves the window within 24 h. (One slot of
            # slack: workers racing at a slot boundary are not a clock step.)
            self.slot = current
        if limits.rate is None:
            self.tokens, self.at = math.nan, now
            return
        if math.isnan(self.tokens):
            self.tokens = float(limits.burst)
        elif now > self.at:
            self.tokens = min(float(limits.burst), self.tokens + (now - self.at) * limits.rate.per_second)
        else:
            self.tokens = min(self.tokens, float(limits.burst))
        # A clock stepped back: refill from now on (keeping the tokens), rather than from a
        # time in the future that real time reaches only after the length of the step.
        self.at = now if now < self.at - CLOCK_STEP else max(self.at, now)

    def totals_at(self, now: float) -> tuple[int, int]:
        """The window's messages and recipients at `now`, without moving it: what `advance`
        would leave, read-only and in one unpack of the ring (usage runs this for every
        entity with a daily quota at each scrape)."""
        return window_totals(self.slot, self.messages, self.recipients, now, self._ring_counts)

    def _ring_counts(self) -> tuple[Sequence[int], Sequence[int]]:
        ring = self._RING.unpack_from(self._ring)
        return ring[0::2], ring[1::2]

    def excess(self, demand: Demand, now: float) -> Excess | None:
        """Whether `demand` would pass a limit (after `advance`)."""
        limits = demand.limits
        # More than the burst can never be in the bucket: such a demand waits for a full
        # bucket and leaves it in debt (`count`).
        needed = min(demand.tokens, limits.burst)
        if limits.rate is not None and needed and self.tokens < needed:
            wait = (needed - self.tokens) / limits.rate.per_second
            return Excess(demand.entity, RATE, self.tokens, limits.burst, wait)
        if limits.daily is not None and self.messages + demand.messages > limits.daily:
            return Excess(demand.entity, DAILY, self.messages, limits.daily, self._until_slot_ends(now))
        if limits.daily_recipients is not None and self.recipients + demand.recipients > limits.daily_recipients:
            return Excess(
                demand.entity, DAILY_RECIPIENTS, self.recipients, limits.daily_recipients, self._until_slot_ends(now)
            )
        return None

    def count(self, demand: Demand) -> None:
        if demand.limits.rate is not None:
            self.tokens -= demand.tokens
        messages, recipients = self.in_slot(self.slot)
        self._set_slot(self.slot, messages + demand.messages, recipients + demand.recipients)
        self.messages += demand.messages
        self.recipients += demand.recipients

    def uncount(self, demand: Demand, slot: int) -> None:
        """Give back what `count` took in `slot`, if that slot is still in the window."""
        if demand.limits.rate is not None and not math.isnan(self.tokens):
            self.tokens = min(float(demand.limits.burst), self.tokens + demand.tokens)
        if self.slot - slot >= WINDOW_SLOTS or slot > self.slot:
            return
        in_slot_messages, in_slot_recipients = self.in_slot(slot)
        messages = min(demand.messages, in_slot_messages)
        recipients = min(demand.recipients, in_slot_recipients)
        self._set_slot(slot, in_slot_messages - messages, in_slot_recipients - recipients)
        self.messages -= messages
        self.recipients -= recipients

    def _until_slot_ends(self, now: float) -> float:
        # The earliest the window can shrink is when the current slot ends.
        return max(0.0, (self.slot + 1) * SLOT_SECONDS - now)
