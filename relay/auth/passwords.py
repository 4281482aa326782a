"""Password hashes for `clients.users[].password_hash`: scrypt from hashlib.

Format: `scrypt$N$r$p$<salt b64>$<hash b64>` (the parameters travel with the hash so they
can be raised later without invalidating existing hashes).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

# ~50 ms on one core, 16 MiB of memory: costly to brute-force, cheap enough per login
# (verified logins are cached by the user directory).
_N, _R, _P = 2**14, 8, 1
_DKLEN = 32
# AUTH PLAIN carries the username and the password in 12288 octets of base64, 9216 octets
# (RFC 4954 §4): a longer password could never be sent; 8192 leaves room for the username.
MAX_PASSWORD_OCTETS = 8192


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = _scrypt(password.encode("utf-8"), salt, _N, _R, _P)
    return "$".join(["scrypt", str(_N), str(_R), str(_P), _b64(salt), _b64(digest)])


def verify_password(password: bytes, encoded: str) -> bool:
    """Constant-time check of `password` against an encoded hash; False on any malformation."""
    try:
        scheme, n, r, p, salt, expected = encoded.split("$")
        if scheme != "scrypt":
            return False
        digest = _scrypt(password, _unb64(salt), int(n), int(r), int(p))
        return hmac.compare_digest(digest, _unb64(expected))
    except (ValueError, TypeError):
        return False


def check_hash_format(encoded: str) -> None:
    """Raise ValueError if `encoded` is not a hash `relay hash-password` could have made."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("expected scrypt$N$r$p$salt$hash from `relay hash-password`")
    n, r, p = (int(x) for x in parts[1:4])
    if n < 2 or n & (n - 1) or r < 1 or p < 1:
        raise ValueError("scrypt parameters are invalid")
    _unb64(parts[4])
    _unb64(parts[5])


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=_DKLEN, maxmem=64 * 1024 * 1024)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
