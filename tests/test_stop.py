"""Relay.stop ends the relay's own tasks even when one lets a cancellation go by.

Python 3.11's asyncio.wait_for (dnspython waits with it) returns the awaited
result instead of raising when the cancellation lands just as that operation completes; the
posture monitor, cancelled that way under load, kept checking, and the relay never exited
on SIGTERM.
"""

from __future__ import annotations

import asyncio


async def test_stop_ends_a_task_that_let_its_first_cancellation_go_by(make_loop_relay, upstream):
    relay = make_loop_relay(upstream.port, start=False)
    await relay.astart()
    cancellations = 0

    async def checks_forever() -> None:
        nonlocal cancellations
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                cancellations += 1
                if cancellations == 1:
                    continue  # what wait_for does with a cancellation that lands late
                raise

    relay.relay._tasks.append(asyncio.create_task(checks_forever()))  # beside its own tasks
    await asyncio.sleep(0.1)
    stopping = asyncio.create_task(relay.astop())
    done, _ = await asyncio.wait({stopping}, timeout=60)  # bounded: before the fix, for ever
    assert done, "stop is still waiting for the task"
    assert cancellations == 2


async def test_stop_ends_background_work_that_lets_its_first_cancellation_go_by(make_loop_relay, upstream):
    """Upstream aborts and "relayed" notices outlive their session (relay.pipeline); the ones
    still running at the stop are cancelled, and one that lets it go by is cancelled again."""
    from relay.pipeline import _in_background

    relay = make_loop_relay(upstream.port, start=False)
    await relay.astart()
    cancellations = 0

    async def notice_that_goes_on() -> None:
        nonlocal cancellations
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                cancellations += 1
                if cancellations == 1:
                    continue
                raise

    _in_background(notice_that_goes_on())
    await asyncio.sleep(0.1)
    stopping = asyncio.create_task(relay.astop())
    done, _ = await asyncio.wait({stopping}, timeout=60)  # bounded: before the fix, for ever
    assert done, "stop is still waiting for the background work"
    assert cancellations == 2
