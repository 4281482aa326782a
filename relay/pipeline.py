"""The path of one message: listen → authenticate → authorize → sign → route → deliver.

A `Pipeline` is built from one config snapshot (at start and at every reload) and holds
the stages. The SMTP session (`relay.listen.session`) calls it in protocol order; each
call either returns the reply for the client or raises `SmtpError`. A transaction keeps the
pipeline it started with, so a reload never changes the rules in the middle of a message.
A `Transaction` is changed here and nowhere else; the session only holds it.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import logging
import os
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from typing import Protocol

from dkim.util import InvalidTagValueList, parse_tag_value

from relay.auth.throttle import AuthThrottle
from relay.auth.users import AuthBusy, User, UserDirectory
from relay.cancel import cancel_and_wait
from relay.config.schema import ListenerSettings, Settings
from relay.deliver.base import NO_DSN, DsnRequest, Envelope, UpstreamTransaction
from relay.deliver.dsn import relayed_report
from relay.errors import Reply, SmtpError
from relay.limits.limiter import NOTHING_RESERVED, Limiter, LimitExceeded, Reservation
from relay.message import Message
from relay.observe import messages
from relay.policy.senders import ClientNetworks, SenderPolicy
from relay.route.router import Router
from relay.sign.dkim import DkimSigner
from relay.sign.keyring import KeyRing

log = logging.getLogger("relay.pipeline")


class SendGate(Protocol):
    """A policy consulted before a domain's message is sent (e.g. SPF `on_fail: refuse`).
    Raises SmtpError to hold the message back."""

    def check(self, from_domain: str) -> None: ...


@dataclass
class Transaction:
    """One client transaction, from MAIL to the final reply."""

    id: str
    listener: str
    client: str
    user: str | None
    senders: SenderPolicy
    envelope: Envelope
    pipeline: Pipeline
    helo: str = "unknown"
    tls: str | None = None  # TLS version of the client session
    started: float = field(default_factory=time.monotonic)
    upstream: UpstreamTransaction | None = None
    recipients: list[str] = field(default_factory=list)
    # Accepted recipients that asked for a notice of success (RFC 3461 §4.1 NOTIFY=SUCCESS).
    notify_success: list[tuple[str, DsnRequest]] = field(default_factory=list)
    broken: str | None = None  # why the upstream transaction was lost after a recipient
    rcpt_refusal: SmtpError | None = None  # the last refusal of a recipient, by us or upstream
    # What happened, for the log line.
    size: int = 0
    dkim: list[str] = field(default_factory=list)
    from_domain: str | None = None
    upstream_reply: Reply | None = None
    limit: str | None = None  # the sending limit that refused it (`user:billing:daily`)
    queued: bool = False  # spool mode: the 250 means "on disk", delivery follows

    @property
    def mail_from_domain(self) -> str:
        return self.envelope.mail_from.rpartition("@")[2].lower()


def new_auth_throttle(settings: Settings) -> AuthThrottle:
    limits = settings.clients.auth_throttle
    return AuthThrottle(
        per_address=limits.per_address,
        per_username=limits.per_username,
        window=limits.window,
        max_tracked=limits.max_tracked,
    )


def new_message_id() -> str:
    return os.urandom(8).hex()


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        *,
        users: UserDirectory,
        keyring: KeyRing,
        router: Router,
        gate: SendGate | None = None,
        throttle: AuthThrottle | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        self.settings = settings
        self.throttle = throttle or new_auth_throttle(settings)
        self.users = users
        self.keyring = keyring
        self.router = router
        self.gate = gate
        self.limiter = limiter
        # The pipeline a reload put in this one's place (Relay.reload): where a transaction
        # of this one begins upstream once this one's upstream is retired (`_begin`).
        self.successor: Pipeline | None = None
        self.networks = ClientNetworks(settings.clients.networks)
        self.signer = DkimSigner(settings.dkim.sign_headers, settings.dkim.oversign)
        self._listener_senders = {
            lst.name: SenderPolicy(lst.senders if lst.senders is not None else keyring.domains)
            for lst in settings.listeners
        }

    # -- 1. listen ------------------------------------------------------------------------
    def admit(self, client_ip: str) -> SmtpError | None:
        if self.networks.allows(client_ip):
            return None
        return SmtpError(
            554,
            "5.7.1",
            "Access denied: this client may not use this relay",
            reason=f"client {client_ip} outside clients.networks",
            label="network",
        )

    # -- 2. authenticate ------------------------------------------------------------------
    async def authenticate(self, username: str, password: bytes, client: str = "") -> User | None:
        """The user, or None for wrong credentials. Raises SmtpError when the attempt is not
        checked at all: the client address has failed too often (421, relay.auth.throttle),
        or too many password checks are already waiting (454, RFC 4954 §6)."""
        throttle = self.throttle
        if throttle.address_blocked(client):
            raise SmtpError(
                421,
                "4.7.0",
                "Too many failed authentications, try again later",
                reason=f"AUTH from {client} throttled after repeated failures",
                label="auth_throttled",
            )
        limited = throttle.username_limited(username)
        try:
            user = await self.users.authenticate(username, password, verify=not limited)
        except AuthBusy:
            raise SmtpError(
                454,
                "4.7.0",
                "Temporary authentication failure, try again later",
                reason="too many password checks in progress",
                label="auth_busy",
            ) from None
        if user is None:
            throttle.failed(client, username, username_limited=limited)
        else:
            throttle.succeeded(client)
        return user

    # -- 3. authorize the envelope sender -------------------------------------------------
    def senders_for(self, listener: ListenerSettings, user: User | None) -> SenderPolicy:
        if user is not None:
            return user.senders
        if listener.auth == "required":
            raise SmtpError(530, "5.7.0", "Authentication required", reason="MAIL before AUTH", label="auth_required")
        return self._listener_senders[listener.name]

    def authorize_envelope(self, senders: SenderPolicy, mail_from: str, user: str | None, client: str) -> None:
        # RFC 5321 §4.1.1.2. The null reverse-path has no domain to check; the header From
        # is still checked at DATA.
        if mail_from and not senders.allows(mail_from):
            raise SmtpError(
                550,
                "5.7.1",
                f"Sender <{mail_from}> not allowed {_for_whom(user)}",
                reason=f"{user or f'unauthenticated client {client}'} may not use envelope sender {mail_from}",
                label="sender_denied",
            )

    def check_announced_size(self, size: int | None) -> None:
        """RFC 1870 §6.1: a message announced (SIZE=) over the limit is refused at MAIL."""
        limit = self.settings.clients.max_message_size
        if size is not None and limit and size > limit:
            raise SmtpError(
                552,
                "5.3.4",
                f"Message size exceeds the limit of {limit} bytes",
                reason=f"SIZE={size} announced, over clients.max_message_size",
                label="too_big",
            )

    def submitter(self, user: User | None, senders: SenderPolicy, claimed: str | None) -> str | None:
        """The AUTH= value to pass on (RFC 4954 §5): the mailbox the client named, if it is
        authenticated and may send as that mailbox; otherwise "" (AUTH=<>). None: no AUTH=."""
        if claimed is None:
            return None
        return claimed if user is not None and claimed and senders.allows(claimed) else ""

    def open_transaction(
        self,
        *,
        listener: str,
        client: str,
        user: str | None,
        senders: SenderPolicy,
        envelope: Envelope,
        helo: str,
        tls: str | None,
    ) -> Transaction:
        """The transaction of an accepted MAIL FROM (no upstream yet: see add_recipient)."""
        tx_id = new_message_id()
        return Transaction(
            id=tx_id,
            listener=listener,
            client=client,
            user=user,
            senders=senders,
            envelope=replace(envelope, id=tx_id, listener=listener, user=user),
            pipeline=self,
            helo=helo,
            tls=tls,
        )

    # -- 4. route: open the upstream transaction at the first recipient -------------------
    async def _add_recipient(self, tx: Transaction, recipient: str, dsn: DsnRequest) -> Reply:
        if len(tx.recipients) >= self.settings.clients.max_recipients:
            # RFC 5321 §4.5.3.1.10: 452 lets the client send the rest in another transaction.
            raise SmtpError(
                452,
                "4.5.3",
                "Too many recipients for one message",
                reason=f"more than {self.settings.clients.max_recipients} recipients",
                label="too_many_recipients",
            )
        if tx.broken:
            raise SmtpError(
                451,
                "4.4.2",
                "Upstream connection lost, send the whole message again",
                reason=tx.broken,
                label="upstream_disconnected",
            )
        if self.limiter is not None:
            # Before the upstream hears of it: a user over its limits opens nothing upstream.
            try:
                self.limiter.check_recipient(tx.user, len(tx.recipients), listener=tx.listener)
            except LimitExceeded as exc:
                tx.limit = exc.limit
                raise
        if tx.upstream is None:
            tx.upstream = await self._begin(tx.envelope, recipient, dsn)
        try:
            reply = await tx.upstream.add_recipient(recipient, dsn)
        except SmtpError as exc:
            # The upstream transaction is gone. Without accepted recipients a new one can
            # be opened for the next RCPT; with some, it cannot be rebuilt faithfully, so
            # the whole transaction must be retried by the client (451 from here on).
            tx.upstream = None
            if tx.recipients:
                tx.broken = exc.reason
            raise
        if reply.positive:
            tx.recipients.append(recipient)
            if dsn.notifies("SUCCESS"):
                tx.notify_success.append((recipient, dsn))
        return reply

    async def _begin(self, envelope: Envelope, recipient: str, dsn: DsnRequest | None = None) -> UpstreamTransaction:
        """The upstream transaction for `envelope`, on the upstream this pipeline routes it to.
        If a reload has retired that upstream since the client's MAIL (its pool is closed:
        the host, port or credentials changed), the transaction begins where the running
        config routes it instead: a reload costs no client a 4xx. A transaction already
        begun upstream is not moved: it ends on its connection, which the retired pool
        closes once it is given back."""
        pipeline = self
        while True:
            try:
                return await pipeline.router.target_for(envelope.mail_from).begin(envelope, recipient, dsn)
            except SmtpError as exc:
                if exc.label != "shutting_down" or pipeline.successor is None:
                    raise  # not retired, or the relay is stopping: the 451 stands
                pipeline = pipeline.successor

    async def add_recipient(self, tx: Transaction, recipient: str, dsn: DsnRequest = NO_DSN) -> Reply:
        """RCPT: the upstream's answer for `recipient`; a refusal (ours or the path's) raises
        SmtpError and is remembered as the transaction's outcome if no recipient passes."""
        try:
            return await self._add_recipient(tx, recipient, dsn)
        except SmtpError as exc:
            tx.rcpt_refusal = exc
            raise

    # -- 5. at DATA: authorize the author, sign, deliver ----------------------------------
    async def relay_message(self, tx: Transaction, raw: bytes) -> Reply:
        """Everything after the client's final dot. Returns the reply for the client."""
        tx.size = len(raw)
        messages.message_received(tx.listener, tx.size)
        started = time.perf_counter()
        reservation = NOTHING_RESERVED
        sending = False
        try:
            message = Message.parse(raw)
            author, domain = message.from_domain()
            tx.from_domain = domain
            if not tx.senders.allows(author):
                raise SmtpError(
                    550,
                    "5.7.1",
                    f"From: <{author}> not allowed {_for_whom(tx.user)}",
                    reason=f"{tx.user or 'unauthenticated client'} may not send as From {author}",
                    label="from_denied",
                )
            if self.gate is not None:
                self.gate.check(domain)
            if tx.broken:
                raise SmtpError(
                    451, "4.4.2", "Upstream connection lost, try again", reason=tx.broken, label="upstream_disconnected"
                )
            # Counted here, before the signing work; given back below if not delivered.
            reservation = await self._reserve(tx, domain)
            message = self._drop_stale_own_signatures(message)
            signatures = self._sign(tx, message, domain)
            if tx.upstream is None:
                raise SmtpError(
                    451,
                    "4.3.0",
                    "No upstream transaction, try again",
                    reason="DATA without an open upstream transaction",
                    label="internal",
                )
            wire = message.wire(signatures + self._received_header(tx))
            sending = True
            reply = await tx.upstream.send(wire)
        except SmtpError:
            if tx.upstream is not None:
                await tx.upstream.abort()
            await reservation.give_back()
            raise
        except asyncio.CancelledError:
            # The client is gone (or the relay stops) before its reply. The upstream
            # transaction ends, whatever its stage: it has left the session, which cannot
            # end it any more, and it holds a pool slot. The count comes back unless the
            # message was on its way upstream (it may have been delivered: it stays counted).
            self.abandon(tx)
            if not sending:
                _in_background(reservation.give_back())
            raise
        except Exception as exc:
            # A failure no stage foresaw: the client may retry (4xx), and nothing of the
            # transaction may outlive it (a leaked upstream transaction is a pool slot lost).
            log.exception("message %s failed", tx.id)
            if tx.upstream is not None:
                await tx.upstream.abort()
            await reservation.give_back()
            raise SmtpError(
                451,
                "4.3.0",
                "Internal error, try again later",
                reason=f"internal error: {type(exc).__name__}",
                label="internal",
            ) from exc
        finally:
            messages.relay_duration(tx.listener, time.perf_counter() - started)
        tx.upstream_reply = reply
        if reply.positive:
            messages.message_relayed(tx.listener, tx.upstream.upstream)
            if self.settings.queue.mode == "spool":
                # The signed message is synced in the spool (relay.queue.spooled); the
                # delivery loop takes it from here. `relay queue show <id>` follows it.
                tx.queued = True
                return Reply(250, "2.0.0", f"Ok: queued, id={tx.id}")
            if tx.notify_success and tx.envelope.mail_from and not tx.upstream.carries_dsn:
                self._issue_relayed_notice(tx, message, domain, reply)
            return Reply(250, "2.0.0", f"Ok: relayed, id={tx.id}")
        await reservation.give_back()
        raise SmtpError(
            reply.code,
            reply.enhanced,
            reply.text,
            reason=f"upstream {tx.upstream.upstream} answered DATA with {reply}",
            label="upstream_temporary" if reply.temporary else "upstream_permanent",
        )

    async def _reserve(self, tx: Transaction, from_domain: str) -> Reservation:
        """Count the message against its user's and From domain's limits (all or nothing),
        or refuse it (451 4.7.0) having counted nothing."""
        if self.limiter is None:
            return NOTHING_RESERVED
        try:
            # Spool mode: the domain's limits stand for what the upstream takes, so the
            # delivery loop paces them (defers); the user's limits are refused here.
            spool = self.settings.queue.mode == "spool"
            return await self.limiter.reserve(
                tx.user, from_domain, len(tx.recipients), domain_limits=not spool, listener=tx.listener
            )
        except LimitExceeded as exc:
            tx.limit = exc.limit
            raise

    def _sign(self, tx: Transaction, message: Message, domain: str) -> bytes:
        keys = self.keyring.keys_for(domain)
        if not keys:
            if self.keyring.signs_for(domain):
                # Configured, but no valid key has ever been loaded: the secrets backend is
                # failing. Temporary: the message will pass once the key arrives.
                raise SmtpError(
                    451,
                    "4.7.0",
                    f"Signing key for {domain} not available, try again later",
                    reason=f"no valid key loaded for {domain}: {self.keyring.never_loaded()}",
                    label="key_unavailable",
                )
            if self.settings.dkim.when_no_key == "reject":
                raise SmtpError(
                    550,
                    "5.7.1",
                    f"This relay does not sign for {domain}",
                    reason=f"no DKIM key configured for From domain {domain}",
                    label="no_key",
                )
            return b""
        started = time.perf_counter()
        signatures = self.signer.sign(message, keys)
        messages.DKIM_SIGN_DURATION.observe(time.perf_counter() - started)
        for key in keys:
            messages.signature_added(key.domain, key.selector, key.algorithm)
            tx.dkim.append(f"{key.domain}/{key.selector}")
        return signatures

    def _drop_stale_own_signatures(self, message: Message) -> Message:
        """A message that already carries a signature with one of our d=/s= pairs (a
        resubmission, or a loop through the relay) loses it: we just signed it afresh, and a
        stale copy would fail verification if any signed header changed. Signatures of
        other domains are kept untouched."""
        stale = []
        for sig in message.get_all("dkim-signature"):
            try:
                tags = parse_tag_value(sig.value.replace(b"\r\n", b"").strip())
            except InvalidTagValueList:
                continue
            ident = (
                tags.get(b"d", b"").decode("ascii", "replace").lower(),
                tags.get(b"s", b"").decode("ascii", "replace"),
            )
            if self.keyring.owns(*ident):
                stale.append(sig)
        return message.without(stale) if stale else message

    def _received_header(self, tx: Transaction) -> bytes:
        """RFC 5321 §4.4 trace field. `relay_only` (the default) leaves out the client's
        private address and HELO name; `full` includes them."""
        mode = self.settings.received_header
        if mode == "off":
            return b""
        # RFC 3848 protocol types.
        protocol = "ESMTP" + ("S" if tx.tls else "") + ("A" if tx.user else "")
        source = f"from {tx.helo} ([{tx.client}])\r\n\t" if mode == "full" else ""
        with_tls = f" ({tx.tls})" if tx.tls else ""
        stamp = _received_date(int(time.time()))
        line = (
            f"Received: {source}by {self.settings.hostname} (relay) with {protocol}{with_tls}"
            f"\r\n\tid {tx.id}; {stamp}\r\n"
        )
        return line.encode("utf-8")

    # -- 6. after the upstream's 250: the "relayed" notice (RFC 3461 §5.2.2) ----------------
    def _issue_relayed_notice(self, tx: Transaction, message: Message, domain: str, upstream_reply: Reply) -> None:
        """The upstream took the message but not the DSN requests: tell the sender of the
        recipients that asked for SUCCESS that none will follow (relay.deliver.dsn). Sent
        after the client's 250, in the background: the client's reply never waits for it."""
        report = relayed_report(
            reporting_mta=self.settings.hostname,
            sender=tx.envelope.mail_from,
            domain=domain,
            recipients=tx.notify_success,
            envid=tx.envelope.envid,
            arrival=time.time() - (time.monotonic() - tx.started),
            upstream_reply=str(upstream_reply),
            header=message.header_bytes(),
        )
        _in_background(self._send_relayed_notice(tx, report, domain))

    async def _send_relayed_notice(self, tx: Transaction, report: bytes, domain: str) -> None:
        notice = Message.parse(report)
        keys = self.keyring.keys_for(domain)
        signed = notice.wire(self.signer.sign(notice, keys) if keys else b"")
        sender = tx.envelope.mail_from
        # RFC 3461 §6.1: the null reverse-path, so a notice can never cause another.
        envelope = Envelope(mail_from="", body_8bit=not signed.isascii(), smtputf8=not sender.isascii())
        upstream: UpstreamTransaction | None = None
        try:
            upstream = await self._begin(envelope, sender)
            reply = await upstream.add_recipient(sender)
            if reply.positive:
                reply = await upstream.send(signed)
        except SmtpError as exc:
            messages.relayed_notice(tx.id, None, exc.reason)
            return
        except asyncio.CancelledError:
            messages.relayed_notice(tx.id, None, "relay stopped before the notice was sent")
            raise
        except Exception as exc:  # a notice must never take anything else down
            log.exception("relayed notice failed")
            messages.relayed_notice(tx.id, None, type(exc).__name__)
            return
        finally:
            if upstream is not None:
                await upstream.abort()  # a no-op once send() has run
        messages.relayed_notice(tx.id, reply, None if reply.positive else str(reply))

    # -- the end of a transaction without a final reply from the upstream ----------------
    def refuse_data(self, tx: Transaction, size: int) -> None:
        """DATA was refused by the listener (too big, bare line endings): the upstream
        transaction is dropped; `size` is what the client sent, for the log line."""
        tx.size = size
        self.abandon(tx)

    def abandon(self, tx: Transaction) -> None:
        """Client RSET, new EHLO, QUIT or disconnect: drop the upstream transaction. Called
        from synchronous protocol callbacks, so the abort runs as a task of its own."""
        if tx.upstream is not None:  # kept on the transaction: the log line names it
            _in_background(tx.upstream.abort())


# Upstream aborts and relayed notices in flight (the loop keeps only weak references to
# tasks). Bounded: each is one upstream transaction, and every upstream wait has a timeout.
_background: set[asyncio.Task[None]] = set()


def _in_background(work: Coroutine[object, object, None]) -> None:
    task = asyncio.get_running_loop().create_task(work)
    _background.add(task)
    task.add_done_callback(_background.discard)


async def finish_background(timeout: float) -> None:
    """Let the background work of finished transactions end (drain), for up to `timeout`
    seconds; whatever is left is cancelled (stop)."""
    loop = asyncio.get_running_loop()
    pending = {task for task in _background if task.get_loop() is loop}
    if pending and timeout > 0:
        _done, pending = await asyncio.wait(pending, timeout=timeout)
    await cancel_and_wait(pending)


class _DateOfSecond:
    """RFC 5322 §3.3 date-time of a second, local time: the text of
    `email.utils.format_datetime(email.utils.localtime())` during that second, made once
    per second (one per message was most of the cost of the Received field)."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, second: int) -> str:
        if second != self._second:
            local = datetime.datetime.fromtimestamp(second, datetime.UTC).astimezone()
            self._second, self._text = second, email.utils.format_datetime(local)
        return self._text


_received_date = _DateOfSecond()


def _for_whom(user: str | None) -> str:
    # An unauthenticated client (auth: optional/none listeners) has no user to blame: its
    # senders are the listener's.
    return "for this user" if user else "for unauthenticated clients"
