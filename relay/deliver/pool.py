"""A bounded pool of upstream connections, reused across messages.

At most `max_connections` exist at once (idle + in use): a semaphore is held by every
connection in use, and a new connection is only opened when no idle one is left. A
connection is retired after `max_messages_per_connection` messages or `idle_timeout`
seconds idle (upstreams drop idle sessions; RFC 5321 §4.5.3.2.7 gives servers 5 minutes).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable

from prometheus_client import Gauge

from relay.cancel import cancel_and_wait
from relay.deliver.connection import UpstreamConnection
from relay.errors import SmtpError

POOL_CONNECTIONS = Gauge(
    "relay_upstream_pool_connections",
    "Upstream connections held by the pool, by state (idle, busy).",
    ["upstream", "state"],
    multiprocess_mode="livesum",
)


class ConnectionPool:
    def __init__(
        self,
        label: str,
        open_connection: Callable[[], Awaitable[UpstreamConnection]],
        *,
        max_connections: int,
        max_messages: int,
        idle_timeout: float,
        acquire_timeout: float,
    ) -> None:
        self.label = label
        self._gauges: tuple[Gauge, Gauge] | None = None  # (idle, busy), at first use
        self._open = open_connection
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: deque[UpstreamConnection] = deque()
        self._busy = 0
        self.max_messages = max_messages
        self.idle_timeout = idle_timeout
        self.acquire_timeout = acquire_timeout
        self._closed = False
        self._reaper: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    async def acquire(self) -> UpstreamConnection:
        if self._closed:
            raise SmtpError(
                451, "4.3.2", "Relay is reloading, try again", reason=f"pool {self.label} closed", label="shutting_down"
            )
        try:
            if self._slots.locked():
                async with asyncio.timeout(self.acquire_timeout):
                    await self._slots.acquire()
            else:
                # A free slot is taken without waiting: no timer to arm and cancel.
                await self._slots.acquire()
        except TimeoutError:
            raise SmtpError(
                451,
                "4.4.5",
                "Upstream busy, try again later",
                reason=f"no free connection to {self.label} within {self.acquire_timeout:g}s",
                label="upstream_busy",
            ) from None
        try:
            conn = self._take_idle()
            if conn is None:
                conn = await self._open()
        except BaseException:
            self._slots.release()
            raise
        self._busy += 1
        self._update_gauges()
        self._ensure_reaper()
        return conn

    def release(self, conn: UpstreamConnection, *, reusable: bool) -> None:
        """Give a connection back. Not reusable (broken, mid-transaction) → closed."""
        self._busy -= 1
        conn.fresh = False
        if reusable and not self._closed and conn.alive and conn.messages < self.max_messages:
            self._idle.append(conn)
        else:
            closing = asyncio.get_running_loop().create_task(conn.quit())
            self._closing.add(closing)  # the loop keeps only weak references to tasks
            closing.add_done_callback(self._closing.discard)
        self._slots.release()
        self._update_gauges()

    async def close(self) -> None:
        self._closed = True
        if self._reaper:
            # Ended first: while it quits a stale connection it holds the ones it keeps.
            await cancel_and_wait({self._reaper})
        idle, self._idle = list(self._idle), deque()
        quits = [asyncio.ensure_future(c.quit()) for c in idle] + list(self._closing)
        if quits:
            await asyncio.wait(quits)  # each QUIT has its own timeout (UpstreamConnection.quit)
        self._update_gauges()

    def _take_idle(self) -> UpstreamConnection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # most recently used first: least likely to be stale
            if conn.alive and now - conn.last_used < self.idle_timeout:
                return conn
            conn.close()
        return None

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        while not self._closed:
            await asyncio.sleep(max(1.0, self.idle_timeout / 2))
            now = time.monotonic()
            keep: deque[UpstreamConnection] = deque()
            try:
                while self._idle:
                    conn = self._idle.popleft()
                    if conn.alive and now - conn.last_used < self.idle_timeout:
                        keep.append(conn)
                    else:
                        with contextlib.suppress(Exception):
                            await conn.quit()
            finally:
                # Also when cancelled during a QUIT (close): what it kept is closed there.
                self._idle.extendleft(reversed(keep))
            self._update_gauges()
            if not self._idle and self._busy == 0:
                return

    def _update_gauges(self) -> None:
        if self._gauges is None:
            # The children, looked up once: labels() checks and locks on every call.
            self._gauges = (POOL_CONNECTIONS.labels(self.label, "idle"), POOL_CONNECTIONS.labels(self.label, "busy"))
        idle, busy = self._gauges
        idle.set(len(self._idle))
        busy.set(self._busy)
