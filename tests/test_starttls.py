"""STARTTLS (RFC 3207) on the event loop's TLS transport: the session starts over, plaintext
pipelined after the command is discarded, and a handshake that fails, stalls or is abandoned
ends the session cleanly. The in-process tests run on asyncio's loop; the process tests on
uvloop (what `relay serve` uses), whose TLS transport is another implementation."""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from relay.listen import smtp as relay_smtp
from tests.support.config import APP_PASSWORD, loopback_bind
from tests.support.inloop import in_thread
from tests.support.smtp import connect, reply


def _reply(sock: socket.socket | ssl.SSLSocket) -> list[bytes]:
    """One SMTP reply, all its lines."""
    lines: list[bytes] = []
    data = b""
    while True:
        chunk = sock.recv(1)
        if not chunk:
            lines.append(data)
            return lines
        data += chunk
        if data.endswith(b"\r\n"):
            lines.append(data)
            if data[3:4] != b"-":
                return lines
            data = b""


def _plain_session(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    assert _reply(sock)[0].startswith(b"220 ")
    sock.sendall(b"EHLO client.test\r\n")
    assert b"STARTTLS" in b"".join(_reply(sock))
    return sock


def _wait_closed(relay, tls_version: str) -> None:
    """The session ended once, counted with the TLS version it reached; nothing left open."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if relay.metric("relay_sessions_total", listener="submission") >= 1:
            break
        time.sleep(0.05)
    time.sleep(0.2)
    assert relay.metric("relay_sessions_total", listener="submission", tls=tls_version) == 1
    assert relay.metric("relay_sessions_total", listener="submission") == 1
    assert relay.metric("relay_sessions_active", listener="submission") == 0
    assert "Traceback" not in relay.log_text()
    assert not [e for e in relay.logs() if e.get("level") == "error"]


def _injection_is_discarded(relay, pki) -> None:
    sock = _plain_session(relay.port("submission"))
    # CVE-2011-0411: a man in the middle appends a command after STARTTLS in the clear.
    sock.sendall(b"STARTTLS\r\nQUIT\r\n")
    assert _reply(sock) == [b"220 2.0.0 Ready to start TLS\r\n"]
    tls = pki.client_context().wrap_socket(sock, server_hostname="localhost")
    tls.sendall(b"NOOP\r\n")
    # The injected QUIT would have been answered 221 and closed the session.
    assert _reply(tls) == [b"250 2.0.0 OK\r\n"]
    tls.sendall(b"QUIT\r\n")
    assert _reply(tls)[0].startswith(b"221 ")
    tls.close()


@in_thread
def test_plaintext_pipelined_after_starttls_is_discarded(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    _injection_is_discarded(relay, pki)
    _wait_closed(relay, "TLSv1.3")


def test_plaintext_pipelined_after_starttls_is_discarded_on_uvloop(make_relay, upstream, pki):
    relay = make_relay(upstream.port)
    _injection_is_discarded(relay, pki)
    assert "Traceback" not in relay.log_text()


@in_thread
def test_session_starts_over_after_starttls(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    sock = _plain_session(relay.port("submission"))
    sock.sendall(b"STARTTLS\r\n")
    assert _reply(sock) == [b"220 2.0.0 Ready to start TLS\r\n"]
    tls = pki.client_context().wrap_socket(sock, server_hostname="localhost")
    # RFC 3207 §4.2: the EHLO given before TLS is forgotten.
    tls.sendall(b"MAIL FROM:<app@example.com>\r\n")
    assert _reply(tls) == [b"503 5.5.1 Send EHLO first\r\n"]
    tls.sendall(b"EHLO client.test\r\n")
    ehlo = b"".join(_reply(tls))
    assert b"AUTH PLAIN LOGIN" in ehlo and b"STARTTLS" not in ehlo
    tls.sendall(b"STARTTLS\r\n")
    assert _reply(tls) == [b"503 5.5.1 TLS already active\r\n"]
    tls.sendall(b"QUIT\r\n")
    assert _reply(tls)[0].startswith(b"221 ")
    tls.close()
    _wait_closed(relay, "TLSv1.3")


@in_thread
def test_starttls_with_an_argument_is_a_syntax_error(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki, tls=False, login=False)
    assert reply(client, "STARTTLS now") == (501, "5.5.4 Syntax: STARTTLS")
    client.starttls(context=pki.client_context())
    client.ehlo("client.test")
    client.login("app", APP_PASSWORD)
    assert client.noop()[0] == 250
    client.quit()
    _wait_closed(relay, "TLSv1.3")


def _abandon_handshake(port: int, how: str) -> None:
    sock = _plain_session(port)
    sock.sendall(b"STARTTLS\r\n")
    assert _reply(sock) == [b"220 2.0.0 Ready to start TLS\r\n"]
    if how == "partial hello":
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello cut short
    elif how == "plaintext":
        sock.sendall(b"EHLO client.test\r\n")  # no TLS at all: the handshake fails
        assert sock.recv(100) is not None  # an alert, or the close
    sock.close()


@pytest.mark.parametrize("how", ["partial hello", "plaintext", "nothing"])
@in_thread
def test_client_vanishing_mid_handshake_ends_the_session(make_loop_relay, upstream, pki, how):
    relay = make_loop_relay(upstream.port)
    _abandon_handshake(relay.port("submission"), how)
    _wait_closed(relay, "none")


@pytest.mark.parametrize("how", ["partial hello", "plaintext", "nothing"])
def test_client_vanishing_mid_handshake_on_uvloop(make_relay, upstream, pki, how):
    relay = make_relay(upstream.port)
    for _ in range(3):
        _abandon_handshake(relay.port("submission"), how)
    # The relay still serves, and said nothing about the abandoned handshakes.
    client = connect(relay, pki)
    assert client.noop()[0] == 250
    client.quit()
    assert "Traceback" not in relay.log_text()
    assert not [e for e in relay.logs() if e.get("level") in ("error", "critical")]


@in_thread
def test_stalled_handshake_ends_at_the_handshake_timeout(make_loop_relay, upstream, pki, monkeypatch):
    monkeypatch.setattr(relay_smtp, "TLS_HANDSHAKE_TIMEOUT", 0.5)
    relay = make_loop_relay(upstream.port)
    sock = _plain_session(relay.port("submission"))
    sock.sendall(b"STARTTLS\r\n")
    assert _reply(sock) == [b"220 2.0.0 Ready to start TLS\r\n"]
    # No ClientHello: the relay closes (session_timeout is minutes; the socket's timeout 20 s).
    assert sock.recv(100) == b""
    sock.close()
    _wait_closed(relay, "none")


def _starttls_session(
    port: int, context: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[ssl.SSLSession, bool]:
    """One STARTTLS session offering `session` for resumption: (its session, resumed?)."""
    sock = _plain_session(port)
    sock.sendall(b"STARTTLS\r\n")
    assert _reply(sock) == [b"220 2.0.0 Ready to start TLS\r\n"]
    tls = context.wrap_socket(sock, server_hostname="localhost", session=session)
    tls.sendall(b"EHLO client.test\r\n")
    assert _reply(tls)[-1].startswith(b"250 ")  # the TLS 1.3 ticket came before this reply
    tls.sendall(b"QUIT\r\n")
    _reply(tls)
    got, resumed = tls.session, tls.session_reused
    tls.close()
    assert got is not None
    return got, resumed


def test_sessions_resume_on_any_worker(make_relay, upstream, pki):
    """The workers share one ticket key (the TLS context is made before they fork), so a
    client resumes whichever worker SO_REUSEPORT gives it. With a key per worker, about
    half of these would be full handshakes."""
    relay = make_relay(upstream.port, start=False)
    relay.args = ["--workers", "2"]
    relay.start()
    context = pki.client_context()
    session, resumed = _starttls_session(relay.port("submission"), context, None)
    assert not resumed
    outcomes = []
    for _ in range(12):
        session, resumed = _starttls_session(relay.port("submission"), context, session)
        outcomes.append(resumed)
    assert all(outcomes), outcomes
    assert relay.metric("relay_sessions_total", listener="submission") == 13


@in_thread
def test_starttls_on_a_listener_without_tls_is_454(make_loop_relay, upstream, pki):
    # Not offered in EHLO, but a client may send it anyway: RFC 3207 §4's 454, and the
    # session goes on (it was an AssertionError logged as a session error).
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["listeners"].append({"name": "plain", "bind": loopback_bind(), "tls": "none", "auth": "none"})
    relay.start()
    sock = socket.create_connection(("127.0.0.1", relay.port("plain")), timeout=20)
    assert _reply(sock)[0].startswith(b"220 ")
    sock.sendall(b"EHLO client.test\r\n")
    assert b"STARTTLS" not in b"".join(_reply(sock))
    sock.sendall(b"STARTTLS\r\n")
    assert _reply(sock) == [b"454 4.7.0 TLS not available\r\n"]
    sock.sendall(b"NOOP\r\n")
    assert _reply(sock)[0].startswith(b"250 ")
    sock.close()
    assert not [e for e in relay.logs() if e.get("level") == "error"]
