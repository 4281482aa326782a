"""The pipeline as a unit: the real wiring for a config, a fake upstream target at the
`UpstreamTarget` seam (tests/support/pipeline.py)."""

from __future__ import annotations

import asyncio

import pytest

from relay.config.load import settings_from_mapping
from relay.deliver.base import Envelope
from relay.errors import SmtpError
from relay.pipeline import Pipeline, Transaction
from tests.support.config import APP_PASSWORD, relay_config
from tests.support.dkim import verify_all
from tests.support.pipeline import FakeTarget, build_test_pipeline
from tests.support.smtp import message


@pytest.fixture
def settings(tmp_path, pki, dkim_keys, app_password_hash):
    return settings_from_mapping(relay_config(tmp_path, pki, dkim_keys, 25, app_password_hash))


async def open_tx(pipeline: Pipeline, mail_from: str = "app@example.com") -> Transaction:
    user = await pipeline.authenticate("app", APP_PASSWORD.encode())
    assert user is not None
    return pipeline.open_transaction(
        listener="submission",
        client="127.0.0.1",
        user="app",
        senders=user.senders,
        envelope=Envelope(mail_from=mail_from, body_8bit=True),
        helo="client.test",
        tls="TLSv1.3",
    )


async def test_the_target_gets_the_signed_message(settings, dkim_keys):
    target = FakeTarget()
    pipeline = await build_test_pipeline(settings, target)
    tx = await open_tx(pipeline)
    assert (await pipeline.add_recipient(tx, "user@example.net")).code == 250
    reply = await pipeline.relay_message(tx, message())
    assert (reply.code, reply.enhanced) == (250, "2.0.0")
    [sent] = target.sent
    assert sent.envelope.mail_from == "app@example.com" and sent.envelope.body_8bit
    assert sent.recipients == ["user@example.net"]
    assert verify_all(sent.content, dkim_keys.dns()) == [True, True]
    assert tx.dkim == ["example.com/s1", "example.com/ed1"] and tx.from_domain == "example.com"


async def test_a_from_outside_the_senders_never_reaches_the_target(settings):
    target = FakeTarget()
    pipeline = await build_test_pipeline(settings, target)
    tx = await open_tx(pipeline)
    await pipeline.add_recipient(tx, "user@example.net")
    with pytest.raises(SmtpError) as err:
        await pipeline.relay_message(tx, message(frm="ceo@other.example"))
    assert (err.value.code, err.value.label) == (550, "from_denied")
    assert target.sent == [] and target.aborted == 1


async def test_a_broken_path_at_rcpt_is_remembered_as_the_outcome(settings):
    target = FakeTarget(fail_begin=SmtpError(451, "4.4.1", "Upstream not reachable", label="upstream_unreachable"))
    pipeline = await build_test_pipeline(settings, target)
    tx = await open_tx(pipeline)
    with pytest.raises(SmtpError):
        await pipeline.add_recipient(tx, "user@example.net")
    assert tx.rcpt_refusal is not None and tx.rcpt_refusal.label == "upstream_unreachable"
    assert tx.recipients == []


async def test_abandon_aborts_the_upstream_transaction(settings):
    target = FakeTarget()
    pipeline = await build_test_pipeline(settings, target)
    tx = await open_tx(pipeline)
    await pipeline.add_recipient(tx, "user@example.net")
    pipeline.abandon(tx)
    await asyncio.sleep(0)  # the abort runs as a task of its own
    assert target.aborted == 1 and target.sent == []
