"""The delivery contract: an upstream transaction that mirrors the client's.

The relay is a passthrough, not a queue: the client's RCPT answers are the upstream's RCPT
answers and the client's final DATA answer is the upstream's. So a delivery opens an
upstream transaction at the client's first accepted recipient and follows it command by
command (maddy's Start → AddRcpt → Body → Commit/Abort). An `UpstreamTarget` is where a
message can go (a smarthost, MX hosts, a failover chain, the dev outbox); it opens one
`UpstreamTransaction` per client transaction:

    tx = await target.begin(envelope, first_recipient, dsn)  # connect (or reuse), MAIL FROM
    reply = await tx.add_recipient(rcpt, dsn)                # upstream RCPT reply, per rcpt
    reply = await tx.send(signed_message)                    # DATA (a WireMessage); the final reply
    await tx.abort()                                         # client RSET/QUIT/disconnect

Rules every implementation keeps:
- `begin`, `add_recipient` and `send` raise `SmtpError` for failures of the path (connect,
  TLS, proxy, timeout, lost connection): always 4xx, with the hop in `reason`. The one
  exception is a path that can never carry the message: an upstream without SMTPUTF8 for a
  UTF-8 address (553 5.6.7, RFC 6531) or header (554 5.6.9, RFC 6532), or without 8BITMIME
  for declared 8-bit content (554 5.6.3, RFC 6152).
- An upstream's own refusal is returned (or raised from `begin`) as a `Reply`/`SmtpError`
  with the upstream's code, enhanced code and text.
- With `dsn` (the first recipient's DSN request), `begin` may send that recipient's RCPT
  with MAIL (RFC 2920 PIPELINING); the first `add_recipient` must then be that recipient
  with that request, and returns (or raises) its reply. Without it, `begin` sends MAIL only.
- `send` is called at most once. After it returns or raises, the transaction is over and
  the connection is back in its pool or closed; `abort` is then a no-op.
- `abort` never raises.
- A timeout or lost connection after the message was sent is reported as 4xx: the client
  retries, which may duplicate but never loses a message.
- The client's parameters travel with the transaction: the envelope's (BODY, SMTPUTF8, the
  DSN's RET and ENVID, AUTH=) and each recipient's DSN request (NOTIFY, ORCPT). A target
  passes on what its next hop offers, and says through `carries_dsn` whether the DSN
  requests went on with the message (RFC 3461 §5.2.1) or stop here (§5.2.2: the pipeline
  then sends the "relayed" notices itself, relay.deliver.dsn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from relay.errors import Reply
from relay.message import WireMessage


@dataclass(frozen=True, slots=True)
class Envelope:
    mail_from: str  # "" for the null reverse-path
    id: str = ""  # the relay's id of the transaction (logs; a spool entry is named after it)
    # Client MAIL parameters worth passing on (RFC 6152 BODY=8BITMIME, RFC 6531 SMTPUTF8).
    body_8bit: bool = False
    smtputf8: bool = False
    # The DSN request for the whole message (RFC 3461 §4.3 RET=FULL|HDRS, §4.4 ENVID as the
    # client sent it, in xtext), for a next hop that offers DSN.
    ret: str | None = None
    envid: str | None = None
    # RFC 4954 §5: who submitted the message, for AUTH= to an upstream the relay
    # authenticated to. None: the client sent no AUTH=; "": AUTH=<> (given so, or not trusted).
    auth: str | None = None
    # Who handed the message to the relay: the listener's name and the authenticated
    # username (None: no AUTH). The relay's own record (a spool entry, for `relay queue
    # show`); never sent upstream.
    listener: str = ""
    user: str | None = None

    def dsn_params(self) -> list[str]:
        return ([f"RET={self.ret}"] if self.ret else []) + ([f"ENVID={self.envid}"] if self.envid else [])


@dataclass(frozen=True, slots=True)
class DsnRequest:
    """One recipient's DSN request, as the client sent it (RFC 3461 §4.1 NOTIFY, §4.2 ORCPT)."""

    notify: str | None = None  # "NEVER", or SUCCESS, FAILURE, DELAY joined by commas (upper case)
    orcpt: str | None = None  # "addr-type;xtext"

    def notifies(self, event: str) -> bool:
        """Whether a notice of `event` (SUCCESS, FAILURE, DELAY) is wanted. Without NOTIFY,
        failures (and delays) are reported and successes not (§4.1)."""
        if self.notify is None:
            return event != "SUCCESS"
        return event in self.notify.split(",")

    def params(self) -> list[str]:
        return ([f"NOTIFY={self.notify}"] if self.notify else []) + ([f"ORCPT={self.orcpt}"] if self.orcpt else [])


NO_DSN = DsnRequest()


class UpstreamTransaction(Protocol):
    @property
    def upstream(self) -> str:
        """The bounded label of the upstream that holds the transaction (logs, metrics)."""
        ...

    @property
    def carries_dsn(self) -> bool:
        """True when the DSN requests go on with the message: the next hop offers DSN and
        got them (RFC 3461 §5.2.1), or the target keeps the message and reports itself."""
        ...

    async def add_recipient(self, address: str, dsn: DsnRequest = NO_DSN) -> Reply: ...

    async def send(self, message: WireMessage) -> Reply:
        """`message` is in pieces (relay.message.WireMessage): write them, never join them."""
        ...

    async def abort(self) -> None: ...


class UpstreamTarget(Protocol):
    """Where messages go; `begin` opens one upstream transaction (see the module docstring)."""

    name: str

    async def begin(self, envelope: Envelope, recipient: str, dsn: DsnRequest | None = None) -> UpstreamTransaction: ...

    async def probe(self) -> str:
        """Check the path (dial, greet, TLS, auth) without sending a message; raise
        SmtpError on failure. Returns the upstream's greeting and EHLO reply text (many
        providers echo the client's public address there: egress IP discovery)."""
        ...

    async def close(self) -> None: ...
