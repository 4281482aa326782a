"""Wall-clock time for rotation: the current UTC time and a way to wait.

Rotation steps are days apart and their dates are stored in the key-set document, so they
are UTC wall-clock times (not monotonic). Tests pass a clock whose `sleep` advances `now`.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
