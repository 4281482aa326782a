"""Ending tasks at a stop, a drain's end or a close: cancelled, awaited, within a bound.

One cancellation is not always enough. Python 3.11's `asyncio.wait_for` (aiosmtplib reads
every upstream reply with it, dnspython waits with it) returns the awaited result instead of
raising when the cancellation lands just as that operation completes; the task then carries
on, and a `task.cancel(); await task` waits for as long as it runs (a loop: for ever).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("relay")

CANCEL_RETRY_S = 1.0  # how long a cancelled task may take before it is cancelled again
CANCEL_TIMEOUT_S = 10.0  # how long a stop waits for its cancelled tasks before it goes on


async def cancel_and_wait(
    tasks: Iterable[asyncio.Future[Any]], timeout: float = CANCEL_TIMEOUT_S
) -> set[asyncio.Future[Any]]:
    """Cancel `tasks` and wait until they have ended, cancelling again every CANCEL_RETRY_S
    while one runs, for at most `timeout` seconds. Returns those still running then (logged:
    a task that ignores every cancellation is a bug, and the stop must not hang on it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            break
        _done, pending = await asyncio.wait(pending, timeout=min(CANCEL_RETRY_S, left))
    if pending:
        names = sorted(t.get_name() if isinstance(t, asyncio.Task) else repr(t) for t in pending)
        log.warning("tasks still running after being cancelled", extra={"tasks": names, "timeout_s": timeout})
    return pending
