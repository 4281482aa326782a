"""One client session: aiosmtpd's hooks translated into calls on the pipeline.

This module only translates. Decisions live in `relay.pipeline`; the reply for every
refusal comes from an `SmtpError`, and every transaction ends in exactly one log line.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from typing import TYPE_CHECKING, Protocol

from aiosmtpd.smtp import MISSING, AuthResult, LoginPassword
from aiosmtpd.smtp import Envelope as SmtpdEnvelope
from prometheus_client import Counter, Gauge

from relay.config.schema import ListenerSettings
from relay.deliver.base import Envelope
from relay.deliver.connection import upstream_id
from relay.errors import Reply, SmtpError
from relay.pipeline import Pipeline, Transaction, new_message_id

if TYPE_CHECKING:
    from relay.listen.smtp import RelaySession, RelaySMTP

log = logging.getLogger("relay.session")
message_log = logging.getLogger("relay.message")

SESSIONS_ACTIVE = Gauge(
    "relay_sessions_active",
    "Client sessions currently open.",
    ["listener"],
    multiprocess_mode="livesum",
)
SESSIONS_TOTAL = Counter(
    "relay_sessions_total",
    "Client sessions ended, by the TLS version they used (none for plain).",
    ["listener", "tls"],
)
SESSIONS_REFUSED = Counter(
    "relay_sessions_refused_total", "Client connections refused at the greeting.", ["listener", "reason"]
)
AUTH_ATTEMPTS = Counter(
    "relay_auth_attempts_total",
    "SMTP AUTH attempts by mechanism and result.",
    ["listener", "mechanism", "result"],
)


class RelayState(Protocol):
    """What a session needs from the running relay."""

    @property
    def pipeline(self) -> Pipeline: ...

    @property
    def draining(self) -> bool: ...

    def track(self, server: RelaySMTP) -> None: ...

    def untrack(self, server: RelaySMTP) -> None: ...


class SessionHandler:
    def __init__(self, listener: ListenerSettings, relay: RelayState) -> None:
        self.listener = listener
        self.relay = relay

    @property
    def draining(self) -> bool:
        return self.relay.draining

    # -- connection ---------------------------------------------------------------------
    def admit(self, server: RelaySMTP) -> str | None:
        """Called instead of sending the greeting; returns a refusal or None."""
        session = server.session
        assert session is not None
        proxy = getattr(session, "proxy_data", None)
        if proxy is not None and proxy.src_addr is not None:
            session.client_ip = str(proxy.src_addr)
        elif session.peer:
            session.client_ip = str(session.peer[0])
        refusal = self.relay.pipeline.admit(session.client_ip)
        if refusal is None and self.draining:
            refusal = SmtpError(421, "4.3.2", "Service shutting down, try again", reason="draining", label="draining")
        if refusal is not None:
            SESSIONS_REFUSED.labels(self.listener.name, refusal.label).inc()
            message_log.info(
                "session refused",
                extra={
                    "event": "session_refused",
                    "listener": self.listener.name,
                    "client": session.client_ip,
                    "code": refusal.code,
                    "reason": refusal.reason,
                },
            )
            return str(refusal.reply)
        self.relay.track(server)
        SESSIONS_ACTIVE.labels(self.listener.name).inc()
        server.tracked = True
        return None

    def session_closed(self, server: RelaySMTP) -> None:
        if getattr(server, "tracked", False):
            server.tracked = False
            SESSIONS_ACTIVE.labels(self.listener.name).dec()
            # Counted at the end, so a STARTTLS session shows the TLS version it ended with.
            tls = server.session.tls_version if server.session is not None else None
            SESSIONS_TOTAL.labels(self.listener.name, tls or "none").inc()
            self.relay.untrack(server)
        self.end_transaction(server)

    async def handle_PROXY(self, server, session, envelope, proxy_data) -> bool:
        # The network check runs on the address the PROXY header carries (in `admit`).
        return True

    async def handle_exception(self, error: Exception) -> str:
        log.error(
            "session error",
            exc_info=log.isEnabledFor(logging.DEBUG),
            extra={"listener": self.listener.name, "error": type(error).__name__},
        )
        return "451 4.3.0 Internal error, try again later"

    # -- AUTH (RFC 4954; PLAIN RFC 4616, LOGIN) -----------------------------------------
    async def auth_PLAIN(self, server: RelaySMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            blob = _b64(args[1])
            if blob is None:
                await server.push("501 5.5.2 Cannot decode base64")
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await server.push("501 5.5.2 Cannot split AUTH PLAIN response")
            return AuthResult(success=False, handled=True)
        return await self._check(server, "PLAIN", parts[1], parts[2])

    async def auth_LOGIN(self, server: RelaySMTP, args: list[str]) -> AuthResult:
        if len(args) == 2:
            login = _b64(args[1])
            if login is None:
                await server.push("501 5.5.2 Cannot decode base64")
                return AuthResult(success=False, handled=True)
        else:
            login = await server.challenge_auth("Username:")
            if login is MISSING:
                return AuthResult(success=False, handled=True)
        password = await server.challenge_auth("Password:")
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._check(server, "LOGIN", login, password)

    async def _check(self, server: RelaySMTP, mechanism: str, login: bytes, password: bytes) -> AuthResult:
        session: RelaySession = server.session  # type: ignore[assignment]
        username = login.decode("utf-8", "replace")
        user = await self.relay.pipeline.authenticate(username, password)
        if user is not None:
            session.user = user
            AUTH_ATTEMPTS.labels(self.listener.name, mechanism, "success").inc()
            return AuthResult(
                success=True, auth_data=LoginPassword(login, b""), message="235 2.7.0 Authentication successful"
            )
        session.auth_failures += 1
        AUTH_ATTEMPTS.labels(self.listener.name, mechanism, "failure").inc()
        log.info(
            "authentication failed",
            extra={
                "listener": self.listener.name,
                "client": session.client_ip,
                "user": username[:64],
            },
        )
        if session.auth_failures >= self.relay.pipeline.settings.clients.max_auth_failures:
            await server.push("535 5.7.8 Authentication credentials invalid")
            await server.push("421 4.7.0 Too many failed authentications, closing connection")
            server.close()
            return AuthResult(success=False, handled=True)
        # aiosmtpd 1.4.6 defaults a failed AuthResult to handled=True and then sends nothing.
        return AuthResult(success=False, handled=False, message="535 5.7.8 Authentication credentials invalid")

    # -- the transaction ----------------------------------------------------------------
    async def handle_MAIL(
        self, server: RelaySMTP, session: RelaySession, envelope: SmtpdEnvelope, address: str, mail_options: list[str]
    ) -> str:
        if self.draining:
            asyncio.get_running_loop().call_soon(server.close)
            return "421 4.3.2 Service shutting down, try again"
        pipeline = self.relay.pipeline
        who = session.user.username if session.user else f"unauthenticated client {session.client_ip}"
        try:
            senders = pipeline.senders_for(self.listener, session.user)
            pipeline.authorize_envelope(senders, address, who)
        except SmtpError as exc:
            self._log_refusal(session, address, exc)
            return str(exc.reply)
        session.transaction = Transaction(
            id=new_message_id(),
            listener=self.listener.name,
            client=session.client_ip,
            user=session.user.username if session.user else None,
            senders=senders,
            envelope=Envelope(
                mail_from=address,
                body_8bit="BODY=8BITMIME" in mail_options,
                smtputf8="SMTPUTF8" in mail_options,
            ),
            pipeline=pipeline,
            helo=session.host_name or "unknown",
            tls=session.tls_version,
        )
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self, server: RelaySMTP, session: RelaySession, envelope: SmtpdEnvelope, address: str, rcpt_options: list[str]
    ) -> str:
        tx: Transaction | None = session.transaction
        if tx is None:
            return "503 5.5.1 Send MAIL FROM first"
        try:
            reply = await tx.pipeline.add_recipient(tx, address)
        except SmtpError as exc:
            tx.rcpt_refusal = exc
            if exc.label != "too_many_recipients":
                log.info(
                    "recipient not accepted",
                    extra={
                        "id": tx.id,
                        "reason": exc.reason,
                        "code": exc.code,
                        "label": exc.label,
                    },
                )
            return str(exc.reply)
        if reply.positive:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return str(reply)

    async def handle_DATA(self, server: RelaySMTP, session: RelaySession, envelope: SmtpdEnvelope) -> str:
        tx: Transaction | None = session.transaction
        if tx is None:
            return "503 5.5.1 Send MAIL FROM first"
        session.transaction = None
        try:
            reply = await tx.pipeline.relay_message(tx, envelope.content)
        except SmtpError as exc:
            self._log_message(tx, exc.reply, exc)
            return str(exc.reply)
        self._log_message(tx, reply, None)
        return str(reply)

    def data_refused(self, server: RelaySMTP, error: SmtpError, size: int) -> str:
        """DATA refused by the listener itself (too big, bare line endings)."""
        session: RelaySession = server.session  # type: ignore[assignment]
        tx: Transaction | None = session.transaction
        if tx is None:
            self.relay.pipeline.count_rejection(self.listener.name, error.label)
            return str(error.reply)
        session.transaction = None
        tx.size = size
        _abort_upstream(tx)
        self._log_message(tx, error.reply, error)
        return str(error.reply)

    def end_transaction(self, server: RelaySMTP) -> None:
        """Client RSET, new EHLO, QUIT or disconnect: drop the upstream transaction."""
        session: RelaySession | None = server.session  # type: ignore[assignment]
        if session is None or session.transaction is None:
            return
        tx, session.transaction = session.transaction, None
        _abort_upstream(tx)
        if not tx.recipients and tx.rcpt_refusal is not None:
            # No recipient was accepted, so no DATA came: the refusal at RCPT is this
            # transaction's outcome and gets its one log line (and rejection count).
            self._log_message(tx, tx.rcpt_refusal.reply, tx.rcpt_refusal)

    # -- one log line per transaction -----------------------------------------------------
    def _log_message(self, tx: Transaction, reply: Reply, error: SmtpError | None) -> None:
        if error is not None:
            tx.pipeline.count_rejection(tx.listener, error.label)
        upstream_reply = tx.upstream_reply
        fields = {
            "event": "message",
            "id": tx.id,
            "listener": tx.listener,
            "client": tx.client,
            "user": tx.user,
            "mail_from_domain": tx.mail_from_domain or None,
            "from_domain": tx.from_domain,
            "recipients": len(tx.recipients),
            "size": tx.size,
            "dkim": tx.dkim,
            "upstream": tx.upstream.upstream if tx.upstream is not None else None,
            "upstream_reply": str(upstream_reply) if upstream_reply else None,
            "upstream_id": upstream_id(upstream_reply.text) if upstream_reply and upstream_reply.positive else None,
            "code": reply.code,
            "enhanced": reply.enhanced,
            "duration_ms": round((time.monotonic() - tx.started) * 1000, 1),
        }
        if error is not None:
            fields["reason"] = error.reason
        message_log.info("relayed" if error is None else "refused", extra=fields)

    def _log_refusal(self, session: RelaySession, mail_from: str, error: SmtpError) -> None:
        self.relay.pipeline.count_rejection(self.listener.name, error.label)
        message_log.info(
            "refused",
            extra={
                "event": "message",
                "id": None,
                "listener": self.listener.name,
                "client": session.client_ip,
                "user": session.user.username if session.user else None,
                "mail_from_domain": mail_from.rpartition("@")[2].lower() or None,
                "code": error.code,
                "enhanced": error.reply.enhanced,
                "reason": error.reason,
            },
        )


def _abort_upstream(tx: Transaction) -> None:
    if tx.upstream is not None:
        asyncio.get_running_loop().create_task(tx.upstream.abort())


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
