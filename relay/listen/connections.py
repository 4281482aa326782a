"""The open client connections of every listener, so that a drain can reach each of them
(and wait for the sockets of sessions already closed that still linger: relay.listen.smtp)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Protocol

from relay.errors import SmtpError


class Connection(Protocol):
    def shutdown(self) -> None:
        """Drain: end the session politely (421) as soon as no transaction is in flight."""
        ...

    def close(self) -> None:
        """Close the connection now."""
        ...


class Connections:
    """The admitted connections of all listeners, those of a listener that a reload removed
    included (they carry on until they close)."""

    def __init__(self) -> None:
        # Each connection's client address; None for a closed session's lingering socket,
        # which a drain waits for but the session limits do not count.
        self._open: dict[Connection, str | None] = {}
        self._per_address: collections.Counter[str] = collections.Counter()
        self._sessions = 0
        self._empty = asyncio.Event()
        self._empty.set()

    def add(self, connection: Connection, address: str | None = None) -> None:
        """A session from `address`, or (None) a socket that lingers after its session."""
        if connection in self._open:
            return
        self._open[connection] = address
        if address is not None:
            self._sessions += 1
            self._per_address[address] += 1
        self._empty.clear()

    def discard(self, connection: Connection) -> None:
        if connection in self._open:
            address = self._open.pop(connection)
            if address is not None:
                self._sessions -= 1
                self._per_address[address] -= 1
                if self._per_address[address] <= 0:
                    del self._per_address[address]
        if not self._open:
            self._empty.set()

    def refusal(self, address: str, max_open: int, max_per_address: int | None) -> SmtpError | None:
        """The reply for one session more from `address` past a limit, else None."""
        if self._sessions >= max_open:
            # RFC 3463 §3.4: X.3.2 "system not accepting network messages" (for now).
            return SmtpError(
                421,
                "4.3.2",
                "Too many connections, try again later",
                reason=f"{self._sessions} sessions open (clients.max_connections)",
                label="too_many_connections",
            )
        if max_per_address is not None and self._per_address[address] >= max_per_address:
            # RFC 3463 §3.8: X.7.0, a policy of this server; Postfix's anvil says the same.
            return SmtpError(
                421,
                "4.7.0",
                "Too many connections from your address, try again later",
                reason=f"{self._per_address[address]} sessions open from {address} "
                "(clients.max_connections_per_address)",
                label="too_many_connections",
            )
        return None

    def __len__(self) -> int:
        return len(self._open)

    def shutdown(self) -> None:
        for connection in list(self._open):
            connection.shutdown()

    async def wait_closed(self, timeout: float) -> bool:
        """Wait until every connection has closed; False if some are still open at `timeout`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._empty.wait(), timeout)
        return not self._open

    def close(self) -> None:
        for connection in list(self._open):
            connection.close()
