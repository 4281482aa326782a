"""Several worker processes on one host: `relay serve --workers N`.

One asyncio loop uses one core, so N workers each run a complete relay (their own loop,
upstream pools and secret refresh) and share the listening ports with SO_REUSEPORT: the
kernel spreads new connections across them. Nothing else is shared: a message lives in one
worker from connect to the upstream's reply, so there is no state to coordinate.

The supervisor imports the relay's code once and forks the workers from it, after
`gc.freeze()`, so the modules' memory stays shared copy-on-write between them (about half
of a worker's footprint).

Metrics stay correct across workers with prometheus-client's multiprocess mode: every
worker writes its samples to files in one directory and whichever worker answers
/metrics aggregates all of them (counters summed, live gauges of dead workers dropped).
The directory must be set before prometheus-client is first imported, which is why the
supervisor sets it before it loads anything else.

The supervisor only starts, restarts and signals workers: SIGTERM and SIGHUP are passed on
(each worker drains or reloads by itself, also one still starting: relay.startup_signals),
SIGINT as SIGTERM (a terminal's Ctrl-C reaches the workers too, and they ignore it: one
stop, one drain; a second Ctrl-C is a second SIGTERM, an exit at once); a worker that dies
unexpectedly is restarted after a short, growing pause; a worker that exits with a config
error (2) is not.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from relay import startup_signals

RESTART_PAUSE_MAX = 30.0
EXIT_CONFIG = 2
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _stop_with(supervisor: int) -> None:
    """In a worker: a SIGTERM (a drain) when the supervisor dies, even of SIGKILL, so that no
    worker goes on serving unsupervised, on ports its replacement then shares (SO_REUSEPORT).
    Linux's PR_SET_PDEATHSIG; elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() != supervisor:  # it died before the prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def supervise(workers: int, run_worker: Callable[[int], int]) -> int:
    """Run `run_worker(index)` in `workers` forked processes until they stop; returns the
    exit code. The worker function gets its settings as arguments, not from the environment:
    only PROMETHEUS_MULTIPROC_DIR is set here, because prometheus-client reads it."""
    children: dict[int, int] = {}  # pid → worker index
    supervisor = os.getpid()
    stopping = False
    pauses = [0.0] * workers

    def start(index: int) -> None:
        # Signals wait while a worker is forked: the supervisor passes them on only to the
        # workers it knows of, and a new worker must not run the supervisor's handler.
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            pid = os.fork()
            if pid == 0:  # the worker
                _stop_with(supervisor)
                # It records signals until its relay runs and acts on them, rather than
                # dying of them while it starts; SIGINT is the supervisor's (relay.startup_signals).
                startup_signals.hold(worker=True)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
                code = 1
                try:
                    code = run_worker(index)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            children[pid] = index
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)
            except ProcessLookupError:
                pass

    for signum in FORWARDED:
        signal.signal(signum, forward)
    # A stop before this point (relay.startup_signals): no worker starts. A reload needs
    # nothing: the workers read the config when they start.
    if startup_signals.take().stop:
        stopping = True
    multiproc_dir = Path(tempfile.mkdtemp(prefix="relay-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc_dir)

    # Preload everything a worker imports, then fork: the workers share these pages.
    import relay.server  # noqa: F401

    gc.collect()
    gc.freeze()

    codes: list[int] = []

    def cannot_start(index: int, exc: OSError) -> None:
        # fork() refused (EAGAIN: a process limit; ENOMEM): the workers already running are
        # stopped rather than left serving unsupervised, and the supervisor exits 1.
        nonlocal stopping
        print(f"relay: cannot start worker {index}: {exc.strerror or exc}; stopping", file=sys.stderr, flush=True)
        codes.append(1)
        if not stopping:
            stopping = True
            forward(signal.SIGTERM, None)

    try:
        for index in range(workers):
            if stopping:  # a stop while the others started: passed on to them, none more
                break
            try:
                start(index)
            except OSError as exc:
                cannot_start(index, exc)
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if pid not in children:
                continue
            index = children.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            _mark_dead(pid, multiproc_dir)
            if stopping or code == EXIT_CONFIG:
                codes.append(code)
                if code == EXIT_CONFIG and not stopping:
                    stopping = True
                    forward(signal.SIGTERM, None)
                continue
            pauses[index] = min(RESTART_PAUSE_MAX, max(1.0, pauses[index] * 2))
            print(
                f"relay: worker {index} exited with {code}; restarting in {pauses[index]:g}s",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(pauses[index])
            if not stopping:  # a stop during the pause was passed on to the others only
                try:
                    start(index)
                except OSError as exc:
                    cannot_start(index, exc)
    finally:
        shutil.rmtree(multiproc_dir, ignore_errors=True)
    # Every worker is gone: nothing to pass a signal on to, and one now must not change the
    # exit status (the interpreter's exit puts the default actions back for Python handlers).
    startup_signals.ignore_until_exit()
    if EXIT_CONFIG in codes:
        # The others were stopped because of it.
        return EXIT_CONFIG
    return max(codes, default=0) if all(c >= 0 for c in codes) else 1


def _mark_dead(pid: int, directory: Path) -> None:
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
    except OSError:
        pass
