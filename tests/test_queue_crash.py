"""Crash safety of the spool, measured: `kill -9` a process that spools and delivers, at
random moments, several times over the same spool; then every acknowledged message must
reach the real upstream. Duplicates are allowed (at-least-once) and reported.

The process (tests/support/spool_worker.py) is the spool and delivery loop of the relay
without its SMTP edge; the end-to-end version through `relay serve` lives with the
pipeline's tests.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from relay.queue import admin
from relay.queue.runner import QueueRunner
from relay.queue.schedule import RetryPolicy
from relay.queue.store import Spool
from tests.support.upstream import Upstream
from tests.test_queue_delivery import Harness, eventually

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


# -- journal replay vs removals by others (review of the spool: each failed before its fix) --
WRITER = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    from relay.queue.entry import QueueEntry, RecipientState
    from relay.queue.store import Spool

    async def main(root, count):
        spool = Spool(Path(root)); spool.open()
        spool.journal.checkpoint_interval = float(sys.argv[3])
        for n in range(count):
            e = QueueEntry(id=f"w{n:04d}", mail_from="app@example.com",
                           recipients=[RecipientState("x@example.net")], created=time.time())
            held = await spool.put(e, b"From: app@example.com\\r\\nSubject: x\\r\\n\\r\\nbody\\r\\n")
            held.release()          # as QueueRunner.submit does when the runner is busy
            print("ACK", e.id, flush=True)
        print("DONE", flush=True)
        await asyncio.sleep(60)   # wait for kill -9

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


def start_writer(root: Path, count: int, checkpoint: float = 3600.0) -> tuple[subprocess.Popen, list[str]]:
    """A process that spools `count` entries and waits to be killed; checkpoint=3600 pins
    "killed before its segment is retired"."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), str(count), str(checkpoint)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    acked = []
    for line in proc.stdout:
        if line.startswith("ACK"):
            acked.append(line.split()[1])
        if line.startswith("DONE"):
            break
    return proc, acked


@pytest.fixture
def upstream():
    with Upstream() as up:
        yield up


@pytest.fixture
async def harness(tmp_path, upstream):
    made: list[Harness] = []

    def make(**kwargs) -> Harness:
        made.append(Harness(tmp_path / "spool", upstream, **kwargs))
        return made[-1]

    yield make
    for h in made:
        await h.close()


async def test_replay_never_resurrects_an_entry_another_worker_delivered(tmp_path):
    """Worker A accepted X and is killed within its segment's life; before, the replay read
    "X missing" as "lost" and brought back what worker B had delivered. Now B cannot take
    X while A's live segment vouches for it, and after A's death a missing X (the same boot:
    the page cache kept every write) is not restored."""
    root = tmp_path / "spool"
    writer, acked = start_writer(root, 1)
    try:
        assert acked == ["w0000"]
        b = Spool(root)
        b.open()
        assert b.lock("w0000") is None  # A's journal keeps it
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        held = b.lock("w0000")
        assert held is not None
        b.remove(held)  # delivered by B
        held.release()
        a2 = Spool(root)
        a2.open()
        assert not a2.path("w0000").exists(), "resurrected"
        assert not list((root / "journal").glob("*.log"))
        await a2.close()
        await b.close()
    finally:
        writer.kill()


async def test_a_deleted_message_does_not_come_back_after_a_kill(tmp_path):
    root = tmp_path / "spool"
    writer, acked = start_writer(root, 1)
    try:
        cli = Spool(root, journal=False)  # what `relay queue delete ID` builds
        with pytest.raises(admin.QueueCommandError, match="being delivered"):
            admin.delete(cli, "w0000", wait=0.2)  # its segment still vouches for it
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        admin.delete(cli, "w0000", wait=5)
        a2 = Spool(root)
        a2.open()
        assert not a2.path("w0000").exists(), "the deleted message is back"
        await a2.close()
    finally:
        writer.kill()


async def test_replay_during_a_restart_race_does_not_deliver_twice(tmp_path, upstream, harness):
    """--workers 2 after a kill -9: one worker holds the dead segment (replaying it) while
    the other delivers; before, the first then restored all it found missing: every
    acknowledged message delivered twice."""
    root = tmp_path / "spool"
    writer, acked = start_writer(root, 20)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    (segment,) = list((root / "journal").glob("*.log"))
    fd = os.open(segment, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # worker 1, inside its replay
    w2 = harness()
    w2.runner.start()
    await eventually(lambda: len(upstream.messages) == 20, what="worker 2 delivers all 20")
    await eventually(lambda: not list((root / "entries").glob("w*")), what="spool empty")
    os.close(fd)
    w1 = harness()
    w1.runner.start()
    await asyncio.sleep(1.5)
    assert not list((root / "journal").glob("*.log"))  # replayed
    assert len(upstream.messages) == 20
