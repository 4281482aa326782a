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
from collections.abc import Callable
from importlib.metadata import version

import aiosmtpd.smtp
import aiosmtplib.protocol
from aiosmtplib import SMTPResponse
from aiosmtplib.protocol import SMTPProtocol

# The versions these patches were written and tested against: [lowest, first untested).
AIOSMTPD_VERSIONS = ((1, 4, 6), (1, 5))
AIOSMTPLIB_VERSIONS = ((3, 0), (6, 0))

# Private members of aiosmtpd.smtp.SMTP that RelaySMTP overrides or reads.
AIOSMTPD_PRIVATE_MEMBERS = (
    "_set_rset_state",  # RSET/HELO/EHLO/STARTTLS reset: ends the upstream transaction too
    "_set_post_data_state",  # after our own DATA handling; gives the DATA budget back
    "_getaddr",  # a stricter, faster path parser
    "_strip_command_keyword",  # "FROM:"/"TO:" off MAIL/RCPT, which RelaySMTP implements itself
    "_reset_timeout",  # DATA is read by RelaySMTP in chunks: each chunk resets the timer
    "_handle_client",  # sends the greeting through push(): where a client is admitted
)
# Private members of aiosmtplib's SMTPProtocol that the upstream DATA path uses (patch 3).
AIOSMTPLIB_PRIVATE_MEMBERS = ("_drain_helper", "_read_response_from_buffer")  # patches 3 and 6
AIOSMTPLIB_PRIVATE_ATTRIBUTES = ("_response_pending", "_buffer", "_connection_lost_callback")
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
        names = cls._names.get(type(obj))
        if names is None:
            names = cls._names[type(obj)] = [n for n in dir(type(obj)) if n.startswith("auth_")]
        return [(name, getattr(obj, name)) for name in names]


_class_names: dict[type, list[str]] = {}


def _method_names(obj: object) -> list[str]:
    """What aiosmtpd.smtp reads of `dir(obj)`: the `smtp_*` and `handle_*` names, in
    `dir()`'s (sorted) order, the class's looked up once per class (patch 4)."""
    cls = type(obj)
    if cls.__dir__ is not object.__dir__:
        return dir(obj)
    names = _class_names.get(cls)
    if names is None:
        names = _class_names[cls] = [name for name in dir(cls) if name.startswith(_DIR_PREFIXES)]
    own = [name for name in getattr(obj, "__dict__", ()) if name.startswith(_DIR_PREFIXES) and name not in names]
    return sorted(names + own) if own else list(names)


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
    start, seen = getattr(protocol, "_relay_scan", (0, 0))
    if len(buffer) < seen:
        start = 0
    while True:
        end = buffer.find(b"\n", start)
        if end == -1:
            protocol._relay_scan = (start, len(buffer))  # type: ignore[attr-defined]
            return None
        if buffer[start + 3 : start + 4] != b"-":
            # The last line (or a malformed one, which the parser reports).
            protocol._relay_scan = (0, 0)  # type: ignore[attr-defined]
            return _read_response_from_buffer(protocol)
        start = end + 1
