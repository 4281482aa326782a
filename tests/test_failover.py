"""Failover at RCPT (issue 20): a 4xx from the first upstream for a recipient moves the
transaction to the next one, when that keeps every answer the client got true. Two real
upstream listeners; each message arrives exactly once, and the upstream left behind is left
clean (its pool slot free, RSET or QUIT seen)."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable, Iterator

import pytest

from tests.support.inloop import LoopRelay, in_thread
from tests.support.smtp import connect, message, reply
from tests.support.upstream import Upstream


@pytest.fixture
def u1(pki) -> Iterator[Upstream]:
    with Upstream(tls="starttls", server_context=pki.server_context()) as up:
        yield up


@pytest.fixture
def u2(pki) -> Iterator[Upstream]:
    with Upstream(tls="starttls", server_context=pki.server_context()) as up:
        yield up


def chain(make_loop_relay, u1: Upstream, u2: Upstream, **upstream: object) -> LoopRelay:
    relay = make_loop_relay(u1.port, start=False)
    base = {**relay.config["upstream"], **upstream}
    relay.config["upstream"] = [{**base, "name": "u1", "port": u1.port}, {**base, "name": "u2", "port": u2.port}]
    relay.start()
    return relay


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def assert_left_clean(relay: LoopRelay, up: Upstream) -> None:
    """The transaction on `up` was ended (RSET or QUIT after its last RCPT) and its pool slot
    is free; nothing was delivered there."""
    last_rcpt = len(up.commands) - 1 - up.commands[::-1].index("RCPT")
    wait_until(lambda: {"RSET", "QUIT"} & set(up.commands[last_rcpt:]) != set())
    wait_until(lambda: relay.metric("relay_upstream_pool_connections", upstream="u1", state="busy") == 0)
    assert up.messages == []


def message_line(relay: LoopRelay) -> dict:
    return relay.wait_log(lambda e: e.get("event") == "message" and e.get("code") is not None)


@in_thread
def test_a_4xx_for_the_first_recipient_moves_the_transaction(make_loop_relay, u1, u2, pki):
    u1.behaviour.rcpt_replies["a@example.net"] = "451 4.3.0 Mailbox store busy"
    relay = chain(make_loop_relay, u1, u2)
    assert connect(relay, pki).sendmail("app@example.com", ["a@example.net", "b@example.net"], message()) == {}
    [got] = u2.wait_for(1)
    assert got.rcpt_tos == ["a@example.net", "b@example.net"]
    assert_left_clean(relay, u1)
    line = message_line(relay)
    assert line["upstream"] == "u2" and line["code"] == 250
    assert line["failovers"] == ["u1 at rcpt: 451 4.3.0 Mailbox store busy"]
    labels = {"from_upstream": "u1", "to_upstream": "u2", "stage": "rcpt", "reason": "upstream_temporary"}
    assert relay.metric("relay_upstream_failovers_total", **labels) == 1
    assert len(u2.messages) == 1


@in_thread
def test_a_4xx_for_the_second_recipient_moves_the_transaction_with_the_first(make_loop_relay, u1, u2, pki):
    u1.behaviour.rcpt_replies["b@example.net"] = "451 4.2.1 Greylisted, try later"
    relay = chain(make_loop_relay, u1, u2)
    assert connect(relay, pki).sendmail("app@example.com", ["a@example.net", "b@example.net"], message()) == {}
    [got] = u2.wait_for(1)
    assert got.rcpt_tos == ["a@example.net", "b@example.net"]  # a replayed on u2, then b
    assert_left_clean(relay, u1)
    line = message_line(relay)
    assert line["upstream"] == "u2" and line["recipients"] == 2
    assert line["failovers"] == ["u1 at rcpt: 451 4.2.1 Greylisted, try later"]


@in_thread
def test_a_later_recipient_stays_refused_when_the_next_upstream_would_refuse_an_earlier_one(
    make_loop_relay, u1, u2, pki
):
    """Faithful: a was accepted by u1; u2 refuses a, so the transaction stays on u1, b gets
    u1's 4xx (the client retries b later), and the message goes to u1 for a only."""
    u1.behaviour.rcpt_replies["b@example.net"] = "451 4.2.1 Greylisted, try later"
    u2.behaviour.rcpt_replies["a@example.net"] = "451 4.3.0 Busy"
    relay = chain(make_loop_relay, u1, u2)
    refused = connect(relay, pki).sendmail("app@example.com", ["a@example.net", "b@example.net"], message())
    assert refused == {"b@example.net": (451, b"4.2.1 Greylisted, try later")}
    [got] = u1.wait_for(1)
    assert got.rcpt_tos == ["a@example.net"]
    assert u2.messages == []
    wait_until(lambda: "RSET" in u2.commands or "QUIT" in u2.commands[2:])
    assert message_line(relay)["upstream"] == "u1"


@in_thread
def test_421_and_close_at_rcpt_moves_the_transaction(make_loop_relay, u1, u2, pki):
    u1.behaviour.rcpt_replies["a@example.net"] = "421 4.3.2 Shutting down"
    relay = chain(make_loop_relay, u1, u2)
    assert connect(relay, pki).sendmail("app@example.com", ["a@example.net"], message()) == {}
    assert len(u2.wait_for(1)) == 1
    wait_until(lambda: relay.metric("relay_upstream_pool_connections", upstream="u1", state="busy") == 0)
    assert u1.messages == []
    assert message_line(relay)["failovers"] == ["u1 at rcpt: 421 4.3.2 Shutting down"]
    time.sleep(0.5)
    assert len(u2.messages) == 1


@in_thread
def test_an_upstream_slower_than_command_timeout_at_rcpt_is_left_for_the_next(make_loop_relay, u1, u2, pki):
    u1.behaviour.rcpt_delay = 4.0
    relay = chain(make_loop_relay, u1, u2, command_timeout="1s")
    assert connect(relay, pki).sendmail("app@example.com", ["a@example.net"], message()) == {}
    [got] = u2.wait_for(1)
    assert got.rcpt_tos == ["a@example.net"]
    wait_until(lambda: relay.metric("relay_upstream_pool_connections", upstream="u1", state="busy") == 0)
    line = message_line(relay)
    assert line["upstream"] == "u2"
    assert line["failovers"][0].startswith("u1 at rcpt: upstream u1 during RCPT: timed out")
    labels = {"from_upstream": "u1", "to_upstream": "u2", "stage": "rcpt", "reason": "upstream_timeout"}
    assert relay.metric("relay_upstream_failovers_total", **labels) == 1
    time.sleep(4.0)  # u1's slow reply would have come by now: still nothing delivered there
    assert u1.messages == [] and len(u2.messages) == 1


@in_thread
def test_every_upstream_4xx_gives_the_last_4xx_with_its_text(make_loop_relay, u1, u2, pki):
    u1.behaviour.rcpt_replies["a@example.net"] = "451 4.3.0 First is busy"
    u2.behaviour.rcpt_replies["a@example.net"] = "452 4.2.2 Second mailbox full"
    relay = chain(make_loop_relay, u1, u2)
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    assert reply(client, "RCPT TO:<a@example.net>") == (452, "4.2.2 Second mailbox full")
    assert reply(client, "RSET")[0] == 250
    assert_left_clean(relay, u1)
    assert u2.messages == []


@in_thread
def test_a_5xx_at_rcpt_is_final(make_loop_relay, u1, u2, pki):
    u1.behaviour.rcpt_replies["a@example.net"] = "550 5.1.1 No such user"
    relay = chain(make_loop_relay, u1, u2)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        connect(relay, pki).sendmail("app@example.com", ["a@example.net"], message())
    assert refused.value.recipients == {"a@example.net": (550, b"5.1.1 No such user")}
    assert "MAIL" not in u2.commands  # never asked
