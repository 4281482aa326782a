"""Delivery to one smarthost through a pool of reused connections."""

from __future__ import annotations

import logging

from relay.deliver.base import NO_DSN, DsnRequest, Envelope
from relay.deliver.connection import UpstreamConnection, UpstreamConnector, no_smtputf8
from relay.deliver.pool import ConnectionPool
from relay.errors import Reply, SmtpError
from relay.message import WireMessage

log = logging.getLogger("relay.deliver")


class SmtpTransaction:
    """One upstream transaction on one connection (see `relay.deliver.base`)."""

    def __init__(
        self,
        upstream: str,
        conn: UpstreamConnection,
        pool: ConnectionPool | None,
        *,
        body_8bit: bool = False,
        smtputf8: bool = False,
    ) -> None:
        self.upstream = upstream
        self._conn: UpstreamConnection | None = conn
        self._pool = pool
        self._dsn = conn.supports("dsn")  # kept: the connection goes back to its pool
        # RFC 6152 §3: 8-bit content the client declared may not go to a 7-bit upstream,
        # and converting it would break the signature: it is refused instead (at DATA).
        self._7bit_only = body_8bit and not conn.supports("8bitmime")
        # SMTPUTF8 asked for, with an ASCII sender, of an upstream without it (see
        # UpstreamConnection._mail_options): a UTF-8 recipient or header cannot go there.
        self._ascii_only = smtputf8 and not conn.supports("smtputf8")
        self._lost = False
        # The first recipient's reply when its RCPT went with MAIL (RFC 2920), for the
        # first add_recipient: (address, DSN request, reply).
        self._first: tuple[str, DsnRequest, Reply | SmtpError] | None = None
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
        if self._first is not None:
            return self._first_recipient(address, dsn)
        if self._ascii_only and not address.isascii():
            return no_smtputf8(self.upstream).reply  # RFC 6531 §3.4: never sent
        conn = self._require()
        try:
            return await conn.rcpt(address, dsn)
        except BaseException:
            # A broken path, or the caller cancelled (the client vanished while we waited
            # for the reply): the connection's state is unknown, so it is closed (QUIT),
            # and its pool slot is free either way.
            self._finish(reusable=False)
            raise

    def _first_recipient(self, address: str, dsn: DsnRequest) -> Reply:
        """The reply to the RCPT that went with MAIL (see begin_on), as `add_recipient`
        would have returned or raised it."""
        assert self._first is not None
        (first, first_dsn, outcome), self._first = self._first, None
        if (address, dsn) != (first, first_dsn):
            # The upstream has that recipient already: another in its place would be a
            # message to a recipient the client did not name here.
            outcome = SmtpError(
                451,
                "4.3.0",
                "Transaction out of order, try again",
                reason=f"first recipient sent with MAIL was not the first added (upstream {self.upstream})",
                label="internal",
            )
        if isinstance(outcome, SmtpError):
            self._finish(reusable=False)
            raise outcome
        return outcome

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
        if self._ascii_only and not message.header_isascii():
            await self.abort()
            # RFC 6532: a UTF-8 header only travels with SMTPUTF8 (RFC 6531's X.6.9: cannot
            # be transferred, rejected); rewriting it (a downgrade) would break the signature.
            raise SmtpError(
                554,
                "5.6.9",
                "Upstream cannot take a UTF-8 header (no SMTPUTF8)",
                reason=f"upstream {self.upstream} does not offer SMTPUTF8",
                label="smtputf8",
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
        self._first = None
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
    upstream: str,
    conn: UpstreamConnection,
    pool: ConnectionPool | None,
    envelope: Envelope,
    first: tuple[str, DsnRequest] | None = None,
) -> SmtpTransaction:
    """MAIL FROM on an open connection; an upstream refusal is raised with its own code.

    With `first` (the first recipient and its DSN request) and an upstream that offers
    PIPELINING, its RCPT goes in the same write (RFC 2920) and its reply is the
    transaction's answer to the first `add_recipient`, which must name that recipient."""
    tx = SmtpTransaction(upstream, conn, pool, body_8bit=envelope.body_8bit, smtputf8=envelope.smtputf8)
    rcpt: Reply | SmtpError | None = None
    try:
        if first is not None and conn.can_pipeline(envelope, first[0]):
            reply, rcpt = await conn.mail_and_rcpt(envelope, *first)
        else:
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
    if first is not None and rcpt is not None:
        tx._first = (*first, rcpt)
    return tx


class SmarthostTarget:
    def __init__(self, name: str, connector: UpstreamConnector, pool: ConnectionPool) -> None:
        self.name = name
        self.connector = connector
        self.pool = pool

    def describe(self) -> str:
        return self.connector.describe()

    async def begin(self, envelope: Envelope, recipient: str, dsn: DsnRequest | None = None) -> SmtpTransaction:
        first = (recipient, dsn) if dsn is not None else None
        conn = await self.pool.acquire()
        reused = not conn.fresh
        try:
            return await begin_on(self.name, conn, self.pool, envelope, first)
        except SmtpError as exc:
            # A pooled connection may have been dropped by the upstream while idle; that
            # is not the message's fault, so try once more on a fresh connection.
            if not (reused and exc.label in ("upstream_disconnected", "upstream_error")):
                raise
        log.debug("stale pooled connection; reconnecting", extra={"upstream": self.name})
        conn = await self.pool.acquire()
        return await begin_on(self.name, conn, self.pool, envelope, first)

    async def probe(self) -> str:
        conn = await self.connector.open()
        text = conn.banner
        await conn.quit()
        return text

    async def close(self) -> None:
        await self.pool.close()
