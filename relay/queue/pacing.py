"""`upstream.max_rate`: deliveries from the spool paced to what the upstream allows.

Providers throttle by recipients per second (Amazon SES counts each recipient of a message
against its sending rate and answers `454 Throttling failure` beyond it). Hammering them
into 4xx only fills the retry schedule, so the spool waits before each RCPT instead. A
token bucket with one second of burst: an idle upstream gets a short burst, a busy one a
steady rate. Pacing is a wrapper around an `UpstreamTarget` (relay.deliver.base), so every path
it wraps keeps the same begin → add_recipient → send | abort contract.
"""

from __future__ import annotations

import asyncio
import time

from relay.deliver.base import NO_DSN, DsnRequest, Envelope, UpstreamTarget, UpstreamTransaction
from relay.errors import Reply
from relay.message import WireMessage


class TokenBucket:
    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = max(1.0, burst if burst is not None else rate)
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, count: float = 1.0) -> None:
        # One waiter at a time: first come, first paced (no starvation of a waiter by
        # later ones that happen to wake first).
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= count:
                    self._tokens -= count
                    return
                await asyncio.sleep((count - self._tokens) / self.rate)


class PacedTransaction:
    def __init__(self, inner: UpstreamTransaction, bucket: TokenBucket, first_paid: bool) -> None:
        self._inner = inner
        self._bucket = bucket
        self._first_paid = first_paid
        self.upstream = inner.upstream

    @property
    def carries_dsn(self) -> bool:
        return self._inner.carries_dsn

    async def add_recipient(self, address: str, dsn: DsnRequest = NO_DSN) -> Reply:
        if self._first_paid:
            self._first_paid = False  # paid in `begin`
        else:
            await self._bucket.take()
        return await self._inner.add_recipient(address, dsn)

    async def send(self, message: WireMessage) -> Reply:
        return await self._inner.send(message)

    async def abort(self) -> None:
        await self._inner.abort()


class PacedTarget:
    """An upstream target whose recipients go out at no more than `rate` per second."""

    def __init__(self, inner: UpstreamTarget, rate: float) -> None:
        self.inner = inner
        self.name = inner.name
        self.bucket = TokenBucket(rate)

    async def begin(self, envelope: Envelope, recipient: str) -> PacedTransaction:
        # The first recipient's token is taken before connecting: no connection is held
        # open while waiting for the first slot.
        await self.bucket.take()
        return PacedTransaction(await self.inner.begin(envelope, recipient), self.bucket, first_paid=True)

    async def probe(self) -> str:
        return await self.inner.probe()

    async def close(self) -> None:
        await self.inner.close()

    def describe(self) -> str:
        describe = getattr(self.inner, "describe", None)
        return describe() if describe else self.name
