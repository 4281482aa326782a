"""Authenticating an upstream SMTP session with the upstream's cached access token.

    auth = UpstreamTokenAuth(cache, mechanism="xoauth2", username="sender@example.com")
    await auth.authenticate(smtp, host, port)    # after EHLO/STARTTLS; raises SmtpError

What the client of the relay hears when this fails (always 4xx: nothing here is the
message's fault, and mail must not bounce for an operator's mistake):

    no token (endpoint down, slow, invalid client, consent missing...)   451 4.7.0
    535 to a token that should be valid → one forced refetch, AUTH again
    535 again, or the mechanism not offered ("rejected")                 451 4.7.0
    454 / other 4xx to AUTH (the upstream's own temporary failure)       451 4.7.0

A refused token is counted and logged (with the upstream's reply and the RFC 7628 error
status) but never shown: the token appears only in the AUTH line.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import aiosmtplib

from relay.cancel import cancel_and_wait
from relay.errors import SmtpError
from relay.oauth import sasl
from relay.oauth.cache import TokenCache
from relay.oauth.token import AccessToken, TokenError


class UpstreamTokenAuth:
    """The token side of one upstream: its cache and the task that keeps it fresh.

    `start()` fetches the first token (before the first message needs it) and starts the
    refresh; `close()` stops both. `secrets` are the references its credentials come from:
    `secret_changed(ref)` after a rotation retries a failed fetch at once."""

    def __init__(self, cache: TokenCache, *, mechanism: str, username: str, secrets: tuple[str, ...] = ()) -> None:
        if mechanism not in sasl.MECHANISMS:
            raise ValueError(f"not an OAuth 2.0 SASL mechanism: {mechanism}")
        self.cache = cache
        self.mechanism = mechanism
        self.username = username
        self.secrets = secrets
        self._refresher: asyncio.Task[None] | None = None

    @property
    def label(self) -> str:
        return self.cache.upstream

    @property
    def problem(self) -> TokenError | None:
        return self.cache.problem

    async def start(self) -> TokenError | None:
        """Idempotent; returns the first fetch's error (logged and counted already)."""
        if self._refresher is not None:
            return None
        error = await self.cache.prefetch()
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(
                self.cache.run(), name=f"token-refresh {self.label}"
            )
        return error

    def secret_changed(self, ref: str) -> None:
        if ref in self.secrets:
            self.cache.credentials_changed()

    async def close(self) -> None:
        """At stop: the refresh task and a fetch in flight end now."""
        await self._stop_refresher()
        await self.cache.close()

    async def retire(self) -> None:
        """At a reload that replaced this upstream: no more refreshes, but a fetch in flight
        finishes for the messages of the old config that wait on it."""
        await self._stop_refresher()
        await self.cache.retire()

    async def _stop_refresher(self) -> None:
        task, self._refresher = self._refresher, None
        if task is not None:
            await cancel_and_wait({task})

    async def authenticate(self, smtp: aiosmtplib.SMTP, host: str, port: int) -> None:
        token = await self._token(self.cache.token())
        try:
            await self._auth(smtp, token, host, port)
        except sasl.OAuthRejected as exc:
            if exc.code != 535:
                raise self._refused(exc) from None
            # RFC 4954 §6: 535 is "credentials invalid"; the token should be valid (it is not
            # expired by our clock), so it was revoked or a permission changed since it was
            # issued. One new token, on the same session (a failed AUTH leaves it open).
            token = await self._token(self.cache.refetch(token))
            try:
                await self._auth(smtp, token, host, port)
            except sasl.OAuthRejected as again:
                raise self._refused(again) from None
        self.cache.accepted()

    async def _token(self, pending: Awaitable[AccessToken]) -> AccessToken:
        try:
            return await pending
        except TokenError as exc:
            raise exc.smtp_error(self.label) from None

    async def _auth(self, smtp: aiosmtplib.SMTP, token: AccessToken, host: str, port: int) -> None:
        try:
            await sasl.authenticate(smtp, self.mechanism, self.username, token.value, host=host, port=port)
        except (sasl.MechanismNotOffered, sasl.NotVerifiedTls) as exc:
            raise self.cache.rejected(f"{host}:{port}: {exc}").smtp_error(self.label) from None

    def _refused(self, exc: sasl.OAuthRejected) -> SmtpError:
        status = f" (error status {exc.status})" if exc.status else ""
        detail = f"AUTH {self.mechanism.upper()} refused: {exc.code} {_one_line(exc.message)}{status}"
        if 400 <= exc.code < 500:
            # The upstream's own temporary failure (454 4.7.0): not the token's.
            return SmtpError(
                451,
                "4.7.0",
                "Upstream authentication unavailable, try again later",
                reason=f"upstream {self.label}: {detail}",
                label="upstream_auth",
            )
        return self.cache.rejected(detail).smtp_error(self.label)


def _one_line(text: str) -> str:
    return " ".join((text or "").split())[:300]
