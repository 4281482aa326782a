"""relay.cancel.cancel_and_wait: a task that lets a cancellation go by is cancelled again,
and a stop never waits on a task for longer than its bound."""

from __future__ import annotations

import asyncio
import sys

from relay.cancel import cancel_and_wait


async def test_a_task_whose_wait_for_returned_instead_of_raising_is_cancelled_again():
    """Python 3.11's asyncio.wait_for returns the result when the cancellation lands in the
    same loop step as the reply (as aiosmtplib reads every upstream reply): the task goes on."""
    loop = asyncio.get_running_loop()
    replies: list[asyncio.Future[str]] = []
    went_on = 0

    async def reads_replies() -> None:
        nonlocal went_on
        while True:
            replies.append(loop.create_future())
            await asyncio.wait_for(replies[-1], 60)
            task = asyncio.current_task()
            assert task is not None
            if task.cancelling():  # cancelled, and still here: wait_for let it go by
                went_on += 1

    task = asyncio.create_task(reads_replies())
    await asyncio.sleep(0)  # waiting for its first reply
    replies[-1].set_result("250 OK")  # the reply arrives in the step the cancellation lands in
    still_running = await cancel_and_wait({task}, timeout=60)
    assert not still_running and task.cancelled()
    if sys.version_info < (3, 12):  # 3.12's wait_for raises (asyncio.timeout underneath)
        assert went_on == 1  # the case this guards against did happen


async def test_a_task_that_ignores_every_cancellation_is_left_after_the_bound(caplog):
    stop = asyncio.Event()

    async def ignores_cancellation() -> None:
        while not stop.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(ignores_cancellation(), name="stubborn")
    await asyncio.sleep(0)  # inside its loop
    still_running = await cancel_and_wait({task}, timeout=0.2)
    assert still_running == {task}
    assert any(getattr(r, "tasks", None) == ["stubborn"] for r in caplog.records)
    stop.set()
    await asyncio.wait({task}, timeout=10)


async def test_done_and_ending_tasks_need_no_wait():
    done = asyncio.create_task(asyncio.sleep(0))
    await done
    sleeping = asyncio.create_task(asyncio.sleep(60))
    assert await cancel_and_wait({done, sleeping}) == set()
    assert sleeping.cancelled() and not done.cancelled()
