"""Counters on this host, shared by every worker process: a small LMDB file in the data dir.

`relay serve --workers N` runs N processes, and a limit must hold for all of them together,
not N times over. The counters therefore live outside any one process, in LMDB (a
memory-mapped B-tree with one writer at a time across processes):

- a check is one write transaction over a few pages already in memory: tens of µs, where
  SQLite's transaction cost 70-100 µs and a counter service over a unix socket costs a
  round trip through two event loops;
- its writer lock is a robust mutex: a worker killed while holding it does not wedge the
  others (a lock in shared memory would);
- the counts survive a restart (a redeploy does not hand every user a fresh daily quota).

Commits are not fsynced: counters are a brake, not a ledger, and losing the last seconds of
counts in a power cut is acceptable. They are written with pwrite(), not into the shared
map (`writemap`): with the map written in place, a page the filesystem cannot back (a full
disk, the file being sparse) is a SIGBUS that kills the process; with pwrite() it is an
ENOSPC, and mail goes through (fail open) like any other counting failure.
A file LMDB finds invalid is set aside and started afresh; while counting fails otherwise,
mail goes through (fail open), counted in `relay_limit_fail_open_total{backend="local"}`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import lmdb

from relay.limits.counters import FAIL_OPEN, CounterState, Demand, Excess, Taken, Usage, slot_of
from relay.limits.rules import Entity

log = logging.getLogger("relay.limits")

# Room for ~65,000 entities (measured): each ends up on a 4 KiB leaf page of its own (a
# 1.6 KB value); past that, new entities go uncounted (fail open, said in problem()).
# The file grows with use; the map size costs only address space.
MAP_SIZE = 256 * 1024 * 1024
PROBLEM_LOG_INTERVAL = 60.0
# A failure stays in `problem()` (/readyz detail) this long after it happened, whatever
# worked since: a failure on some entities only is otherwise hidden by the others' success.
PROBLEM_STICKY = 600.0
# How often a process checks that the file it counts in is still the one in the directory
# (another process may have set a damaged one aside).
FILE_CHECK_INTERVAL = 10.0
FORGET_IDLE = 2 * 86400.0
# What LMDB raises for a damaged data page in a file that opened fine (LMDB documents that
# a system crash can leave one when commits are not synced).
DAMAGED = (lmdb.CorruptedError, lmdb.PageNotFoundError)


class LocalCounters:
    name = "local"

    def __init__(self, directory: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self._clock = clock
        # At 0 from the start: `increase()` (RelayLimitsNotCounted) cannot see a counter's
        # first step when the series is born at 1.
        FAIL_OPEN.labels(self.name)
        self._problem: str | None = None
        self._problem_until = 0.0
        self._last_logged = -PROBLEM_LOG_INTERVAL
        self._last_file_check = time.monotonic()
        self._env = self._open()
        self._forget_idle()

    def _open(self) -> lmdb.Environment | None:
        try:
            return _environments.acquire(self.directory)
        except (lmdb.InvalidError, lmdb.CorruptedError, lmdb.VersionMismatchError) as exc:
            return self._start_afresh(exc)
        except (OSError, lmdb.Error) as exc:
            self._failed(f"cannot open {self.directory}: {type(exc).__name__}: {exc}")
        return None

    def _start_afresh(self, exc: BaseException, *, damaged: lmdb.Environment | None = None) -> lmdb.Environment | None:
        """Set the unreadable or damaged file aside and open a new one. With `damaged`, the
        environment in use: the directory is moved only if it still holds that file (another
        process may have set it aside already), and every process moves on to the new file
        within FILE_CHECK_INTERVAL."""
        aside = self.directory.with_name(f"{self.directory.name}.broken-{int(time.time())}-{os.getpid()}")
        reason = f"{type(exc).__name__}: {exc}"
        try:
            if damaged is None or not _environments.replaced(damaged, self.directory):
                self.directory.rename(aside)
                log.error(
                    "limit counters unreadable; starting afresh",
                    extra={"path": str(self.directory), "moved_to": str(aside), "reason": reason},
                )
            env = _environments.acquire(self.directory)
        except (OSError, lmdb.Error) as again:
            self._failed(f"cannot open {self.directory}: {type(again).__name__}: {again}")
            return None
        finally:
            if damaged is not None:
                _environments.release(damaged)
        self._note_problem(f"counter file damaged ({reason}), set aside and started afresh")
        return env

    def _check_file(self) -> None:
        """Move on to a new file if another process set the one in use aside."""
        now = time.monotonic()
        if self._env is None or now - self._last_file_check < FILE_CHECK_INTERVAL:
            return
        self._last_file_check = now
        if _environments.replaced(self._env, self.directory):
            old, self._env = self._env, None
            _environments.release(old)
            self._env = self._open()

    def _count_failed(self, exc: lmdb.Error) -> None:
        self._failed(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, DAMAGED) and self._env is not None:
            damaged, self._env = self._env, None
            self._env = self._start_afresh(exc, damaged=damaged)

    # -- the contract (see counters.py) ------------------------------------------------
    def peek(self, demands: Sequence[Demand]) -> Excess | None:
        if self._env is None:
            return None
        now = self._clock()
        try:
            with self._env.begin(buffers=True) as txn:
                for demand in demands:
                    state = CounterState.from_bytes(txn.get(demand.entity.key.encode()))
                    state.advance(now, demand.limits)
                    excess = state.excess(demand, now)
                    if excess is not None:
                        return excess
        except lmdb.Error as exc:
            self._count_failed(exc)
        return None

    async def take(self, demands: Sequence[Demand]) -> Taken | Excess:
        return self.take_now(demands)

    def take_now(self, demands: Sequence[Demand]) -> Taken | Excess:
        """`take` without a suspension point (the Redis backend falls back on it)."""
        self._check_file()
        now = self._clock()
        taken = Taken(tuple(demands), slot_of(now), self.name)
        if self._env is None:
            FAIL_OPEN.labels(self.name).inc()
            return taken
        try:
            with self._env.begin(write=True) as txn:
                states = []
                for demand in demands:
                    key = demand.entity.key.encode()
                    state = CounterState.from_bytes(txn.get(key))
                    state.advance(now, demand.limits)
                    excess = state.excess(demand, now)
                    if excess is not None:
                        txn.abort()
                        return excess
                    states.append((key, state))
                for (key, state), demand in zip(states, demands, strict=True):
                    state.count(demand)
                    txn.put(key, state.to_bytes())
                # A demand's slot is the one the state moved to (a clock that went back
                # leaves the state's slot ahead of `now`).
                if states:
                    taken = Taken(tuple(demands), states[0][1].slot, self.name)
        except lmdb.Error as exc:
            FAIL_OPEN.labels(self.name).inc()
            self._count_failed(exc)
            return taken
        if self._problem is not None and time.monotonic() >= self._problem_until:
            self._problem = None
        return taken

    async def give_back(self, taken: Taken) -> None:
        self.give_back_now(taken)

    def give_back_now(self, taken: Taken) -> None:
        if self._env is None:
            return
        now = self._clock()
        try:
            with self._env.begin(write=True) as txn:
                for demand in taken.demands:
                    key = demand.entity.key.encode()
                    data = txn.get(key)
                    if data is None:
                        continue
                    state = CounterState.from_bytes(data)
                    state.advance(now, demand.limits)
                    state.uncount(demand, taken.slot)
                    txn.put(key, state.to_bytes())
        except lmdb.Error as exc:
            self._count_failed(exc)

    async def usage(self, entities: Sequence[Entity]) -> dict[Entity, Usage]:
        if self._env is None:
            return {}
        # Off the event loop: one read transaction over every entity with a daily quota
        # (thousands of users) must not stall the sessions of this worker. The environment
        # is held meanwhile: a file set aside at the same time is not closed under the read.
        env = _environments.hold(self._env)
        try:
            return await asyncio.to_thread(self._usage_now, env, entities, self._clock())
        finally:
            _environments.release(env)

    def _usage_now(self, env: lmdb.Environment, entities: Sequence[Entity], now: float) -> dict[Entity, Usage]:
        out: dict[Entity, Usage] = {}
        try:
            with env.begin(buffers=True) as txn:
                for entity in entities:
                    data = txn.get(entity.key.encode())
                    if data is None:
                        out[entity] = Usage(0, 0)
                    else:
                        out[entity] = Usage(*CounterState.from_bytes(data).totals_at(now))
        except lmdb.Error as exc:
            self._failed(f"{type(exc).__name__}: {exc}")
        return out

    def _forget_idle(self) -> None:
        """Drop entities idle for longer than FORGET_IDLE (users and domains no longer
        configured): their window is empty and their bucket full, so nothing is lost. And
        those whose window lies more than a day ahead: counted under a clock that was wrong."""
        if self._env is None:
            return
        now = self._clock()
        horizon, ahead = slot_of(now - FORGET_IDLE), slot_of(now + 86400)
        try:
            with self._env.begin(write=True) as txn:
                stale = [
                    bytes(key)
                    for key, data in txn.cursor()
                    if not horizon <= CounterState.from_bytes(data).slot <= ahead
                ]
                for key in stale:
                    txn.delete(key)
        except lmdb.Error as exc:
            self._count_failed(exc)

    def problem(self) -> str | None:
        return self._problem

    async def close(self) -> None:
        if self._env is not None:
            env, self._env = self._env, None
            _environments.release(env)

    def _note_problem(self, problem: str) -> None:
        self._problem = problem
        self._problem_until = time.monotonic() + PROBLEM_STICKY

    def _failed(self, reason: str) -> None:
        self._note_problem(f"local limit counters failing (mail is let through): {reason}")
        now = time.monotonic()
        if now - self._last_logged >= PROBLEM_LOG_INTERVAL:
            self._last_logged = now
            log.error(
                "limit counters failing; mail goes through uncounted",
                extra={"path": str(self.directory), "reason": reason},
            )


class _Environments:
    """One open LMDB environment per directory and process: LMDB forbids opening the same
    one twice in a process (a reload builds new counters while the old ones still serve),
    and an environment must not be used across fork (workers open their own). A file set
    aside is replaced by a new one; the old environment is closed when its last user lets
    it go."""

    def __init__(self) -> None:
        self._current: dict[tuple[int, str], lmdb.Environment] = {}
        self._users: dict[lmdb.Environment, int] = {}
        self._files: dict[lmdb.Environment, tuple[int, int]] = {}  # (device, inode) of data.mdb

    def acquire(self, directory: Path) -> lmdb.Environment:
        key = (os.getpid(), str(directory.resolve()))
        env = self._current.get(key)
        if env is None or self.replaced(env, directory):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            env = lmdb.open(
                str(directory),
                map_size=MAP_SIZE,
                subdir=True,
                sync=False,
                metasync=False,
                # Not `writemap`: a full disk would be a SIGBUS, not an error (see above).
                writemap=False,
                max_dbs=0,
                readahead=False,
                mode=0o600,
                lock=True,
            )
            env.reader_check()  # free the reader slots of processes that died
            stat = (directory / "data.mdb").stat()
            self._current[key] = env
            self._files[env] = (stat.st_dev, stat.st_ino)
        self._users[env] = self._users.get(env, 0) + 1
        return env

    def hold(self, env: lmdb.Environment) -> lmdb.Environment:
        """One more user of an environment already acquired (release it likewise)."""
        self._users[env] = self._users.get(env, 0) + 1
        return env

    def replaced(self, env: lmdb.Environment, directory: Path) -> bool:
        """Whether the directory no longer holds the file `env` has open."""
        try:
            stat = (directory / "data.mdb").stat()
        except OSError:
            return True
        return self._files.get(env) != (stat.st_dev, stat.st_ino)

    def release(self, env: lmdb.Environment) -> None:
        users = self._users.get(env, 0) - 1
        if users > 0:
            self._users[env] = users
            return
        self._users.pop(env, None)
        self._files.pop(env, None)
        for key, current in list(self._current.items()):
            if current is env:
                del self._current[key]
        env.close()


_environments = _Environments()


def counters_dir(data_dir: Path) -> Path:
    return data_dir / "limits"
