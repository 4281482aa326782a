"""Several upstreams tried in order (e.g. a second smarthost when the first is down).

A 4xx means "not now, here"; another upstream may take the message now. So the transaction
moves to the next upstream whenever the one holding it fails temporarily before the message
is accepted, provided nothing the client was told becomes untrue:

- at connect or MAIL FROM (`begin`): the next upstream is tried;
- at RCPT, while no recipient has been accepted (the first recipient, or every one so far
  refused): the transaction is aborted on this upstream (RSET or QUIT) and begun on the
  next one with this recipient;
- at RCPT for a later recipient: the next upstream takes the transaction only if it
  accepts every recipient already accepted and this one (the client was told 250 for
  those, and one DATA reply must be true for all of them); otherwise the transaction stays
  where it is and the client gets this upstream's 4xx for the new recipient, which it will
  retry in another transaction (RFC 5321 §4.5.3.1.10 style). A lost connection at a later
  RCPT is replayed the same way, or stays lost (the client retries the whole message);
- at the end of DATA: offered to the next upstream on the same condition (every accepted
  recipient accepted there), else the first 4xx stands.

A 5xx is an answer and is never retried elsewhere. When every upstream answers 4xx, the
client gets the last 4xx with its text. Each move is counted in
`relay_upstream_failovers_total` and named in the message's log line (`failovers`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import Counter

from relay.deliver.base import NO_DSN, DsnRequest, Envelope, UpstreamTarget, UpstreamTransaction
from relay.errors import Reply, SmtpError
from relay.message import WireMessage

log = logging.getLogger("relay.deliver")

UPSTREAM_FAILOVERS = Counter(
    "relay_upstream_failovers_total",
    "Transactions moved from one upstream to the next after a temporary failure, by the "
    "stage and reason of the failure.",
    ["from_upstream", "to_upstream", "stage", "reason"],
)


@dataclass(frozen=True, slots=True)
class Skipped:
    """An upstream a transaction left, and why (for the log line and the metric)."""

    upstream: str
    stage: str  # connect (connect, TLS, AUTH or MAIL FROM), rcpt, data
    reason: str  # the failure's label: upstream_temporary for a 4xx reply, else the path's
    detail: str  # the 4xx reply or the failure's log reason

    def __str__(self) -> str:
        return f"{self.upstream} at {self.stage}: {self.detail}"


Outcome = Reply | SmtpError


def _as_error(reply: Reply, upstream: str) -> SmtpError:
    return SmtpError(
        reply.code,
        reply.enhanced,
        reply.text,
        reason=f"upstream {upstream} refused a recipient: {reply}",
        label="upstream_temporary" if reply.temporary else "upstream_permanent",
    )


def _skipped(upstream: str, stage: str, outcome: Outcome) -> Skipped:
    if isinstance(outcome, SmtpError):
        return Skipped(upstream, stage, outcome.label, outcome.reason)
    return Skipped(upstream, stage, "upstream_temporary", str(outcome))


class FailoverTransaction:
    def __init__(
        self, chain: FailoverTarget, index: int, inner: UpstreamTransaction, envelope: Envelope, skipped: list[Skipped]
    ) -> None:
        self._chain = chain
        self._index = index
        self._inner = inner
        self._envelope = envelope
        self._accepted: list[tuple[str, DsnRequest]] = []
        self.skipped = skipped  # upstreams left behind, in order

    @property
    def upstream(self) -> str:
        return self._inner.upstream

    @property
    def carries_dsn(self) -> bool:
        return self._inner.carries_dsn

    async def add_recipient(self, address: str, dsn: DsnRequest = NO_DSN) -> Reply:
        outcome: Outcome
        try:
            outcome = await self._inner.add_recipient(address, dsn)
        except SmtpError as exc:
            if not exc.temporary:
                raise
            outcome = exc  # this upstream's transaction is gone
        if not outcome.temporary:
            assert isinstance(outcome, Reply)
            if outcome.positive:
                self._accepted.append((address, dsn))
            return outcome
        first_recipient = not self._accepted
        answer: Outcome = outcome
        for index in range(self._index + 1, len(self._chain.deliveries)):
            replay = await self._replay(index, [*self._accepted, (address, dsn)])
            if isinstance(replay, tuple):
                tx, reply = replay
                self._switch(index, tx, "rcpt", outcome)
                self._accepted.append((address, dsn))
                return reply
            if first_recipient:
                if not replay.temporary:
                    answer = replay  # a 5xx is an answer: final
                    break
                answer = replay  # all 4xx so far: the client gets the last one's
        # Nobody else takes it. For a later recipient the transaction stays here with this
        # upstream's answer for the new one; for the first, the answer is the last one.
        if isinstance(outcome, Reply):
            # This upstream's transaction is still open: it stays, and the client gets a reply.
            return answer if isinstance(answer, Reply) else answer.reply
        raise answer if isinstance(answer, SmtpError) else _as_error(answer, self._inner.upstream)

    def _switch(self, index: int, tx: UpstreamTransaction, stage: str, failure: Outcome) -> None:
        left = _skipped(self._inner.upstream, stage, failure)
        self.skipped.append(left)
        UPSTREAM_FAILOVERS.labels(left.upstream, tx.upstream, stage, left.reason).inc()
        log.info("failing over", extra={"from": left.upstream, "to": tx.upstream, "reason": str(left)})
        previous = self._inner
        self._inner, self._index = tx, index
        self._chain.abort_later(previous)

    async def send(self, message: WireMessage) -> Reply:
        try:
            reply = await self._inner.send(message)
        except SmtpError as exc:
            if not exc.temporary:
                raise
            first: Outcome = exc
        else:
            if not reply.temporary:
                return reply
            first = reply
        failure = first
        for index in range(self._index + 1, len(self._chain.deliveries)):
            replay = await self._replay(index, self._accepted)
            if not isinstance(replay, tuple):
                continue
            retry, _ = replay
            self._switch(index, retry, "data", failure)
            try:
                reply = await retry.send(message)
            except SmtpError as exc:
                if not exc.temporary:
                    raise
                failure = exc
                continue
            if not reply.temporary:
                return reply
            failure = reply
        if isinstance(first, SmtpError):
            raise first
        return first

    async def _replay(
        self, index: int, recipients: list[tuple[str, DsnRequest]]
    ) -> tuple[UpstreamTransaction, Reply] | SmtpError:
        """Open the transaction on upstream `index` with `recipients`; the transaction and
        its reply for the last recipient, or why it cannot take them all (as an SmtpError,
        label `upstream_temporary`/`upstream_permanent` for a refusal)."""
        delivery = self._chain.deliveries[index]
        try:
            tx = await delivery.begin(self._envelope, *recipients[0])
        except SmtpError as exc:
            return exc
        reply = Reply(250, "2.1.5", "OK")
        for address, dsn in recipients:
            try:
                reply = await tx.add_recipient(address, dsn)
            except SmtpError as exc:
                return exc
            if not reply.positive:
                await tx.abort()
                return _as_error(reply, tx.upstream)
        return tx, reply

    async def abort(self) -> None:
        await self._inner.abort()


class FailoverTarget:
    def __init__(self, deliveries: Sequence[UpstreamTarget]) -> None:
        self.deliveries = list(deliveries)
        self.name = "failover(" + ",".join(d.name for d in self.deliveries) + ")"
        self._aborting: set[asyncio.Task[None]] = set()

    async def begin(self, envelope: Envelope, recipient: str, dsn: DsnRequest | None = None) -> FailoverTransaction:
        failed: list[tuple[str, SmtpError]] = []
        for index, delivery in enumerate(self.deliveries):
            try:
                inner = await delivery.begin(envelope, recipient, dsn)
            except SmtpError as exc:
                if not exc.temporary:
                    raise
                failed.append((delivery.name, exc))
                log.info(
                    "upstream unavailable, trying the next", extra={"upstream": delivery.name, "reason": exc.reason}
                )
                continue
            skipped = [_skipped(name, "connect", exc) for name, exc in failed]
            for left in skipped:
                UPSTREAM_FAILOVERS.labels(left.upstream, delivery.name, "connect", left.reason).inc()
            return FailoverTransaction(self, index, inner, envelope, skipped)
        raise failed[-1][1]

    def abort_later(self, tx: UpstreamTransaction) -> None:
        """Abort a transaction left behind (RSET, or QUIT if it broke) without making the
        client wait for it."""
        task = asyncio.get_running_loop().create_task(tx.abort())
        self._aborting.add(task)
        task.add_done_callback(self._aborting.discard)

    async def probe(self) -> str:
        last: SmtpError | None = None
        for delivery in self.deliveries:
            try:
                return await delivery.probe()
            except SmtpError as exc:
                last = exc
        assert last is not None
        raise last

    async def close(self) -> None:
        for delivery in self.deliveries:
            await delivery.close()
