"""The delivery contract: an upstream transaction that mirrors the client's.

The relay is a passthrough, not a queue: the client's RCPT answers are the upstream's RCPT
answers and the client's final DATA answer is the upstream's. So a delivery opens an
upstream transaction at the client's first accepted recipient and follows it command by
command (maddy's Start → AddRcpt → Body → Commit/Abort). An `UpstreamTarget` is where a
message can go (a smarthost, MX hosts, a failover chain, the dev outbox); it opens one
`UpstreamTransaction` per client transaction:

    tx = await target.begin(envelope, first_recipient)     # connect (or reuse), MAIL FROM
    reply = await tx.add_recipient(rcpt)                     # upstream RCPT reply, per rcpt
    reply = await tx.send(signed_message)                    # DATA (a WireMessage); the final reply
    await tx.abort()                                         # client RSET/QUIT/disconnect

Rules every implementation keeps:
- `begin`, `add_recipient` and `send` raise `SmtpError` for failures of the path (connect,
  TLS, proxy, timeout, lost connection): always 4xx, with the hop in `reason`.
- An upstream's own refusal is returned (or raised from `begin`) as a `Reply`/`SmtpError`
  with the upstream's code, enhanced code and text.
- `send` is called at most once. After it returns or raises, the transaction is over and
  the connection is back in its pool or closed; `abort` is then a no-op.
- `abort` never raises.
- A timeout or lost connection after the message was sent is reported as 4xx: the client
  retries, which may duplicate but never loses a message.
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


class UpstreamTransaction(Protocol):
    @property
    def upstream(self) -> str:
        """The bounded label of the upstream that holds the transaction (logs, metrics)."""
        ...

    async def add_recipient(self, address: str) -> Reply: ...

    async def send(self, message: WireMessage) -> Reply:
        """`message` is in pieces (relay.message.WireMessage): write them, never join them."""
        ...

    async def abort(self) -> None: ...


class UpstreamTarget(Protocol):
    """Where messages go; `begin` opens one upstream transaction (see the module docstring)."""

    name: str

    async def begin(self, envelope: Envelope, recipient: str) -> UpstreamTransaction: ...

    async def probe(self) -> str:
        """Check the path (dial, greet, TLS, auth) without sending a message; raise
        SmtpError on failure. Returns the upstream's greeting and EHLO reply text (many
        providers echo the client's public address there: egress IP discovery)."""
        ...

    async def close(self) -> None: ...
