"""A process that spools messages and delivers them, for crash tests (`kill -9` at any time).

    python -m tests.support.spool_worker SPOOL_DIR UPSTREAM_PORT FIRST COUNT

Spools COUNT messages (ids FIRST…) from 20 concurrent writers while a QueueRunner delivers
them to the upstream on 127.0.0.1:UPSTREAM_PORT, and prints `ACK <id>` once each put has
returned (i.e. when a client would have got its 250). The message carries its id in
`X-Spool-Test-Id`, so the upstream's copies can be matched to the acknowledgements.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path


async def main(root: Path, port: int, first: int, count: int) -> None:
    from relay.deliver.smarthost import SmarthostTarget
    from relay.queue.entry import QueueEntry, RecipientState
    from relay.queue.runner import QueueRunner
    from relay.queue.schedule import RetryPolicy
    from relay.queue.store import Spool
    from relay.route.router import Router
    from tests.support.upstream import plain_upstream_pool

    connector, pool = plain_upstream_pool(port, timeout=10.0, max_connections=8, idle_timeout=30.0)
    router = Router(SmarthostTarget("up", connector, pool))
    spool = Spool(root)
    spool.open()
    runner = QueueRunner(
        spool, lambda: router, RetryPolicy([0.2], max_age=3600, jitter=0.0), hostname="relay.test", scan_interval=0.3
    )
    runner.start()
    ids = iter(range(first, first + count))

    async def writer() -> None:
        for n in ids:
            entry_id = f"c{n:07d}"
            message = (
                f"From: app@example.com\r\nTo: x@example.net\r\nX-Spool-Test-Id: {entry_id}\r\n"
                f"Subject: crash test\r\n\r\n" + "body line\r\n" * 200
            ).encode()
            entry = QueueEntry(
                id=entry_id,
                mail_from="app@example.com",
                recipients=[RecipientState("x@example.net")],
                created=time.time(),
            )
            held = await spool.put(entry, message)
            print(f"ACK {entry_id}", flush=True)
            runner.submit(held, entry, message)

    await asyncio.gather(*(writer() for _ in range(20)))
    while runner.inflight:
        await asyncio.sleep(0.05)
    print("DONE", flush=True)
    await asyncio.sleep(3600)  # wait to be killed


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
