"""Several upstreams tried in order (e.g. a second smarthost when the first is down).

An upstream is skipped when it cannot be reached or answers 4xx before the message is
sent. When the chosen upstream answers the end of DATA with 4xx, the message is offered to
the next one, but only if that one accepts every recipient the client was already told
was accepted; otherwise the first 4xx stands, so no recipient is ever reported
differently from what happened to it. A 5xx is an answer and is never retried elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from relay.deliver.base import Envelope, UpstreamTarget, UpstreamTransaction
from relay.errors import Reply, SmtpError

log = logging.getLogger("relay.deliver")


class FailoverTransaction:
    def __init__(self, chain: FailoverTarget, index: int, inner: UpstreamTransaction, envelope: Envelope) -> None:
        self._chain = chain
        self._index = index
        self._inner = inner
        self._envelope = envelope
        self._accepted: list[str] = []

    @property
    def upstream(self) -> str:
        return self._inner.upstream

    async def add_recipient(self, address: str) -> Reply:
        reply = await self._inner.add_recipient(address)
        if reply.positive:
            self._accepted.append(address)
        return reply

    async def send(self, message: bytes) -> Reply:
        try:
            reply = await self._inner.send(message)
        except SmtpError as exc:
            if not exc.temporary:
                raise
            first: Reply | SmtpError = exc
        else:
            if not reply.temporary:
                return reply
            first = reply
        for index in range(self._index + 1, len(self._chain.deliveries)):
            retry = await self._replay(index)
            if retry is None:
                continue
            log.info("failing over", extra={"from": self._inner.upstream, "to": retry.upstream, "reason": str(first)})
            self._inner, self._index = retry, index
            try:
                reply = await retry.send(message)
            except SmtpError as exc:
                if not exc.temporary:
                    raise
                continue
            if not reply.temporary:
                return reply
        if isinstance(first, SmtpError):
            raise first
        return first

    async def _replay(self, index: int) -> UpstreamTransaction | None:
        """Open the transaction on upstream `index` with every accepted recipient."""
        delivery = self._chain.deliveries[index]
        try:
            tx = await delivery.begin(self._envelope, self._accepted[0])
        except SmtpError:
            return None
        for address in self._accepted:
            try:
                reply = await tx.add_recipient(address)
            except SmtpError:
                return None
            if not reply.positive:
                await tx.abort()
                return None
        return tx

    async def abort(self) -> None:
        await self._inner.abort()


class FailoverTarget:
    def __init__(self, deliveries: Sequence[UpstreamTarget]) -> None:
        self.deliveries = list(deliveries)
        self.name = "failover(" + ",".join(d.name for d in self.deliveries) + ")"

    async def begin(self, envelope: Envelope, recipient: str) -> FailoverTransaction:
        last: SmtpError | None = None
        for index, delivery in enumerate(self.deliveries):
            try:
                inner = await delivery.begin(envelope, recipient)
            except SmtpError as exc:
                if not exc.temporary:
                    raise
                last = exc
                log.info(
                    "upstream unavailable, trying the next", extra={"upstream": delivery.name, "reason": exc.reason}
                )
                continue
            return FailoverTransaction(self, index, inner, envelope)
        assert last is not None
        raise last

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
