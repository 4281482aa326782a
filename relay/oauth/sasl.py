"""SASL XOAUTH2 and OAUTHBEARER (RFC 7628) on the client side of an aiosmtplib session.

Both send the user name and the bearer token in one initial response (RFC 4954 §4), which
Exchange Online and Gmail accept:

    XOAUTH2      "user=" user ^A "auth=Bearer " token ^A ^A
    OAUTHBEARER  gs2-header ^A "host=" host ^A "port=" port ^A "auth=Bearer " token ^A ^A
                 with gs2-header "n,a=" saslname "," (RFC 7628 §3.1, RFC 5801 §4)

A refused token is answered with a 334 error challenge: base64 JSON with `status` (and
`scope`, `schemes`, `openid-configuration`), RFC 7628 §3.2.2. The exchange must then be
finished by the client: with OAUTHBEARER a dummy response of one %x01 (RFC 7628 §3.2.3),
with XOAUTH2 an empty one; the server then sends its final failure reply (535 in practice).
That final reply and the decoded challenge are raised as `OAuthRejected`.

The token travels only in the AUTH line; nothing here logs, and no exception carries it.
"""

from __future__ import annotations

import base64
import binascii
import json

import aiosmtplib

MECHANISMS = ("xoauth2", "oauthbearer")
# RFC 7628 §3.2.3: "a single %x01 (control A) character", base64-encoded.
_DUMMY_RESPONSE = {"OAUTHBEARER": base64.b64encode(b"\x01"), "XOAUTH2": b""}
_MAX_CHALLENGE_FIELDS = 8


class OAuthRejected(aiosmtplib.SMTPAuthenticationError):
    """The upstream refused the token: its final reply, and what its error challenge said."""

    def __init__(self, code: int, message: str, challenge: dict[str, str] | None = None) -> None:
        super().__init__(code, message)
        self.challenge = challenge or {}

    @property
    def status(self) -> str | None:
        """RFC 7628 §3.2.2 `status` ("invalid_token", "insufficient_scope"; Google's XOAUTH2
        says "401", "400")."""
        return self.challenge.get("status")


class MechanismNotOffered(aiosmtplib.SMTPException):
    """The upstream does not advertise the configured mechanism in its EHLO reply."""


def xoauth2_response(username: str, token: str) -> bytes:
    _check_user(username)
    return f"user={username}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearer_response(username: str, token: str, host: str, port: int) -> bytes:
    _check_user(username)
    # RFC 5801 §4: in a saslname, "=" is written "=3D" and "," "=2C".
    saslname = username.replace("=", "=3D").replace(",", "=2C")
    return f"n,a={saslname},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01".encode()


async def authenticate(
    smtp: aiosmtplib.SMTP, mechanism: str, username: str, token: str, *, host: str, port: int
) -> aiosmtplib.SMTPResponse:
    """Authenticate an EHLO'd session; raises `OAuthRejected` or `MechanismNotOffered`
    (and aiosmtplib's errors for a broken connection)."""
    name = mechanism.upper()
    if name not in _DUMMY_RESPONSE:
        raise ValueError(f"not an OAuth 2.0 SASL mechanism: {mechanism}")
    if smtp.is_ehlo_or_helo_needed:
        # After STARTTLS the server's extensions are forgotten (RFC 3207 §4.2): ask again.
        await smtp.ehlo()
    if name.lower() not in smtp.server_auth_methods:
        offered = " ".join(m.upper() for m in smtp.server_auth_methods) or "none"
        raise MechanismNotOffered(f"upstream does not offer AUTH {name} (offers: {offered})")
    if name == "XOAUTH2":
        raw = xoauth2_response(username, token)
    else:
        raw = oauthbearer_response(username, token, host, port)
    response = await smtp.execute_command(b"AUTH", name.encode(), base64.b64encode(raw))
    challenge: dict[str, str] = {}
    if response.code == 334:
        challenge = _error_challenge(response.message)
        response = await smtp.execute_command(_DUMMY_RESPONSE[name])
    if response.code != 235:
        raise OAuthRejected(response.code, response.message, challenge)
    return response


def _error_challenge(text: str) -> dict[str, str]:
    """The RFC 7628 §3.2.2 JSON error, as short printable strings (it is logged)."""
    try:
        data = json.loads(base64.b64decode(text.strip(), validate=True))
    except (binascii.Error, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    out = {}
    for key, value in list(data.items())[:_MAX_CHALLENGE_FIELDS]:
        out[_printable(str(key))] = _printable(str(value))
    return out


def _check_user(username: str) -> None:
    # ^A separates the fields; a control character in the name would forge one.
    if not username or any(ord(c) < 0x20 or ord(c) == 0x7F for c in username):
        raise ValueError("SASL user name is empty or has control characters")


def _printable(text: str, limit: int = 200) -> str:
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text)
    return cleaned[:limit]
