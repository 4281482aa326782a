"""What the message path reports: its metrics, and one log line per transaction.

Every transaction ends in exactly one `relay.message` log line ("relayed" or "refused"),
whichever stage ended it: MAIL, RCPT (when no recipient was accepted), DATA, or the
listener itself (too big, bare line endings). The line never carries message content,
addresses beyond their domains, or a secret.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Iterable, Mapping
from typing import Protocol

from prometheus_client import Counter, Histogram

from relay.deliver.base import UpstreamTransaction
from relay.errors import Reply, SmtpError

message_log = logging.getLogger("relay.message")
log = logging.getLogger("relay.session")

MESSAGES_RECEIVED = Counter("relay_messages_received_total", "Messages whose DATA was fully received.", ["listener"])
MESSAGES_RELAYED = Counter(
    "relay_messages_relayed_total",
    "Messages accepted by an upstream (the client got 250).",
    ["listener", "upstream"],
)
MESSAGES_REJECTED = Counter(
    "relay_messages_rejected_total",
    "Transactions refused (at MAIL, RCPT or DATA), by listener and reason.",
    ["listener", "reason"],
)
MESSAGE_SIZE = Histogram(
    "relay_message_size_bytes",
    "Size of received messages.",
    ["listener"],
    buckets=(1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 52428800),
)
RELAY_DURATION = Histogram(
    "relay_message_relay_duration_seconds",
    "From the end of the client's DATA to the final reply: signing plus the upstream's answer.",
    ["listener"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
DKIM_SIGNATURES = Counter("relay_dkim_signatures_total", "DKIM signatures added.", ["domain", "selector", "algorithm"])
DKIM_SIGN_DURATION = Histogram(
    "relay_dkim_sign_duration_seconds",
    "Time to sign one message with all of its keys.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
)

DSN_RELAYED_NOTICES = Counter(
    "relay_dsn_relayed_notices_total",
    'The "relayed" notices (RFC 3461 §5.2.2) the relay sent itself, by result (sent, failed).',
    ["result"],
)

# The label children, looked up once per label values (see relay.observe.sessions).
_received = functools.lru_cache(maxsize=256)(MESSAGES_RECEIVED.labels)
_sizes = functools.lru_cache(maxsize=256)(MESSAGE_SIZE.labels)
_relayed = functools.lru_cache(maxsize=1024)(MESSAGES_RELAYED.labels)
_rejected = functools.lru_cache(maxsize=1024)(MESSAGES_REJECTED.labels)
_durations = functools.lru_cache(maxsize=256)(RELAY_DURATION.labels)
_signatures = functools.lru_cache(maxsize=1024)(DKIM_SIGNATURES.labels)

_QUEUE_ID = re.compile(r"(?:queued as|id=|\bid\s)\s*<?([A-Za-z0-9._@+-]{4,})", re.IGNORECASE)


class TransactionFacts(Protocol):
    """What the log line reads from a transaction (`relay.pipeline.Transaction`)."""

    @property
    def id(self) -> str: ...
    @property
    def listener(self) -> str: ...
    @property
    def client(self) -> str: ...
    @property
    def user(self) -> str | None: ...
    @property
    def mail_from_domain(self) -> str: ...
    @property
    def from_domain(self) -> str | None: ...
    @property
    def recipients(self) -> list[str]: ...
    @property
    def size(self) -> int: ...
    @property
    def dkim(self) -> list[str]: ...
    @property
    def upstream(self) -> UpstreamTransaction | None: ...
    @property
    def upstream_reply(self) -> Reply | None: ...
    @property
    def queued(self) -> bool: ...
    @property
    def started(self) -> float: ...
    @property
    def limit(self) -> str | None: ...


def export_listeners(listeners: Iterable[str]) -> None:
    """Each configured listener's received messages at 0 from the start: a series born at 1
    hides its first step from rate() and increase()."""
    for listener in listeners:
        MESSAGES_RECEIVED.labels(listener)


def count_rejection(listener: str, reason: str) -> None:
    _rejected(listener, reason).inc()


def transaction_ended(tx: TransactionFacts, reply: Reply, error: SmtpError | None) -> None:
    """The one log line of a transaction that reached RCPT or DATA (and its rejection count)."""
    if error is not None:
        count_rejection(tx.listener, error.label)
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
        # Upstreams a failover chain left before this one took the transaction, and why
        # (relay.deliver.failover.Skipped); absent for a single upstream.
        "failovers": [str(s) for s in getattr(tx.upstream, "skipped", ())] or None,
        "upstream_reply": str(upstream_reply) if upstream_reply else None,
        "upstream_id": upstream_id(upstream_reply.text) if upstream_reply and upstream_reply.positive else None,
        # Spool mode: the 250 meant "on disk"; the delivery attempts have lines of their own
        # (logger relay.queue, "delivery attempt", same id).
        "queued": tx.queued,
        "code": reply.code,
        "enhanced": reply.enhanced,
        "duration_ms": round((time.monotonic() - tx.started) * 1000, 1),
    }
    if error is not None:
        fields["reason"] = error.reason
    if tx.limit is not None:
        fields["limit"] = tx.limit  # the sending limit that refused it: scope:name:kind
    _message_line("relayed" if error is None else "refused", fields)


def _message_line(msg: str, fields: Mapping[str, object]) -> None:
    """`message_log.info(msg, extra=fields)` without the search for the caller's source
    line (Logger.findCaller walks the stack on every line): no formatter of relay's prints
    it, and this line is written once per message."""
    if message_log.isEnabledFor(logging.INFO):
        message_log.handle(
            message_log.makeRecord(message_log.name, logging.INFO, __file__, 0, msg, (), None, extra=fields)
        )


def transaction_cancelled(tx: TransactionFacts, why: str) -> None:
    """The one log line of a transaction that ended without DATA (RSET, QUIT, a new EHLO,
    a disconnect, a time limit) after at least one recipient: nothing was sent."""
    message_log.info(
        "cancelled",
        extra={
            "event": "message",
            "id": tx.id,
            "listener": tx.listener,
            "client": tx.client,
            "user": tx.user,
            "mail_from_domain": tx.mail_from_domain or None,
            "recipients": len(tx.recipients),
            "upstream": tx.upstream.upstream if tx.upstream is not None else None,
            "code": None,
            "enhanced": None,
            "reason": why,
            "duration_ms": round((time.monotonic() - tx.started) * 1000, 1),
        },
    )


def mail_refused(listener: str, client: str, user: str | None, mail_from: str, error: SmtpError) -> None:
    """The one log line of a transaction refused at MAIL (no transaction id was given)."""
    count_rejection(listener, error.label)
    message_log.info(
        "refused",
        extra={
            "event": "message",
            "id": None,
            "listener": listener,
            "client": client,
            "user": user,
            "mail_from_domain": mail_from.rpartition("@")[2].lower() or None,
            "code": error.code,
            "enhanced": error.reply.enhanced,
            "reason": error.reason,
        },
    )


def recipient_refused(tx_id: str, error: SmtpError) -> None:
    """A refused recipient is not the transaction's end; it gets a line of its own (not the
    message line), except 452 too-many-recipients, which clients answer by design."""
    if error.label != "too_many_recipients":
        log.info(
            "recipient not accepted",
            extra={"id": tx_id, "reason": error.reason, "code": error.code, "label": error.label},
        )


def upstream_id(reply_text: str) -> str | None:
    """The id an upstream gave the message in its 250 text (Postfix `queued as X`, SES
    `Ok <id>`, …), so a message can be followed into the provider's logs."""
    match = _QUEUE_ID.search(reply_text)
    if match:
        return match.group(1)
    words = reply_text.split()
    if len(words) >= 2 and words[0].lower() == "ok" and len(words[1]) >= 8:
        return words[1].strip("<>")
    return None


def message_received(listener: str, size: int) -> None:
    _received(listener).inc()
    _sizes(listener).observe(size)


def message_relayed(listener: str, upstream: str) -> None:
    _relayed(listener, upstream).inc()


def relay_duration(listener: str, seconds: float) -> None:
    _durations(listener).observe(seconds)


def signature_added(domain: str, selector: str, algorithm: str) -> None:
    _signatures(domain, selector, algorithm).inc()


def relayed_notice(tx_id: str, reply: Reply | None, failure: str | None) -> None:
    """The outcome of a "relayed" notice for transaction `tx_id` (relay.deliver.dsn): its own
    line, beside the transaction's, since it is sent after the client's 250."""
    DSN_RELAYED_NOTICES.labels("failed" if failure else "sent").inc()
    fields = {"event": "dsn_relayed", "id": tx_id, "code": reply.code if reply else None}
    if failure:
        log.warning("relayed notice not sent", extra={**fields, "reason": failure})
    else:
        log.info("relayed notice sent", extra=fields)
