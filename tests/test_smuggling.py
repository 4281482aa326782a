"""SMTP smuggling (the 2023 advisories): end-of-data look-alikes inside DATA never make a
second message at the upstream, whatever `clients.bare_newline` says. Only CRLF.CRLF ends
DATA. With `normalize` (the default) a bare LF is read as CRLF, as Postfix 3.9 does, and the
look-alike becomes an ordinary line of the one message (its leading dot removed, RFC 5321
§4.5.2); with `reject` the message is refused whole. A bare CR is refused in both modes:
no hop after us can read the message differently."""

from __future__ import annotations

import pytest

from tests.support.inloop import in_thread
from tests.support.smtp import connect, message, reply

SMUGGLED = (
    b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
    b"From: ceo@example.com\r\nSubject: smuggled\r\n\r\npay now\r\n"
)
BARE_LF = {"LF.LF": b"\n.\n", "LF.CRLF": b"\n.\r\n", "CRLF.LF": b"\r\n.\n"}
BARE_CR = {"CR.LF": b"\r.\n", "CR.CRLF": b"\r.\r\n", "CRLF.CR": b"\r\n.\r"}
REFUSAL = (550, b"5.6.0 Message contains a bare CR or LF; lines must end with CRLF (RFC 5321 section 2.3.8)")


def _send_carrier(relay, pki, separator: bytes):
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    assert reply(client, "RCPT TO:<u@example.net>")[0] == 250
    assert reply(client, "DATA")[0] == 354
    client.send(b"From: app@example.com\r\nSubject: carrier\r\n\r\nhello" + separator + SMUGGLED + b"\r\n.\r\n")
    return client, client.getreply()


@pytest.mark.parametrize("separator", list(BARE_LF.values()), ids=list(BARE_LF))
@in_thread
def test_bare_lf_look_alikes_stay_inside_the_one_message_by_default(make_loop_relay, upstream, pki, separator):
    relay = make_loop_relay(upstream.port)
    client, (code, _) = _send_carrier(relay, pki, separator)
    assert code == 250
    # The session is still in sync: the next command is answered as a command.
    assert client.noop()[0] == 250
    [got] = upstream.wait_for(1)
    assert upstream.mail_commands == 1
    assert got.rcpt_tos == ["u@example.net"]
    body = got.content.split(b"\r\n\r\n", 1)[1]
    assert b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@example.net>\r\n" in body
    assert got.content.count(b"\n") == got.content.count(b"\r\n")
    assert b"\r\n.\r\n" not in got.content


@pytest.mark.parametrize("separator", list(BARE_LF.values()), ids=list(BARE_LF))
@in_thread
def test_bare_lf_look_alikes_are_refused_with_reject(make_loop_relay, upstream, pki, separator):
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["clients"]["bare_newline"] = "reject"
    relay.start()
    client, answer = _send_carrier(relay, pki, separator)
    assert answer == REFUSAL
    assert client.noop()[0] == 250
    assert upstream.messages == []
    assert upstream.mail_commands <= 1


@pytest.mark.parametrize("mode", ["normalize", "reject"])
@pytest.mark.parametrize("separator", list(BARE_CR.values()), ids=list(BARE_CR))
@in_thread
def test_bare_cr_look_alikes_are_refused_in_both_modes(make_loop_relay, upstream, pki, separator, mode):
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["clients"]["bare_newline"] = mode
    relay.start()
    client, answer = _send_carrier(relay, pki, separator)
    assert answer == REFUSAL
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


@in_thread
def test_two_messages_pipelined_in_one_write_are_two_messages(make_loop_relay, upstream, pki):
    # RFC 2920 §3.1: a client may send the next transaction right after the end of data;
    # what follows CRLF.CRLF is commands again, read after the first message is answered.
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    envelope = b"MAIL FROM:<app@example.com>\r\nRCPT TO:<u@example.net>\r\nDATA\r\n"
    first = b"From: app@example.com\r\nSubject: one\r\n\r\n..dot\r\n.\r\n"
    second = b"From: app@example.com\r\nSubject: two\r\n\r\nend.\r\n.\r\n"
    client.send(envelope + first + envelope + second + b"QUIT\r\n")
    codes = [client.getreply()[0] for _ in range(9)]
    assert codes == [250, 250, 354, 250, 250, 250, 354, 250, 221]
    got = upstream.wait_for(2)
    assert [m.content.split(b"\r\n\r\n", 1)[1] for m in got] == [b".dot\r\n", b"end.\r\n"]


@pytest.mark.parametrize("last", [b" LAST", b""])
@in_thread
def test_a_bdat_chunk_is_dropped_whole_not_read_as_commands(make_loop_relay, upstream, pki, last):
    """relay does not offer CHUNKING (RFC 3030). A client that sends BDAT anyway sends its
    chunk right behind it: message content, which was read as commands, so a line such as
    "RCPT TO:<...>" in it was carried out (500 to BDAT, then 250 to the chunk's lines). The
    chunk is now read and dropped: one 502 reply, and the session goes on."""
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    assert reply(client, "RCPT TO:<u@example.net>")[0] == 250
    chunk = b"RSET\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<smuggled@example.net>\r\nNOOP\r\n"
    client.send(b"BDAT %d%s\r\n" % (len(chunk), last) + chunk)
    code, text = client.getreply()
    assert (code, text[:5]) == (502, b"5.5.1")
    assert client.noop() == (250, b"2.0.0 OK")  # the next reply is NOOP's: none came for the chunk
    assert reply(client, "BDAT x")[0] == 501
    assert reply(client, "RCPT TO:<v@example.net>")[0] == 250  # the transaction goes on
    assert client.data(message())[0] == 250
    [got] = upstream.wait_for(1)
    assert got.rcpt_tos == ["u@example.net", "v@example.net"]
