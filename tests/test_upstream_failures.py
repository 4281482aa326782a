"""Upstream down, 4xx, 5xx, stalls: the client gets the mapped reply and nothing is reported
delivered that was not."""

from __future__ import annotations

import smtplib
import socket
import time

import pytest

from tests.support.inloop import in_thread
from tests.support.procs import dead_port
from tests.support.smtp import connect, message, reply


@in_thread
def test_upstream_down_gives_451_at_rcpt(make_loop_relay, pki):
    relay = make_loop_relay(dead_port(), wait_ready=False)  # nothing listens there
    relay_ready = relay.http_json("/readyz")
    assert relay_ready[0] == 503 and "upstream" in relay_ready[1]["checks"]
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    code, text = reply(client, "RCPT TO:<u@example.net>")
    assert code == 451 and text.startswith("4.4.1")
    line = relay.wait_log(lambda e: e.get("msg") == "recipient not accepted")
    assert line["reason"].startswith("localhost: connect to 127.0.0.1:") and line["label"] == "upstream_unreachable"


@in_thread
def test_upstream_tempfail_at_data_is_passed_through(make_loop_relay, upstream, pki):
    upstream.behaviour.data_reply = "451 4.3.0 Mailbox store busy, try later"
    relay = make_loop_relay(upstream.port)
    with pytest.raises(smtplib.SMTPDataError) as err:
        connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message())
    assert (err.value.smtp_code, err.value.smtp_error) == (451, b"4.3.0 Mailbox store busy, try later")
    line = relay.wait_log(lambda e: e.get("event") == "message" and e.get("code") == 451)
    assert line["upstream_reply"] == "451 4.3.0 Mailbox store busy, try later"
    assert relay.metric("relay_messages_relayed_total") == 0
    assert relay.metric("relay_upstream_replies_total", stage="data", **{"class": "4xx"}) == 1


@in_thread
def test_upstream_permanent_failure_is_passed_through(make_loop_relay, upstream, pki):
    upstream.behaviour.data_reply = "554 5.7.1 Message rejected: content policy"
    relay = make_loop_relay(upstream.port)
    with pytest.raises(smtplib.SMTPDataError) as err:
        connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message())
    assert (err.value.smtp_code, err.value.smtp_error) == (554, b"5.7.1 Message rejected: content policy")


@in_thread
def test_upstream_refuses_sender(make_loop_relay, upstream, pki):
    upstream.behaviour.mail_reply = "550 5.7.60 Sender not verified"
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    assert reply(client, "RCPT TO:<u@example.net>") == (550, "5.7.60 Sender not verified")


@in_thread
def test_an_upstream_421_at_rcpt_is_passed_on_and_the_session_closed(make_loop_relay, upstream, pki):
    """RFC 5321 §3.8: a server that answers 421 closes the channel. relay passes the upstream's
    421 to RCPT on, and closes the client's session as it does after its own 421."""
    upstream.behaviour.rcpt_replies["u@example.net"] = "421 4.3.2 Service shutting down"
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    assert reply(client, "RCPT TO:<u@example.net>") == (421, "4.3.2 Service shutting down")
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.noop()


@in_thread
def test_upstream_stall_before_data_gives_451_and_nothing_delivered(make_loop_relay, upstream, pki):
    upstream.behaviour.rcpt_delay = 4.0
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["upstream"]["command_timeout"] = "1s"
    relay.start()
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    code, text = reply(client, "RCPT TO:<u@example.net>")
    assert code == 451 and text.startswith("4.4.2")
    time.sleep(4.5)
    assert upstream.messages == []


@in_thread
def test_upstream_stall_after_data_gives_451(make_loop_relay, upstream, pki):
    upstream.behaviour.data_delay = 3.0
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["upstream"]["command_timeout"] = "1s"
    relay.start()
    with pytest.raises(smtplib.SMTPDataError) as err:
        connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message())
    assert err.value.smtp_code == 451 and err.value.smtp_error.startswith(b"4.4.2")
    time.sleep(3.5)
    # The upstream never acknowledged (its reply could not reach us): not delivered.
    assert upstream.messages == []
    assert relay.metric("relay_messages_relayed_total") == 0


@in_thread
def test_client_disconnect_mid_data_sends_nothing_upstream(make_loop_relay, upstream, pki):
    # One pool slot, so a transaction left open upstream would block the next message; and
    # the upstream must see the abort itself (RSET), not only a free slot.
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["upstream"]["pool"] = {"max_connections": 1, "acquire_timeout": "5s"}
    relay.start()
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    assert reply(client, "RCPT TO:<u@example.net>")[0] == 250
    assert reply(client, "DATA")[0] == 354
    client.send(b"From: app@example.com\r\nSubject: half\r\n\r\nfirst half of the bo")
    client.sock.shutdown(socket.SHUT_RDWR)
    client.close()
    deadline = time.monotonic() + 20
    while "RSET" not in upstream.commands:
        assert time.monotonic() < deadline, f"the upstream saw {upstream.commands}, no RSET"
        time.sleep(0.02)
    assert upstream.commands[-3:] == ["MAIL", "RCPT", "RSET"]  # (before: the readiness probes)
    assert relay.metric("relay_upstream_pool_connections", state="busy") == 0
    assert relay.metric("relay_upstream_pool_connections", state="idle") == 1
    assert upstream.messages == []
    # The relay aborted the upstream transaction and is still serving, on the same connection.
    connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message())
    assert len(upstream.wait_for(1)) == 1


@in_thread
def test_upstream_restart_between_messages_is_transparent(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message(subject="one"))
    upstream.wait_for(1)
    upstream.stop()  # drops the pooled connection
    upstream.start()
    connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message(subject="two"))
    assert len(upstream.wait_for(2)) == 2
