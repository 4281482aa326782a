"""Every refusal, with its exact reply code and enhanced status code, over real sockets."""

from __future__ import annotations

import base64
import smtplib
import socket

import pytest

from tests.support.config import APP_PASSWORD
from tests.support.inloop import in_thread
from tests.support.smtp import connect, message, reply


@in_thread
def test_ehlo_offers_auth_only_over_tls(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    plain = connect(relay, pki, tls=False, login=False)
    assert "starttls" in plain.esmtp_features and "auth" not in plain.esmtp_features
    assert "enhancedstatuscodes" in plain.esmtp_features
    assert reply(plain, "AUTH PLAIN " + base64.b64encode(b"\0app\0" + APP_PASSWORD.encode()).decode()) == (
        538,
        "5.7.11 Encryption required for requested authentication mechanism",
    )
    assert reply(plain, "MAIL FROM:<app@example.com>") == (530, "5.7.0 Authentication required")
    plain.quit()
    tls = connect(relay, pki, login=False)
    assert tls.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
    # aiosmtpd cannot tell that an implicit-TLS transport is TLS; the relay can.
    implicit = connect(relay, pki, listener="submissions", login=False)
    assert implicit.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
    assert "starttls" not in implicit.esmtp_features


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@in_thread
def test_wrong_password_gets_535_not_a_hang(make_loop_relay, upstream, pki, mechanism):
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki, login=False)
    client.user, client.password = "app", "wrong"
    method = client.auth_plain if mechanism == "PLAIN" else client.auth_login
    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        client.auth(mechanism, method)
    assert err.value.smtp_code == 535
    assert err.value.smtp_error == b"5.7.8 Authentication credentials invalid"
    assert relay.metric("relay_auth_attempts_total", mechanism=mechanism, result="failure") == 1


@in_thread
def test_repeated_auth_failures_close_the_session(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki, login=False)
    bad = "AUTH PLAIN " + base64.b64encode(b"\0app\0nope").decode()
    assert reply(client, bad)[0] == 535
    assert reply(client, bad)[0] == 535
    assert reply(client, bad) == (535, "5.7.8 Authentication credentials invalid")
    assert client.getreply() == (421, b"4.7.0 Too many failed authentications, closing connection")


@in_thread
def test_unknown_user_is_refused_like_a_wrong_password(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki, login=False)
    assert reply(client, "AUTH PLAIN " + base64.b64encode(b"\0ghost\0x").decode()) == (
        535,
        "5.7.8 Authentication credentials invalid",
    )


@in_thread
def test_envelope_sender_outside_senders(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@other.example>") == (
        550,
        "5.7.1 Sender <app@other.example> not allowed for this user",
    )
    assert upstream.mail_commands == 0


@in_thread
def test_header_from_outside_senders(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    with pytest.raises(smtplib.SMTPDataError) as err:
        client.sendmail("app@example.com", ["u@example.net"], message(frm="ceo@other.example"))
    assert (err.value.smtp_code, err.value.smtp_error) == (
        550,
        b"5.7.1 From: <ceo@other.example> not allowed for this user",
    )
    assert upstream.messages == []
    line = relay.wait_log(lambda e: e.get("event") == "message" and e.get("code") == 550)
    assert "ceo@other.example" in line["reason"]


@in_thread
def test_from_domain_without_key(make_loop_relay, upstream, pki, app_password_hash):
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["clients"]["users"][0]["senders"] = ["example.com", "nokey.example"]
    relay.start()
    client = connect(relay, pki)
    with pytest.raises(smtplib.SMTPDataError) as err:
        client.sendmail("app@nokey.example", ["u@example.net"], message(frm="app@nokey.example"))
    assert (err.value.smtp_code, err.value.smtp_error) == (550, b"5.7.1 This relay does not sign for nokey.example")
    assert upstream.messages == []
    assert relay.metric("relay_messages_rejected_total", reason="no_key") == 1


@in_thread
def test_from_domain_without_key_relayed_unsigned_when_configured(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["clients"]["users"][0]["senders"] = ["example.com", "nokey.example"]
    relay.config["dkim"]["when_no_key"] = "relay_unsigned"
    relay.start()
    connect(relay, pki).sendmail("app@nokey.example", ["u@example.net"], message(frm="app@nokey.example"))
    [got] = upstream.wait_for(1)
    assert b"DKIM-Signature" not in got.content


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"From: a@example.com\r\nFrom: b@example.com\r\n\r\nx\r\n",
        b"From: a@example.com, b@example.com\r\n\r\nx\r\n",
    ],
    ids=["no-from", "two-from-fields", "two-addresses"],
)
@in_thread
def test_messages_without_exactly_one_author(make_loop_relay, upstream, pki, body):
    relay = make_loop_relay(upstream.port)
    data = body or b"To: u@example.net\r\nSubject: none\r\n\r\nx\r\n"
    with pytest.raises(smtplib.SMTPDataError) as err:
        connect(relay, pki).sendmail("app@example.com", ["u@example.net"], data)
    assert err.value.smtp_code == 550 and err.value.smtp_error.startswith(b"5.6.0")
    assert upstream.messages == []


@in_thread
def test_oversize_message(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)  # max_message_size: 1MiB
    client = connect(relay, pki)
    assert client.esmtp_features["size"] == str(1024 * 1024)
    assert reply(client, "MAIL FROM:<app@example.com> SIZE=2000000")[0] == 552
    reply(client, "RSET")
    # Without SIZE= the limit is enforced on the data itself, answered after the final dot.
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    assert reply(client, "RCPT TO:<u@example.net>")[0] == 250
    assert reply(client, "DATA")[0] == 354
    client.send(message() + (b"y" * 76 + b"\r\n") * 15000 + b".\r\n")
    assert client.getreply() == (552, f"5.3.4 Message size exceeds the limit of {1024 * 1024} bytes".encode())
    # The session survives and the next message goes through.
    client.sendmail("app@example.com", ["u@example.net"], message())
    assert len(upstream.wait_for(1)) == 1


@in_thread
def test_client_outside_networks_refused_at_greeting(make_loop_relay, upstream):
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["clients"]["networks"] = ["10.0.0.0/8"]
    relay.start()
    with socket.create_connection(("127.0.0.1", relay.port("submission")), timeout=10) as sock:
        greeting = sock.recv(1024)
        assert greeting == b"554 5.7.1 Access denied: this client may not use this relay\r\n"
        assert sock.recv(1024) == b""  # closed
    assert relay.metric("relay_sessions_refused_total", reason="network") == 1


@pytest.mark.parametrize(
    "command,expected",
    [
        ("MAIL FROM:<app@example.com", (553, "5.1.3 Error: malformed address")),
        ("MAIL FROM: app", (553, "5.1.3 Error: malformed address")),
        ("MAIL TO:<app@example.com>", (501, "5.5.4 Syntax: MAIL FROM: <address> [SP <mail-parameters>]")),
        ("RCPT TO:<u@example.net>", (503, "5.5.1 Send MAIL FROM first")),
        ("DATA", (503, "5.5.1 Send RCPT TO first (no recipient was accepted)")),
        ("FOO bar", (500, '5.5.2 Error: command "FOO" not recognized')),
    ],
)
@in_thread
def test_malformed_commands(make_loop_relay, upstream, pki, command, expected):
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    assert reply(client, command) == expected
    assert client.noop()[0] == 250  # the session survives


@in_thread
def test_malformed_rcpt(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    assert reply(client, "RCPT TO:<u@@example.net") == (553, "5.1.3 Error: malformed address")
    assert reply(client, "RCPT TO:") == (501, "5.5.4 Syntax: RCPT TO: <address> [SP <mail-parameters>]")


@in_thread
def test_more_recipients_than_allowed(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)  # max_recipients: 5
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    for i in range(5):
        assert reply(client, f"RCPT TO:<u{i}@example.net>")[0] == 250
    assert reply(client, "RCPT TO:<u5@example.net>") == (452, "4.5.3 Too many recipients for one message")
    client.docmd("DATA")
    client.send(message() + b".\r\n")
    assert client.getreply()[0] == 250
    [got] = upstream.wait_for(1)
    assert len(got.rcpt_tos) == 5
