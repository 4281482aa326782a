"""One message as the relay sees it at DATA: the header fields parsed once, the body untouched.

The raw bytes are the DATA content after dot-unstuffing, with CRLF line endings only (the
listener refuses bare CR/LF, RFC 5321 §2.3.8). Parsing splits the header block into fields
and leaves the body as one slice, so signing canonicalizes the body exactly once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.utils import getaddresses

from relay.errors import SmtpError

# RFC 5322 §2.2: field-name = 1*ftext, printable US-ASCII except ":".
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_NON_ASCII = re.compile(rb"[\x80-\xff]")
_HEADER_END = re.compile(rb"\r\n\r\n")
# The usual From: `a@b.c`, `<a@b.c>` or `Name Words <a@b.c>`: a dot-atom address of a few
# plain characters, and a display name of plain words. For these the full parse
# (email.utils.getaddresses, most of from_domain's cost) finds exactly this address
# (tests/unit/test_message_from.py checks it against the full parse); anything else gets
# the full parse.
_PLAIN_ADDRESS = r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_PLAIN_FROM = re.compile(rf"(?:(?:[A-Za-z0-9]+ )*[A-Za-z0-9]+ ?)?<({_PLAIN_ADDRESS})>|({_PLAIN_ADDRESS})")


@dataclass(frozen=True, slots=True)
class HeaderField:
    name: bytes  # as written (case preserved)
    value: bytes  # everything after the colon, including folding, ending in CRLF

    @property
    def lname(self) -> str:
        return self.name.decode("ascii").lower()

    def unfolded(self) -> str:
        return self.value.replace(b"\r\n", b"").decode("utf-8", "replace").strip()


class WireMessage:
    """A message as it goes upstream: pieces (new header lines, the kept fields, the body as a
    view of the received bytes), never joined into one copy. CRLF line endings, not yet
    dot-stuffed (RFC 5321 §4.5.2 is the sender's job)."""

    __slots__ = ("pieces", "size")

    def __init__(self, pieces: Sequence[bytes | memoryview]) -> None:
        self.pieces = list(pieces)
        self.size = sum(len(p) for p in self.pieces)

    def __bytes__(self) -> bytes:
        """One copy of the whole message (for targets that need it whole, and tests)."""
        return b"".join(self.pieces)

    def isascii(self) -> bool:
        # Searched in place: a memoryview has no isascii(), and bytes(view) would copy.
        return not any(_NON_ASCII.search(piece) for piece in self.pieces)

    def header_isascii(self) -> bool:
        """The header section, up to its empty line, is ASCII (the pieces split after it,
        or not at all)."""
        for piece in self.pieces:
            end = _HEADER_END.search(piece)
            if _NON_ASCII.search(piece, 0, end.end() if end else len(piece)):
                return False
            if end:
                return True
        return True


class Message:
    """The parsed message. `fields` are in order, top to bottom; the body is a view of the
    received bytes (`raw[body_start:]`), never copied."""

    __slots__ = ("fields", "raw", "body_start")

    def __init__(self, fields: list[HeaderField], raw: bytes, body_start: int) -> None:
        self.fields = fields
        self.raw = raw
        self.body_start = body_start

    @property
    def body(self) -> memoryview:
        return memoryview(self.raw)[self.body_start :]

    @classmethod
    def parse(cls, raw: bytes) -> Message:
        if raw.startswith(b"\r\n"):
            return cls([], raw, 2)
        end = raw.find(b"\r\n\r\n")
        if end == -1:
            head, body_start = raw, len(raw)
        else:
            head, body_start = raw[: end + 2], end + 4
        fields: list[HeaderField] = []
        # A field's lines are collected and joined once: appending each folded line to
        # the value would copy the value again per line (quadratic in a field's length).
        name = b""
        lines: list[bytes] = []
        for line in head.split(b"\r\n")[:-1] if head.endswith(b"\r\n") else head.split(b"\r\n"):
            if line[:1] in (b" ", b"\t"):
                if not lines:
                    raise _malformed("the message starts with a folded line")
                lines.append(line)
                continue
            match = _FIELD.match(line)
            if match is None:
                raise _malformed("a header line has no field name")
            if lines:
                fields.append(HeaderField(name, b"\r\n".join(lines) + b"\r\n"))
            name, lines = match.group(1), [line[match.end() :]]
        if lines:
            fields.append(HeaderField(name, b"\r\n".join(lines) + b"\r\n"))
        return cls(fields, raw, body_start)

    def get_all(self, name: str) -> list[HeaderField]:
        # Compared as bytes: field names are ASCII (_FIELD), and decoding each is the cost.
        wanted = name.encode("ascii")
        return [f for f in self.fields if f.name.lower() == wanted]

    def header_bytes(self) -> bytes:
        return b"".join(f.name + b":" + f.value for f in self.fields)

    def to_bytes(self, prepend: bytes = b"") -> bytes:
        """The message with `prepend` (complete CRLF-terminated header lines) on top."""
        return bytes(self.wire(prepend))

    def wire(self, prepend: bytes = b"") -> WireMessage:
        """The message to send, with `prepend` (complete header lines) on top; the body is
        not copied."""
        return WireMessage((prepend + self.header_bytes() + b"\r\n", self.body))

    def without(self, drop: Iterable[HeaderField]) -> Message:
        """The message without the fields in `drop` (these objects, not equal copies).
        One pass with a set of identities: comparing every field with every dropped one
        is quadratic, and a message can carry tens of thousands of fields."""
        dropped = {id(f) for f in drop}
        kept = [f for f in self.fields if id(f) not in dropped]
        return Message(kept, self.raw, self.body_start)

    def from_domain(self) -> tuple[str, str]:
        """The one author address and its domain (RFC 5322 §3.6.2; RFC 7489 §6.6.1).

        Refuses a message without From, with several From fields, or with several
        addresses in From: DMARC evaluates exactly one author domain, and signing for
        one of several would be a guess.
        """
        fields = self.get_all("from")
        if not fields:
            raise SmtpError(
                550, "5.6.0", "Message has no From: header (RFC 5322 §3.6)", reason="no From header", label="no_from"
            )
        if len(fields) > 1:
            raise SmtpError(
                550,
                "5.6.0",
                "Message has more than one From: header",
                reason="several From headers",
                label="multiple_from",
            )
        value = fields[0].unfolded()
        plain = _PLAIN_FROM.fullmatch(value)
        addresses = [plain.group(1) or plain.group(2)] if plain else _parsed_addresses(value)
        if len(addresses) != 1 or "@" not in addresses[0]:
            raise SmtpError(
                550,
                "5.6.0",
                "From: must hold exactly one address (name@domain)",
                reason=f"From has {len(addresses)} usable addresses",
                label="bad_from",
            )
        address = addresses[0]
        domain = address.rpartition("@")[2].strip().rstrip(".").lower()
        if not domain:
            raise SmtpError(550, "5.6.0", "From: address has no domain", reason="From without domain", label="bad_from")
        return address, domain


def _parsed_addresses(value: str) -> list[str]:
    """The addresses of a From value by the full RFC 5322 parse."""
    try:
        parsed = getaddresses([value])
    except RecursionError:
        # The standard library's parser recurses once per nested comment (RFC 5322
        # §3.2.2 sets no bound on nesting): thousands of "(" are no address at all.
        parsed = []
    return [addr for _, addr in parsed if addr]


def _malformed(why: str) -> SmtpError:
    return SmtpError(
        550,
        "5.6.0",
        "Malformed message header (RFC 5322 §2.2)",
        reason=f"malformed header: {why}",
        label="malformed_header",
    )
