"""One spool entry: the envelope, per-recipient state, and the framed bytes on disk.

Two files per entry, both framed so that a torn or truncated file is recognised:

    <id>        RELAYQ1 <meta_len> <message_len> <crc32>\\n <meta JSON> <signed message>
    <id>.state  RELAYS1 <state_len> <crc32>\\n <state JSON>

The entry file is written once and never changed; it carries the envelope and the initial
state. Every later state change (an attempt's result, a retry or requeue by an operator)
writes the small `.state` file, which supersedes the state inside the entry file. The CRC
(zlib's CRC-32, over everything after the first line) and the lengths in the first line
catch a file cut short or garbled; such a file is never delivered, it is quarantined.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

ENTRY_MAGIC = b"RELAYQ1"
STATE_MAGIC = b"RELAYS1"
MAX_FIRST_LINE = 64

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"


class CorruptEntry(Exception):
    """A spool file that is not what we wrote: torn, truncated or altered."""


class CorruptState(CorruptEntry):
    """A `.state` file that is not what we wrote. The entry file (the message) may well be
    intact: its embedded initial state stands in (see Spool.read)."""


@dataclass
class RecipientState:
    address: str
    status: str = PENDING  # pending | delivered | failed
    attempts: int = 0
    next_attempt: float = 0.0  # unix time; 0 means now
    last_attempt: float = 0.0
    last_reply: str = ""  # the last answer for this recipient, "451 4.4.1 text"
    upstream: str = ""
    # RFC 3461 §4.1, §4.2: the client's NOTIFY and ORCPT parameters, kept for the DSN.
    notify: str | None = None
    orcpt: str | None = None

    @property
    def final(self) -> bool:
        return self.status != PENDING

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecipientState:
        # Fields this version does not know (written by a newer relay before a rollback)
        # are dropped, not fatal: the entry stays deliverable.
        return cls(**{k: v for k, v in data.items() if k in _RECIPIENT_FIELDS})


@dataclass
class QueueEntry:
    id: str
    mail_from: str  # "" for the null reverse-path (a DSN, or a client's own bounce)
    recipients: list[RecipientState]
    created: float  # when the client got its 250 (unix time)
    since: float = 0.0  # when the entry (re)entered the queue: `max_age` counts from here
    size: int = 0  # bytes of the signed message
    body_8bit: bool = False
    smtputf8: bool = False
    # RFC 3461 §4.3, §4.4: RET=FULL|HDRS and ENVID of the client's MAIL command.
    ret: str | None = None
    envid: str | None = None
    listener: str = ""
    user: str | None = None
    from_domain: str | None = None
    owner: str = ""  # the instance that last held the entry (host:pid), for operators
    finished: float = 0.0  # when every recipient got a final answer (dead-letter age)
    # The failure report for the sender: "" (none due yet), "pending" (due, not yet queued:
    # a crash in between is caught up on), "queued", or "none" (not wanted / not allowed).
    dsn: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # Sending limits of the From domain (spool mode counts them at delivery): whether the
    # message has been counted (once, however many attempts it takes), and a count taken
    # for an attempt that no delivery has settled yet ({"slot", "messages", "recipients",
    # "backend"}): an attempt cut short (a crash, a stop) leaves it, and the next attempt
    # gives it back before counting again.
    limits_counted: bool = False
    limits_unsettled: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.since:
            self.since = self.created

    @property
    def pending(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.status == PENDING]

    @property
    def done(self) -> bool:
        return all(r.final for r in self.recipients)

    @property
    def failed(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.status == FAILED]

    def next_due(self) -> float | None:
        """When the next pending recipient is due, or None when nothing is pending."""
        times = [r.next_attempt for r in self.recipients if r.status == PENDING]
        return min(times) if times else None

    # -- serialisation --------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return asdict(self)

    def state(self) -> dict[str, Any]:
        """The mutable part: what a `.state` file carries."""
        state = {
            "since": self.since,
            "owner": self.owner,
            "finished": self.finished,
            "dsn": self.dsn,
            "recipients": [asdict(r) for r in self.recipients],
        }
        if self.limits_counted:
            state["limits_counted"] = True
        if self.limits_unsettled is not None:
            state["limits_unsettled"] = self.limits_unsettled
        return state

    def apply_state(self, state: dict[str, Any]) -> None:
        self.since = float(state["since"])
        self.owner = str(state.get("owner", ""))
        self.finished = float(state.get("finished", 0.0))
        self.dsn = str(state.get("dsn", ""))
        self.recipients = [RecipientState.from_dict(r) for r in state["recipients"]]
        self.limits_counted = bool(state.get("limits_counted", False))
        unsettled = state.get("limits_unsettled")
        self.limits_unsettled = unsettled if isinstance(unsettled, dict) else None

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> QueueEntry:
        meta = {k: v for k, v in meta.items() if k in _ENTRY_FIELDS}  # see RecipientState.from_dict
        meta["recipients"] = [RecipientState.from_dict(r) for r in meta["recipients"]]
        return cls(**meta)


_RECIPIENT_FIELDS = frozenset(f.name for f in fields(RecipientState))
_ENTRY_FIELDS = frozenset(f.name for f in fields(QueueEntry))


def encode_entry(entry: QueueEntry, message: bytes) -> bytes:
    meta = json.dumps(entry.meta(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    crc = zlib.crc32(message, zlib.crc32(meta))
    first = b"%s %d %d %08x\n" % (ENTRY_MAGIC, len(meta), len(message), crc)
    return b"".join((first, meta, message))


def encode_state(entry: QueueEntry) -> bytes:
    body = json.dumps(entry.state(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return b"%s %d %08x\n" % (STATE_MAGIC, len(body), zlib.crc32(body)) + body


def _first_line(head: bytes, magic: bytes, fields: int) -> tuple[int, list[int]]:
    end = head.find(b"\n", 0, MAX_FIRST_LINE)
    if end == -1:
        raise CorruptEntry("no header line")
    parts = head[:end].split(b" ")
    if len(parts) != fields + 1 or parts[0] != magic:
        raise CorruptEntry("bad header line")
    try:
        numbers = [int(p) for p in parts[1:-1]] + [int(parts[-1], 16)]
    except ValueError:
        raise CorruptEntry("bad header numbers") from None
    return end + 1, numbers


def decode_entry(data: bytes) -> tuple[QueueEntry, bytes]:
    """The entry and its message from a whole entry file; CorruptEntry if it is not intact."""
    start, (meta_len, message_len, crc) = _first_line(data, ENTRY_MAGIC, 3)
    if len(data) != start + meta_len + message_len:
        raise CorruptEntry(f"length {len(data)} does not match the header ({start + meta_len + message_len})")
    view = memoryview(data)
    if zlib.crc32(view[start:]) != crc:
        raise CorruptEntry("checksum mismatch")
    try:
        entry = QueueEntry.from_meta(json.loads(bytes(view[start : start + meta_len])))
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise CorruptEntry(f"bad metadata: {type(exc).__name__}") from None
    return entry, bytes(view[start + meta_len :])


def decode_meta(head: bytes, file_size: int) -> QueueEntry:
    """The entry from the start of its file (header line and metadata), checking that the
    file is as long as its header says. Cheap: the message itself is not read."""
    start, (meta_len, message_len, _crc) = _first_line(head, ENTRY_MAGIC, 3)
    if file_size != start + meta_len + message_len:
        raise CorruptEntry(f"length {file_size} does not match the header ({start + meta_len + message_len})")
    if len(head) < start + meta_len:
        raise CorruptEntry("metadata cut short")
    try:
        return QueueEntry.from_meta(json.loads(head[start : start + meta_len]))
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise CorruptEntry(f"bad metadata: {type(exc).__name__}") from None


def meta_span(head: bytes) -> int:
    """How many bytes from the start of an entry file hold the header line and metadata."""
    start, (meta_len, _message_len, _crc) = _first_line(head, ENTRY_MAGIC, 3)
    return start + meta_len


def decode_state(data: bytes) -> dict[str, Any]:
    try:
        start, (length, crc) = _first_line(data, STATE_MAGIC, 2)
    except CorruptEntry as exc:
        raise CorruptState(f"state file: {exc}") from None
    body = data[start:]
    if len(body) != length or zlib.crc32(body) != crc:
        raise CorruptState("state file torn or altered")
    try:
        state = json.loads(body)
        if not isinstance(state, dict) or not isinstance(state.get("recipients"), list):
            raise ValueError("no recipients")
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise CorruptState(f"bad state: {type(exc).__name__}") from None
    return state
