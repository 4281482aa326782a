"""The DKIM signer: relaxed/relaxed, RSA through OpenSSL, Ed25519 per RFC 8463.

dkimpy does the header selection (RFC 6376 §5.4.2); canonicalization (§3.4, header and
body) and folding are done here in linear time and bounded memory (see below);
the private-key operation goes through `cryptography` (OpenSSL), because dkimpy's RSA is
pure Python and about 25 times slower. The body is canonicalized and hashed once per
message, however many keys sign it; each key then costs one header hash and one signature.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim import RE_BTAG, select_headers

from relay.message import Message
from relay.sign.keys import SigningKey

_SIG_NAME = b"DKIM-Signature"
_PREHASHED_SHA256 = Prehashed(hashes.SHA256())


# RFC 6376 §3.4.4 relaxed body rules as linear-time patterns. dkimpy's `[\t ]+\r\n` is tried
# at every position of a run of spaces and backtracks through the rest of the run each time:
# quadratic in the run (80 KB of spaces took 54 s). The look-behinds start a match only at
# the beginning of a run (or of a CRLF sequence), so each byte is looked at a bounded number
# of times.
_TRAILING_WSP = re.compile(rb"(?<![\t ])[\t ]+\r\n")
_WSP_RUN = re.compile(rb"[\t ]+")
_WSP_AT = re.compile(rb"[\t ]*")
_TRAILING_CRLFS = re.compile(rb"(?<!\r\n)(?:\r\n)*\Z")
# Bodies are canonicalized and hashed in pieces of about this size, each ending after a CRLF
# (no whitespace run crosses a line end), so no copy of the whole body is ever made.
_PIECE = 64 * 1024
_CRLFS = b"\r\n" * 4096


def relaxed_body_hash(data: bytes, start: int = 0) -> bytes:
    """SHA-256 of the relaxed canonical form (RFC 6376 §3.4.4) of the body `data[start:]`,
    dkimpy's result, in linear time and without copying the body: whitespace runs at line
    ends removed, other runs made one space, empty lines at the end ignored, a non-empty
    body ending in one CRLF."""
    view = memoryview(data)
    digest = hashlib.sha256()
    pending = 0  # CRLFs held back: they count only if a non-empty line follows
    fed = False
    end_of_body = len(data)
    while start < end_of_body:
        end = data.find(b"\r\n", min(start + _PIECE, end_of_body))
        end = end_of_body if end == -1 else end + 2
        piece: bytes | memoryview = view[start:end]
        if any(data.find(wsp, start, end) != -1 for wsp in (b"\t", b"  ", b" \r\n")):
            piece = _WSP_RUN.sub(b" ", _TRAILING_WSP.sub(b"\r\n", piece))
        cut = _trailing_crlfs_start(piece)
        if cut:
            while pending:
                n = min(pending, len(_CRLFS) // 2)
                digest.update(_CRLFS[: 2 * n])
                pending -= n
            digest.update(piece[:cut])
            fed = True
        pending += (len(piece) - cut) // 2
        start = end
    if fed:
        digest.update(b"\r\n")
    return digest.digest()


def _trailing_crlfs_start(piece: bytes | memoryview) -> int:
    """Where the CRLFs that end `piece` start (len(piece) if it does not end in CRLF). In C
    for the usual case; a pattern search over the whole piece would cost 100 times the
    hashing."""
    data = bytes(piece) if isinstance(piece, memoryview) else piece
    start = len(data.rstrip(b"\r\n"))
    run = data[start:]
    if run.count(b"\r\n") * 2 == len(run):
        return start  # the run is CRLFs only
    end = len(data)  # bare CR/LF in the run: count whole CRLFs from the end
    while end >= 2 and data[end - 2 : end] == b"\r\n":
        end -= 2
    return end


def relaxed_header(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    """One header field in relaxed form (RFC 6376 §3.4.2), dkimpy's result: the name in
    lower case, the value unfolded, each whitespace run one space, stripped, then CRLF.

    dkimpy compresses the value with one `re.sub` over all of it, which lists every run
    before joining: a 10 MB signed Subject of "a a a ..." (5 million runs) took a gigabyte.
    Long values are done in pieces of about _PIECE bytes instead, each ending after a
    whitespace run, so no run is split and no list grows past a piece's runs."""
    # Unfolding removes CRLF and, as dkimpy's `\r?\n` does, any bare LF (none reach here).
    value = value.replace(b"\r\n", b"").replace(b"\n", b"")
    if len(value) <= _PIECE:
        if b"\t" in value or b"  " in value:
            value = _WSP_RUN.sub(b" ", value)
        # else: no run longer than one space, nothing to compress (the usual field)
        return name.lower().rstrip(), value.strip() + b"\r\n"
    pieces = []
    start, end_of_value = 0, len(value)
    while start < end_of_value:
        run = _WSP_AT.match(value, min(start + _PIECE, end_of_value))
        assert run is not None  # `[\t ]*` matches anywhere
        end = run.end()
        pieces.append(_WSP_RUN.sub(b" ", value[start:end]))
        start = end
    return name.lower().rstrip(), b"".join(pieces).strip() + b"\r\n"


def relaxed_body(body: bytes) -> bytes:
    """The relaxed canonical body itself (for tests and tools; signing uses the hash)."""
    canonical = _WSP_RUN.sub(b" ", _TRAILING_WSP.sub(b"\r\n", body))
    match = _TRAILING_CRLFS.search(canonical)
    assert match is not None
    content = canonical[: match.start()]
    return content + b"\r\n" if content else b""


def fold(value: bytes, namelen: int) -> bytes:
    """dkimpy's `fold` (lines of at most 72 columns, broken after a space), in one pass:
    dkimpy re-slices the rest of the value for every line, quadratic in the value's length,
    and an h= tag lists every signed field (a message may repeat a field thousands of times)."""
    limit = 72 - namelen
    if len(value) <= limit:
        return value
    lines: list[bytes] = []
    start, n = 0, len(value)
    while n - start > limit:
        space = value.rfind(b" ", start, start + limit)
        if space == -1:
            lines.append(value[start : start + limit])
            start += limit
        else:
            lines.append(value[start:space])
            start = space + 1
        limit = 71
    lines.append(value[start:])
    return b"\r\n ".join(lines)


class DkimSigner:
    def __init__(self, sign_headers: Sequence[str], oversign: Sequence[str]) -> None:
        # Duplicates in the config would only make h= longer.
        self._sign = list(dict.fromkeys(h.lower() for h in sign_headers))
        self._oversign = {h.lower() for h in oversign}
        self._sign_bytes = [(h.encode("ascii"), 1 if h in self._oversign else 0) for h in self._sign]

    def header_list(self, message: Message) -> list[bytes]:
        """h= (RFC 6376 §5.4.2): each configured field as often as it occurs, plus one
        more for oversigned fields so that none can be added after signing."""
        counts: dict[bytes, int] = {}
        for f in message.fields:
            name = f.name.lower()  # ASCII (relay.message._FIELD): as HeaderField.lname, undecoded
            counts[name] = counts.get(name, 0) + 1
        names: list[bytes] = []
        for name, oversigned in self._sign_bytes:
            names.extend([name] * (counts.get(name, 0) + oversigned))
        return names

    def sign(self, message: Message, keys: Sequence[SigningKey], now: float | None = None) -> bytes:
        """Return the DKIM-Signature header lines (CRLF-terminated) for `keys`, in order."""
        if not keys:
            return b""
        timestamp = str(int(time.time() if now is None else now)).encode("ascii")
        body_hash = base64.b64encode(relaxed_body_hash(message.raw, message.body_start))
        include = self.header_list(message)
        # Select first (names compare case-insensitively), then canonicalize only those.
        selected = select_headers([(f.name, f.value) for f in message.fields], include)
        signed_prefix = hashlib.sha256()
        for name, value in selected:
            canonical_name, canonical_value = relaxed_header(name, value)
            signed_prefix.update(canonical_name + b":" + canonical_value)
        lines = []
        for key in keys:
            lines.append(self._signature(key, include, body_hash, timestamp, signed_prefix.copy()))
        return b"".join(lines)

    def _signature(
        self, key: SigningKey, include: list[bytes], body_hash: bytes, timestamp: bytes, digest: Any
    ) -> bytes:
        fields = [
            (b"v", b"1"),
            (b"a", key.algorithm.encode("ascii")),
            (b"c", b"relaxed/relaxed"),
            (b"d", key.domain.encode("idna")),
            (b"s", key.selector.encode("ascii")),
            (b"t", timestamp),
            # " : " lets the folder break the list between names (RFC 6376 §3.5 allows
            # FWS around the colons, never inside a name).
            (b"h", b" : ".join(include)),
            (b"bh", body_hash),
            (b"b", b""),
        ]
        value = fold(b"; ".join(b"=".join(f) for f in fields), namelen=len(_SIG_NAME))
        value = RE_BTAG.sub(b"\\1", value)
        # RFC 6376 §3.7: the signature field itself is hashed last, canonicalized, with
        # an empty b= and without its trailing CRLF.
        name, canon = relaxed_header(_SIG_NAME, b" " + value)
        digest.update(name + b":" + canon.rstrip(b"\r\n"))
        hashed = digest.digest()
        if isinstance(key.private, ed25519.Ed25519PrivateKey):
            # RFC 8463 §3: Ed25519 signs the SHA-256 hash of the canonicalized data.
            signature = key.private.sign(hashed)
        else:
            signature = key.private.sign(hashed, padding.PKCS1v15(), _PREHASHED_SHA256)
        fields[-1] = (b"b", base64.b64encode(signature))
        value = fold(b"; ".join(b"=".join(f) for f in fields), namelen=len(_SIG_NAME))
        return _SIG_NAME + b": " + value + b"\r\n"
