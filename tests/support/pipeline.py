"""A fake upstream target and a pipeline builder, for unit tests of the message path.

    target = FakeTarget()
    pipeline = await build_test_pipeline(settings, target)   # the real wiring, this target
    tx = pipeline.open_transaction(...); await pipeline.add_recipient(tx, "u@example.net")
    reply = await pipeline.relay_message(tx, raw)
    [sent] = target.sent                                      # what the upstream would get

Fakes only at this seam (the `UpstreamTarget` contract of relay/deliver/base.py): a test of
what crosses the network uses the real upstream of `tests.support.upstream`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.config.schema import Settings
from relay.deliver.base import NO_DSN, DsnRequest, Envelope
from relay.errors import Reply, SmtpError
from relay.message import WireMessage
from relay.pipeline import Pipeline
from relay.wiring import build_dns, build_pipeline, load_secrets, new_secret_store


@dataclass
class SentMessage:
    envelope: Envelope
    recipients: list[str]
    content: bytes
    dsn: list[DsnRequest] = field(default_factory=list)  # per recipient, in order


@dataclass
class FakeTarget:
    """An `UpstreamTarget` that keeps what it is sent. `rcpt_replies` (address → Reply) and
    `data_reply` make it refuse; `fail_begin` makes `begin` raise (a broken path); `dsn`
    says whether it takes DSN requests on (`carries_dsn`)."""

    name: str = "fake"
    rcpt_replies: dict[str, Reply] = field(default_factory=dict)
    data_reply: Reply | None = None
    fail_begin: SmtpError | None = None
    dsn: bool = False
    sent: list[SentMessage] = field(default_factory=list)
    begun: int = 0
    aborted: int = 0

    async def begin(self, envelope: Envelope, recipient: str, dsn: DsnRequest | None = None) -> FakeTransaction:
        if self.fail_begin is not None:
            raise self.fail_begin
        self.begun += 1
        return FakeTransaction(self, envelope)

    async def probe(self) -> str:
        return "fake target ready"

    async def close(self) -> None:
        return None


class FakeTransaction:
    def __init__(self, target: FakeTarget, envelope: Envelope) -> None:
        self.upstream = target.name
        self._target = target
        self._envelope = envelope
        self._recipients: list[str] = []
        self._dsn: list[DsnRequest] = []
        self._done = False

    @property
    def carries_dsn(self) -> bool:
        return self._target.dsn

    async def add_recipient(self, address: str, dsn: DsnRequest = NO_DSN) -> Reply:
        reply = self._target.rcpt_replies.get(address, Reply(250, "2.1.5", "OK"))
        if reply.positive:
            self._recipients.append(address)
            self._dsn.append(dsn)
        return reply

    async def send(self, message: WireMessage) -> Reply:
        self._done = True
        if self._target.data_reply is not None:
            return self._target.data_reply
        self._target.sent.append(SentMessage(self._envelope, list(self._recipients), bytes(message), list(self._dsn)))
        return Reply(250, "2.0.0", f"Ok: queued as F{len(self._target.sent):06d}")

    async def abort(self) -> None:
        if not self._done:
            self._done = True
            self._target.aborted += 1


async def build_test_pipeline(settings: Settings, target: FakeTarget) -> Pipeline:
    """The pipeline `relay serve` would build for `settings`, delivering to `target`
    (secrets loaded from the settings' references; the posture monitor is not started)."""
    store = new_secret_store(settings)
    await load_secrets(store, settings)
    pipeline, _monitor = build_pipeline(settings, store, [target], build_dns(settings))
    return pipeline
