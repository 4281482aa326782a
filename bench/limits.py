"""Cost of sending limits per message, without SMTP: one RCPT check and one DATA reservation
(user and domain, rate and daily quotas) against the local counters (LMDB in a temporary
directory) and against a redis-server started on a loopback port.

    .venv/bin/python bench/limits.py [--messages 20000] [--concurrency 20] [--processes 2]

Prints the CPU time the relay process spends per message (µs; Redis's own CPU is not
included: in production it runs elsewhere), alone or with several processes sharing one
counter file, and for Redis the round trips per message. Bounded: --messages per run.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.limits.limiter import Limiter  # noqa: E402
from relay.limits.local import LocalCounters  # noqa: E402
from relay.limits.rules import LimitPolicy, Limits, parse_rate  # noqa: E402


class _Policy(LimitPolicy):
    """Generous limits that every message passes: the cost measured is the check itself."""

    def __init__(self) -> None:
        self._limits = Limits(rate=parse_rate("1000000/s"), burst=1_000_000, daily=10**9, daily_recipients=10**9)

    def for_user(self, username):
        return self._limits if username else None

    def for_domain(self, domain):
        return self._limits if domain else None


async def run(counters, messages: int, concurrency: int) -> float:
    limiter = Limiter(_Policy(), counters)
    queue = iter(range(messages))

    async def session(index: int) -> None:
        for _ in queue:
            limiter.check_recipient(f"user{index % 4}", 0)
            await limiter.reserve(f"user{index % 4}", "example.com", 1)

    started = time.process_time()
    await asyncio.gather(*(session(i) for i in range(concurrency)))
    return (time.process_time() - started) / messages * 1e6


def _local_worker(directory: str, messages: int, concurrency: int, out) -> None:
    async def main() -> float:
        counters = LocalCounters(Path(directory))
        try:
            return await run(counters, messages, concurrency)
        finally:
            await counters.close()

    out.put(asyncio.run(main()))


def local_processes(directory: Path, processes: int, messages: int, concurrency: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_local_worker, args=(str(directory), messages, concurrency, out)) for _ in range(processes)
    ]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(60)
    return statistics.mean(results)


async def redis_run(url: str, directory: Path, messages: int, concurrency: int) -> tuple[float, float]:
    from relay.limits.redis_counters import RedisCounters

    counters = RedisCounters(url, fallback=LocalCounters(directory), key_prefix="bench:")
    try:
        await run(counters, 100, 1)  # load the script
        before = counters.round_trips
        cost = await run(counters, messages, concurrency)
        return cost, (counters.round_trips - before) / messages
    finally:
        await counters.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="relay-bench-limits-"))
    try:
        for rep in range(args.reps):
            directory = work / f"local-{rep}"
            local = asyncio.run(_one_local(directory, args.messages, args.concurrency))
            shared = local_processes(work / f"procs-{rep}", args.processes, args.messages, args.concurrency)
            print(
                f"rep {rep + 1}: local, 1 process: {local:.1f} µs CPU/msg;  "
                f"local, {args.processes} processes on one file: {shared:.1f} µs CPU/msg each",
                flush=True,
            )
        redis_server = shutil.which("redis-server")
        if redis_server is None:
            print("redis-server not installed: skipping the Redis figures")
            return
        port = _free_port()
        proc = subprocess.Popen(
            [
                redis_server,
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(work),
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            _wait(port)
            for rep in range(args.reps):
                cost, trips = asyncio.run(
                    redis_run(f"redis://127.0.0.1:{port}/0", work / f"fallback-{rep}", args.messages, args.concurrency)
                )
                print(f"rep {rep + 1}: redis (loopback): {cost:.1f} µs CPU/msg, {trips:.2f} round trips/msg")
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _one_local(directory: Path, messages: int, concurrency: int) -> float:
    counters = LocalCounters(directory)
    try:
        return await run(counters, messages, concurrency)
    finally:
        await counters.close()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(port: int) -> None:
    import socket

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("redis-server did not start")


if __name__ == "__main__":
    main()
