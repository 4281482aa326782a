"""A task that lets its first cancellation go by, as Python 3.11's asyncio.wait_for does
with one that lands just as the awaited operation completes (relay.cancel says why it
matters); the second cancellation ends it.

    late = LateCancel()
    task = asyncio.create_task(late.run())
    ...                                   # whatever must end it: a stop, a close
    assert late.cancellations == 2
"""

from __future__ import annotations

import asyncio

from relay.cancel import cancel_and_wait


class LateCancel:
    def __init__(self) -> None:
        self.cancellations = 0
        self.running = False
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> asyncio.Task[None]:
        """The task, once it runs (a task cancelled before its first step never sees it)."""
        self.task = asyncio.create_task(self.run())
        while not self.running:
            await asyncio.sleep(0)
        return self.task

    async def end(self) -> None:
        """In a test's `finally`: a task the code under test left running ends here, rather
        than hang the close of the test's loop (which cancels it once)."""
        if self.task is not None and not self.task.done():
            await cancel_and_wait({self.task}, timeout=10)

    async def run(self) -> None:
        self.running = True
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                self.cancellations += 1
                if self.cancellations == 1:
                    continue  # what wait_for does with a cancellation that lands late
                raise
