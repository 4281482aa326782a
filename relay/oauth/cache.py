"""One upstream's access token, shared by every connection of its pool.

    cache = TokenCache(source, upstream="smtp.office365.com:587")
    await cache.prefetch()              # at startup: before the first message needs it
    task = create_task(cache.run())     # keeps it fresh ahead of expiry
    token = await cache.token()         # per upstream connection, before AUTH
    token = await cache.refetch(token)  # the upstream answered 535 to a token still valid

Single flight: whatever the number of connections that need a token at once, one request
goes to the token endpoint and they all wait for its answer. A waiter that gives up (its
client left) does not cancel the request for the others; a request that is stopped (the
relay stops) gives its waiters a `TokenError`, so their clients get a reply.

Refresh: a token is handed out until shortly before it expires (`usable_until`), and a new
one is fetched from `refresh_at` on (a quarter of its lifetime ahead, at most 5 minutes), in
the background: while a still-valid token exists, no message waits for the endpoint and a
failed refresh costs nothing but a log line until the old token runs out.

Failure: with no usable token, a failed fetch is remembered for a short, growing while
(`retry_min` doubling to `retry_max`); messages in that while get the same error at once
instead of piling onto a failing endpoint. `credentials_changed()` (a rotated secret) ends
the wait. A fresh token that the upstream refuses too (`rejected`: SMTP AUTH disabled for
the mailbox, a missing permission) is paced the same way: until the wait is over, a 535
gets that rejection at once instead of one more token request per message; the next
accepted AUTH ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from relay.cancel import cancel_and_wait
from relay.oauth.providers import TokenSource
from relay.oauth.token import REASONS, TOKEN_FAILURES, AccessToken, TokenError

log = logging.getLogger("relay.oauth")


class TokenCache:
    def __init__(
        self,
        source: TokenSource,
        *,
        upstream: str,
        retry_min: float = 1.0,
        retry_max: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if retry_min <= 0 or retry_max < retry_min:
            raise ValueError("token retry delays must be positive, retry_max >= retry_min")
        self.source = source
        self.upstream = upstream
        self.retry_min = retry_min
        self.retry_max = retry_max
        self._clock = clock
        self._token: AccessToken | None = None
        self._inflight: asyncio.Task[AccessToken] | None = None
        self._failure: TokenError | None = None
        self._retry_at = 0.0
        self._backoff = retry_min
        # Pacing of refetches while the upstream refuses fresh tokens (see `rejected`).
        self._rejections = 0
        self._refetch_after = 0.0
        self._wake = asyncio.Event()
        self._closed = False
        self.fetches = 0  # requests sent to the token endpoint (for `relay check` and tests)
        for reason in REASONS:  # every series exists from the start, at 0
            TOKEN_FAILURES.labels(upstream, reason)

    # -- what connections use --------------------------------------------------------------

    async def token(self) -> AccessToken:
        """A token valid for at least a few more seconds; raises `TokenError`."""
        now = self._clock()
        current = self._token
        if current is not None and now < current.usable_until:
            if now >= current.refresh_at and now >= self._retry_at and not self._closed:
                self._start_fetch()  # ahead of expiry, without making this message wait
            return current
        failure = self._failure
        if self._inflight is None and failure is not None and now < self._retry_at:
            # A new exception each time: raising the remembered one would append every
            # message's frames to its traceback for the whole wait.
            raise TokenError(failure.reason, failure.detail)
        return await self._shared_fetch()

    async def refetch(self, refused: AccessToken) -> AccessToken:
        """The upstream refused `refused` while it should still be valid (revoked, or a
        permission changed since it was issued): fetch once more. Connections that saw the
        same refusal share that one fetch; the others keep getting `refused` until the new
        one is in hand (a 535 may be one connection's, and if the fetch fails, the token
        that worked a moment ago is still the best there is).

        Paced like `token`: while the endpoint is failing (its backoff) or the upstream
        refuses fresh tokens (`rejected`), raises that failure at once until the wait is
        over."""
        failure = self._failure
        if failure is not None and self._inflight is None:
            wait_until = self._refetch_after if failure.reason == "rejected" else self._retry_at
            if self._clock() < wait_until:
                raise TokenError(failure.reason, failure.detail)
        if self._token is refused or self._inflight is not None:
            if self._inflight is None:
                log.info("upstream refused a valid token; fetching a new one", extra={"upstream": self.upstream})
            return await self._shared_fetch()
        return await self.token()

    def rejected(self, detail: str) -> TokenError:
        """The upstream refused a freshly fetched token too: an operator must act (the
        mailbox's permissions, SMTP AUTH disabled for it...). Counted, logged, remembered
        for readiness until a token is accepted again; the next refetch waits (`retry_min`
        doubling to `retry_max`), as such a refusal lasts until an admin acts."""
        error = TokenError("rejected", detail)
        delay = min(self.retry_max, self.retry_min * 2 ** min(self._rejections, 16))
        self._refetch_after = self._clock() + delay
        self._rejections += 1
        TOKEN_FAILURES.labels(self.upstream, "rejected").inc()
        log.error(
            "upstream refused a fresh access token",
            extra={"upstream": self.upstream, "reason": "rejected", "detail": detail},
        )
        self._failure = error
        return error

    def accepted(self) -> None:
        """The upstream accepted a token: a 'rejected' state is over."""
        self._rejections = 0
        self._refetch_after = 0.0
        if self._failure is not None and self._failure.reason == "rejected":
            self._failure = None

    # -- lifecycle -------------------------------------------------------------------------

    async def prefetch(self) -> TokenError | None:
        """Fetch before the first message needs a token; the error, if any, is returned
        (and logged, counted) rather than raised: startup goes on, readiness reports it."""
        try:
            await self._shared_fetch()
        except TokenError as exc:
            return exc
        return None

    async def run(self) -> None:
        """Keep a token fresh: fetch at `refresh_at`, and after a failure at the retry time."""
        while True:
            now = self._clock()
            current = self._token
            if current is None or now >= current.refresh_at:
                if now >= self._retry_at or self._inflight is not None:
                    with contextlib.suppress(TokenError):
                        await self._shared_fetch()
                    continue
                wait = self._retry_at - now
            else:
                wait = current.refresh_at - now
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.05, wait)):
                    await self._wake.wait()

    def credentials_changed(self) -> None:
        """A secret the source uses changed: forget the failure and try again now."""
        self._retry_at = 0.0
        self._backoff = self.retry_min
        if self._failure is not None:
            self._wake.set()

    async def close(self) -> None:
        """Stop now: a fetch in flight is cancelled (its waiters get a `TokenError`)."""
        self._closed = True
        task, self._inflight = self._inflight, None
        if task is not None:
            await cancel_and_wait({task})

    async def retire(self) -> None:
        """Stop once a fetch in flight is done (it has its own deadline): connections of a
        replaced config may be waiting on it, and get its token or its error."""
        self._closed = True
        task = self._inflight
        if task is not None:
            await asyncio.wait([task])

    # -- state, for /readyz, `relay check` and logs -----------------------------------------

    @property
    def problem(self) -> TokenError | None:
        """Why no message can get a token now (None: one is in hand, or none was tried)."""
        if self._failure is not None and self._failure.reason == "rejected":
            return self._failure
        current = self._token
        if current is not None and self._clock() < current.usable_until:
            return None
        return self._failure

    @property
    def last_failure(self) -> TokenError | None:
        return self._failure

    # -- the single flight -----------------------------------------------------------------

    def _start_fetch(self) -> asyncio.Task[AccessToken]:
        if self._inflight is None:
            if self._closed:
                raise TokenError("unreachable", f"{self.source.endpoint}: token source closed")
            task = asyncio.get_running_loop().create_task(self._fetch(), name=f"token-fetch {self.upstream}")
            # A background refresh may have no waiter: its outcome is logged in _fetch.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._inflight = task
        return self._inflight

    async def _shared_fetch(self) -> AccessToken:
        # shield: a waiter that is cancelled (its client left) leaves the fetch running for
        # the others.
        task = self._start_fetch()
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            waiter = asyncio.current_task()
            if task.cancelled() and (waiter is None or not waiter.cancelling()):
                # The fetch was stopped, not this waiter: its client gets a 4xx reply, not
                # a dropped connection.
                raise TokenError("unreachable", f"{self.source.endpoint}: token request stopped") from None
            raise

    async def _fetch(self) -> AccessToken:
        self.fetches += 1
        try:
            token = await self.source.fetch()
        except TokenError as exc:
            self._failed(exc)
            raise
        except Exception as exc:  # a library bug must not look like a token
            error = TokenError("bad_response", f"{self.source.endpoint}: unexpected {type(exc).__name__}")
            self._failed(error)
            raise error from None
        finally:
            self._inflight = None
        self._token = token
        if self._failure is not None and self._failure.reason != "rejected":
            log.info("upstream token endpoint works again", extra={"upstream": self.upstream})
            self._failure = None
        self._retry_at = 0.0
        self._backoff = self.retry_min
        log.info(
            "upstream access token fetched",
            extra={"upstream": self.upstream, "provider": self.source.provider, "expires_in": round(token.lifetime)},
        )
        return token

    def _failed(self, error: TokenError) -> None:
        TOKEN_FAILURES.labels(self.upstream, error.reason).inc()
        self._failure = error
        self._retry_at = self._clock() + self._backoff
        self._backoff = min(self.retry_max, self._backoff * 2)
        still = self._token is not None and self._clock() < self._token.usable_until
        log.log(
            logging.WARNING if still else logging.ERROR,
            "upstream token fetch failed" + ("; the current token is still valid" if still else ""),
            extra={
                "upstream": self.upstream,
                "provider": self.source.provider,
                "reason": error.reason,
                "detail": error.detail,
            },
        )
