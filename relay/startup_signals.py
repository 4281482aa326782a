"""Signals that reach `relay serve` while it starts, before its event loop handles them.

A process starts with the default action for SIGHUP and SIGTERM: to die. Loading secrets,
fetching tokens or scanning the spool takes a moment, and a config-management tool that
reloads right after a deploy, or an orchestrator that stops what it has just started, would
kill the relay half-started (a worker of `--workers N` would be restarted, a single process
just dies). From its first step `relay serve` records these signals instead, and the
running relay acts on them once its own handlers are in place (`relay.server.serve`):

- SIGHUP: a reload then, since the config may have changed after it was read (one that
  arrives before the config is read changes nothing: `config_read()` forgets it);
- SIGTERM or SIGINT: a drain at once, which, with no session yet, is a clean stop (exit 0);
  a second one exits at once (1), as it does while running.

Only the main thread runs these handlers (Python's rule), between two steps of the start.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class Requested:
    reload: bool = False
    stop: bool = False


_requested = Requested()


def hold() -> None:
    """Record SIGHUP, SIGTERM and SIGINT from now on (in a forked worker: its own record)."""
    global _requested
    _requested = Requested()
    signal.signal(signal.SIGHUP, _on_reload)
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_stop)


def config_read() -> None:
    """Called just before the config is read: a reload requested until now is not needed."""
    _requested.reload = False


def take() -> Requested:
    """What was requested while the relay started; called once its own handlers are in place
    (a signal that arrives later goes to them)."""
    global _requested
    requested, _requested = _requested, Requested()
    return requested


def _on_reload(_signum: int, _frame: FrameType | None) -> None:
    _requested.reload = True


def _on_stop(_signum: int, _frame: FrameType | None) -> None:
    if _requested.stop:
        # Straight to the file descriptor: the handler may run inside a write to sys.stderr.
        os.write(2, b"relay: second stop signal while starting: exiting now\n")
        os._exit(1)
    _requested.stop = True
