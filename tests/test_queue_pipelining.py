"""The spool's delivery loop to an upstream that offers PIPELINING (RFC 2920): MAIL and the
first RCPT go in one write, and every outcome is the one a command at a time gives: per
recipient (delivered, deferred, failed) and the failure report, MAIL refused with 4xx and
5xx, the first RCPT refused, the connection lost between the two replies, the DSN requests,
pacing by `max_rate`, a From domain's limits counted once, and a restart in the middle of a
delivery.

In-process, as tests/test_queue_delivery.py: the runner in the test's event loop, aiosmtpd
(offering PIPELINING) in its own thread, or a scripted upstream where the point is exactly
when the connection goes.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from relay.queue import admin
from relay.queue.entry import DELIVERED, FAILED, PENDING, QueueEntry, RecipientState
from relay.queue.runner import queue_id
from tests.support.inloop import in_thread
from tests.support.upstream import Upstream
from tests.test_queue_delivery import MESSAGE, Harness, eventually, state_of
from tests.test_upstream_pipelining import Script, ScriptedUpstream


@pytest.fixture
def upstream():
    with Upstream(pipelining=True) as up:
        yield up


@pytest.fixture
async def harness(tmp_path, upstream):
    """Makes harnesses on one spool directory (a restart is a second one), closes them all."""
    made: list[Harness] = []

    def make(**kwargs) -> Harness:
        made.append(Harness(tmp_path / "spool", upstream, **kwargs))
        return made[-1]

    yield make
    for h in made:
        await h.close()


def pipelined(upstream: Upstream) -> list[bool]:
    """For each MAIL with a sender: whether its first RCPT came with it. (The null
    reverse-path of a failure report goes one command at a time: `can_pipeline`.)"""
    return [ahead for address, ahead in upstream.mails if address != "<>"]


async def test_spool_deliveries_send_mail_and_the_first_rcpt_together(harness, upstream):
    """Before, the delivery loop called begin() without the first recipient's DSN request,
    so it waited for MAIL's reply before sending the first RCPT."""
    h = harness()
    h.runner.start()
    ids = [await h.put([f"r{i}@example.net", f"s{i}@example.net"]) for i in range(3)]
    await eventually(lambda: len(upstream.messages) == 3, what="3 deliveries")
    await eventually(lambda: all(state_of(h.spool, i) is None for i in ids), what="empty spool")
    assert sorted(m.rcpt_tos for m in upstream.messages) == [
        [f"r{i}@example.net", f"s{i}@example.net"] for i in range(3)
    ]
    assert pipelined(upstream) == [True, True, True]


@pytest.mark.parametrize(
    "order",
    [
        pytest.param(("later@example.net", "ok@example.net", "never@example.net"), id="first-rcpt-deferred"),
        pytest.param(("never@example.net", "ok@example.net", "later@example.net"), id="first-rcpt-refused"),
    ],
)
async def test_per_recipient_outcomes_and_the_failure_report(harness, upstream, order):
    """The first recipient's RCPT goes with MAIL: deferred (451) or refused for good (550)
    there, it is that recipient's outcome alone, as one command at a time."""
    upstream.behaviour.rcpt_replies = {
        "later@example.net": "451 4.2.0 mailbox busy",
        "never@example.net": "550 5.1.1 no such user",
    }
    h = harness(steps=(0.3,))
    entry_id = await h.put(list(order), envid="E-1")
    h.runner.start()

    def outcomes() -> dict[str, RecipientState]:
        return {r.address: r for r in state_of(h.spool, entry_id).recipients}

    await eventually(lambda: outcomes()["ok@example.net"].status == DELIVERED, what="first delivery")
    assert [m.rcpt_tos for m in upstream.messages] == [["ok@example.net"]]
    by_address = outcomes()
    assert {a: r.status for a, r in by_address.items()} == {
        "ok@example.net": DELIVERED,
        "later@example.net": PENDING,
        "never@example.net": FAILED,
    }
    assert by_address["later@example.net"].last_reply.startswith("451 4.2.0 mailbox busy")
    assert by_address["never@example.net"].last_reply == "550 5.1.1 no such user"
    assert by_address["never@example.net"].attempts == 1

    del upstream.behaviour.rcpt_replies["later@example.net"]
    # The retry delivers `later` alone (its RCPT with MAIL); the entry is then final with one
    # failure: a dead letter, and a report to the sender.
    await eventually(lambda: len(upstream.messages) == 3, what="retry and report")
    retried, report = upstream.messages[1], upstream.messages[2]
    assert retried.rcpt_tos == ["later@example.net"]
    assert report.mail_from in ("", "<>") and report.rcpt_tos == ["app@example.com"]
    assert b"Final-Recipient: rfc822; never@example.net" in report.content
    assert b"Original-Envelope-Id: E-1" in report.content
    dead = state_of(h.spool, entry_id)
    assert dead.done and [r.address for r in dead.failed] == ["never@example.net"] and dead.dsn == "queued"
    assert pipelined(upstream) and all(pipelined(upstream))


@pytest.mark.parametrize(
    "refusal,status",
    [("451 4.3.0 sender busy, try later", PENDING), ("550 5.7.1 sender blocked", FAILED)],
    ids=["4xx", "5xx"],
)
async def test_a_refused_mail_is_every_recipients_outcome(harness, upstream, refusal, status):
    """MAIL's refusal (its RCPT was sent with it and is answered 503 by the upstream, read
    and ignored) is the outcome of every recipient: deferred or failed, one attempt each."""
    upstream.behaviour.mail_reply = refusal
    h = harness(steps=(60.0,), bounce="drop")
    entry_id = await h.put(["a@example.net", "b@example.net"])
    h.runner.start()
    await eventually(lambda: (e := state_of(h.spool, entry_id)) is not None and e.recipients[0].attempts, what="try")
    entry = state_of(h.spool, entry_id)
    assert [(r.status, r.attempts, r.last_reply) for r in entry.recipients] == [(status, 1, refusal)] * 2
    assert upstream.messages == [] and pipelined(upstream) == [True]
    if status == PENDING:
        upstream.behaviour.mail_reply = None
        assert await asyncio.to_thread(admin.retry, h.spool, entry_id) == 2  # `relay queue retry`
        await eventually(lambda: state_of(h.spool, entry_id) is None, what="delivery on retry")
        assert [m.rcpt_tos for m in upstream.messages] == [["a@example.net", "b@example.net"]]
    else:
        assert entry.done and entry.dsn == "none"


@pytest.mark.parametrize(
    "together,stage",
    [(False, "RCPT"), (True, "MAIL")],
    ids=["between-the-replies", "before-either-reply"],
)
async def test_a_connection_lost_during_the_pipelined_exchange_defers_every_recipient(
    tmp_path, caplog, together, stage
):
    """MAIL accepted, then the connection goes before the first RCPT's reply: as one command
    at a time, the transaction began and its RCPT failed, so every recipient is deferred
    (451 4.4.2) and the next attempt, on a new connection, delivers. Lost before MAIL's
    reply: the same, failed at MAIL."""
    caplog.set_level(logging.INFO, logger="relay.queue")
    async with ScriptedUpstream(Script(together=together, drop_at_rcpt=(1, 1))) as up:
        h = Harness(tmp_path / "spool", up, steps=(0.2,))
        try:
            entry_id = await h.put(["a@example.net", "b@example.net"])
            h.runner.start()
            await eventually(lambda: state_of(h.spool, entry_id) is None, what="delivery on the second attempt")
        finally:
            await h.close()
    attempts = [r for r in caplog.records if r.getMessage() == "delivery attempt"]
    assert [(r.result, r.recipients) for r in attempts] == [("deferred", 2), ("delivered", 2)]
    assert attempts[0].reply == 451 and f"during {stage}" in attempts[0].reason
    first, second = up.sessions
    assert first.sent_ahead_of_mail_reply == [True] and second.sent_ahead_of_mail_reply == [True]
    assert [line[:4] for line in second.lines if line[:4] in (b"MAIL", b"RCPT", b"DATA")] == [
        b"MAIL",
        b"RCPT",
        b"RCPT",
        b"DATA",
    ]


async def test_the_dsn_requests_go_with_the_pipelined_rcpt(tmp_path):
    """The first recipient's NOTIFY and ORCPT go with MAIL, and the first add_recipient
    names the same request: a different one would be refused (451, `internal`)."""
    with Upstream(pipelining=True, dsn=True) as up:
        h = Harness(tmp_path / "spool", up)
        try:
            now = time.time()
            entry = QueueEntry(
                id=queue_id(),
                mail_from="app@example.com",
                recipients=[
                    RecipientState("a@example.net", notify="SUCCESS,FAILURE", orcpt="rfc822;a@example.net"),
                    RecipientState("b@example.net", notify="NEVER"),
                ],
                created=now,
                ret="HDRS",
                envid="E-2",
            )
            h.runner.submit(await h.spool.put(entry, MESSAGE), entry, MESSAGE)
            h.runner.start()
            [got] = await asyncio.to_thread(up.wait_for, 1)
            await eventually(lambda: state_of(h.spool, entry.id) is None, what="the entry done")
        finally:
            await h.close()
    assert got.rcpt_tos == ["a@example.net", "b@example.net"]
    assert got.rcpt_options == {
        "a@example.net": ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;a@example.net"],
        "b@example.net": ["NOTIFY=NEVER"],
    }
    assert "RET=HDRS" in got.mail_options and "ENVID=E-2" in got.mail_options
    assert up.mails == [("app@example.com", True)]


async def test_pacing_takes_one_token_per_recipient(harness, upstream):
    """`max_rate` counts recipients: the first one's token is taken before begin() (which
    sends its RCPT with MAIL), the others' before each RCPT, none twice."""
    h = harness(max_rate=100.0)
    bucket = h.delivery.bucket
    taken = []
    real_take = bucket.take

    async def take(count: float = 1.0) -> None:
        taken.append(count)
        await real_take(count)

    bucket.take = take
    h.runner.start()
    for i in range(4):
        await h.put([f"p{i}@example.net", f"q{i}@example.net", f"r{i}@example.net"])
    await eventually(lambda: len(upstream.messages) == 4, what="paced deliveries")
    assert sum(taken) == 12
    assert pipelined(upstream) == [True] * 4


@pytest.mark.parametrize("held_at", ["RCPT", "DATA"])
async def test_a_restart_in_the_middle_of_a_delivery_delivers_once(harness, upstream, held_at):
    """The relay stops while the upstream holds the first RCPT's reply (the pipelined
    exchange under way) or DATA's (the state "a and b delivered, never failed" prepared on
    disk): the attempt is cancelled, the entry stays as last committed (nothing recorded,
    the prepared state gone), and the next process delivers it once."""
    upstream.behaviour.rcpt_replies = {"never@example.net": "550 5.1.1 no such user"}
    if held_at == "RCPT":
        upstream.behaviour.rcpt_delay = 30.0
    else:
        upstream.behaviour.data_delay = 30.0
    h = harness(steps=(60.0,), bounce="drop")
    h.runner.start()
    entry_id = await h.put(["a@example.net", "b@example.net", "never@example.net"])
    await eventually(lambda: held_at in upstream.commands, what=f"the upstream holding {held_at}")
    if held_at == "DATA":
        assert list(h.spool.entries.glob(f".tmp-{entry_id}.state-*"))  # prepared
    await h.runner.stop(0.1)  # the end of a drain: the delivery under way is cancelled
    await h.close()
    entry = state_of(h.spool, entry_id)
    assert [(r.status, r.attempts) for r in entry.recipients] == [(PENDING, 0)] * 3
    assert not list(h.spool.entries.glob(f".tmp-{entry_id}*"))
    assert upstream.messages == []

    upstream.behaviour.rcpt_delay = upstream.behaviour.data_delay = 0.0
    again = harness(bounce="drop")
    again.runner.start()  # its scan finds the entry
    await eventually(lambda: state_of(again.spool, entry_id).done, what="delivery after the restart")
    await asyncio.sleep(0.5)  # a few more scans: nothing goes out twice
    assert [m.rcpt_tos for m in upstream.messages] == [["a@example.net", "b@example.net"]]
    entry = state_of(again.spool, entry_id)
    assert [(r.status, r.attempts) for r in entry.recipients] == [(DELIVERED, 1), (DELIVERED, 1), (FAILED, 1)]
    assert pipelined(upstream) == [True, True]


# -- through the relay: a From domain's limits, counted once --------------------------------


@in_thread
def test_a_message_whose_first_recipient_is_deferred_counts_once(make_loop_relay, pki, tmp_path):
    """As tests/test_limits_spool.py, with the deferred recipient the one whose RCPT goes
    with MAIL: one message and two recipients against the domain over two attempts."""
    from tests.test_limits_spool import DOMAIN_LIMITS, domain_usage, send, settled, spool_state

    with Upstream(tls="starttls", server_context=pki.server_context(), pipelining=True) as up:
        relay = make_loop_relay(
            up.port,
            queue={"mode": "spool", "dir": str(tmp_path / "spool"), "retry": ["1s"]},
            limits={"domains": DOMAIN_LIMITS},
        )
        up.behaviour.rcpt_replies["b@example.net"] = "451 4.2.1 mailbox busy, try later"
        send(relay, pki, "two attempts", ("b@example.net", "a@example.net"))
        up.wait_for(1)
        relay.wait_log(lambda e: e.get("msg") == "delivery attempt" and e.get("result") == "deferred")
        up.behaviour.rcpt_replies.clear()
        up.wait_for(2, timeout=30)
        settled(relay, lambda: not spool_state(relay))
        assert [m.rcpt_tos for m in up.messages] == [["a@example.net"], ["b@example.net"]]
        assert domain_usage(relay) == (1, 2)
        assert [ahead for _, ahead in up.mails] == [True, True]
