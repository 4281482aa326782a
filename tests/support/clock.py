"""A wall clock for rotation tests (`relay.rotate.clock.Clock`): `sleep` advances `now` at
once and then runs `on_sleep`, which is how a test acts "meanwhile" (makes DNS catch up,
checks that nothing switched yet)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

T0 = datetime(2026, 11, 16, 9, 0, tzinfo=UTC)
DAY = timedelta(days=1)


class StepClock:
    def __init__(self, start: datetime = T0) -> None:
        self.t = start
        self.on_sleep: Callable[[], None] | None = None
        self.sleeps = 0

    def now(self) -> datetime:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)
        self.sleeps += 1
        if self.on_sleep is not None:
            self.on_sleep()
