"""One client connection's state, and what each SMTP event means for it.

`ClientSession` is the typed per-connection session: the edge (`relay.listen.smtp`) creates
one per connection and calls it, in protocol order; it never calls back into the edge. It
translates each event into a call on the pipeline (which decides), keeps the connection's
state (client address, TLS, the authenticated user, the open transaction), and reports
through `relay.observe`:

    on_connect(client_ip) -> SmtpError | None   before the greeting: admit or refuse
    on_tls(version, restarted)                  implicit TLS, or STARTTLS (RFC 3207 §4.2)
    authenticate(mechanism, login, password)    AUTH (RFC 4954)
    mail(address, params, helo) -> Reply        MAIL: opens the transaction
    rcpt(address, dsn) -> Reply                 RCPT: opens/extends the upstream transaction
    data(content) -> Reply                      the content after the final dot
    data_refused(error, size) -> Reply          DATA refused by the listener itself
    on_reset()                                  RSET, HELO, EHLO, STARTTLS: the transaction ends
    timed_out(error)                            the relay's own timer ends the transaction
    on_close()                                  the connection is gone, whatever the reason
"""

from __future__ import annotations

import asyncio
from typing import Literal, Protocol

from relay.auth.users import User
from relay.config.schema import ListenerSettings
from relay.deliver.base import NO_DSN, DsnRequest, Envelope
from relay.errors import Reply, SmtpError
from relay.listen.esmtp import MailParams
from relay.observe import messages, sessions
from relay.pipeline import Pipeline, Transaction

# Or the reply to give when the password could not be checked at all (454, RFC 4954 §6).
# refused: wrong credentials (535); closing: too many in this session (535, then 421 and
# close); throttled: too many from this address (421 and close, relay.auth.throttle).
AuthOutcome = Literal["accepted", "refused", "closing", "throttled"] | Reply

SENDER_OK = Reply(250, "2.1.0", "Sender OK")
NEED_MAIL = Reply(503, "5.5.1", "Send MAIL FROM first")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again")


class SessionContext(Protocol):
    """What a session needs from the running relay."""

    @property
    def pipeline(self) -> Pipeline: ...

    @property
    def draining(self) -> bool: ...


class ClientSession:
    def __init__(self, listener: ListenerSettings, context: SessionContext) -> None:
        self.listener = listener
        self.context = context
        self.client_ip = ""
        self.tls_version: str | None = None
        self.user: User | None = None
        self.auth_failures = 0
        self.transaction: Transaction | None = None
        self.relaying = False  # from the end of DATA to its reply
        self.admitted = False

    @property
    def draining(self) -> bool:
        return self.context.draining

    @property
    def idle(self) -> bool:
        """No transaction open and no message on its way: a drain may close the session now.
        A message being relayed is not idle although its transaction has left the session:
        closing then would send 421 for a message the upstream may accept (a duplicate)."""
        return self.transaction is None and not self.relaying

    # -- connection -----------------------------------------------------------------------
    def on_connect(self, client_ip: str, full: SmtpError | None = None) -> SmtpError | None:
        """Admit the client, or return the refusal to send instead of the greeting (`full`:
        the connection limits' refusal, after the network check)."""
        self.client_ip = client_ip
        refusal = self.context.pipeline.admit(client_ip) or full
        if refusal is None and self.draining:
            refusal = SmtpError(421, "4.3.2", "Service shutting down, try again", reason="draining", label="draining")
        if refusal is not None:
            sessions.session_refused(self.listener.name, client_ip, refusal)
            return refusal
        self.admitted = True
        sessions.session_admitted(self.listener.name)
        return None

    def on_tls(self, version: str | None, *, restarted: bool) -> None:
        self.tls_version = version
        if restarted:
            # RFC 3207 §4.2: after STARTTLS the session starts over.
            self.user = None
            self.auth_failures = 0

    def on_reset(self, why: str = "RSET") -> None:
        """The client transaction ends without DATA; so does the upstream one."""
        tx, self.transaction = self.transaction, None
        if tx is None:
            return
        tx.pipeline.abandon(tx)
        if not tx.recipients and tx.rcpt_refusal is not None:
            # No recipient was accepted, so no DATA came: the refusal at RCPT is this
            # transaction's outcome and gets its one log line (and rejection count).
            messages.transaction_ended(tx, tx.rcpt_refusal.reply, tx.rcpt_refusal)
        else:
            messages.transaction_cancelled(tx, why)

    def on_close(self, why: str = "client disconnected") -> None:
        if self.admitted:
            self.admitted = False
            sessions.session_ended(self.listener.name, self.tls_version)
        self.on_reset(why)

    def proxy_refused(self, peer: str) -> None:
        """A PROXY header from a source outside `proxy_protocol_from`: refused unread."""
        refusal = SmtpError(
            554,
            "5.7.1",
            "Access denied: PROXY header not accepted from this address",
            reason=f"PROXY header from {peer}, outside proxy_protocol_from",
            label="proxy_source",
        )
        sessions.session_refused(self.listener.name, peer, refusal)

    # -- AUTH (RFC 4954) --------------------------------------------------------------------
    async def authenticate(self, mechanism: str, login: bytes, password: bytes) -> AuthOutcome:
        username = login.decode("utf-8", "replace")
        pipeline = self.context.pipeline
        try:
            user = await pipeline.authenticate(username, password, self.client_ip)
        except SmtpError as exc:
            if exc.label == "auth_unavailable":
                # The user's password could not be checked (its secret is not loaded): a
                # temporary failure (RFC 4954 §6: 454 4.7.0), not the client's fault.
                sessions.auth_unavailable(self.listener.name, mechanism, client=self.client_ip, reason=exc.reason)
            else:
                sessions.auth_not_checked(self.listener.name, mechanism, exc, client=self.client_ip)
            return "throttled" if exc.code == 421 else exc.reply
        sessions.auth_attempt(
            self.listener.name,
            mechanism,
            user is not None,
            client=self.client_ip,
            username=username,
            known=pipeline.users.knows(username),
        )
        if user is not None:
            self.user = user
            return "accepted"
        self.auth_failures += 1
        if self.auth_failures >= pipeline.settings.clients.max_auth_failures:
            return "closing"
        return "refused"

    # -- the transaction ------------------------------------------------------------------
    def mail(self, address: str, params: MailParams, *, helo: str | None) -> Reply:
        """MAIL FROM (`address` "" is the null reverse-path), with its parsed parameters."""
        if self.draining:
            return SHUTTING_DOWN
        pipeline = self.context.pipeline
        username = self.user.username if self.user else None
        try:
            senders = pipeline.senders_for(self.listener, self.user)
            pipeline.authorize_envelope(senders, address, username, self.client_ip)
            pipeline.check_announced_size(params.size)
        except SmtpError as exc:
            messages.mail_refused(self.listener.name, self.client_ip, username, address, exc)
            return exc.reply
        envelope = Envelope(
            mail_from=address,
            body_8bit=params.body_8bit,
            smtputf8=params.smtputf8,
            ret=params.ret,
            envid=params.envid,
            auth=pipeline.submitter(self.user, senders, params.auth),
        )
        self.transaction = pipeline.open_transaction(
            listener=self.listener.name,
            client=self.client_ip,
            user=username,
            senders=senders,
            envelope=envelope,
            helo=helo or "unknown",
            tls=self.tls_version,
        )
        return SENDER_OK

    async def rcpt(self, address: str, dsn: DsnRequest = NO_DSN) -> Reply:
        tx = self.transaction
        if tx is None:
            return NEED_MAIL
        try:
            return await tx.pipeline.add_recipient(tx, address, dsn)
        except SmtpError as exc:
            messages.recipient_refused(tx.id, exc)
            return exc.reply

    async def data(self, content: bytes) -> Reply:
        tx, self.transaction = self.transaction, None
        if tx is None:
            return NEED_MAIL
        self.relaying = True
        try:
            reply = await tx.pipeline.relay_message(tx, content)
        except SmtpError as exc:
            messages.transaction_ended(tx, exc.reply, exc)
            return exc.reply
        except asyncio.CancelledError:
            # The client went away (or the relay stopped) after the final dot, before our
            # reply: the message's one log line says so (the upstream may have taken it).
            messages.transaction_cancelled(tx, "session ended before the reply to DATA")
            raise
        finally:
            self.relaying = False
        messages.transaction_ended(tx, reply, None)
        return reply

    @property
    def holds_upstream(self) -> bool:
        """A transaction is open and its upstream transaction has begun (the first RCPT): a
        pooled upstream connection waits on this client."""
        return self.transaction is not None and self.transaction.upstream is not None

    def timed_out(self, error: SmtpError) -> None:
        """The relay's own timer ends the open transaction (before DATA): the upstream
        transaction is dropped and the transaction's one log line carries `error`."""
        tx, self.transaction = self.transaction, None
        if tx is None:
            return
        tx.pipeline.abandon(tx)
        messages.transaction_ended(tx, error.reply, error)

    def data_refused(self, error: SmtpError, size: int) -> Reply:
        """DATA refused by the listener itself (too big, bare line endings)."""
        tx, self.transaction = self.transaction, None
        if tx is None:
            messages.count_rejection(self.listener.name, error.label)
            return error.reply
        tx.pipeline.refuse_data(tx, size)
        messages.transaction_ended(tx, error.reply, error)
        return error.reply
