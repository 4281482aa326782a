"""The spool directory: entries, their locks, state changes, accounting and quarantine.

    <dir>/entries/<id>          the entry file (envelope + signed message), never rewritten
    <dir>/entries/<id>.state    the entry's current state, replaced whole by rename
    <dir>/entries/.tmp-*        writes in progress (removed when a crash left them old)
    <dir>/journal/              write-ahead segments of new entries (relay.queue.journal)
    <dir>/corrupt/              files that failed their length or checksum check
    <dir>/kick                  touched by `relay queue retry|requeue` to wake the workers

Every change of an entry is one rename or one unlink, so an entry is always either in its
old state or its new one. A finally-failed entry stays where it is, with a state that says
so: the dead-letter area is the set of entries whose recipients all have a final answer
and at least one failed (no move between directories, which could not be atomic for the
two files of an entry).

Ownership: whoever delivers, retries, requeues or deletes an entry holds an exclusive
flock(2) on its entry file for the whole operation, and re-reads the state after taking it.
The lock dies with its process (kill -9 included), so no lease needs to expire. With
`relay serve --workers N` every worker sees every entry, and the one that gets the lock
delivers it; the others skip it. A new entry is locked before it has its name (see
`GroupCommitter.write`), so the worker that accepted it delivers it first, and it keeps the
lock (in its journal, `Journal.keep`) until its journal segment is retired: nobody else
removes an entry a live segment vouches for.

Listings and journal replays exclude each other (`journal/replay.lock`: shared for a listing,
exclusive for a replay), so no worker delivers from a listing a replay may then contradict.
`relay queue` changes only as the directory's owner (relay.queue.commands).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from relay.errors import SmtpError
from relay.files import NotARegularFile, open_regular
from relay.queue.commit import GroupCommitter, fsync_directory
from relay.queue.entry import (
    CorruptEntry,
    CorruptState,
    QueueEntry,
    decode_entry,
    decode_meta,
    decode_state,
    encode_entry,
    encode_state,
    meta_span,
)
from relay.queue.journal import Journal, orphans, replay_orphans

log = logging.getLogger("relay.queue")

ENTRIES = "entries"
CORRUPT = "corrupt"
JOURNAL = "journal"
KICK = "kick"
# flock'd shared by every listing of the entries, exclusively by a journal replay: nobody
# delivers from a listing taken while a replay may still restore what it lists.
REPLAY_LOCK = "replay.lock"
STATE_SUFFIX = ".state"
TMP_PREFIX = ".tmp-"
STALE_TMP_AGE = 600.0
HEAD_READ = 65536
# Room kept free on the spool's filesystem for the state updates of what is queued already:
# new mail is refused (452 4.3.1) before the disk is full, not when it is.
DEFAULT_RESERVE_BYTES = 16 * 1024 * 1024
LOCK_POLL = 0.02

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def valid_id(entry_id: str) -> bool:
    return bool(_ID.match(entry_id))


def instance_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class EntryLock:
    """An exclusive hold on one entry; released by `release()` or at process death.

    With a journal, a release may hand the lock to it instead (Journal.keep): while a live
    segment of this process vouches for the entry, nobody else may remove it."""

    def __init__(self, entry_id: str, fd: int, keeper: Journal | None = None) -> None:
        self.id = entry_id
        self.fd = fd
        self.keeper = keeper

    def release(self) -> None:
        if self.fd >= 0:
            if self.keeper is None or not self.keeper.keep(self.id, self.fd):
                os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = -1

    def __enter__(self) -> EntryLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True, slots=True)
class EntrySummary:
    """What a scan knows of an entry without reading its message."""

    id: str
    created: float
    since: float
    size: int  # bytes on disk (entry + state)
    due: float | None  # None: every recipient has a final answer
    dead: bool  # final, with at least one failed recipient
    dsn_pending: bool  # a failure report is owed to the sender (a crash came in between)
    finished: float
    mail_from: str
    recipients: int
    key: tuple[int, int, int, int]  # changes whenever the entry's files change


@dataclass
class ScanResult:
    entries: dict[str, EntrySummary]
    corrupt: list[str]
    bytes: int
    # Entries that could not be read for another reason (permissions, I/O error): skipped
    # and logged, never quarantined (the file may be fine), tried again at the next scan.
    unreadable: list[str] = field(default_factory=list)
    # What is wrong with each damaged or unreadable entry, for `relay queue list`.
    problems: dict[str, str] = field(default_factory=dict)


class Spool:
    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int | None = None,
        reserve_bytes: int = DEFAULT_RESERVE_BYTES,
        committer: GroupCommitter | None = None,
        journal: bool = True,
    ) -> None:
        self.root = Path(root)
        self.entries = self.root / ENTRIES
        self.corrupt = self.root / CORRUPT
        self.journal_dir = self.root / JOURNAL
        self.max_bytes = max_bytes
        self.reserve_bytes = reserve_bytes
        self.committer = committer or GroupCommitter()
        self.owner = instance_name()
        # New entries are made durable by the journal (one fdatasync per batch); without
        # it, by an fsync of each entry file (`committer`), as chasquid and Postfix do.
        self.journal = Journal(self.journal_dir, self.entries, self.owner) if journal else None
        # Bytes on disk as of the last scan plus this process's changes since. Other
        # workers' new entries show up at the next scan (docs: `queue.max_bytes`).
        self.used_bytes = 0
        self._changed_bytes = 0  # this process's puts minus removals, ever (see `scan`)
        # The scan made by `open()`, handed to the delivery loop so that it does not read
        # every entry a second time at start.
        self.opened_scan: ScanResult | None = None
        self._reported_unreadable: dict[str, str] = {}
        self._unmovable: dict[str, str] = {}  # damaged entries whose quarantine failed, and why

    # -- setup and health ---------------------------------------------------------------
    def open(self) -> None:
        created = False
        for directory in (self.root, self.entries, self.corrupt, self.journal_dir):
            if not directory.is_dir():
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                created = True
        if created:
            # A new spool's directories must be durable before its first acknowledgement.
            for directory in {self.root.parent, self.root}:
                with contextlib.suppress(OSError):
                    fsync_directory(directory)
        self.opened_scan = self.scan({})
        self.used_bytes = self.opened_scan.bytes

    def problem(self) -> str | None:
        """Why new mail cannot be spooled now, or None."""
        problem = self.unwritable()
        if problem is None and self.max_bytes is not None and self.used_bytes >= self.max_bytes:
            return f"spool holds {self.used_bytes} bytes, max_bytes is {self.max_bytes}"
        return problem

    def unwritable(self) -> str | None:
        """Why the spool cannot be written at all (for /readyz), or None."""
        try:
            stats = os.statvfs(self.entries)
        except OSError as exc:
            return f"spool {self.entries}: {exc.strerror or exc}"
        if stats.f_flag & os.ST_RDONLY or not os.access(self.entries, os.W_OK | os.X_OK):
            return f"spool {self.entries} is not writable"
        if self.journal is not None and not os.access(self.journal_dir, os.W_OK | os.X_OK):
            # New entries are durable through the journal: without it, none is taken.
            return f"spool journal {self.journal_dir} is missing or not writable"
        if stats.f_bavail * stats.f_frsize < self.reserve_bytes:
            return f"spool filesystem has less than {self.reserve_bytes} bytes free"
        return None

    async def close(self) -> None:
        if self.journal is not None:
            await self.journal.close()
        await self.committer.close()

    # -- paths ----------------------------------------------------------------------------
    def path(self, entry_id: str) -> Path:
        if not valid_id(entry_id):
            raise ValueError(f"not a queue id: {entry_id!r}")
        return self.entries / entry_id

    def state_path(self, entry_id: str) -> Path:
        return self.path(entry_id).with_name(entry_id + STATE_SUFFIX)

    # -- new entries ----------------------------------------------------------------------
    def check_room(self, size: int) -> None:
        """452 4.3.1 (RFC 3463: mail system full) when `size` more bytes would not fit."""
        if self.max_bytes is not None and self.used_bytes + size > self.max_bytes:
            raise SmtpError(
                452,
                "4.3.1",
                "Insufficient system storage, try again later",
                reason=f"spool full: {self.used_bytes} of max_bytes {self.max_bytes} used",
                label="spool_full",
            )
        try:
            stats = os.statvfs(self.entries)
        except OSError as exc:
            raise _storage_error(exc) from None
        if stats.f_bavail * stats.f_frsize < size + self.reserve_bytes:
            raise SmtpError(
                452,
                "4.3.1",
                "Insufficient system storage, try again later",
                reason="spool filesystem nearly full",
                label="spool_full",
            )

    async def put(self, entry: QueueEntry, message: bytes) -> EntryLock:
        """Write a new entry durably; returns its lock, held. SmtpError 452 4.3.1 when the
        spool or its disk is full, 451 4.3.0 on another storage failure; nothing already
        queued is touched either way."""
        entry.owner = self.owner
        entry.size = len(message)
        data = encode_entry(entry, message)
        self.check_room(len(data))
        path = self.path(entry.id)
        try:
            if self.journal is None:
                fd = await self.committer.write(path, data, lock=True)
                assert fd is not None
            else:
                if len(data) > INLINE_WRITE_MAX:
                    fd = await _write_locked_in_thread(path, data)
                else:
                    fd = _write_locked(path, data)  # page cache only: microseconds
                try:
                    await self.journal.append(entry.id, data)
                except BaseException:
                    # Not durable, so not acknowledged, so not to be delivered either.
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                    os.close(fd)
                    raise
        except OSError as exc:
            raise _storage_error(exc) from None
        self._account(len(data))
        return EntryLock(entry.id, fd, self.journal)

    def _account(self, delta: int) -> None:
        self.used_bytes = max(0, self.used_bytes + delta)
        self._changed_bytes += delta

    def restore(self, entry_id: str, data: bytes, lost_possible: bool = True) -> bool:
        """Journal replay: make the entry durable; write `data` as the entry if its file is
        damaged, or missing while `lost_possible` (see relay.queue.journal)."""
        if not valid_id(entry_id):
            return False
        path = self.path(entry_id)
        try:
            held = self.lock(entry_id)
        except NotARegularFile as exc:
            # Not ours to overwrite: reported by the scan (`relay queue list`), left alone.
            log.error(
                "journal replay: not restoring over a file that is not an entry",
                extra={"id": entry_id, "reason": str(exc)},
            )
            return False
        if held is None and (path.exists() or not lost_possible):
            # Held by a live delivery: it is there. Or removed by someone (delivered by
            # another worker, deleted by an operator): a kill does not lose a written file.
            return False
        try:
            if held is not None:
                try:
                    decode_entry(os.pread(held.fd, os.fstat(held.fd).st_size, 0))
                    os.fsync(held.fd)  # its writer died before its checkpoint
                    return False  # intact
                except CorruptEntry:
                    pass
            try:
                decode_entry(data)
            except CorruptEntry:
                return False
            tmp = self.entries / f"{TMP_PREFIX}{entry_id}-{os.urandom(4).hex()}"
            _write_synced(tmp, data)
            os.rename(tmp, path)
            fsync_directory(self.entries)
            log.warning("spool entry restored from the journal", extra={"id": entry_id})
            return True
        finally:
            if held is not None:
                held.release()

    # -- ownership ------------------------------------------------------------------------
    def lock(self, entry_id: str, *, wait: float = 0.0) -> EntryLock | None:
        """Take the entry's lock; None if it is gone, or held by another past `wait` seconds."""
        path = self.path(entry_id)
        if self.journal is not None:
            kept = self.journal.take_kept(entry_id)
            if kept is not None:
                return EntryLock(entry_id, kept, self.journal)
        deadline = time.monotonic() + wait
        while True:
            try:
                fd = open_regular(path, follow_symlinks=False)
            except FileNotFoundError:
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    return None
                time.sleep(LOCK_POLL)
                continue
            # The holder before us may have removed the entry (delivered) after we opened
            # it: the lock is then on a file that no longer has the name.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                return None
            return EntryLock(entry_id, fd, self.journal)

    async def lock_async(self, entry_id: str, *, wait: float) -> EntryLock | None:
        deadline = time.monotonic() + wait
        while True:
            held = self.lock(entry_id)
            if held is not None or time.monotonic() >= deadline or not self.path(entry_id).exists():
                return held
            await asyncio.sleep(LOCK_POLL)

    # -- reading ---------------------------------------------------------------------------
    def read(self, held: EntryLock) -> tuple[QueueEntry, bytes]:
        """The whole entry (checksum verified) with its current state. CorruptEntry if the
        entry file is not intact; a damaged state file is moved to quarantine and the entry
        goes on from the state embedded in its file."""
        size = os.fstat(held.fd).st_size
        data = os.pread(held.fd, size, 0)
        entry, message = decode_entry(data)
        damaged = self._apply_state_file(entry)
        if damaged is not None:
            self._quarantine_state(held.id, damaged)
        return entry, message

    def read_meta(self, entry_id: str) -> QueueEntry:
        """Envelope and state without the message (FileNotFoundError when it is gone)."""
        return self.read_meta_checked(entry_id)[0]

    def read_meta_checked(self, entry_id: str) -> tuple[QueueEntry, str | None]:
        """`read_meta`, and why the entry's state file could not be used (the entry then
        has the state embedded in its file), or None."""
        with os.fdopen(open_regular(self.path(entry_id), follow_symlinks=False), "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(HEAD_READ)
            span = meta_span(head)
            if span > len(head):
                head += fh.read(span - len(head))
        entry = decode_meta(head, size)
        return entry, self._apply_state_file(entry)

    def read_message(self, entry_id: str) -> bytes:
        with os.fdopen(open_regular(self.path(entry_id), follow_symlinks=False), "rb") as fh:
            return decode_entry(fh.read())[1]

    def _apply_state_file(self, entry: QueueEntry) -> str | None:
        """Apply the entry's `.state` file; returns why it was not usable (the entry then keeps
        the state embedded in its file), or None."""
        try:
            with os.fdopen(open_regular(self.state_path(entry.id), follow_symlinks=False), "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            if not entry.since:
                entry.since = entry.created
            return None
        initial = entry.state()
        try:
            entry.apply_state(decode_state(data))
        except CorruptState as exc:
            return str(exc)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            entry.apply_state(initial)
            return f"bad state: {type(exc).__name__}"
        return None

    def _quarantine_state(self, entry_id: str, why: str) -> None:
        """A damaged `.state` (the caller holds the entry's lock): out of the way, kept for
        inspection. The message itself is intact, so it stays queued from its initial state:
        recipients already delivered may get it again (a duplicate rather than a loss)."""
        source = self.state_path(entry_id)
        target = self.corrupt / source.name
        if target.exists():
            target = self.corrupt / f"{source.name}.{int(time.time())}"
        try:
            os.rename(source, target)
        except FileNotFoundError:
            pass
        except OSError as exc:
            # Left in place: the entry goes on from the state embedded in its file all the same.
            log.error(
                "spool state file damaged, and it cannot be moved to quarantine; left in place",
                extra={"id": entry_id, "reason": why, "error": f"{exc.strerror or exc}"},
            )
            return
        log.error(
            "spool state file damaged; moved to quarantine, the message stays queued from its initial state",
            extra={"id": entry_id, "reason": why, "quarantine": str(target)},
        )
        self.committer.sync_later(self.entries)

    # -- state changes (the caller holds the entry's lock) ---------------------------------
    async def save(self, held: EntryLock, entry: QueueEntry) -> None:
        entry.owner = self.owner
        write = asyncio.ensure_future(self.committer.write(self.state_path(held.id), encode_state(entry)))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            # The caller's lock must outlive the write: released now, the rename could land
            # later over what the next holder (an operator, another worker) wrote.
            await asyncio.wait([write])
            raise

    def save_sync(self, held: EntryLock, entry: QueueEntry, owner: str | None = None) -> None:
        """`save` for callers without an event loop (the `relay queue` command)."""
        entry.owner = owner or self.owner
        tmp = self.entries / f"{TMP_PREFIX}{held.id}{STATE_SUFFIX}-{os.urandom(4).hex()}"
        _write_synced(tmp, encode_state(entry))
        os.rename(tmp, self.state_path(held.id))
        fsync_directory(self.entries)

    def prepare_removal(self, held: EntryLock) -> PreparedChange:
        """The change "every recipient delivered": the entry's removal, one unlink."""
        return PreparedChange(self, held, None)

    async def prepare(self, held: EntryLock, entry: QueueEntry) -> PreparedChange:
        """Get a state change ready to take effect with one syscall (see PreparedChange)."""
        if entry.done and not entry.failed:
            return PreparedChange(self, held, None)
        entry.owner = self.owner
        tmp = self.entries / f"{TMP_PREFIX}{held.id}{STATE_SUFFIX}-{os.urandom(4).hex()}"
        await asyncio.to_thread(_write_synced, tmp, encode_state(entry))
        return PreparedChange(self, held, tmp)

    def remove(self, held: EntryLock) -> None:
        """Every recipient delivered (or an operator's delete): the entry goes.

        The entry file first: once it is gone nothing will deliver the entry again, and a
        state file left behind by a crash is an orphan the next scan removes."""
        path = self.path(held.id)
        try:
            size = os.fstat(held.fd).st_size
            os.unlink(path)
        except FileNotFoundError:
            size = 0
        if self.journal is not None:
            self.journal.completed(held.id)
        with contextlib.suppress(FileNotFoundError):
            size += self.state_path(held.id).stat().st_size
            os.unlink(self.state_path(held.id))
        self._account(-size)
        self.committer.sync_later(self.entries)

    def damaged(self, held: EntryLock) -> str | None:
        """Why the held entry is not intact, or None (checked again under the lock before a
        quarantine: a journal replay may just have restored it)."""
        try:
            self.read(held)
        except CorruptEntry as exc:
            return str(exc)
        except FileNotFoundError:
            return None
        return None

    def quarantine(self, entry_id: str, why: str) -> None:
        """Move a damaged entry out of the way, with a log line; it is never delivered."""
        moved = []
        for source in (self.path(entry_id), self.state_path(entry_id)):
            try:
                target = self.corrupt / source.name
                if target.exists():
                    target = self.corrupt / f"{source.name}.{int(time.time())}"
                os.rename(source, target)
                moved.append(source.name)
            except FileNotFoundError:
                continue
            except OSError as exc:
                # A read-only spool, no room in corrupt/: the entry stays where it is, still
                # never delivered (every scan finds it damaged); one line per entry and reason.
                reason = f"{exc.strerror or exc}"
                if self._unmovable.get(entry_id) != reason:
                    self._unmovable[entry_id] = reason
                    log.error(
                        "spool entry damaged, and it cannot be moved to quarantine; left in place, not delivered",
                        extra={"id": entry_id, "reason": why, "error": reason, "path": str(source)},
                    )
                return
        self._unmovable.pop(entry_id, None)
        log.error(
            "spool entry damaged; moved to quarantine and not delivered",
            extra={"id": entry_id, "reason": why, "files": moved, "quarantine": str(self.corrupt)},
        )
        self.committer.sync_later(self.entries)

    # -- scanning -------------------------------------------------------------------------
    def scan(self, cache: dict[str, EntrySummary], *, tidy: bool = True) -> ScanResult:
        """Every entry's summary, reusing `cache` for files that did not change. Damaged
        entries are reported (not read further), unreadable ones skipped and logged. With
        `tidy` (the relay, not `relay queue`), segments of stopped processes are replayed,
        and orphaned state files and old tmp files of entries nobody holds are removed."""
        changed_before = self._changed_bytes
        with self._listing():
            result = self._scan(cache, tidy)
        # This process's puts and removals made while the listing ran are not lost (a
        # put may be counted twice until the next scan: over, never under).
        self.used_bytes = result.bytes + (self._changed_bytes - changed_before)
        return result

    @contextlib.contextmanager
    def _listing(self) -> Iterator[None]:
        """Shared hold of the replay lock for a listing; a replay of stopped processes'
        segments first, exclusively, when there is one (see REPLAY_LOCK)."""
        path = self.journal_dir / REPLAY_LOCK
        try:
            flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_CREAT if self.journal is not None else 0)
            fd = os.open(path, flags, 0o600)
        except OSError:
            if self.journal is not None:
                raise
            yield  # `relay queue` on a spool no relay has opened yet (or not ours to create)
            return
        try:
            if self.journal is not None and orphans(self.journal_dir, self.journal.prefix):
                fcntl.flock(fd, fcntl.LOCK_EX)
                replay_orphans(self.journal_dir, self.journal.prefix, self.restore, self.entries)
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def _scan(self, cache: dict[str, EntrySummary], tidy: bool) -> ScanResult:
        files: dict[str, os.stat_result] = {}
        states: dict[str, os.stat_result] = {}
        stale: list[str] = []
        now = time.time()
        with os.scandir(self.entries) as listing:
            for item in listing:
                name = item.name
                try:
                    stat = item.stat(follow_symlinks=False)  # a link is listed as what it is
                except FileNotFoundError:
                    continue
                if name.startswith(TMP_PREFIX):
                    if now - stat.st_mtime > STALE_TMP_AGE:
                        stale.append(name)
                elif name.endswith(STATE_SUFFIX):
                    states[name[: -len(STATE_SUFFIX)]] = stat
                elif valid_id(name):
                    files[name] = stat
        summaries: dict[str, EntrySummary] = {}
        corrupt: list[str] = []
        unreadable: list[str] = []
        problems: dict[str, str] = {}
        total = 0
        for entry_id, stat in files.items():
            state = states.get(entry_id)
            key = (stat.st_ino, stat.st_size, state.st_ino if state else 0, state.st_mtime_ns if state else 0)
            total += stat.st_size + (state.st_size if state else 0)
            known = cache.get(entry_id)
            if known is not None and known.key == key:
                summaries[entry_id] = known
                continue
            try:
                entry = self.read_meta(entry_id)
            except FileNotFoundError:
                continue
            except CorruptEntry as exc:
                log.debug("damaged entry found by scan", extra={"id": entry_id, "reason": str(exc)})
                corrupt.append(entry_id)
                problems[entry_id] = str(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - one entry's problem is never the spool's
                problems[entry_id] = self._report_unreadable(entry_id, exc)
                unreadable.append(entry_id)
                continue
            self._reported_unreadable.pop(entry_id, None)
            summaries[entry_id] = summarize(entry, key, stat.st_size + (state.st_size if state else 0))
        if tidy:
            for name in stale:
                self._remove_stale_tmp(name)
            for entry_id in states.keys() - files.keys():
                # The entry was removed (delivered) and a crash left its state behind. Checked
                # again: the entry may be new since the listing.
                if not self.path(entry_id).exists():
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.state_path(entry_id))
        return ScanResult(summaries, corrupt, total, unreadable, problems)

    def _report_unreadable(self, entry_id: str, exc: Exception) -> str:
        reason = str(exc) if isinstance(exc, NotARegularFile) else f"{type(exc).__name__}: {exc}"
        if self._reported_unreadable.get(entry_id) != reason:  # once per new reason, not every scan
            self._reported_unreadable[entry_id] = reason
            log.error(
                "spool entry unreadable; skipped, tried again at the next scan",
                extra={"id": entry_id, "reason": reason, "path": str(self.path(entry_id))},
            )
        return reason

    def _remove_stale_tmp(self, name: str) -> None:
        """An old tmp file is a crash's leftover, unless its entry is held: a prepared state
        (`.tmp-<id>.state-*`) waits for its transaction's end, however long it takes."""
        entry_id = name[len(TMP_PREFIX) :].rsplit("-", 1)[0].removesuffix(STATE_SUFFIX)
        if valid_id(entry_id) and self.path(entry_id).exists():
            try:
                held = self.lock(entry_id)
            except NotARegularFile:
                held = None  # the scan reports that name; the tmp file waits
            if held is None:
                return  # held by a delivery under way (or gone this instant: next scan)
            try:
                # Under the entry's lock: nobody can be preparing a state for it now.
                with contextlib.suppress(OSError):
                    os.unlink(self.entries / name)
            finally:
                held.release()
            return
        with contextlib.suppress(OSError):
            os.unlink(self.entries / name)

    # -- waking the workers -----------------------------------------------------------------
    def kick(self) -> None:
        path = self.root / KICK
        path.touch()
        os.utime(path)

    def kicked_at(self) -> float:
        try:
            return (self.root / KICK).stat().st_mtime
        except FileNotFoundError:
            return 0.0


def summarize(entry: QueueEntry, key: tuple[int, int, int, int], size: int) -> EntrySummary:
    return EntrySummary(
        id=entry.id,
        created=entry.created,
        since=entry.since,
        size=size,
        due=entry.next_due(),
        dead=entry.done and bool(entry.failed),
        dsn_pending=entry.dsn == "pending",
        finished=entry.finished,
        mail_from=entry.mail_from,
        recipients=len(entry.recipients),
        key=key,
    )


class PreparedChange:
    """A state change written and synced under a temporary name, waiting for its moment.

    The delivery loop prepares the state "these recipients delivered" before it sends the
    message, and puts it in place right after the upstream's 250: the window in which a
    crash would deliver the message again is then one rename (or, when every recipient is
    done, one unlink), not a file write and two fsyncs."""

    def __init__(self, spool: Spool, held: EntryLock, tmp: Path | None) -> None:
        self._spool = spool
        self._held = held
        self._tmp = tmp

    def commit(self) -> None:
        if self._tmp is None:
            self._spool.remove(self._held)
            return
        os.rename(self._tmp, self._spool.state_path(self._held.id))
        self._tmp = None
        self._spool.committer.sync_later(self._spool.entries)

    def discard(self) -> None:
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            self._tmp = None


INLINE_WRITE_MAX = 256 * 1024


def _write_locked(path: Path, data: bytes) -> int:
    """Write an entry file under a temporary name, lock it, give it its name; no fsync
    (the journal makes it durable). Returns the descriptor holding the lock."""
    tmp = path.parent / f"{TMP_PREFIX}{path.name}-{os.urandom(4).hex()}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.rename(tmp, path)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return fd


async def _write_locked_in_thread(path: Path, data: bytes) -> int:
    """`_write_locked` in a thread. A caller that gives up (a client that vanished) leaves
    the thread writing: once it is done, its entry is removed and its lock closed, as after
    a failed journal append (not acknowledged, so never to be delivered). Before, the entry
    stayed with its lock held by a descriptor nobody closed: no worker could deliver or
    remove it, and the next start delivered a message whose client had been told nothing."""
    write = asyncio.ensure_future(asyncio.to_thread(_write_locked, path, data))
    try:
        return await asyncio.shield(write)
    except asyncio.CancelledError:
        write.add_done_callback(lambda done: _discard_written(path, done))
        raise


def _discard_written(path: Path, write: asyncio.Future[int]) -> None:
    if write.cancelled() or write.exception() is not None:
        return
    with contextlib.suppress(OSError):
        os.unlink(path)
    os.close(write.result())


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        # A full disk: the partial file would hold its blocks until a scan removed it.
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    finally:
        os.close(fd)


def _storage_error(exc: OSError) -> SmtpError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SmtpError(
            452,
            "4.3.1",
            "Insufficient system storage, try again later",
            reason=f"spool write failed: {exc.strerror}",
            label="spool_full",
        )
    return SmtpError(
        451,
        "4.3.0",
        "Could not queue the message, try again later",
        reason=f"spool write failed: {exc.strerror or exc}",
        label="spool_error",
    )
