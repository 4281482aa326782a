"""Several worker processes on one host: `relay serve --workers N`.

One asyncio loop uses one core, so N workers each run a complete relay (their own loop,
upstream pools and secret refresh) and share the listening ports with SO_REUSEPORT: the
kernel spreads new connections across them. Nothing else is shared: a message lives in one
worker from connect to the upstream's reply, so there is no state to coordinate.

Metrics stay correct across workers with prometheus-client's multiprocess mode: every
worker writes its samples to files in one directory and whichever worker answers
/metrics aggregates all of them (counters summed, live gauges of dead workers dropped).

The supervisor only starts, restarts and signals workers: SIGTERM and SIGHUP are passed on
(each worker drains or reloads by itself); a worker that dies unexpectedly is restarted
after a short, growing pause.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESTART_PAUSE_MAX = 30.0


def supervise(workers: int, config: str | None) -> int:
    multiproc_dir = Path(tempfile.mkdtemp(prefix="relay-metrics-"))
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir), "RELAY_REUSE_PORT": "1"}
    argv = [sys.executable, "-m", "relay", "serve", "--workers", "1"] + (["-c", config] if config else [])
    procs: dict[int, subprocess.Popen] = {}
    stopping = False
    pauses = [0.0] * workers

    def start(index: int) -> None:
        procs[index] = subprocess.Popen(argv, env={**env, "RELAY_WORKER": str(index)})  # noqa: S603 - our own interpreter

    def forward(signum, _frame) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    for index in range(workers):
        start(index)
    codes: dict[int, int] = {}
    try:
        while procs:
            time.sleep(0.2)
            for index, proc in list(procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                _mark_dead(proc.pid, multiproc_dir)
                if stopping or code == 2:  # 2: a config error, restarting cannot help
                    codes[index] = code
                    del procs[index]
                    continue
                pauses[index] = min(RESTART_PAUSE_MAX, max(1.0, pauses[index] * 2))
                print(f"relay: worker {index} exited with {code}; restarting in {pauses[index]:g}s",
                      file=sys.stderr, flush=True)
                time.sleep(pauses[index])
                start(index)
    finally:
        shutil.rmtree(multiproc_dir, ignore_errors=True)
    return max(codes.values(), default=0)


def _mark_dead(pid: int, directory: Path) -> None:
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid, str(directory))
    except OSError:
        pass
