"""Delivery to one smarthost through a pool of reused connections."""

from __future__ import annotations

import logging

from relay.deliver.base import NO_DSN, DsnRequest, Envelope
from relay.deliver.connection import UpstreamConnection, UpstreamConnector
from relay.deliver.pool import ConnectionPool
from relay.errors import Reply, SmtpError
from relay.message import WireMessage

log = logging.getLogger("relay.deliver")


class SmtpTransaction:
    """One upstream transaction on one connection (see `relay.deliver.base`)."""

    def __init__(
        self, upstream: str, conn: UpstreamConnection, pool: ConnectionPool | None, *, body_8bit: bool = False
    ) -> None:
        self.upstream = upstream
        self._conn: UpstreamConnection | None = conn
        self._pool = pool
        self._dsn = conn.supports("dsn")  # kept: the connection goes back to its pool
        # RFC 6152 §3: 8-bit content the client declared may not go to a 7-bit upstream,
        # and converting it would break the signature: it is refused instead (at DATA).
        self._7bit_only = body_8bit and not conn.supports("8bitmime")
        self._lost = False
        # Lost while the client is between commands: the slot is freed at once, and the
        # client's next RCPT or DATA gets 451 (`_require`).
        conn.watch_loss(self._on_lost)

    def _on_lost(self) -> None:
        self._lost = True
        self._finish(reusable=False)

    @property
    def carries_dsn(self) -> bool:
        return self._dsn

    async def add_recipient(self, address: str, dsn: DsnRequest = NO_DSN) -> Reply:
        conn = self._require()
        try:
            return await conn.rcpt(address, dsn)
        except BaseException:
            # A broken path, or the caller cancelled (the client vanished while we waited
            # for the reply): the connection's state is unknown, so it is closed (QUIT),
            # and its pool slot is free either way.
            self._finish(reusable=False)
            raise

    async def send(self, message: WireMessage) -> Reply:
        conn = self._require()
        if self._7bit_only and not message.isascii():
            await self.abort()
            raise SmtpError(
                554,
                "5.6.3",
                "Upstream cannot take 8-bit content (no 8BITMIME)",
                reason=f"upstream {self.upstream} does not offer 8BITMIME",
                label="8bitmime",
            )
        try:
            reply = await conn.data(message)
        except BaseException:
            self._finish(reusable=False)
            raise
        # After the final reply (any code) the upstream transaction is over (RFC 5321
        # §4.1.1.4), so the connection is clean for the next one.
        self._finish(reusable=True)
        return reply

    async def abort(self) -> None:
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        reusable = False
        try:
            reusable = conn.alive and await conn.reset()
        finally:
            self._release(conn, reusable)

    def _require(self) -> UpstreamConnection:
        if self._conn is None and self._lost:
            raise SmtpError(
                451,
                "4.4.2",
                "Upstream connection lost, try again",
                reason=f"upstream {self.upstream} closed the connection between commands",
                label="upstream_disconnected",
            )
        if self._conn is None:
            raise SmtpError(
                451,
                "4.3.0",
                "Transaction no longer open, try again",
                reason="upstream transaction already finished",
                label="internal",
            )
        return self._conn

    def _finish(self, *, reusable: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._release(conn, reusable)

    def _release(self, conn: UpstreamConnection, reusable: bool) -> None:
        conn.watch_loss(None)
        if self._pool is not None:
            self._pool.release(conn, reusable=reusable)
        else:
            conn.close()


async def begin_on(
    upstream: str, conn: UpstreamConnection, pool: ConnectionPool | None, envelope: Envelope
) -> SmtpTransaction:
    """MAIL FROM on an open connection; an upstream refusal is raised with its own code."""
    tx = SmtpTransaction(upstream, conn, pool, body_8bit=envelope.body_8bit)
    try:
        reply = await conn.mail(envelope)
    except BaseException:
        tx._finish(reusable=False)  # see SmtpTransaction.add_recipient
        raise
    if not reply.positive:
        await tx.abort()
        raise SmtpError(
            reply.code,
            reply.enhanced,
            reply.text,
            reason=f"upstream {upstream} refused MAIL FROM: {reply}",
            label="upstream_refused",
        )
    return tx


class SmarthostTarget:
    def __init__(self, name: str, connector: UpstreamConnector, pool: ConnectionPool) -> None:
        self.name = name
        self.connector = connector
        self.pool = pool

    def describe(self) -> str:
        return self.connector.describe()

    async def begin(self, envelope: Envelope, recipient: str) -> SmtpTransaction:
        conn = await self.pool.acquire()
        reused = not conn.fresh
        try:
            return await begin_on(self.name, conn, self.pool, envelope)
        except SmtpError as exc:
            # A pooled connection may have been dropped by the upstream while idle; that
            # is not the message's fault, so try once more on a fresh connection.
            if not (reused and exc.label in ("upstream_disconnected", "upstream_error")):
                raise
        log.debug("stale pooled connection; reconnecting", extra={"upstream": self.name})
        conn = await self.pool.acquire()
        return await begin_on(self.name, conn, self.pool, envelope)

    async def probe(self) -> str:
        conn = await self.connector.open()
        text = conn.banner
        await conn.quit()
        return text

    async def close(self) -> None:
        await self.pool.close()
