"""SMTP smuggling (the 2023 advisories): end-of-data look-alikes inside DATA never make a
second message at the upstream. Only CRLF.CRLF ends DATA, and a message with a bare CR or
LF is refused whole, so no hop after us can read it differently."""

from __future__ import annotations

import pytest

from tests.support.inloop import in_thread
from tests.support.smtp import connect, reply

SMUGGLED = (
    b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
    b"From: ceo@example.com\r\nSubject: smuggled\r\n\r\npay now\r\n"
)


@pytest.mark.parametrize(
    "separator",
    [b"\n.\n", b"\r.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r"],
    ids=["LF.LF", "CR.LF", "LF.CRLF", "CR.CRLF", "CRLF.LF", "CRLF.CR"],
)
@in_thread
def test_smuggling_sequences_never_yield_a_second_message(make_loop_relay, upstream, pki, separator):
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    assert reply(client, "RCPT TO:<u@example.net>")[0] == 250
    assert reply(client, "DATA")[0] == 354
    client.send(b"From: app@example.com\r\nSubject: carrier\r\n\r\nhello" + separator + SMUGGLED + b"\r\n.\r\n")
    code, text = client.getreply()
    assert (code, text) == (
        550,
        b"5.6.0 Message contains a bare CR or LF; lines must end with CRLF (RFC 5321 \xc2\xa72.3.8)",
    )
    # The session is still in sync: the next command is answered as a command.
    assert client.noop()[0] == 250
    assert upstream.messages == []
    assert upstream.mail_commands <= 1


@in_thread
def test_dot_stuffing_round_trips(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    body = b"From: app@example.com\r\nSubject: dots\r\n\r\n.leading dot\r\n..two dots\r\nend.\r\n."
    # smtplib stuffs dots itself; the upstream must see the original lines.
    client.sendmail("app@example.com", ["u@example.net"], body)
    [got] = upstream.wait_for(1)
    assert got.content.endswith(b"\r\n\r\n.leading dot\r\n..two dots\r\nend.\r\n.\r\n")


@in_thread
def test_empty_body_and_only_terminator(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    client.sendmail("app@example.com", ["u@example.net"], b"From: app@example.com\r\nSubject: e\r\n\r\n")
    assert len(upstream.wait_for(1)) == 1
