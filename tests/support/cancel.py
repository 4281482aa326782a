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


class LateCancel:
    def __init__(self) -> None:
        self.cancellations = 0

    async def run(self) -> None:
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                self.cancellations += 1
                if self.cancellations == 1:
                    continue  # what wait_for does with a cancellation that lands late
                raise
