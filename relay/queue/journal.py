"""The write-ahead journal: group commit for new entries, one fdatasync per batch.

Measured on ext4 (bench/spool_commit.py), what limits a spool of one file per message is
the fsync of each file: every one is a journal commit of the filesystem with a cache flush,
and concurrent ones do not merge well. So a new entry is made durable differently:

    1. its entry file is written and renamed into place, without fsync (visible to the
       other workers and to `relay queue` at once, durable later);
    2. the same bytes are appended to this process's journal segment;
    3. one fdatasync of the segment covers every entry appended since the last one
       (whatever arrived while the previous sync ran: no timer, no idle wait);
    4. only then is each writer acknowledged (the client's 250).

Completions ("delivered, entry removed") are appended at once as small marks (synced with
the next batch). About once a second (`CHECKPOINT_INTERVAL`) the segment is retired: the entry files
it still vouches for are fsynced with their directory, then the segment is removed. What
ends up on disk is what a spool with one fsync per message would hold; the journal only
bridges the second in between.

After a crash, a segment whose owner is gone (its flock is free) is replayed by whichever
process finds it first: each entry it records that has no completion mark and whose file is
missing or damaged (a power loss before writeback) is written again, durably. Entries
completed after their mark was synced are not resurrected; an entry completed in the last
moment before the crash may be (at-least-once). Each record carries its length and a
CRC-32; a torn last record was never acknowledged and is ignored.

Segments are named `<host>-<pid>-<seq>.log` and locked by their writer before they get
that name, so a live writer's segment is never replayed under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from relay.queue.commit import COMMIT_BATCH, COMMIT_WAIT, fsync_directory

log = logging.getLogger("relay.queue")

CHECKPOINT_INTERVAL = 1.0
SEGMENT_SUFFIX = ".log"
_RECORD = struct.Struct(">cBII")  # kind, id length, data length, CRC-32 of id + data
PUT = b"P"
DONE = b"D"


def encode_record(kind: bytes, entry_id: str, data: bytes = b"") -> bytes:
    ident = entry_id.encode("ascii")
    crc = zlib.crc32(data, zlib.crc32(ident))
    return b"".join((_RECORD.pack(kind, len(ident), len(data), crc), ident, data))


def read_records(blob: bytes) -> list[tuple[bytes, str, bytes]]:
    """The intact records of a segment, in order; stops at the first torn one."""
    out = []
    offset = 0
    view = memoryview(blob)
    while offset + _RECORD.size <= len(blob):
        kind, id_len, data_len, crc = _RECORD.unpack_from(blob, offset)
        start = offset + _RECORD.size
        end = start + id_len + data_len
        if kind not in (PUT, DONE) or end > len(blob) or zlib.crc32(view[start:end]) != crc:
            break
        ident = bytes(view[start : start + id_len]).decode("ascii", "replace")
        out.append((kind, ident, bytes(view[start + id_len : end])))
        offset = end
    return out


class Journal:
    def __init__(self, directory: Path, entries: Path, owner: str, *, threads: int = 2) -> None:
        self.directory = directory
        self.entries = entries
        # Unique per journal, not only per process: tests (and tools) may open several
        # spools on one directory in one process.
        self.prefix = f"{owner.replace(':', '-').replace('/', '-')}-{os.urandom(3).hex()}"
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="spool-journal")
        # Retiring a segment fsyncs the entry files still queued: in parallel, off the path
        # of new acknowledgements.
        self._retire_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="spool-checkpoint")
        self._retiring: set[asyncio.Task[None]] = set()
        # Segments being retired still take completion marks until they are gone: a kill
        # during a checkpoint must not let a replay resurrect what was delivered meanwhile.
        self._retiring_segments: list[tuple[int, set[str]]] = []
        self._seq = 0
        self._fd = -1
        self._segment: Path | None = None
        self._segment_ids: set[str] = set()
        self._opened = 0.0
        self._buffer: list[bytes] = []
        self._buffer_ids: list[str] = []  # the entries of `_buffer`: they join the segment written to
        self._waiters: list[tuple[asyncio.Future[None], float]] = []
        self._runner: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.checkpoint_interval = CHECKPOINT_INTERVAL
        self.batches = 0
        self.writes = 0

    # -- writing --------------------------------------------------------------------------
    async def append(self, entry_id: str, data: bytes) -> None:
        """Record a new entry; returns once the record is on disk."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._buffer.append(encode_record(PUT, entry_id, data))
        self._buffer_ids.append(entry_id)
        self._waiters.append((future, time.perf_counter()))
        self._kick()
        await asyncio.shield(future)

    def completed(self, entry_id: str) -> None:
        """An entry left the spool: no replay may bring it back.

        The mark is written at once (one small append, not synced): a killed process's
        writes survive in the page cache, so a replay after `kill -9` never resurrects a
        delivered entry; after a power loss the last marks may be lost, and with them a few
        deliveries repeated (at-least-once)."""
        for fd, ids in [(self._fd, self._segment_ids), *self._retiring_segments]:
            if entry_id in ids and fd >= 0:
                ids.discard(entry_id)
                with contextlib.suppress(OSError):  # the retirement makes the removal durable anyway
                    os.write(fd, encode_record(DONE, entry_id))
                return

    def _kick(self) -> None:
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._drain(), name="spool-journal")

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiters or self._checkpoint_due():
            if self._fd < 0 or self._checkpoint_due():
                await self._rotate()
            records, self._buffer = self._buffer, []
            ids, self._buffer_ids = self._buffer_ids, []
            waiters, self._waiters = self._waiters, []
            if records:
                # The segment these records go to is the one that vouches for them (and takes
                # their completion marks), whatever rotation comes later.
                self._segment_ids.update(ids)
                try:
                    await loop.run_in_executor(self._pool, _append_synced, self._fd, b"".join(records))
                except OSError as exc:
                    for future, _ in waiters:
                        if not future.done():
                            future.set_exception(exc)
                    # A segment that failed a write may end in a partial record: start anew.
                    await self._rotate()
                    continue
            now = time.perf_counter()
            for future, queued in waiters:
                COMMIT_WAIT.observe(now - queued)
                if not future.done():
                    future.set_result(None)
            if waiters:
                self.batches += 1
                self.writes += len(waiters)
                COMMIT_BATCH.observe(len(waiters))
        self._arm_checkpoint()

    def _checkpoint_due(self) -> bool:
        return self._fd >= 0 and bool(self._segment_ids) and time.monotonic() - self._opened >= self.checkpoint_interval

    def _arm_checkpoint(self) -> None:
        if self._timer is not None or not self._segment_ids:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timer = None
            self._kick()

        self._timer = loop.call_later(self.checkpoint_interval, fire)

    async def _rotate(self) -> None:
        """Open a new segment and retire the current one, between two batches.

        The switch happens here, on the event loop: entries appended from now on belong to
        the new segment. Every entry of the old one had its file written before its record
        was appended, so fsyncing those files makes the old segment unnecessary."""
        loop = asyncio.get_running_loop()
        old_fd, old_segment, old_ids = self._fd, self._segment, self._segment_ids
        self._segment_ids = set()
        self._seq += 1
        self._fd, self._segment = await loop.run_in_executor(self._pool, self._open_segment, self._seq)
        self._opened = time.monotonic()
        if old_fd >= 0:
            task = asyncio.create_task(self._retire(old_fd, old_segment, old_ids), name="spool-checkpoint")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _retire(self, fd: int, segment: Path | None, ids: set[str]) -> None:
        loop = asyncio.get_running_loop()
        retiring = (fd, ids)
        self._retiring_segments.append(retiring)
        try:
            await asyncio.gather(
                *(loop.run_in_executor(self._retire_pool, fsync_entry, self.entries / i) for i in list(ids))
            )
            await loop.run_in_executor(self._retire_pool, self._retire_segment, segment, set())
        except OSError as exc:
            # The segment stays (and is replayed after a restart): nothing is lost.
            log.error("journal checkpoint failed; the segment is kept", extra={"reason": str(exc)})
        finally:
            # Closed here, on the loop, so `completed` never writes to a descriptor closed
            # (or reused) under it.
            self._retiring_segments.remove(retiring)
            os.close(fd)

    def _open_segment(self, seq: int) -> tuple[int, Path]:
        name = f"{self.prefix}-{seq}{SEGMENT_SUFFIX}"
        tmp = self.directory / f".tmp-{name}.new"  # no replay looks at it (not *.log)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, self.directory / name)
        # The new segment's name must be durable before a record in it is acknowledged.
        fsync_directory(self.directory)
        return fd, self.directory / name

    def _retire_segment(self, segment: Path | None, ids: set[str]) -> None:
        make_entries_durable(self.entries, ids)
        if segment is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(segment)
            # Durably gone, or a replay after a crash could bring back entries delivered since.
            fsync_directory(self.directory)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._runner is not None and not self._runner.done():
            await asyncio.shield(self._runner)
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        if self._fd >= 0:
            # A clean stop retires the segment: nothing is left to replay.
            fd, segment, ids = self._fd, self._segment, self._segment_ids
            self._fd, self._segment, self._segment_ids = -1, None, set()
            await asyncio.get_running_loop().run_in_executor(self._pool, self._retire_segment, segment, ids)
            os.close(fd)
        self._pool.shutdown(wait=True)
        self._retire_pool.shutdown(wait=True)


def make_entries_durable(entries: Path, ids: set[str]) -> None:
    for entry_id in ids:
        fsync_entry(entries / entry_id)
    fsync_directory(entries)


def fsync_entry(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # delivered (or removed) meanwhile
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append_synced(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fdatasync(fd)


def replay_orphans(directory: Path, own_prefix: str, restore: Callable[[str, bytes], bool]) -> int:
    """Replay every segment whose writer is gone. `restore(id, data)` rewrites an entry if
    it is missing or damaged and says whether it did. Returns how many were restored."""
    restored = 0
    for segment in sorted(directory.glob(f"*{SEGMENT_SUFFIX}")):
        if segment.name.startswith((own_prefix + "-", ".")):
            continue
        try:
            fd = os.open(segment, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is alive
            if not segment.exists():
                continue  # replayed by someone else meanwhile
            size = os.fstat(fd).st_size
            records = read_records(os.pread(fd, size, 0))
            done = {ident for kind, ident, _ in records if kind == DONE}
            for kind, ident, data in records:
                if kind == PUT and ident not in done and restore(ident, data):
                    restored += 1
            with contextlib.suppress(FileNotFoundError):
                os.unlink(segment)
            fsync_directory(directory)
            log.info(
                "journal segment of a stopped process replayed",
                extra={"segment": segment.name, "records": len(records), "restored": restored},
            )
        finally:
            os.close(fd)
    return restored
