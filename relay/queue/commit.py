"""Durable file writes that share their fsyncs (group commit).

A new spool file is durable once its data is fsynced and the directory entry that names it
is fsynced too (POSIX: fsync of a file does not make its directory entry durable). The
directory fsync is the expensive one on ext4/XFS (a journal commit with a cache flush), and
it covers every rename made in that directory before it. So writers do not sync one by one:

    1. each write goes to `.tmp-<name>-<random>`, then fsync   (in parallel, thread pool:
       the filesystem folds concurrent fsyncs into one journal commit)
    2. rename each tmp file to its name                          (atomic, RFC-less POSIX)
    3. one fsync of the directory for the whole batch
    4. only then every writer of the batch is told "durable"

A batch is whatever arrived while the previous batch was syncing (no fixed window, so one
writer alone waits for one sync, not for a timer); `batch_max` bounds it. With
`group=False` every write is its own batch: one file fsync and one directory fsync per
message, the discipline of chasquid's safeio and of `relay.deliver.outbox`, kept for
comparison in `bench/spool_commit.py`.

Renames and unlinks made elsewhere (a state file put in place after an upstream's 250, an
entry removed) are made durable by the next batch's directory fsync, or by `sync_later`'s
short timer when no batch comes: losing one of those in a crash only repeats a delivery,
never loses one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Histogram

COMMIT_BATCH = Histogram(
    "relay_queue_commit_batch_size",
    "Spool writes made durable by one shared directory fsync.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
COMMIT_WAIT = Histogram(
    "relay_queue_commit_wait_seconds",
    "From a spool write's request to its durability (the batching window plus the syncs).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
LAZY_SYNC_DELAY = 0.05


@dataclass(eq=False)
class _Write:
    path: Path
    data: bytes
    lock: bool
    future: asyncio.Future[int | None]
    queued: float = field(default_factory=time.perf_counter)
    tmp: str = ""
    fd: int = -1


class GroupCommitter:
    def __init__(self, *, threads: int = 8, batch_max: int = 256, group: bool = True) -> None:
        self.group = group
        self.batch_max = batch_max if group else 1
        self._pool = ThreadPoolExecutor(max_workers=threads if group else 1, thread_name_prefix="spool-sync")
        self._pending: list[_Write] = []
        self._runner: asyncio.Task[None] | None = None
        self._dirty: set[Path] = set()
        self._lazy: asyncio.TimerHandle | None = None
        self.batches = 0
        self.writes = 0

    async def write(self, path: Path, data: bytes, *, lock: bool = False) -> int | None:
        """Write `data` as `path`, durably. With `lock`, returns an open descriptor of the
        new file holding an exclusive flock (taken before the file had its name, so no
        other process can own it first); the caller closes it."""
        loop = asyncio.get_running_loop()
        request = _Write(path, data, lock, loop.create_future())
        self._pending.append(request)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._drain(), name="spool-commit")
        try:
            return await asyncio.shield(request.future)
        except asyncio.CancelledError:
            # The caller gave up (a client that vanished); the write itself goes on, and
            # its lock must not leak.
            request.future.add_done_callback(_close_result)
            raise

    def sync_later(self, directory: Path) -> None:
        """Make renames/unlinks already done in `directory` durable soon (coalesced).
        Without an event loop (the `relay queue` command) it is done at once."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            fsync_directory(directory)
            return
        self._dirty.add(directory)
        if self._lazy is None and not (self._runner and not self._runner.done()):
            self._lazy = asyncio.get_running_loop().call_later(LAZY_SYNC_DELAY, self._sync_dirty_soon)

    def _sync_dirty_soon(self) -> None:
        self._lazy = None
        if self._dirty and (self._runner is None or self._runner.done()):
            self._runner = asyncio.create_task(self._drain(), name="spool-commit")

    async def flush(self) -> None:
        """Wait until every write and dirty directory so far is durable."""
        while self._runner is not None and not self._runner.done():
            await asyncio.shield(self._runner)
        if self._dirty:
            self._runner = asyncio.create_task(self._drain(), name="spool-commit")
            await self._runner

    async def close(self) -> None:
        await self.flush()
        if self._lazy is not None:
            self._lazy.cancel()
        self._pool.shutdown(wait=True)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending or self._dirty:
            batch, self._pending = self._pending[: self.batch_max], self._pending[self.batch_max :]
            dirty, self._dirty = self._dirty, set()
            written = await asyncio.gather(
                *(loop.run_in_executor(self._pool, _write_tmp, w) for w in batch), return_exceptions=True
            )
            ready = []
            for request, outcome in zip(batch, written, strict=True):
                if isinstance(outcome, BaseException):
                    _settle(request, outcome)
                else:
                    ready.append(request)
            try:
                failures = await loop.run_in_executor(self._pool, _rename_and_sync, ready, dirty)
            except BaseException as exc:  # the event loop is closing under us
                failures = {id(r): exc for r in ready}
            now = time.perf_counter()
            for request in ready:
                _settle(request, failures.get(id(request)))
                COMMIT_WAIT.observe(now - request.queued)
            if batch:
                self.batches += 1
                self.writes += len(ready)
                COMMIT_BATCH.observe(len(ready))


def _settle(request: _Write, error: BaseException | None) -> None:
    if request.future.done():
        return
    if error is not None:
        request.future.set_exception(error)
    else:
        request.future.set_result(request.fd if request.lock else None)


def _close_result(future: asyncio.Future[int | None]) -> None:
    if not future.cancelled() and future.exception() is None:
        fd = future.result()
        if fd is not None:
            os.close(fd)


def _write_tmp(request: _Write) -> None:
    tmp = str(request.path.parent / f".tmp-{request.path.name}-{os.urandom(4).hex()}")
    # Read-write: a locked descriptor is handed back to be read from (the delivery that follows).
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        if request.lock:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        view = memoryview(request.data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if not request.lock:
        os.close(fd)
        fd = -1
    request.tmp, request.fd = tmp, fd


def _rename_and_sync(ready: list[_Write], dirty: set[Path]) -> dict[int, BaseException]:
    failures: dict[int, BaseException] = {}
    directories = set(dirty)
    for request in ready:
        try:
            os.rename(request.tmp, request.path)
            directories.add(request.path.parent)
        except OSError as exc:
            failures[id(request)] = exc
            _undo(request, request.tmp)
    for directory in directories:
        try:
            fsync_directory(directory)
        except OSError as exc:
            for request in ready:
                if id(request) not in failures and request.path.parent == directory:
                    failures[id(request)] = exc
                    if request.lock:
                        # A new entry: not durable, so not acknowledged; since its writer
                        # will be told to try again, it must not stay to be delivered twice.
                        _undo(request, str(request.path))
                    # A state file stays: the rename already replaced the previous state, so
                    # it is the newest one there is (unlinked, the entry would fall back to
                    # its initial state and deliver its delivered recipients again).
    return failures


def _undo(request: _Write, path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
    if request.fd >= 0:
        os.close(request.fd)
        request.fd = -1


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
