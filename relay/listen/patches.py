"""Every change the relay makes to aiosmtpd and aiosmtplib beyond their public API, in one place.

Applied once, explicitly, by `apply()` (the server calls it at start; the in-process tests
too), and checked against the installed versions first: these touch private members, so a
version outside the tested range refuses to start rather than misbehave. pyproject.toml caps
both libraries to the same range.

1. aiosmtpd's `SMTP.__init__` calls `inspect.getmembers()` on the protocol and the handler of
   every connection, only to find their `auth_*` methods; getmembers evaluates every
   attribute, which cost about 8% of the relay's CPU under load. The names depend on the
   class alone, so they are looked up once per class.
2. aiosmtplib rewrites every line ending of a message with a regex before DATA. The listener
   refuses bare CR/LF (RFC 5321 §2.3.8), so messages here are CRLF-only already and the
   rewrite changes nothing; checking that is three C-level scans instead of a regex pass.
   (The relay's own DATA path, `UpstreamConnection._stream_data`, no longer calls it; the
   patch stays for any other use of `SMTP.data`.)
3. `UpstreamConnection._stream_data` writes DATA in pieces through aiosmtplib's protocol and
   uses two of its private members: `_drain_helper` (flow control) and `_response_pending`
   (a reply arriving before `read_response()` is awaited is kept, not dropped).
4. aiosmtpd's `SMTP.__init__` also lists `dir()` of the protocol and of the handler on every
   connection, and goes through every name (~150) to find the `smtp_*` and `handle_*` ones:
   its only two uses of `dir` (checked). Inside aiosmtpd.smtp, `dir` now gives just the
   names with those prefixes, in `dir()`'s order: the class's looked up once per class, the
   instance's own added each time. What aiosmtpd builds from them is unchanged.
5. aiosmtpd passes every command line through `sanitized_log` (a regex that hides AUTH
   credentials) twice, before the logger is asked whether that level is on; the relay keeps
   `mail.log` at WARNING, so the work was thrown away. The check now comes first; a line
   that is logged is sanitized exactly as before.

6. aiosmtplib parses an upstream's reply from the start of its buffer whenever a read ends
   in a line break, so a multiline reply that arrives a line per TCP segment is parsed once
   per line: quadratic, ~20 s of the event loop for one 32 KiB reply of short lines (an MX
   host in `mode: mx` is anyone's). The parse now runs once the final line (no "-" after
   the code, RFC 5321 §4.2.1) has arrived; until then each byte is looked at once.

7. Even so, aiosmtpd's `SMTP.__init__` bound every `smtp_*` method of the protocol (~25),
   every `handle_*` hook and `auth_*` mechanism of both objects into per-connection dicts,
   and formatted an "Available AUTH mechanisms" line that mail.log (at WARNING) drops: about
   40 of the ~55 µs a connection's protocol cost. Which attribute serves which command,
   hook or mechanism depends on the two classes alone: it is now found once per pair of
   classes, and `SMTP.__init__` only binds the hooks and mechanisms (a few) and gives the
   commands as a table that binds the one asked for (`CommandTable`). While mail.log logs
   INFO, aiosmtpd builds its tables itself (patches 1 and 4), so that its line lists the
   mechanisms; so it does for a handler with `handle_EHLO` (its signature is checked there)
   and for objects with such attributes of their own.

`RelaySMTP` (relay.listen.smtp) also overrides private members of aiosmtpd's `SMTP`; they
are listed in `AIOSMTPD_PRIVATE_MEMBERS` and checked here too. Its STARTTLS is its own
(relay.listen.starttls: the loop's TLS transport instead of asyncio's pure-Python one) and
repoints the stream's private transport attributes, as aiosmtpd does: checked here too.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import aiosmtpd.smtp
import aiosmtplib.protocol
from aiosmtplib import SMTPResponse
from aiosmtplib.protocol import SMTPProtocol

from relay.deliver.pipelining import SCAN_STATE

# The versions these patches were written and tested against: [lowest, first untested).
AIOSMTPD_VERSIONS = ((1, 4, 6), (1, 5))
AIOSMTPLIB_VERSIONS = ((3, 0), (6, 0))

# Private members of aiosmtpd.smtp.SMTP that RelaySMTP overrides or reads.
AIOSMTPD_PRIVATE_MEMBERS = (
    "_set_rset_state",  # RSET/HELO/EHLO/STARTTLS reset: ends the upstream transaction too
    "_set_post_data_state",  # after our own DATA handling; gives the DATA budget back
    "_getaddr",  # a stricter, faster path parser
    "_strip_command_keyword",  # "FROM:"/"TO:" off MAIL/RCPT, which RelaySMTP implements itself
    "_reset_timeout",  # the idle timer, re-armed lazily (also per DATA chunk, read by RelaySMTP)
    "_handle_client",  # sends the greeting through push(): where a client is admitted
)
# Private members of aiosmtplib's SMTPProtocol that the upstream DATA path uses (patch 3).
AIOSMTPLIB_PRIVATE_MEMBERS = ("_drain_helper", "_read_response_from_buffer")  # patches 3 and 6
# Its instance attributes that the DATA path and RFC 2920 pipelining (relay.deliver.pipelining,
# which reads two replies of one write) rely on.
AIOSMTPLIB_PRIVATE_ATTRIBUTES = (
    "_response_pending",
    "_buffer",
    "_connection_lost_callback",
    "_response_waiter",
    "_command_lock",
)
# aiosmtplib.SMTP's handler of a lost connection, chained by UpstreamConnection.watch_loss.
AIOSMTPLIB_SMTP_PRIVATE_MEMBERS = ("_on_connection_lost",)
# Instance attributes set in SMTP.__init__ that RelaySMTP reads.
AIOSMTPD_PRIVATE_ATTRIBUTES = ("_reader", "_writer", "_timeout_handle")
# asyncio's stream attributes that STARTTLS repoints, as aiosmtpd does (relay.listen.starttls).
ASYNCIO_STREAM_ATTRIBUTES = (
    ("StreamReader", "_buffer"),
    ("StreamReader", "_transport"),
    ("StreamWriter", "_transport"),
)

# What patches 4 and 5 rely on aiosmtpd's module calling by these names.
_AIOSMTPD_CALLS = ("sanitized_log(log.info, ", "sanitized_log(log.debug, ")
# Patch 4 holds while aiosmtpd.smtp uses dir() only for these two filtered loops.
_AIOSMTPD_DIR_USES = (
    re.compile(r'for m in dir\(handler\)\s+if m\.startswith\("handle_"\)'),
    re.compile(r'for m in dir\(self\)\s+if m\.startswith\("smtp_"\)'),
)
_DIR_PREFIXES = ("smtp_", "handle_")
# What patch 7 relies on: the tables SMTP.__init__ builds (and it replaces), how a mechanism
# is named, and what an entry of `_auth_methods` is.
_AIOSMTPD_TABLES = (
    "self._auth_methods: Dict[str, _AuthMechAttr] = {",
    "self._handle_hooks: Dict[str, Callable] = {",
    "self._smtp_methods: Dict[str, Any] = {",
    '"__auth_mechanism_name__"',
    'mname.replace("auth_", "").replace("__", "-")',
    "for m in (auth_exclude_mechanism or []):",
    'ehlo_hook = self._handle_hooks.get("EHLO")',
)
_TABLE_PREFIXES = ("smtp_", "handle_", "auth_")

_applied = False


class IncompatibleLibrary(RuntimeError):
    """An installed aiosmtpd/aiosmtplib is not one the relay's patches fit."""


def apply() -> None:
    """Check the installed versions and private members, then patch (once)."""
    global _applied
    if _applied:
        return
    check()
    setattr(aiosmtpd.smtp, "inspect", _AuthMemberLookup)  # noqa: B010 - replaces a module global
    setattr(aiosmtpd.smtp, "dir", _method_names)  # noqa: B010 - shadows the builtin in that module
    setattr(aiosmtpd.smtp, "sanitized_log", _sanitized_log_if_enabled)  # noqa: B010
    setattr(aiosmtpd.smtp.SMTP, "__init__", _init_with_class_tables)  # noqa: B010
    aiosmtplib.protocol.normalize_message_line_endings = _crlf_only_fast_path
    setattr(aiosmtplib.protocol.SMTPProtocol, "_read_response_from_buffer", _read_response_once_complete)  # noqa: B010
    _applied = True


def check() -> None:
    _check_version("aiosmtpd", AIOSMTPD_VERSIONS)
    _check_version("aiosmtplib", AIOSMTPLIB_VERSIONS)
    missing = [name for name in AIOSMTPD_PRIVATE_MEMBERS if not callable(getattr(aiosmtpd.smtp.SMTP, name, None))]
    source = inspect.getsource(aiosmtpd.smtp.SMTP)
    missing += [name for name in AIOSMTPD_PRIVATE_ATTRIBUTES if f"self.{name} = " not in source]
    if getattr(aiosmtpd.smtp, "inspect", None) is not inspect and not _applied:
        missing.append("aiosmtpd.smtp.inspect")
    if not callable(getattr(aiosmtpd.smtp, "sanitized_log", None)):
        missing.append("aiosmtpd.smtp.sanitized_log")
    smtp_source = inspect.getsource(aiosmtpd.smtp)
    missing += [f"aiosmtpd.smtp: {use}" for use in _AIOSMTPD_CALLS if use not in smtp_source]
    missing += [f"aiosmtpd.smtp: {use}" for use in _AIOSMTPD_TABLES if use not in smtp_source]
    if not hasattr(aiosmtpd.smtp, "_AuthMechAttr"):
        missing.append("aiosmtpd.smtp._AuthMechAttr")
    if len(re.findall(r"\bdir\(", smtp_source)) != len(_AIOSMTPD_DIR_USES):
        missing.append("aiosmtpd.smtp: dir() used only to find smtp_*/handle_* methods")
    missing += [f"aiosmtpd.smtp: {use.pattern}" for use in _AIOSMTPD_DIR_USES if not use.search(smtp_source)]
    if not callable(getattr(aiosmtplib.protocol, "normalize_message_line_endings", None)):
        missing.append("aiosmtplib.protocol.normalize_message_line_endings")
    protocol = aiosmtplib.protocol.SMTPProtocol
    missing += [name for name in AIOSMTPLIB_PRIVATE_MEMBERS if not callable(getattr(protocol, name, None))]
    missing += [
        f"SMTP.{name}" for name in AIOSMTPLIB_SMTP_PRIVATE_MEMBERS if not callable(getattr(aiosmtplib.SMTP, name, None))
    ]
    protocol_source = inspect.getsource(protocol)
    missing += [name for name in AIOSMTPLIB_PRIVATE_ATTRIBUTES if f"self.{name} = " not in protocol_source]
    missing += [
        f"asyncio.{cls}.{name}"
        for cls, name in ASYNCIO_STREAM_ATTRIBUTES
        if f"self.{name} = " not in inspect.getsource(getattr(asyncio, cls))
    ]
    if missing:
        raise IncompatibleLibrary(f"installed aiosmtpd/aiosmtplib lack what relay patches: {', '.join(missing)}")


def _check_version(package: str, supported: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
    installed = version(package)
    parsed = tuple(int(part) for part in installed.split(".")[:3] if part.isdigit())
    low, high = supported
    if not (low <= parsed < high):
        shown = f"{'.'.join(map(str, low))} up to (not including) {'.'.join(map(str, high))}"
        raise IncompatibleLibrary(f"relay supports {package} {shown}; {installed} is installed")


class _AuthMemberLookup:
    """Stands in for the `inspect` module inside aiosmtpd.smtp (patch 1)."""

    _names: dict[type, list[str]] = {}
    signature = staticmethod(inspect.signature)

    @classmethod
    def getmembers(cls, obj: object) -> list[tuple[str, object]]:
        if getattr(_building, "tables", False):
            return []  # patch 7 makes the table
        names = cls._names.get(type(obj))
        if names is None:
            names = cls._names[type(obj)] = [n for n in dir(type(obj)) if n.startswith("auth_")]
        return [(name, getattr(obj, name)) for name in names]


_class_names: dict[type, list[str]] = {}


def _method_names(obj: object) -> list[str]:
    """What aiosmtpd.smtp reads of `dir(obj)`: the `smtp_*` and `handle_*` names, in
    `dir()`'s (sorted) order, the class's looked up once per class (patch 4)."""
    if getattr(_building, "tables", False):
        return []  # patch 7 makes the tables
    cls = type(obj)
    if cls.__dir__ is not object.__dir__:
        return dir(obj)
    names = _class_names.get(cls)
    if names is None:
        names = _class_names[cls] = [name for name in dir(cls) if name.startswith(_DIR_PREFIXES)]
    own = [name for name in getattr(obj, "__dict__", ()) if name.startswith(_DIR_PREFIXES) and name not in names]
    return sorted(names + own) if own else list(names)


_original_smtp_init: Callable[..., None] = aiosmtpd.smtp.SMTP.__init__
# Set while aiosmtpd's SMTP.__init__ runs for patch 7: its dir() and getmembers() then find
# nothing, and the tables are made after it (per thread: test upstreams run in threads).
_building = threading.local()


class CommandTable(Mapping[str, Any]):
    """A connection's `SMTP._smtp_methods`: command -> the protocol's `smtp_*` method, bound
    when it is looked up (patch 7). aiosmtpd reads it with `get()` per command and
    `items()` for HELP."""

    __slots__ = ("_protocol", "_names")

    def __init__(self, protocol: object, names: dict[str, str]) -> None:
        self._protocol = protocol
        self._names = names

    def get(self, command: str, default: Any = None) -> Any:
        name = self._names.get(command)
        return default if name is None else getattr(self._protocol, name)

    def __getitem__(self, command: str) -> Any:
        return getattr(self._protocol, self._names[command])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@dataclass(frozen=True)
class _ClassTables:
    """Which attribute serves each command, hook and AUTH mechanism, for one pair of
    (protocol class, handler class); None where the classes' dir() is their own."""

    commands: dict[str, str]
    hooks: tuple[tuple[str, str], ...]
    mechanisms: tuple[tuple[str, bool, str], ...]  # (mechanism, of the protocol, attribute)


_tables: dict[tuple[type, type], _ClassTables | None] = {}


def _class_tables(protocol_class: type[object], handler_class: type[object]) -> _ClassTables | None:
    key = (protocol_class, handler_class)
    if key in _tables:
        return _tables[key]
    tables = None
    if protocol_class.__dir__ is object.__dir__ and handler_class.__dir__ is object.__dir__:
        # As aiosmtpd names them: the same str.replace calls, the last of equal names wins.
        protocol_names, handler_names = dir(protocol_class), dir(handler_class)
        mechanisms: dict[str, tuple[bool, str]] = {}
        for of_protocol, cls, names in ((True, protocol_class, protocol_names), (False, handler_class, handler_names)):
            for name in names:
                if name.startswith("auth_"):
                    default = name.replace("auth_", "").replace("__", "-")
                    mechanisms[getattr(getattr(cls, name), "__auth_mechanism_name__", default)] = (of_protocol, name)
        tables = _ClassTables(
            commands={name.replace("smtp_", ""): name for name in protocol_names if name.startswith("smtp_")},
            hooks=tuple((name.replace("handle_", ""), name) for name in handler_names if name.startswith("handle_")),
            mechanisms=tuple((mechanism, *source) for mechanism, source in mechanisms.items()),
        )
        if any(hook == "EHLO" for hook, _ in tables.hooks):
            tables = None  # aiosmtpd checks that hook's signature (and warns): its own way
    _tables[key] = tables
    return tables


def _own_table_names(obj: object) -> bool:
    """Whether the object has attributes of its own that aiosmtpd's dir() would find."""
    own: dict[str, Any] = getattr(obj, "__dict__", None) or {}
    return bool(own) and any(name.startswith(_TABLE_PREFIXES) for name in own)


def _init_with_class_tables(self: aiosmtpd.smtp.SMTP, handler: Any, **kwargs: Any) -> None:
    """aiosmtpd's `SMTP.__init__`, its tables made from the classes' (patch 7)."""
    tables = _class_tables(type(self), type(handler))
    if (
        tables is None
        or aiosmtpd.smtp.log.isEnabledFor(logging.INFO)
        or _own_table_names(self)
        or _own_table_names(handler)
    ):
        _original_smtp_init(self, handler, **kwargs)
        return
    _building.tables = True
    try:
        _original_smtp_init(self, handler, **kwargs)
    finally:
        _building.tables = False
    self._smtp_methods = CommandTable(self, tables.commands)  # type: ignore[assignment] # read as a dict
    self._handle_hooks = {hook: getattr(handler, name) for hook, name in tables.hooks}
    auth_methods = {
        mechanism: aiosmtpd.smtp._AuthMechAttr(getattr(self if of_protocol else handler, name), of_protocol)
        for mechanism, of_protocol, name in tables.mechanisms
    }
    for mechanism in kwargs.get("auth_exclude_mechanism") or ():
        auth_methods.pop(mechanism, None)
    self._auth_methods = auth_methods


_original_sanitized_log = aiosmtpd.smtp.sanitized_log
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _sanitized_log_if_enabled(func: Callable[..., None], msg: str, *args: object, **kwargs: object) -> None:
    """aiosmtpd's `sanitized_log`, skipped when the logger would drop the line (patch 5)."""
    logger = getattr(func, "__self__", None)
    level = _LEVELS.get(getattr(func, "__name__", ""))
    if isinstance(logger, logging.Logger) and level is not None and not logger.isEnabledFor(level):
        return
    _original_sanitized_log(func, msg, *args, **kwargs)


_normalize_line_endings: Callable[[bytes], bytes] = aiosmtplib.protocol.normalize_message_line_endings


def _crlf_only_fast_path(message: bytes) -> bytes:
    """aiosmtplib's line-ending rewrite, skipped for CRLF-only messages (patch 2)."""
    crlf = message.count(b"\r\n")
    if message.count(b"\n") == crlf and message.count(b"\r") == crlf:
        return message if message.endswith(b"\r\n") else message + b"\r\n"
    return _normalize_line_endings(message)


_read_response_from_buffer: Callable[[SMTPProtocol], SMTPResponse | None] = (
    aiosmtplib.protocol.SMTPProtocol._read_response_from_buffer
)


def _read_response_once_complete(protocol: SMTPProtocol) -> SMTPResponse | None:
    """aiosmtplib's reply parser, run only once the buffer holds the reply's final line
    (patch 6). The lines before it are scanned once: where the scan stopped is kept on the
    protocol, and starts over when the buffer was emptied (a reply taken, an overflow)."""
    buffer = protocol._buffer
    start, seen = getattr(protocol, SCAN_STATE, (0, 0))
    if len(buffer) < seen:
        start = 0
    while True:
        end = buffer.find(b"\n", start)
        if end == -1:
            setattr(protocol, SCAN_STATE, (start, len(buffer)))
            return None
        if buffer[start + 3 : start + 4] != b"-":
            # The last line (or a malformed one, which the parser reports).
            setattr(protocol, SCAN_STATE, (0, 0))
            return _read_response_from_buffer(protocol)
        start = end + 1
