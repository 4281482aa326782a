"""The open client connections of every listener, so that a drain can reach each of them
(and wait for the sockets of sessions already closed that still linger: relay.listen.smtp)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol


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
        self._open: set[Connection] = set()
        self._empty = asyncio.Event()
        self._empty.set()

    def add(self, connection: Connection) -> None:
        self._open.add(connection)
        self._empty.clear()

    def discard(self, connection: Connection) -> None:
        self._open.discard(connection)
        if not self._open:
            self._empty.set()

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
