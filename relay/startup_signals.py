"""Signals that reach `relay serve` outside its event loop: while it starts, and while it exits.

A process starts with the default action for SIGHUP and SIGTERM: to die. Loading secrets,
fetching tokens or scanning the spool takes a moment, and a config-management tool that
reloads right after a deploy, or an orchestrator that stops what it has just started, would
kill the relay half-started (a worker of `--workers N` would be restarted, a single process
just dies). From its first step (`relay.__main__`, before the command line's slow imports)
`relay serve` records these signals instead, and the running relay acts on them once its own
handlers are in place (`relay.server.serve`):

- SIGHUP: a reload then, since the config may have changed after it was read (one that
  arrives before the config is read changes nothing: `config_read()` forgets it);
- SIGTERM or SIGINT: a drain at once, which, with no session yet, is a clean stop (exit 0);
  a second one exits at once (1), as it does while running.

A worker of `--workers N` takes SIGTERM only: a terminal's Ctrl-C reaches every process of
its group, the supervisor passes it on as SIGTERM, and a worker that counted both would take
them for a second stop signal (an exit without a drain).

Once the relay has stopped, the three are ignored until the process is gone
(`hold_until_exit`, `ignore_until_exit`): closing the event loop puts their default actions
back, and a SIGHUP during the interpreter's exit would turn a clean stop (0) into 129.

Only the main thread runs these handlers (Python's rule), between two steps of the start.
This module imports only `os` and `signal`: it runs before anything else is loaded.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
WORKER_STOP_SIGNALS = (signal.SIGTERM,)
HANDLED = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


class Requested:
    def __init__(self) -> None:
        self.reload = False
        self.stop = False


_requested = Requested()
_holder: int | None = None  # the process whose record `_requested` is (a fork starts its own)
_stop_signals: tuple[signal.Signals, ...] = STOP_SIGNALS


def hold(*, worker: bool = False) -> None:
    """Record SIGHUP and the stop signals from now on. Called again in the same process, the
    record is kept (`relay.__main__` and then `relay serve` call it); in a forked worker
    (`worker=True`) it starts over, and SIGINT is left to the supervisor."""
    global _requested, _holder, _stop_signals
    if _holder != os.getpid():
        _requested, _holder = Requested(), os.getpid()
    _stop_signals = WORKER_STOP_SIGNALS if worker else STOP_SIGNALS
    signal.signal(signal.SIGHUP, _on_reload)
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_stop if signum in _stop_signals else signal.SIG_IGN)


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop this process: SIGTERM and SIGINT, or SIGTERM alone in a worker."""
    return _stop_signals


def config_read() -> None:
    """Called just before the config is read: a reload requested until now is not needed."""
    _requested.reload = False


def take() -> Requested:
    """What was requested while the relay started; called once its own handlers are in place
    (a signal that arrives later goes to them)."""
    global _requested
    requested, _requested = _requested, Requested()
    return requested


def hold_until_exit() -> None:
    """Called in the event loop once the relay has stopped: from now on the signals wait
    (blocked in this thread) instead of reaching the loop, which is about to close and to put
    their default actions back. `ignore_until_exit` drops them once it has closed."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)


def ignore_until_exit() -> None:
    """The stop is done: SIGHUP, SIGTERM and SIGINT are ignored until the process is gone.
    Those that waited since `hold_until_exit` are dropped (POSIX: a pending signal set to
    SIG_IGN is discarded). SIG_IGN, not a handler: the interpreter's finalization puts
    Python handlers back to the default actions, and leaves ignored signals ignored."""
    for signum in HANDLED:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)


def _on_reload(_signum: int, _frame: FrameType | None) -> None:
    _requested.reload = True


def _on_stop(_signum: int, _frame: FrameType | None) -> None:
    if _requested.stop:
        # Straight to the file descriptor: the handler may run inside a write to sys.stderr.
        os.write(2, b"relay: second stop signal while starting: exiting now\n")
        os._exit(1)
    _requested.stop = True
