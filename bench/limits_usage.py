"""Cost of one read of `relay_limit_usage_ratio` from Redis (what each worker does at most
every 10 s when Prometheus scrapes): the relay's CPU per read, and Redis's.

    .venv/bin/python bench/limits_usage.py [--users 3000] [--reads 5] [--profile]

Fills Redis (a redis-server started on a loopback port) with `--users` users, each counted
in 8 slots spread over a day, then reads their usage with the day's clock at several idle
times after the last count (the window has moved by then, so the read must look at the
slots that left it). Prints, per idle time, the median relay CPU ms per read (process time,
the event loop's thread included) and Redis's main-thread CPU ms per read (INFO cpu: the
commands and the I/O of reading and answering them). Bounded:
--users x --reads reads.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.limits.counters import Demand  # noqa: E402
from relay.limits.local import LocalCounters  # noqa: E402
from relay.limits.redis_counters import RedisCounters  # noqa: E402
from relay.limits.rules import SLOT_SECONDS, USER, Entity, Limits  # noqa: E402
from tests.support.procs import free_port, wait_port  # noqa: E402

DAY0 = 1_800_000_000.0  # a fixed day, aligned to nothing in particular
IDLE_HOURS = (0.0, 6.0, 23.0)


class Clock:
    def __init__(self) -> None:
        self.now = DAY0

    def __call__(self) -> float:
        return self.now


def redis_cpu_ms(port: int) -> float:
    """CPU time of Redis's main thread so far (INFO cpu): the commands, and reading and
    answering them (which INFO commandstats leaves out)."""
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "cpu"], capture_output=True, text=True, check=True)
    fields = dict(line.split(":", 1) for line in out.stdout.splitlines() if ":" in line)
    return (float(fields["used_cpu_user_main_thread"]) + float(fields["used_cpu_sys_main_thread"])) * 1000


async def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="relay-usage-bench-"))
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=workdir,
    )
    clock = Clock()
    counters = RedisCounters(
        f"redis://127.0.0.1:{port}/0", fallback=LocalCounters(workdir / "limits"), clock=clock, timeout=10
    )
    try:
        wait_port("127.0.0.1", port, 10, proc=server)
        limits = Limits(daily=1000, daily_recipients=10000)
        entities = [Entity(USER, f"user{i:05d}") for i in range(args.users)]
        # 8 slots counted over the day before DAY0 + 24 h.
        for hour in range(0, 24, 3):
            clock.now = DAY0 + hour * 3600
            for entity in entities:
                await counters.take([Demand(entity, limits, 1, 2)])
        last = clock.now
        print(f"{args.users} users, each counted in 8 slots over a day; {args.reads} reads per idle time")
        print("idle after last count   relay CPU ms/read (median)   redis CPU ms/read (median)")
        for idle in IDLE_HOURS:
            clock.now = last + idle * 3600 + SLOT_SECONDS / 2
            cpu, busy = [], []
            profile = cProfile.Profile() if args.profile else None
            for _ in range(args.reads):
                before_ms = redis_cpu_ms(port)
                started = time.process_time()
                if profile is not None:
                    profile.enable()
                usage = await counters.usage(entities)
                if profile is not None:
                    profile.disable()
                cpu.append((time.process_time() - started) * 1000)
                busy.append(redis_cpu_ms(port) - before_ms)
                assert len(usage) == args.users
            median_cpu, median_busy = statistics.median(cpu), statistics.median(busy)
            print(f"{idle:5.1f} h {median_cpu:30.1f} {median_busy:28.1f}")
            if profile is not None:
                pstats.Stats(profile).sort_stats("cumulative").print_stats(12)
    finally:
        await counters.close()
        server.terminate()
        server.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--reads", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="cProfile the reads and print the top entries")
    asyncio.run(main(parser.parse_args()))
