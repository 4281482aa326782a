"""`upstream.max_rate`: deliveries from the spool paced to what the upstream allows.

Providers throttle by recipients per second (Amazon SES counts each recipient of a message
against its sending rate and answers `454 Throttling failure` beyond it). Hammering them
into 4xx only fills the retry schedule, so the spool waits before each RCPT instead. A
token bucket with one second of burst: an idle upstream gets a short burst, a busy one a
steady rate. Pacing is a wrapper around an `UpstreamTarget` (relay.deliver.base), so every path
it wraps keeps the same begin → add_recipient → send | abort contract.

`max_rate` is the upstream's limit, not a process's: with `relay serve --workers N` the
workers share one bucket, a small file in the spool directory (`pacing/<upstream>`) updated
under flock for each token (a reload keeps it too, instead of starting with a full burst).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import os
import re
import struct
import time
from pathlib import Path

from relay.deliver.base import NO_DSN, DsnRequest, Envelope, UpstreamTarget, UpstreamTransaction
from relay.errors import Reply
from relay.message import WireMessage

log = logging.getLogger("relay.queue")

_STATE = struct.Struct("<dd")  # tokens, time.monotonic() of the last update
FLOCK_TRIES = 200  # x 1 ms: the holder only reads and writes 16 bytes
# Tokens owed by takers waiting their turn: at most the deliveries under way at once (64 per
# worker); a larger debt in the file is damage, not pacing.
MAX_DEBT = 100_000.0


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


class SharedTokenBucket:
    """A TokenBucket whose state lives in a file shared by the workers of one spool.

    Each take reserves its tokens at once (the count may go below zero: the debt is the
    wait), so concurrent takers in several processes queue up in the order they came and
    together never exceed `rate`. CLOCK_MONOTONIC is system-wide on Linux, so the
    processes agree on time; a stamp from before a reboot (in the future) is reset."""

    def __init__(self, path: Path, rate: float, burst: float | None = None) -> None:
        self.path = path
        self.rate = rate
        self.burst = max(1.0, burst if burst is not None else rate)
        self._local = TokenBucket(rate, burst)  # when the file cannot be used
        self._fd = -1
        self._warned = False

    async def take(self, count: float = 1.0) -> None:
        try:
            wait = self._reserve(count)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "max_rate: shared pacing state unusable; pacing this process alone",
                    extra={"path": str(self.path), "reason": str(exc)},
                )
            await self._local.take(count)
            return
        if wait > 0:
            await asyncio.sleep(wait)

    def _reserve(self, count: float) -> float:
        if self._fd < 0:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fd = self._fd
        for _ in range(FLOCK_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.001)
        else:
            raise OSError("pacing state locked for too long")
        try:
            now = time.monotonic()
            raw = os.pread(fd, _STATE.size, 0)
            tokens, stamp = (float(v) for v in _STATE.unpack(raw)) if len(raw) == _STATE.size else (self.burst, now)
            if not (math.isfinite(tokens) and math.isfinite(stamp)) or tokens < -MAX_DEBT:
                # Damaged at rest: obeyed, it would hold every delivery to this upstream
                # for ages, restart or not. Start afresh (one burst more at worst).
                tokens, stamp = self.burst, now
            if stamp > now:
                stamp = now
            tokens = min(self.burst, tokens + (now - stamp) * self.rate) - count
            os.pwrite(fd, _STATE.pack(tokens, now), 0)  # no fsync: a crash only forgets a burst
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return max(0.0, -tokens / self.rate)

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


def pacing_state(spool_dir: Path, upstream: str) -> Path:
    return spool_dir / "pacing" / re.sub(r"[^A-Za-z0-9_.-]", "_", upstream)


class PacedTransaction:
    def __init__(self, inner: UpstreamTransaction, bucket: TokenBucket | SharedTokenBucket, first_paid: bool) -> None:
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

    def __init__(self, inner: UpstreamTarget, rate: float, *, shared: Path | None = None) -> None:
        """`shared`: the state file of a bucket shared with the other workers (pacing_state)."""
        self.inner = inner
        self.name = inner.name
        self.bucket: TokenBucket | SharedTokenBucket = (
            SharedTokenBucket(shared, rate) if shared is not None else TokenBucket(rate)
        )

    async def begin(self, envelope: Envelope, recipient: str, dsn: DsnRequest | None = None) -> PacedTransaction:
        # The first recipient's token is taken before connecting: no connection is held
        # open while waiting for the first slot.
        await self.bucket.take()
        return PacedTransaction(await self.inner.begin(envelope, recipient, dsn), self.bucket, first_paid=True)

    async def probe(self) -> str:
        return await self.inner.probe()

    async def close(self) -> None:
        if isinstance(self.bucket, SharedTokenBucket):
            self.bucket.close()
        await self.inner.close()

    def describe(self) -> str:
        describe = getattr(self.inner, "describe", None)
        return describe() if describe else self.name
