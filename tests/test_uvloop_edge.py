"""The edge's own writes on uvloop, the loop `relay serve` runs: uvloop's transports are not
asyncio.WriteTransport subclasses, so a check by class once skipped these replies there while
the in-process tier (asyncio's loop) saw them."""

from __future__ import annotations

import signal
import socket

import pytest

from tests.support.config import loopback_bind

pytestmark = pytest.mark.e2e

CLOSING = b"421 4.3.2 Service shutting down, closing connection\r\n"
REFUSED = b"554 5.7.1 Access denied: PROXY header not accepted from this address\r\n"


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_drain_tells_an_idle_plain_session_to_go_away(make_relay, upstream):
    relay = make_relay(upstream.port, start=False)
    relay.config["listeners"].append({"name": "plain", "bind": loopback_bind(), "tls": "none", "auth": "none"})
    relay.start()
    sock = socket.create_connection(("127.0.0.1", relay.port("plain")), timeout=20)
    with sock:
        assert sock.recv(1024).startswith(b"220 ")
        sock.sendall(b"EHLO client.test\r\n")
        assert b"250 " in sock.recv(4096)
        relay.signal(signal.SIGTERM)
        assert _read_until_closed(sock) == CLOSING
    assert relay.proc.wait(30) == 0


def _proxy_only_from_elsewhere(make_relay, upstream):
    """A relay whose listener takes the PROXY header from 127.0.0.2 only (tests use .1)."""
    relay = make_relay(upstream.port, start=False)
    relay.config["listeners"][0]["proxy_protocol"] = True
    relay.config["listeners"][0]["proxy_protocol_from"] = ["127.0.0.2/32"]
    relay.start()
    return relay


def test_proxy_header_from_elsewhere_gets_its_refusal(make_relay, upstream):
    relay = _proxy_only_from_elsewhere(make_relay, upstream)
    sock = socket.create_connection(("127.0.0.1", relay.port("submission")), timeout=20)
    with sock:
        sock.sendall(b"PROXY TCP4 10.1.2.3 10.0.0.1 40000 587\r\n")
        assert _read_until_closed(sock) == REFUSED
    relay.wait_log(lambda e: e.get("event") == "session_refused" and "proxy_protocol_from" in e.get("reason", ""))
    assert "Traceback" not in relay.log_text()


def test_a_refused_client_that_keeps_sending_still_reads_its_refusal(make_relay, upstream):
    # RFC 1122 §4.2.2.13: closing on unread input sends RST, and the refusal already sent is
    # then lost to the client ("connection reset"). The relay half-closes and drops the rest.
    relay = _proxy_only_from_elsewhere(make_relay, upstream)
    sock = socket.create_connection(("127.0.0.1", relay.port("submission")), timeout=20)
    with sock:
        sock.sendall(b"PROXY TCP4 10.1.2.3 10.0.0.1 40000 587\r\n" + b"EHLO client.test\r\n" * 20_000)
        assert _read_until_closed(sock) == REFUSED
