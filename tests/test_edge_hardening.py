"""Hostile clients at the SMTP edge: header injection through EHLO, PROXY headers from
anyone, slow clients that never finish, STARTTLS twice, passwords typed as usernames, and
transactions that end without DATA."""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
import time
import uuid

import pytest

from tests.support.config import APP_PASSWORD
from tests.support.inloop import in_thread
from tests.support.smtp import connect, message, reply
from tests.test_edge import proxied_session


def _line(sock: socket.socket | ssl.SSLSocket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def _reply(sock: socket.socket | ssl.SSLSocket) -> list[bytes]:
    lines = []
    while True:
        line = _line(sock)
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            return lines


# -- header injection (RFC 5321 §4.1.1.1: EHLO takes a domain or an address literal) -----


@pytest.mark.parametrize("hostname", [b"evil\rX-Injected: yes", b"evil\x0bX-Injected: yes", b"evil X-Injected: yes"])
@in_thread
def test_ehlo_hostname_cannot_inject_a_header(make_loop_relay, upstream, pki, hostname):
    relay = make_loop_relay(upstream.port, received_header="full")
    sock = socket.create_connection(("127.0.0.1", relay.port("submissions")), timeout=20)
    tls = pki.client_context().wrap_socket(sock, server_hostname="localhost")
    assert _reply(tls)[0].startswith(b"220 ")
    tls.sendall(b"EHLO " + hostname + b"\r\n")
    assert _reply(tls)[-1].startswith(b"501 5.5.4 ")
    # The client may carry on with a proper name; nothing of the bad one reaches a header.
    tls.sendall(b"EHLO client.test\r\n")
    assert _reply(tls)[-1].startswith(b"250 ")
    blob = base64.b64encode(b"\0app\0" + APP_PASSWORD.encode())
    tls.sendall(b"AUTH PLAIN " + blob + b"\r\n")
    assert _reply(tls)[0].startswith(b"235 ")
    tls.sendall(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<u@example.net>\r\nDATA\r\n")
    assert [_reply(tls)[0][:3] for _ in range(3)] == [b"250", b"250", b"354"]
    tls.sendall(message(subject="injection") + b"\r\n.\r\n")
    assert _reply(tls)[0].startswith(b"250 ")
    [got] = upstream.wait_for(1)
    header = got.content.split(b"\r\n\r\n")[0]
    assert b"X-Injected" not in header
    assert b"Received: from client.test ([127.0.0.1])" in header


# -- PROXY protocol only from the balancer's addresses -------------------------------------


@in_thread
def test_proxy_header_is_taken_only_from_proxy_protocol_from(make_loop_relay, upstream):
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["listeners"][0]["proxy_protocol"] = True
    relay.config["listeners"][0]["proxy_protocol_from"] = ["127.0.0.2/32"]
    relay.config["clients"]["networks"] = ["10.1.0.0/16"]
    relay.start()
    port = relay.port("submission")
    # From the balancer's address: the header is taken, the client is the one it names.
    balancer = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0))
    with balancer:
        balancer.sendall(b"PROXY TCP4 10.1.2.3 10.0.0.1 40000 587\r\n")
        assert balancer.recv(1024).startswith(b"220 relay.test ESMTP")
    # From anywhere else, the same header is refused: it would let anyone pick an address
    # inside clients.networks.
    with proxied_session(port, "10.1.2.3") as intruder:
        intruder.settimeout(15)
        assert intruder.recv(1024) == b"554 5.7.1 Access denied: PROXY header not accepted from this address\r\n"
        assert intruder.recv(1024) == b""  # FIN, not a reset (see smtp._Linger)
    line = relay.wait_log(lambda e: e.get("event") == "session_refused" and e.get("client") == "127.0.0.1")
    assert "proxy_protocol_from" in line["reason"]
    assert relay.metric("relay_sessions_refused_total", reason="proxy_source") == 1


@in_thread
def test_proxy_protocol_from_needs_proxy_protocol(make_loop_relay, upstream, tmp_path):
    import subprocess
    import sys

    import yaml

    relay = make_loop_relay(upstream.port, start=False)
    relay.config["listeners"][0]["proxy_protocol_from"] = ["10.0.0.0/8"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(relay.config))
    result = subprocess.run(
        [sys.executable, "-m", "relay", "config", "validate", "-c", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "listeners[0].proxy_protocol_from: needs proxy_protocol" in result.stdout + result.stderr


# -- slowloris: the whole DATA phase and the whole session are bounded ---------------------


@in_thread
def test_data_phase_is_bounded_as_a_whole(make_loop_relay, upstream, pki):
    """A body dripped one short line at a time resets any per-read timer; the DATA phase as
    a whole still ends (421 4.4.2), the upstream transaction is dropped, nothing is sent."""
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["clients"]["data_timeout"] = "2s"
    relay.start()
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    assert reply(client, "RCPT TO:<u@example.net>")[0] == 250
    assert reply(client, "DATA")[0] == 354
    sock = client.sock
    sock.sendall(b"From: app@example.com\r\nSubject: drip\r\n\r\n")
    answer = b""
    for _ in range(150):  # up to 30 s of dripping, far beyond the 2 s limit
        try:
            sock.sendall(b"a.\r\n")
        except OSError:
            break
        time.sleep(0.2)
        sock.setblocking(False)
        try:
            answer += sock.recv(1024)
        except (BlockingIOError, ssl.SSLWantReadError):
            pass
        finally:
            sock.setblocking(True)
        if answer:
            break
    assert answer.startswith(b"421 4.4.2 "), answer
    assert upstream.messages == []
    line = relay.wait_log(lambda e: e.get("event") == "message" and e.get("code") == 421)
    assert line["recipients"] == 1


@in_thread
def test_session_is_bounded_as_a_whole(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["clients"]["max_session_duration"] = "3s"
    relay.start()
    client = connect(relay, pki)
    answer = None
    for _ in range(150):  # NOOP every 0.2 s for up to 30 s
        try:
            code, text = client.noop()
        except smtplib.SMTPServerDisconnected:
            break
        if code != 250:
            answer = (code, text)
            break
        time.sleep(0.2)
    assert answer is not None and answer[0] == 421 and answer[1].startswith(b"4.4.2 "), answer


# -- STARTTLS inside TLS --------------------------------------------------------------------


@in_thread
def test_second_starttls_is_refused_without_a_traceback(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki, login=False)
    assert reply(client, "STARTTLS") == (503, "5.5.1 TLS already active")
    assert client.noop()[0] == 250
    client.quit()
    time.sleep(0.5)
    assert "Traceback" not in relay.log_text()
    assert not [e for e in relay.logs() if e.get("level") == "error"]


# -- a password typed into the username field is not logged --------------------------------


@in_thread
def test_failed_auth_logs_only_configured_usernames(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    typed_password = "Pw-" + uuid.uuid4().hex
    client = connect(relay, pki, login=False)
    blob = base64.b64encode(b"\0" + typed_password.encode() + b"\0" + APP_PASSWORD.encode()).decode()
    assert reply(client, "AUTH PLAIN " + blob)[0] == 535
    blob = base64.b64encode(b"\0app\0wrong").decode()
    assert reply(client, "AUTH PLAIN " + blob)[0] == 535
    failures = [e for e in relay.logs() if e.get("msg") == "authentication failed"]
    assert len(failures) == 2
    assert typed_password not in relay.log_text()
    unknown, known = failures
    assert unknown.get("user") is None and unknown.get("user_hash")
    assert known["user"] == "app"


# -- a transaction that ends without DATA gets its log line ----------------------------------


@pytest.mark.parametrize("ending", ["RSET", "QUIT", "disconnect"])
@in_thread
def test_cancelled_transaction_gets_its_log_line(make_loop_relay, upstream, pki, ending):
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    assert reply(client, "RCPT TO:<u@example.net>")[0] == 250
    if ending == "RSET":
        assert client.rset()[0] == 250
    elif ending == "QUIT":
        client.quit()
    else:
        client.close()  # the socket goes without QUIT
    line = relay.wait_log(lambda e: e.get("event") == "message" and e.get("msg") == "cancelled")
    assert line["id"] and line["user"] == "app" and line["recipients"] == 1
    assert line["code"] is None
    assert ending.lower() in line["reason"].lower()
