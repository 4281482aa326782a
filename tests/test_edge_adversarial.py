"""What outside testers throw at the edge beyond the well-behaved clients: a From header that
breaks the address parser, command lines near their limits while other clients come and go,
AUTH exchanges far over any real size. Never a traceback or an "internal error" for the
client's own input, never a leaked upstream slot."""

from __future__ import annotations

import base64
import logging
import smtplib
import socket
import threading
import time
from collections.abc import Callable

import pytest

from relay.queue import store
from tests.support.config import APP_PASSWORD
from tests.support.inloop import in_thread
from tests.support.redis import RedisServer
from tests.support.smtp import connect, message, reply, submit
from tests.support.upstream import Upstream


def wait_until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def vanish(client: smtplib.SMTP) -> None:
    """The client is gone: no QUIT, the connection just ends."""
    client.sock.shutdown(socket.SHUT_RDWR)
    client.close()


def busy_upstream_connections(relay) -> float:
    return relay.metric("relay_upstream_pool_connections", state="busy")


@in_thread
def test_a_from_header_the_address_parser_cannot_read_is_refused_and_frees_the_upstream(make_loop_relay, upstream, pki):
    """A From of deeply nested comments made the standard library's address parser recurse
    until RecursionError: the client got "451 Internal error", and the upstream transaction
    (MAIL and RCPT already mirrored) was never ended, so its pool slot was gone for good.
    With a pool of one, the next message then waited for a slot and got 451 4.4.5."""
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["upstream"]["pool"] = {"max_connections": 1, "acquire_timeout": "3s"}
    relay.start()
    nested = message().replace(b"From: App <app@example.com>", b"From: " + b"(" * 3000 + b"<app@example.com>")
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    assert reply(client, "RCPT TO:<u@example.net>")[0] == 250
    code, text = client.data(nested)
    assert (code, text.decode()[:5]) == (550, "5.6.0")
    client.quit()
    wait_until(lambda: busy_upstream_connections(relay) == 0)
    assert submit(relay, pki) == {}
    assert len(upstream.wait_for(1)) == 1
    assert relay.metric("relay_messages_rejected_total", reason="bad_from") == 1


def _greeted_socket(relay) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", relay.port("submission")), timeout=20)
    assert sock.recv(1024).startswith(b"220 ")
    return sock


@in_thread
def test_command_line_limits_of_a_session_hold_while_other_clients_connect(make_loop_relay, upstream, pki):
    """EHLO raises the MAIL and RCPT line limits for the parameters it offers (RFC 5321
    §4.5.3.1.4, RFC 3461 §4). aiosmtpd keeps those limits in one dict shared by every
    session and empties it for each new connection: a session's RCPT of 600 octets (a
    long ORCPT) was "500 Command line too long" whenever another client had connected
    since its EHLO."""
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    other = _greeted_socket(relay)  # a new connection, not yet at EHLO
    orcpt = "rfc822;" + "a" * 450 + "@example.net"
    command = f"RCPT TO:<user@example.net> NOTIFY=FAILURE ORCPT={orcpt}"
    assert len(command) > 512
    assert reply(client, command)[0] == 250
    other.close()
    client.quit()


@in_thread
def test_auth_with_an_initial_response_over_512_octets_is_read(make_loop_relay, upstream, pki, tmp_path):
    """RFC 4954 §4: 12288 octets is what deployed mechanisms need for a response. Clients
    (curl, PHPMailer, Python's smtplib) send PLAIN's initial response on the AUTH line
    whatever its length; a long password (a token) made that line 500 Command line too
    long."""
    password = "t" * 600
    secret = tmp_path / "token"
    secret.write_text(password)
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["clients"]["users"].append(
        {"username": "tokenapp", "password": f"file://{secret}", "senders": ["example.com"]}
    )
    relay.start()
    client = connect(relay, pki, login=False)
    blob = base64.b64encode(b"\0tokenapp\0" + password.encode()).decode()
    assert reply(client, f"AUTH PLAIN {blob}") == (235, "2.7.0 Authentication successful")
    client.quit()


@in_thread
def test_an_auth_response_over_the_line_buffer_gets_5_5_6_and_the_session_goes_on(make_loop_relay, upstream, pki):
    """A response to the AUTH challenge of 1 MB: before, the reader's limit surfaced as an
    exception, the client got "451 Internal error" and the rest of the line was then read
    as commands. RFC 4954 §6: 500 5.5.6 Authentication Exchange line is too long."""
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki, login=False)
    assert reply(client, "AUTH LOGIN")[0] == 334
    client.send(b"QUFB" * 256 * 1024 + b"\r\n")
    code, text = client.getreply()
    assert (code, text.decode()[:5]) == (500, "5.5.6")
    assert client.noop()[0] == 250  # nothing of the long line is read as a command
    client.login("app", APP_PASSWORD)
    assert not [e for e in relay.logs() if e.get("msg") == "session error"]
    client.quit()


@in_thread
def test_an_upstream_reply_code_outside_smtp_never_reaches_the_client(make_loop_relay, upstream, pki):
    """RFC 5321 §4.2.1: reply codes start with 2 to 5. An upstream's "650" (an MX host
    in mode: mx is anyone's) went to the client as it was; the client cannot tell whether
    to retry. It is a broken path: 451 4.4.2."""
    upstream.behaviour.rcpt_replies["odd@example.net"] = "650 6.0.0 what now"
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    code, text = reply(client, "RCPT TO:<odd@example.net>")
    assert (code, text[:5]) == (451, "4.4.2")
    client.quit()


@pytest.mark.binaries
@in_thread
def test_a_client_gone_while_its_message_is_counted_frees_the_upstream(make_loop_relay, upstream, pki, tmp_path):
    """The client vanishes at DATA while the relay counts its message in Redis (slow, or
    frozen here): the task was cancelled there, before the upstream transaction (MAIL and
    RCPT mirrored, taken out of the session for DATA) was ended: its pool slot was never
    given back, and with a pool of one no message went through any more."""
    with RedisServer(tmp_path) as redis:
        relay = make_loop_relay(upstream.port, start=False)
        relay.config["limits"] = {
            "users": {"daily": 100},
            "backend": "redis",
            "redis": {"url": redis.url, "timeout": "10s"},
        }
        relay.config["upstream"]["pool"] = {"max_connections": 1, "acquire_timeout": "3s"}
        relay.start()
        client = connect(relay, pki)
        assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
        assert reply(client, "RCPT TO:<u@example.net>")[0] == 250
        assert reply(client, "DATA")[0] == 354
        redis.freeze()
        try:
            client.send(message() + b".\r\n")
            wait_until(lambda: relay.metric("relay_messages_received_total") == 1)
            vanish(client)
            wait_until(lambda: busy_upstream_connections(relay) == 0)
        finally:
            redis.thaw()
        assert submit(relay, pki) == {}
        assert len(upstream.wait_for(1)) == 1


@in_thread
def test_an_address_of_nested_comments_is_malformed_not_an_internal_error(make_loop_relay, upstream, pki):
    """MAIL FROM and RCPT TO with a thousand nested "(" made the email package's parser
    recurse until RecursionError: "451 Internal error" (try again) and an error logged,
    for what is a malformed address (553 5.1.3)."""
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    nested = "(" * 1100
    assert reply(client, f"MAIL FROM:{nested}app@example.com")[0] == 553
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    assert reply(client, f"RCPT TO:{nested[:990]}u@example.net")[0] == 553
    assert not [e for e in relay.logs() if e.get("msg") == "session error"]
    client.quit()


@in_thread
def test_a_client_gone_after_its_final_dot_leaves_the_message_log_line(make_loop_relay, upstream, pki):
    """The one log line per message: a client that vanished while the upstream answered
    its DATA left none (the transaction had left the session for DATA)."""
    upstream.behaviour.data_delay = 3.0
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    assert reply(client, "RCPT TO:<u@example.net>")[0] == 250
    assert reply(client, "DATA")[0] == 354
    client.send(message() + b".\r\n")
    wait_until(lambda: "DATA" in upstream.commands)
    vanish(client)
    line = relay.wait_log(lambda e: e.get("event") == "message" and e.get("msg") == "cancelled")
    assert line["reason"] == "session ended before the reply to DATA"
    assert line["recipients"] == 1 and line["user"] == "app"


@in_thread
def test_spool_entry_of_a_client_gone_while_it_is_written_is_not_kept(
    make_loop_relay, upstream, pki, tmp_path, monkeypatch
):
    """Spool mode, a message over 256 KiB (written in a thread): the client vanishes while
    the thread writes. The entry stayed, locked by a descriptor nobody closed: no worker
    could deliver or remove it, and the next start delivered a message whose client had
    been told nothing (its retry: a duplicate). Now it goes, as after a failed journal
    append."""
    writing, release = threading.Event(), threading.Event()
    write_locked = store._write_locked

    def gated_write(path, data):
        writing.set()
        release.wait(30)
        return write_locked(path, data)

    monkeypatch.setattr(store, "_write_locked", gated_write)
    relay = make_loop_relay(upstream.port, start=False)
    spool = tmp_path / "spool"
    relay.config["queue"] = {"mode": "spool", "dir": str(spool)}
    relay.start()
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    assert reply(client, "RCPT TO:<u@example.net>")[0] == 250
    assert reply(client, "DATA")[0] == 354
    client.send(message(body="x" * 76 + "\r\n") + (b"y" * 76 + b"\r\n") * 4000 + b".\r\n")
    assert writing.wait(30)
    vanish(client)
    wait_until(lambda: relay.metric("relay_sessions_active") == 0)
    release.set()
    wait_until(lambda: not list((spool / "entries").iterdir()))
    assert submit(relay, pki) == {}
    assert len(upstream.wait_for(1)) == 1
    time.sleep(1)
    assert len(upstream.messages) == 1


@in_thread
def test_an_upstream_refusal_of_many_lines_reaches_the_client_as_one_short_line(make_loop_relay, upstream, pki):
    """An upstream refused with 200 lines of text: folded into one reply line of 16 KB, which
    Python's smtplib (and any client with a line buffer) cannot read: the refusal became
    a client-side error. RFC 5321 §4.5.3.1.5: 512 octets."""
    lines = [f"550-5.1.1 line {i} " + "x" * 60 for i in range(200)]
    upstream.behaviour.rcpt_replies["long@example.net"] = "\r\n".join([*lines, "550 5.1.1 the end"])
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    code, text = reply(client, "RCPT TO:<long@example.net>")
    assert (code, text[:5]) == (550, "5.1.1")
    assert len(text) + 4 <= 510
    client.quit()


@in_thread
def test_a_header_of_many_tiny_fields_is_charged_to_the_data_budget(make_loop_relay, upstream, pki):
    """Parsing makes an object of every header field: 500 KB of "a:x" fields took ~25 MB,
    and a 25 MB message of them over 1 GB, outside what clients.max_bytes_in_flight
    bounds. Their cost is charged to that budget: a header that alone exceeds it is refused
    for good (552 5.3.4); one that fits passes, and the budget comes back whole."""
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["clients"]["max_bytes_in_flight"] = "8MiB"
    relay.start()
    client = connect(relay, pki)
    for fields, expected in [(100_000, 552), (10_000, 250)]:
        assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
        assert reply(client, "RCPT TO:<u@example.net>")[0] == 250
        code, text = client.data(b"a:x\r\n" * fields + message())
        assert code == expected, text
    assert len(upstream.wait_for(1)) == 1
    assert relay.metric("relay_data_bytes_in_flight") == 0
    client.quit()


@in_thread
def test_an_ehlo_name_that_is_not_utf8_is_refused(make_loop_relay, upstream, pki):
    """EHLO with bytes that are not UTF-8 was taken (as lone surrogates); with
    `received_header: full` every message of that session then failed to encode its
    Received: header: 451 Internal error, and its upstream transaction was never ended."""
    relay = make_loop_relay(upstream.port, received_header="full")
    client = connect(relay, pki)
    client.send(b"EHLO host\xff\xfe.test\r\n")
    code, text = client.getreply()
    assert (code, text.decode()[:5]) == (501, "5.5.4")
    assert client.ehlo("client.test")[0] == 250
    client.login("app", APP_PASSWORD)
    client.sendmail("app@example.com", ["u@example.net"], message())
    assert len(upstream.wait_for(1)) == 1
    client.quit()


@in_thread
def test_an_upstream_that_drops_a_waiting_transaction_frees_its_pool_slot(make_loop_relay, pki):
    """A client holds MAIL and RCPT and then waits (under session_timeout, or with NOOPs):
    its upstream transaction holds a pool slot. The upstream drops the idle session (RFC
    5321 §4.5.3.2.7); the slot stayed taken until the client's next command, up to
    max_session_duration, and `max_connections` such clients left everyone else with
    451 4.4.5. Now the slot is freed when the upstream goes; the waiting client's DATA
    gets 451 4.4.2."""
    with Upstream(tls="starttls", server_context=pki.server_context(), idle_timeout=1.0) as upstream:
        relay = make_loop_relay(upstream.port, start=False)
        relay.config["upstream"]["pool"] = {"max_connections": 1, "acquire_timeout": "5s"}
        relay.start()
        waiting = connect(relay, pki)
        assert reply(waiting, "MAIL FROM:<app@example.com>")[0] == 250
        assert reply(waiting, "RCPT TO:<u@example.net>")[0] == 250
        wait_until(lambda: busy_upstream_connections(relay) == 0)
        assert submit(relay, pki) == {}
        code, text = waiting.data(message())
        assert (code, text.decode()[:5]) == (451, "4.4.2")
        assert len(upstream.wait_for(1)) == 1


# What a client sends that goes through aiosmtpd's command, hook and AUTH mechanism tables
# (made once per class pair by relay.listen.patches, patch 7): each line, and its reply.
_TABLE_SCRIPT = (
    "HELP",
    "HELP MAIL",
    "HELP mail",
    "HELP NOSUCH",
    "NOOP",
    "XYZZY",
    "VRFY <a@example.net>",
    "EXPN staff",
    "AUTH",
    "AUTH CRAM-MD5",
    "AUTH XOAUTH2 dGVzdA==",
    "AUTH LOGIN",
    base64.b64encode(b"app").decode(),
    base64.b64encode(APP_PASSWORD.encode()).decode(),
    "AUTH PLAIN",
    "MAIL FROM:<app@example.com>",
    "HELP RCPT",
    "RSET",
)


@in_thread
def test_commands_and_auth_mechanisms_answer_as_with_aiosmtpds_own_tables(make_loop_relay, upstream, pki):
    """The same lines, over real sockets, to a session with the tables patch 7 makes and to
    one with aiosmtpd's own (it builds them itself while mail.log logs INFO): every reply
    the same, AUTH LOGIN in two steps included."""
    relay = make_loop_relay(upstream.port)
    mail_log = logging.getLogger("mail.log")
    level = mail_log.level
    transcripts = []
    for own_tables in (False, True):
        mail_log.setLevel(logging.INFO if own_tables else logging.WARNING)
        try:
            client = connect(relay, pki, login=False)
        finally:
            mail_log.setLevel(level)
        transcripts.append([reply(client, line) for line in _TABLE_SCRIPT])
        client.quit()
    patched, aiosmtpds = transcripts
    assert patched == aiosmtpds
    replies = dict(zip(_TABLE_SCRIPT, patched, strict=True))
    assert replies["HELP"][0] == 250 and "MAIL" in replies["HELP"][1]
    assert replies["HELP MAIL"][0] == 250 and replies["HELP NOSUCH"][0] == 501
    assert replies["XYZZY"][0] == 500
    assert replies[_TABLE_SCRIPT[13]] == (235, "2.7.0 Authentication successful")
    assert replies["MAIL FROM:<app@example.com>"][0] == 250
