"""The path of one message: listen → authenticate → authorize → sign → route → deliver.

A `Pipeline` is built from one config snapshot (at start and at every reload) and holds
the stages. The SMTP session calls it in protocol order; each call either returns the
reply for the client or raises `SmtpError`. A transaction keeps the pipeline it started
with, so a reload never changes the rules in the middle of a message.
"""

from __future__ import annotations

import email.utils
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Protocol

from dkim.util import InvalidTagValueList, parse_tag_value
from prometheus_client import Counter, Histogram

from relay.auth.users import User, UserDirectory
from relay.config.schema import ListenerSettings, Settings
from relay.deliver.base import Envelope, UpstreamTransaction
from relay.errors import Reply, SmtpError
from relay.message import Message
from relay.policy.senders import ClientNetworks, SenderPolicy
from relay.route.router import Router
from relay.sign.dkim import DkimSigner
from relay.sign.keyring import KeyRing

log = logging.getLogger("relay.pipeline")

MESSAGES_RECEIVED = Counter(
    "relay_messages_received_total", "Messages whose DATA was fully received.", ["listener"]
)
MESSAGES_RELAYED = Counter(
    "relay_messages_relayed_total", "Messages accepted by an upstream (the client got 250).",
    ["listener", "upstream"],
)
MESSAGES_REJECTED = Counter(
    "relay_messages_rejected_total",
    "Transactions refused (at MAIL, RCPT or DATA), by listener and reason.",
    ["listener", "reason"],
)
MESSAGE_SIZE = Histogram(
    "relay_message_size_bytes", "Size of received messages.", ["listener"],
    buckets=(1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 52428800),
)
RELAY_DURATION = Histogram(
    "relay_message_relay_duration_seconds",
    "From the end of the client's DATA to the final reply: signing plus the upstream's answer.",
    ["listener"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
DKIM_SIGNATURES = Counter(
    "relay_dkim_signatures_total", "DKIM signatures added.", ["domain", "selector", "algorithm"]
)
DKIM_SIGN_DURATION = Histogram(
    "relay_dkim_sign_duration_seconds", "Time to sign one message with all of its keys.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
)


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
    broken: str | None = None  # why the upstream transaction was lost after a recipient
    rcpt_refusal: SmtpError | None = None  # the last refusal of a recipient, by us or upstream
    # What happened, for the log line.
    size: int = 0
    dkim: list[str] = field(default_factory=list)
    from_domain: str | None = None
    upstream_reply: Reply | None = None

    @property
    def mail_from_domain(self) -> str:
        return self.envelope.mail_from.rpartition("@")[2].lower()


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
    ) -> None:
        self.settings = settings
        self.users = users
        self.keyring = keyring
        self.router = router
        self.gate = gate
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
        return SmtpError(554, "5.7.1", "Access denied: this client may not use this relay",
                         reason=f"client {client_ip} outside clients.networks", label="network")

    # -- 2. authenticate ------------------------------------------------------------------
    async def authenticate(self, username: str, password: bytes) -> User | None:
        return await self.users.authenticate(username, password)

    # -- 3. authorize the envelope sender -------------------------------------------------
    def senders_for(self, listener: ListenerSettings, user: User | None) -> SenderPolicy:
        if user is not None:
            return user.senders
        if listener.auth == "required":
            raise SmtpError(530, "5.7.0", "Authentication required",
                            reason="MAIL before AUTH", label="auth_required")
        return self._listener_senders[listener.name]

    def authorize_envelope(self, senders: SenderPolicy, mail_from: str, who: str) -> None:
        # RFC 5321 §4.1.1.2. The null reverse-path has no domain to check; the header From
        # is still checked at DATA.
        if mail_from and not senders.allows(mail_from):
            raise SmtpError(550, "5.7.1", f"Sender <{mail_from}> not allowed for this user",
                            reason=f"{who} may not use envelope sender {mail_from}",
                            label="sender_denied")

    # -- 4. route: open the upstream transaction at the first recipient -------------------
    async def add_recipient(self, tx: Transaction, recipient: str) -> Reply:
        if len(tx.recipients) >= self.settings.clients.max_recipients:
            # RFC 5321 §4.5.3.1.10: 452 lets the client send the rest in another transaction.
            raise SmtpError(452, "4.5.3", "Too many recipients for one message",
                            reason=f"more than {self.settings.clients.max_recipients} recipients",
                            label="too_many_recipients")
        if tx.broken:
            raise SmtpError(451, "4.4.2", "Upstream connection lost, send the whole message again",
                            reason=tx.broken, label="upstream_disconnected")
        if tx.upstream is None:
            delivery = self.router.route(tx.envelope.mail_from, recipient)
            tx.upstream = await delivery.begin(tx.envelope, recipient)
        try:
            reply = await tx.upstream.add_recipient(recipient)
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
        return reply

    # -- 5. at DATA: authorize the author, sign, deliver ----------------------------------
    async def relay_message(self, tx: Transaction, raw: bytes) -> Reply:
        """Everything after the client's final dot. Returns the reply for the client."""
        tx.size = len(raw)
        MESSAGES_RECEIVED.labels(tx.listener).inc()
        MESSAGE_SIZE.labels(tx.listener).observe(tx.size)
        started = time.perf_counter()
        try:
            message = Message.parse(raw)
            author, domain = message.from_domain()
            tx.from_domain = domain
            if not tx.senders.allows(author):
                raise SmtpError(550, "5.7.1", f"From: <{author}> not allowed for this user",
                                reason=f"{tx.user or 'unauthenticated client'} may not send as From {author}",
                                label="from_denied")
            if self.gate is not None:
                self.gate.check(domain)
            if tx.broken:
                raise SmtpError(451, "4.4.2", "Upstream connection lost, try again",
                                reason=tx.broken, label="upstream_disconnected")
            message = self._drop_stale_own_signatures(message)
            signatures = self._sign(tx, message, domain)
            if tx.upstream is None:
                raise SmtpError(451, "4.3.0", "No upstream transaction, try again",
                                reason="DATA without an open upstream transaction", label="internal")
            reply = await tx.upstream.send(message.to_bytes(signatures + self._received_header(tx)))
        except SmtpError:
            if tx.upstream is not None:
                await tx.upstream.abort()
            raise
        finally:
            RELAY_DURATION.labels(tx.listener).observe(time.perf_counter() - started)
        tx.upstream_reply = reply
        if reply.positive:
            MESSAGES_RELAYED.labels(tx.listener, tx.upstream.upstream).inc()
            return Reply(250, "2.0.0", f"Ok: relayed, id={tx.id}")
        raise SmtpError(reply.code, reply.enhanced, reply.text,
                        reason=f"upstream {tx.upstream.upstream} answered DATA with {reply}",
                        label="upstream_temporary" if reply.temporary else "upstream_permanent")

    def _sign(self, tx: Transaction, message: Message, domain: str) -> bytes:
        keys = self.keyring.keys_for(domain)
        if not keys:
            if self.keyring.signs_for(domain):
                # Configured, but no valid key has ever been loaded: the secrets backend is
                # failing. Temporary: the message will pass once the key arrives.
                raise SmtpError(451, "4.7.0", f"Signing key for {domain} not available, try again later",
                                reason=f"no valid key loaded for {domain}: {self.keyring.never_loaded()}",
                                label="key_unavailable")
            if self.settings.dkim.when_no_key == "reject":
                raise SmtpError(550, "5.7.1", f"This relay does not sign for {domain}",
                                reason=f"no DKIM key configured for From domain {domain}",
                                label="no_key")
            return b""
        started = time.perf_counter()
        signatures = self.signer.sign(message, keys)
        DKIM_SIGN_DURATION.observe(time.perf_counter() - started)
        for key in keys:
            DKIM_SIGNATURES.labels(key.domain, key.selector, key.algorithm).inc()
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
            ident = (tags.get(b"d", b"").decode("ascii", "replace").lower(),
                     tags.get(b"s", b"").decode("ascii", "replace"))
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
        stamp = email.utils.format_datetime(email.utils.localtime())
        line = (f"Received: {source}by {self.settings.hostname} (relay) with {protocol}{with_tls}"
                f"\r\n\tid {tx.id}; {stamp}\r\n")
        return line.encode("utf-8")

    def count_rejection(self, listener: str, reason: str) -> None:
        MESSAGES_REJECTED.labels(listener, reason).inc()
