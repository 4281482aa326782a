"""The DKIM signer: relaxed/relaxed, RSA through OpenSSL, Ed25519 per RFC 8463.

dkimpy does the canonicalization (RFC 6376 §3.4), header selection (§5.4.2) and folding;
the private-key operation goes through `cryptography` (OpenSSL), because dkimpy's RSA is
pure Python and about 25 times slower. The body is canonicalized and hashed once per
message, however many keys sign it; each key then costs one header hash and one signature.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim import RE_BTAG, fold, select_headers
from dkim.canonicalization import Relaxed, correct_empty_body, strip_trailing_lines

from relay.message import Message
from relay.sign.keys import SigningKey

_SIG_NAME = b"DKIM-Signature"
_PREHASHED_SHA256 = Prehashed(hashes.SHA256())


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 §3.4.4 relaxed body canonicalization, dkimpy's, with a fast path: most bodies
    have no tab, no double space and no space before a line end, and then the whitespace
    rules change nothing and only the trailing empty lines are handled."""
    if b"\t" in body or b"  " in body or b" \r\n" in body:
        canonical: bytes = Relaxed.canonicalize_body(body)
        return canonical
    trimmed: bytes = correct_empty_body(strip_trailing_lines(body))
    return trimmed


class DkimSigner:
    def __init__(self, sign_headers: Sequence[str], oversign: Sequence[str]) -> None:
        # Duplicates in the config would only make h= longer.
        self._sign = list(dict.fromkeys(h.lower() for h in sign_headers))
        self._oversign = {h.lower() for h in oversign}

    def header_list(self, message: Message) -> list[bytes]:
        """h= (RFC 6376 §5.4.2): each configured field as often as it occurs, plus one
        more for oversigned fields so that none can be added after signing."""
        counts: dict[str, int] = {}
        for f in message.fields:
            counts[f.lname] = counts.get(f.lname, 0) + 1
        names: list[bytes] = []
        for name in self._sign:
            n = counts.get(name, 0) + (1 if name in self._oversign else 0)
            names.extend([name.encode("ascii")] * n)
        return names

    def sign(self, message: Message, keys: Sequence[SigningKey], now: float | None = None) -> bytes:
        """Return the DKIM-Signature header lines (CRLF-terminated) for `keys`, in order."""
        if not keys:
            return b""
        timestamp = str(int(time.time() if now is None else now)).encode("ascii")
        body_hash = base64.b64encode(hashlib.sha256(relaxed_body(message.body)).digest())
        include = self.header_list(message)
        # Select first (names compare case-insensitively), then canonicalize only those.
        selected = select_headers([(f.name, f.value) for f in message.fields], include)
        signed_prefix = hashlib.sha256()
        for name, value in Relaxed.canonicalize_headers(selected):
            signed_prefix.update(name + b":" + value)
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
        [(name, canon)] = Relaxed.canonicalize_headers([(_SIG_NAME, b" " + value)])
        digest.update(name + b":" + canon.rstrip(b"\r\n"))
        hashed = digest.digest()
        if isinstance(key.private, ed25519.Ed25519PrivateKey):
            # RFC 8463 §3: Ed25519 signs the SHA-256 hash of the canonicalized data.
            signature = key.private.sign(hashed)
        else:
            signature = key.private.sign(hashed, padding.PKCS1v15(), _PREHASHED_SHA256)
        fields[-1] = (b"b", base64.b64encode(signature))
        value = fold(b"; ".join(b"=".join(f) for f in fields) + b"\r\n", namelen=len(_SIG_NAME))
        return _SIG_NAME + b": " + bytes(value)
