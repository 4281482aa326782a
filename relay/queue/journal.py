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

While a segment vouches for an entry, the process that wrote it keeps the entry's lock
(`keep`; its own runner takes it back with `take_kept`): no other worker and no `relay
queue delete` can remove an entry a live segment still vouches for, so a missing file means
lost, not removed by someone else.

After a crash, a segment whose owner is gone (its flock is free) is replayed by whichever
process finds it first (the spool serialises replays against listings, see
Spool.scan): the entry files it vouches for that are intact are fsynced; a damaged one is
written again from its record; a missing one is written again only if the machine has
rebooted since the segment was written (its first record names the kernel's boot id).
After a process kill (`kill -9`, OOM) the page cache keeps every write, so a missing file
was removed by someone (delivered by another worker, deleted by an operator) and bringing
it back would deliver it twice; only a power loss or a kernel crash loses a file written
without fsync. Entries completed after their mark was synced are not resurrected; an entry
completed in the last moment before a power loss may be (at-least-once). Each record
carries its length and a CRC-32; a torn last record was never acknowledged and is ignored.

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

from relay.files import open_regular
from relay.queue.commit import COMMIT_BATCH, COMMIT_WAIT, fsync_directory

log = logging.getLogger("relay.queue")

CHECKPOINT_INTERVAL = 1.0
SEGMENT_SUFFIX = ".log"
_RECORD = struct.Struct(">cBII")  # kind, id length, data length, CRC-32 of id + data
PUT = b"P"
DONE = b"D"
BOOT = b"B"  # a segment's first record: the boot id of the kernel it was written under
# Entry locks kept for segments not yet retired: past this many, the checkpoint comes early
# (each is an open descriptor).
KEEP_MAX = 256
RETIRE_RETRY_MAX = 60.0


def boot_id() -> str:
    """This kernel's boot id: it changes at every boot, so a segment written under another one
    outlived a reboot (a power loss or a crash of the machine, the only way a file written
    without fsync can be lost). "" when unknown: then every missing entry is restored."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return ""


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
        if kind not in (PUT, DONE, BOOT) or end > len(blob) or zlib.crc32(view[start:end]) != crc:
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
        # Entry locks held for the segments that vouch for their entries (see `keep`).
        self._kept: dict[str, int] = {}
        # A segment that took a failed write may end in a partial record: none after it.
        self._must_rotate = False
        self._closing = asyncio.Event()
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
                mark = encode_record(DONE, entry_id)
                try:
                    written = os.write(fd, mark)
                except OSError:
                    written = -1  # the retirement makes the removal durable anyway
                if written != len(mark) and fd == self._fd:
                    # Cut short (a full disk): a torn record, past which a replay reads
                    # nothing. What comes next goes to a new segment.
                    self._must_rotate = True
                return

    def keep(self, entry_id: str, fd: int) -> bool:
        """Take over an entry lock being released, if a segment of ours still vouches for the
        entry: it is held until that segment is retired (then the entry file is durable on
        its own, and another process may remove it without a replay bringing it back)."""
        if not self._vouches(entry_id):
            return False
        old = self._kept.pop(entry_id, None)
        if old is not None:
            os.close(old)
        self._kept[entry_id] = fd
        if len(self._kept) >= KEEP_MAX and self._fd >= 0:
            self._opened = 0.0  # checkpoint now: the descriptors must not pile up
            with contextlib.suppress(RuntimeError):  # no event loop: the next put does it
                self._kick()
        return True

    def take_kept(self, entry_id: str) -> int | None:
        """The descriptor of a kept lock, handed back to this process's own delivery."""
        return self._kept.pop(entry_id, None)

    def _vouches(self, entry_id: str) -> bool:
        return entry_id in self._segment_ids or any(entry_id in ids for _fd, ids in self._retiring_segments)

    def _release_kept(self, ids: set[str]) -> None:
        for entry_id in ids:
            if not self._vouches(entry_id):
                fd = self._kept.pop(entry_id, None)
                if fd is not None:
                    os.close(fd)

    def _kick(self) -> None:
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._drain(), name="spool-journal")

    async def _drain(self) -> None:
        try:
            await self._drain_batches()
        except Exception as exc:
            # Never leave a writer waiting for a sync nobody runs: its client gets a 4xx.
            log.exception("journal write failed", extra={"reason": str(exc)})
            self._fail_waiting(exc if isinstance(exc, OSError) else OSError(str(exc)))
        finally:
            self._arm_checkpoint()

    def _fail_waiting(self, exc: OSError) -> None:
        waiters, self._waiters = self._waiters, []
        self._buffer, self._buffer_ids = [], []
        for future, _ in waiters:
            if not future.done():
                future.set_exception(exc)

    async def _drain_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiters or self._checkpoint_due():
            if self._fd >= 0 and not self._must_rotate and self._waiters and _unlinked(self._fd):
                # The segment was removed under us (`journal/` deleted): a record in it would
                # not outlive a power loss. A new one, or this batch is refused.
                self._must_rotate = True
            if self._fd < 0 or self._must_rotate or self._checkpoint_due():
                try:
                    await self._rotate()
                except OSError as exc:
                    if self._fd < 0 or self._must_rotate:
                        # Nowhere to write: this batch is refused (451 4.3.0); the next
                        # put tries to open a segment again.
                        log.error("journal: cannot open a new segment", extra={"reason": str(exc)})
                        self._fail_waiting(exc)
                        return
                    # The current segment still works: go on with it, try again at the next
                    # checkpoint (its entries stay vouched for until then).
                    log.error("journal: cannot open a new segment; the current one goes on", extra={"reason": str(exc)})
                    self._opened = time.monotonic()
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
                    # A segment that failed a write may end in a partial record: start anew
                    # (the failed records' entries were unlinked by their writers).
                    self._must_rotate = True
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
        self._seq += 1
        # The new segment first: if it cannot be opened (EMFILE, ENOSPC, EIO), nothing has
        # changed and the current segment still vouches for its entries.
        new_fd, new_segment = await loop.run_in_executor(self._pool, self._open_segment, self._seq)
        old_fd, old_segment, old_ids = self._fd, self._segment, self._segment_ids
        self._fd, self._segment, self._segment_ids = new_fd, new_segment, set()
        self._must_rotate = False
        self._opened = time.monotonic()
        if old_fd >= 0:
            task = asyncio.create_task(self._retire(old_fd, old_segment, old_ids), name="spool-checkpoint")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _retire(self, fd: int, segment: Path | None, ids: set[str]) -> None:
        loop = asyncio.get_running_loop()
        retiring = (fd, ids)
        self._retiring_segments.append(retiring)
        delay = 1.0
        try:
            while True:
                try:
                    await asyncio.gather(
                        *(loop.run_in_executor(self._retire_pool, fsync_entry, self.entries / i) for i in list(ids))
                    )
                    await loop.run_in_executor(self._retire_pool, self._retire_segment, segment, set())
                    return
                except OSError as exc:
                    # The segment stays, still locked by us (so no other worker replays it
                    # under us) and its entries' locks stay kept: tried again, with backoff.
                    # At a stop it is left for the replay after the restart: nothing is lost.
                    log.error(
                        "journal checkpoint failed; the segment is kept",
                        extra={"reason": str(exc), "segment": segment.name if segment else None},
                    )
                    if self._closing.is_set():
                        return
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._closing.wait(), timeout=delay)
                    delay = min(delay * 2, RETIRE_RETRY_MAX)
        finally:
            # Closed here, on the loop, so `completed` never writes to a descriptor closed
            # (or reused) under it.
            self._retiring_segments.remove(retiring)
            os.close(fd)
            self._release_kept(ids)

    def _open_segment(self, seq: int) -> tuple[int, Path]:
        name = f"{self.prefix}-{seq}{SEGMENT_SUFFIX}"
        tmp = self.directory / f".tmp-{name}.new"  # no replay looks at it (not *.log)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Synced with the segment's first batch, like every record.
            _append(fd, encode_record(BOOT, boot_id()))
            os.rename(tmp, self.directory / name)
            # The new segment's name must be durable before a record in it is acknowledged.
            fsync_directory(self.directory)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            with contextlib.suppress(OSError):
                os.unlink(self.directory / name)
            raise
        return fd, self.directory / name

    def _retire_segment(self, segment: Path | None, ids: set[str]) -> None:
        make_entries_durable(self.entries, ids)
        if segment is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(segment)
            # Durably gone, or a replay after a crash could bring back entries delivered since.
            fsync_directory(self.directory)

    async def close(self) -> None:
        self._closing.set()
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
            try:
                await asyncio.get_running_loop().run_in_executor(self._pool, self._retire_segment, segment, ids)
            except OSError as exc:
                log.error("journal checkpoint failed at stop; the segment is kept", extra={"reason": str(exc)})
            finally:
                os.close(fd)
        for kept in self._kept.values():
            os.close(kept)
        self._kept.clear()
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


def _unlinked(fd: int) -> bool:
    return os.fstat(fd).st_nlink == 0


def _append(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _append_synced(fd: int, data: bytes) -> None:
    _append(fd, data)
    os.fdatasync(fd)


def orphans(directory: Path, own_prefix: str) -> bool:
    """Whether some segment's writer is gone (its flock is free): a replay is due."""
    for segment in directory.glob(f"*{SEGMENT_SUFFIX}"):
        if segment.name.startswith((own_prefix + "-", ".")):
            continue
        try:
            fd = open_regular(segment, follow_symlinks=False)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            continue
        finally:
            os.close(fd)
    return False


def replay_orphans(directory: Path, own_prefix: str, restore: Callable[[str, bytes, bool], bool], entries: Path) -> int:
    """Replay every segment whose writer is gone. `restore(id, data, lost_possible)` makes
    the entry durable, rewriting it if it is damaged, or missing while `lost_possible` (the
    machine rebooted since the segment was written), and says whether it rewrote it.
    Returns how many were restored. The caller excludes concurrent listings of the spool."""
    restored = 0
    current_boot = boot_id()
    for segment in sorted(directory.glob(f"*{SEGMENT_SUFFIX}")):
        if segment.name.startswith((own_prefix + "-", ".")):
            continue
        try:
            fd = open_regular(segment, follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.error("journal: not a segment; left alone", extra={"segment": segment.name, "reason": str(exc)})
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
            boots = [ident for kind, ident, _ in records if kind == BOOT]
            # No boot record (a segment of an older version) or an unknown boot: as before,
            # a missing entry counts as lost.
            lost_possible = not boots or not current_boot or boots[0] != current_boot
            for kind, ident, data in records:
                if kind == PUT and ident not in done and restore(ident, data, lost_possible):
                    restored += 1
            # The entries the dead writer never checkpointed are durable now (restore fsynced
            # each file); their names too, before the segment that vouched for them goes.
            fsync_directory(entries)
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
