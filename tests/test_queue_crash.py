"""Crash safety of the spool, measured: `kill -9` a process that spools and delivers, at
random moments, several times over the same spool; then every acknowledged message must
reach the real upstream. Duplicates are allowed (at-least-once) and reported.

The process (tests/support/spool_worker.py) is the spool and delivery loop of the relay
without its SMTP edge; the end-to-end version through `relay serve` lives with the
pipeline's tests.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from relay.queue.runner import QueueRunner
from relay.queue.schedule import RetryPolicy
from relay.queue.store import Spool
from tests.support.upstream import Upstream

# Processes killed with SIGKILL: the process tier.
pytestmark = pytest.mark.e2e

ROUNDS = 6
PER_ROUND = 150
REPO = Path(__file__).resolve().parent.parent


def start_worker(root: Path, port: int, first: int) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.spool_worker", str(root), str(port), str(first), str(PER_ROUND)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    acked: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            if line.startswith("ACK "):
                acked.append(line.split()[1])

    threading.Thread(target=read, daemon=True).start()
    return proc, acked


def delivered_ids(upstream: Upstream) -> Counter:
    with upstream.lock:
        found = [re.search(rb"X-Spool-Test-Id: (\w+)", m.content) for m in upstream.messages]
    return Counter(m.group(1).decode() for m in found if m)


async def test_kill_9_at_random_moments_loses_no_acknowledged_message(tmp_path, upstream_factory=None):
    rng = random.Random(os.environ.get("RELAY_CRASH_SEED", "13"))
    root = tmp_path / "spool"
    acked_all: list[str] = []
    with Upstream() as upstream:
        for round_no in range(ROUNDS):
            proc, acked = start_worker(root, upstream.port, round_no * PER_ROUND)
            deadline = time.monotonic() + 60
            # Wait for the process to start acknowledging, then kill it at a random moment
            # in the middle of the load.
            while not acked and time.monotonic() < deadline and proc.poll() is None:
                await asyncio.sleep(0.02)
            await asyncio.sleep(rng.uniform(0.0, 1.5))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            await asyncio.sleep(0.1)  # let the reader thread take the last lines
            acked_all += acked

        # Restart on the same spool: whatever is left, including the journal segments of the
        # killed processes, is delivered.
        spool = Spool(root)
        spool.open()
        from tests.test_queue_delivery import make_delivery  # the same real upstream delivery

        delivery = make_delivery(upstream)
        from relay.route.router import Router

        router = Router(delivery)
        runner = QueueRunner(
            spool,
            lambda: router,
            RetryPolicy([0.2], max_age=3600, jitter=0.0),
            hostname="relay.test",
            scan_interval=0.2,
        )
        runner.start()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if set(acked_all) <= set(delivered_ids(upstream)) and not spool.scan({}).entries:
                break
            await asyncio.sleep(0.2)
        await runner.stop(5)
        await delivery.close()
        await spool.close()

        counts = delivered_ids(upstream)
        missing = sorted(set(acked_all) - set(counts))
        duplicates = sum(n - 1 for n in counts.values() if n > 1)
        print(
            f"\ncrash test: {ROUNDS} kill -9, {len(acked_all)} acknowledged, {sum(counts.values())} "
            f"delivered, {duplicates} duplicates ({duplicates / max(1, len(counts)):.2%} of messages)"
        )
        assert acked_all, "the worker acknowledged nothing"
        assert not missing, f"acknowledged but never delivered: {missing[:10]} ({len(missing)})"
        assert not list((root / "corrupt").iterdir())
        with upstream.lock:
            assert {m.mail_from for m in upstream.messages} == {"app@example.com"}  # no failure reports
