"""An upstream SMTP server that authenticates with SASL XOAUTH2 and OAUTHBEARER only.

It accepts a token only while the `AuthServer` that issued it says it is live for the user
(as Exchange Online and Gmail ask their identity platform), and otherwise answers with the
RFC 7628 §3.2.2 error challenge (334 + base64 JSON), waits for the client's dummy response
(%x01 for OAUTHBEARER, empty for XOAUTH2, RFC 7628 §3.2.3) and then fails with 535. Every
exchange is recorded in `auth_log`, the dummy responses included, so a test can check the
client finished the exchange as the RFC says.

AUTH lines carry tokens of a few kilobytes: the command line limit is raised to RFC 4954
§4's 12288 octets for AUTH.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import ssl
from dataclasses import dataclass

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword

from tests.support.oauth import GOOGLE_SCOPE, AuthServer
from tests.support.upstream import Upstream, _Handler

AUTH_LINE_LIMIT = 12288  # RFC 4954 §4


@dataclass
class AuthAttempt:
    mechanism: str
    user: str | None
    token: str | None
    accepted: bool
    error: str | None = None  # what the error challenge said (status)
    dummy: bytes | None = None  # the client's answer to the error challenge
    fields: dict[str, str] | None = None  # OAUTHBEARER key/values (host, port)


class _OAuthSMTP(SMTP):
    line_length_limit = AUTH_LINE_LIMIT + 2

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # An instance table: the class-level one is shared by every aiosmtpd server.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self.command_size_limits["AUTH"] = AUTH_LINE_LIMIT


class _OAuthController(Controller):
    def factory(self):
        return _OAuthSMTP(self.handler, **self.SMTP_kwargs)


class _OAuthHandler(_Handler):
    up: OAuthUpstream

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        raw = await _initial_response(server, args)
        if raw is None:
            return AuthResult(success=False, handled=True)
        fields = dict(part.split("=", 1) for part in raw.decode("utf-8", "replace").split("\x01") if "=" in part)
        user, token = fields.get("user"), _bearer(fields.get("auth"))
        return await self._decide(
            server, "XOAUTH2", user, token, None, {"status": "401", "schemes": "Bearer", "scope": GOOGLE_SCOPE}, b""
        )

    async def auth_OAUTHBEARER(self, server: SMTP, args: list[str]) -> AuthResult:
        raw = await _initial_response(server, args)
        if raw is None:
            return AuthResult(success=False, handled=True)
        text = raw.decode("utf-8", "replace")
        gs2, _, rest = text.partition("\x01")
        user = None
        # RFC 7628 §3.1: gs2-header "n,a=user," (no channel binding).
        parts = gs2.split(",")
        if len(parts) == 3 and parts[0] == "n" and parts[1].startswith("a=") and parts[2] == "":
            user = parts[1][2:].replace("=2C", ",").replace("=3D", "=")
        fields = dict(kv.split("=", 1) for kv in rest.split("\x01") if "=" in kv)
        token = _bearer(fields.get("auth"))
        return await self._decide(
            server,
            "OAUTHBEARER",
            user,
            token,
            fields,
            {
                "status": "invalid_token",
                "scope": GOOGLE_SCOPE,
                "openid-configuration": f"{self.up.auth.base}/.well-known/openid-configuration",
            },
            b"\x01",
        )

    async def _decide(
        self,
        server: SMTP,
        mechanism: str,
        user: str | None,
        token: str | None,
        fields: dict | None,
        challenge: dict,
        expected_dummy: bytes,
    ) -> AuthResult:
        problem = "invalid_request" if not (user and token) else self.up.auth.check(token, user)
        attempt = AuthAttempt(mechanism, user, token, problem is None, fields=fields)
        with self.up.lock:
            self.up.auth_log.append(attempt)
        if problem is None and not self.up.refuse_all:
            return AuthResult(success=True, auth_data=LoginPassword(login=(user or "").encode(), password=b""))
        status = "invalid_token" if self.up.refuse_all or problem in (None, "invalid_request") else problem
        attempt.accepted, attempt.error = False, status
        challenge = dict(challenge)
        if mechanism == "XOAUTH2":  # Google's XOAUTH2 speaks HTTP status codes
            challenge["status"] = "401" if status == "invalid_token" else "400"
        else:
            challenge["status"] = status
        dummy = await server.challenge_auth(json.dumps(challenge))
        if dummy is MISSING:
            return AuthResult(success=False, handled=True)
        attempt.dummy = dummy
        if dummy != expected_dummy:
            # RFC 7628 §3.2.3: anything but the dummy response is a protocol error.
            return AuthResult(success=False, handled=False, message="501 5.5.2 Expected the dummy response")
        return AuthResult(success=False, handled=False, message="535 5.7.8 Authentication unsuccessful")


async def _initial_response(server: SMTP, args: list[str]) -> bytes | None:
    if len(args) > 1:
        blob = args[1].encode()
        if blob == b"=":  # RFC 4954 §4: an empty initial response
            return b""
        try:
            return base64.b64decode(blob, validate=True)
        except binascii.Error:
            await server.push("501 5.5.2 Can't decode base64")
            return None
    raw = await server.challenge_auth("")
    return None if raw is MISSING else raw


def _bearer(value: str | None) -> str | None:
    if value and value.startswith("Bearer "):
        return value[len("Bearer ") :]
    return None


class OAuthUpstream(Upstream):
    """`Upstream` (messages, behaviours, restart) that wants XOAUTH2 or OAUTHBEARER."""

    def __init__(
        self,
        auth: AuthServer,
        *,
        tls: str = "starttls",
        server_context: ssl.SSLContext | None = None,
        mechanisms: tuple[str, ...] = ("XOAUTH2", "OAUTHBEARER"),
        host: str = "127.0.0.1",
        port: int | None = None,
        hostname: str = "upstream.test",
    ) -> None:
        super().__init__(tls=tls, server_context=server_context, host=host, port=port, hostname=hostname)
        self.auth = auth
        self.auth_log: list[AuthAttempt] = []
        self.refuse_all = False  # refuse even live tokens (a mailbox without SMTP AUTH)
        excluded = ["PLAIN", "LOGIN"] + [m for m in ("XOAUTH2", "OAUTHBEARER") if m not in mechanisms]
        kwargs: dict = {
            "data_size_limit": 60 * 1024 * 1024,
            "auth_required": True,
            "auth_require_tls": tls != "none",
            "auth_exclude_mechanism": excluded,
        }
        if tls == "starttls":
            kwargs["tls_context"] = server_context
            kwargs["require_starttls"] = False
        self._make_controller = lambda: _OAuthController(
            _OAuthHandler(self),
            hostname=host,
            port=self.port,
            ssl_context=server_context if self.implicit else None,
            server_hostname=hostname,
            ready_timeout=10,
            **kwargs,
        )
        self._controller = self._make_controller()

    def attempts(self) -> list[AuthAttempt]:
        with self.lock:
            return list(self.auth_log)
