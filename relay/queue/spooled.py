"""Spool mode seen from the pipeline: an upstream target whose transaction ends on disk.

In passthrough the client's transaction mirrors an upstream one. In spool mode no upstream
transaction exists while the client is connected, so this target stands in for it, with
the same contract (relay.deliver.base):

    begin(envelope, first)  → a SpoolTransaction (nothing is opened)
    add_recipient(rcpt)     → 250 once the recipient has a route (the local checks: sender
                              policy, limits and recipient count were made by the pipeline)
    send(signed_message)    → the entry written and synced (relay.queue.store.Spool.put),
                              250 "queued as ID"; the delivery loop takes it from there
    abort()                 → nothing to undo

So the pipeline signs and "delivers" exactly as in passthrough, and the client's 250 to
DATA comes only after the sync that makes the signed message durable. A full spool or disk
is a 452 4.3.1 from `send` (RFC 3463 §3.4: mail system full), and nothing queued is touched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from relay.deliver.base import NO_DSN, DsnRequest, Envelope, UpstreamTarget
from relay.errors import Reply, SmtpError
from relay.message import WireMessage
from relay.queue.entry import QueueEntry, RecipientState
from relay.queue.runner import QueueRunner, queue_id
from relay.queue.store import Spool, valid_id

UPSTREAM_LABEL = "spool"


class Routes(Protocol):
    def target_for(self, mail_from: str) -> UpstreamTarget: ...


class SpoolTransaction:
    upstream = UPSTREAM_LABEL

    def __init__(self, target: SpoolTarget, envelope: Envelope) -> None:
        self._target = target
        self._envelope = envelope
        self._recipients: list[RecipientState] = []
        self.queued_id: str | None = None

    @property
    def carries_dsn(self) -> bool:
        # The spool keeps the DSN requests with the message; the delivery loop passes them
        # on or reports itself (relay.queue.runner).
        return True

    async def add_recipient(self, address: str, dsn: DsnRequest = NO_DSN) -> Reply:
        # The route that will carry the message must exist now: a recipient that no
        # upstream could take is refused here, while the client can still be told.
        self._target.routes().target_for(self._envelope.mail_from)
        self._recipients.append(RecipientState(address, notify=dsn.notify, orcpt=dsn.orcpt))
        return Reply(250, "2.1.5", "OK")

    async def send(self, message: WireMessage) -> Reply:
        if not self._recipients:
            raise SmtpError(
                503, "5.5.1", "No valid recipients", reason="DATA without accepted recipients", label="no_recipients"
            )
        envelope = self._envelope
        entry = QueueEntry(
            # Named after the transaction: one id in the client's reply, the log lines and
            # `relay queue show`.
            id=envelope.id if valid_id(envelope.id) else queue_id(),
            mail_from=envelope.mail_from,
            recipients=self._recipients,
            created=time.time(),
            body_8bit=envelope.body_8bit,
            smtputf8=envelope.smtputf8,
            # RFC 3461 §4.3, §4.4 (NOTIFY and ORCPT are on each RecipientState).
            ret=envelope.ret,
            envid=envelope.envid,
            # RFC 4954 §5: the AUTH= value the pipeline vouches for, for the upstream.
            extra={} if envelope.auth is None else {"auth": envelope.auth},
            # Who sent it, for an operator looking at a stuck message (`relay queue show`).
            listener=envelope.listener,
            user=envelope.user,
        )
        content = bytes(message)  # the spool writes and keeps the message whole
        held = await self._target.spool.put(entry, content)  # SmtpError 452/451 on failure
        self.queued_id = entry.id
        self._target.runner.submit(held, entry, content)
        return Reply(250, "2.0.0", f"Ok: queued as {entry.id}")

    async def abort(self) -> None:
        return None


class SpoolTarget:
    """The pipeline's delivery in spool mode. `routes` gives the current router of the real
    deliveries (it changes on reload); the runner delivers through it later."""

    name = UPSTREAM_LABEL

    def __init__(self, spool: Spool, runner: QueueRunner, routes: Callable[[], Routes]) -> None:
        self.spool = spool
        self.runner = runner
        self.routes = routes

    async def begin(self, envelope: Envelope, recipient: str, dsn: DsnRequest | None = None) -> SpoolTransaction:
        problem = self.spool.problem()
        if problem is not None:
            # Refuse at the first RCPT already: the client can try another relay now rather
            # than after sending the whole message.
            raise SmtpError(
                452, "4.3.1", "Insufficient system storage, try again later", reason=problem, label="spool_full"
            )
        return SpoolTransaction(self, envelope)

    async def probe(self) -> str:
        problem = self.spool.unwritable()
        if problem is not None:
            raise SmtpError(451, "4.3.0", "Spool not writable", reason=problem, label="spool_error")
        return ""

    async def close(self) -> None:
        return None

    def describe(self) -> str:
        return f"spool {self.spool.root}"
