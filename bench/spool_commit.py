"""Spool writes per second: the journal's group commit against fsyncs of each entry file.

N concurrent writers (like N SMTP sessions at their final dot) each put 10 KB entries into
a spool on the given filesystem; a writer counts a message only once `Spool.put` returned,
i.e. after the sync that makes it durable. Three ways of making it durable:

- `fsync/message`: each entry file fsynced, then its directory (chasquid, Postfix);
- `grouped files`: each entry file fsynced in parallel, one directory fsync per batch;
- `journal`: entry files unsynced, one fdatasync of the journal per batch (the default).

Prints msgs/s, p50/p99 put latency, and the mean batch size (messages per sync). Bounded
by --messages.

    .venv/bin/python bench/spool_commit.py --dir /var/tmp --writers 1 20 100
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from relay.queue.commit import GroupCommitter
from relay.queue.entry import QueueEntry, RecipientState
from relay.queue.store import Spool

MODES = {
    "fsync/message": {"journal": False, "group": False},
    "grouped files": {"journal": False, "group": True},
    "journal": {"journal": True, "group": True},
}


async def run(root: Path, writers: int, messages: int, size: int, mode: str, deliver: bool) -> dict:
    spool = Spool(root, committer=GroupCommitter(group=MODES[mode]["group"]), journal=MODES[mode]["journal"])
    spool.open()
    body = b"Subject: bench\r\n\r\n" + os.urandom(size // 2).hex().encode()[:size]
    latencies: list[float] = []
    counter = iter(range(messages))

    async def writer() -> None:
        for n in counter:
            entry = QueueEntry(
                id=f"b{n:08d}",
                mail_from="app@example.com",
                recipients=[RecipientState("to@example.net")],
                created=time.time(),
            )
            started = time.perf_counter()
            held = await spool.put(entry, body)
            latencies.append(time.perf_counter() - started)
            if deliver:
                spool.remove(held)  # as if the upstream took it at once
            held.release()

    started = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    elapsed = time.perf_counter() - started
    counts = spool.journal or spool.committer
    await spool.close()
    latencies.sort()
    return {
        "msgs_s": messages / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "batch": counts.writes / max(1, counts.batches),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="filesystem to test (a spool is made inside)")
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 20, 100])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--size", type=int, default=10240)
    parser.add_argument(
        "--deliver",
        action="store_true",
        help="remove each entry right after its put (an upstream that answers at once); "
        "without it, every entry stays (an upstream outage)",
    )
    args = parser.parse_args()
    print(f"{'writers':>7} {'mode':<16} {'msgs/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'msgs/sync':>16}")
    for writers in args.writers:
        for mode in MODES:
            root = Path(tempfile.mkdtemp(prefix="spool-bench-", dir=args.dir))
            try:
                r = asyncio.run(run(root, writers, args.messages, args.size, mode, args.deliver))
            finally:
                shutil.rmtree(root, ignore_errors=True)
            print(
                f"{writers:>7} {mode:<16} {r['msgs_s']:>8.0f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} "
                f"{r['batch']:>16.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
