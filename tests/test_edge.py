"""Edge behaviour: PROXY protocol behind a load balancer, the Received: header, and several
worker processes sharing the listeners."""

from __future__ import annotations

import signal
import socket
import time

from tests.support.inloop import in_thread
from tests.support.smtp import connect, message


def proxied_session(port: int, src: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"PROXY TCP4 {src} 10.0.0.1 40000 587\r\n".encode())
    return sock


@in_thread
def test_proxy_protocol_uses_the_client_address_from_the_header(make_loop_relay, upstream):
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["listeners"][0]["proxy_protocol"] = True
    relay.config["clients"]["networks"] = ["10.1.0.0/16"]
    relay.start()
    port = relay.port("submission")
    with proxied_session(port, "10.1.2.3") as allowed:
        assert allowed.recv(1024).startswith(b"220 relay.test ESMTP")
    with proxied_session(port, "192.0.2.77") as refused:
        assert refused.recv(1024) == b"554 5.7.1 Access denied: this client may not use this relay\r\n"
    line = relay.wait_log(lambda e: e.get("event") == "session_refused")
    assert line["client"] == "192.0.2.77"
    # Without the header the connection is dropped: a proxy_protocol listener must sit
    # behind a load balancer that sends it.
    with socket.create_connection(("127.0.0.1", port), timeout=15) as bare:
        bare.sendall(b"EHLO x\r\n")
        assert bare.recv(1024) == b""


@in_thread
def test_received_header_hides_the_client_by_default(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message())
    [got] = upstream.wait_for(1)
    received = [line for line in got.content.split(b"\r\n\r\n")[0].split(b"\r\n") if line.startswith(b"Received:")]
    header = got.content.split(b"\r\n\r\n")[0]
    assert b"Received: by relay.test (relay) with ESMTPSA (TLSv1.3)" in header
    assert b"127.0.0.1" not in header and b"client.test" not in header
    assert len(received) == 1


@in_thread
def test_received_header_full_names_the_client(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port, received_header="full")
    connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message())
    [got] = upstream.wait_for(1)
    assert b"Received: from client.test ([127.0.0.1])" in got.content


def test_workers_share_the_ports_and_the_metrics(make_relay, upstream, pki):
    relay = make_relay(upstream.port, start=False)
    relay.args = ["--workers", "2"]
    relay.start()
    children = _children(relay.proc.pid)
    assert len(children) == 2, children
    # Both workers serve, signal handlers in place (a worker still starting dies of a SIGHUP).
    _wait_for_lines(relay, "metrics and health listening", 2, "both workers start")
    for i in range(12):
        connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message(subject=f"w{i}"))
    assert len(upstream.wait_for(12)) == 12
    # Whichever worker answers the scrape, it reports every worker's messages.
    for _ in range(4):
        assert relay.metric("relay_messages_relayed_total") == 12
    served = [e for e in relay.message_logs() if e.get("code") == 250]
    relay.signal(signal.SIGHUP)
    _wait_for_lines(relay, "configuration reloaded", 2, "both workers reload on SIGHUP")
    assert relay.stop() == 0
    assert not any(_alive(pid) for pid in children)
    assert len(served) == 12  # every message was logged once, by the worker that relayed it


def _wait_for_lines(relay, msg: str, count: int, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sum(1 for e in relay.logs() if e.get("msg") == msg) < count:
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _children(pid: int) -> list[int]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            kids = [int(p) for p in fh.read().split()]
        if len(kids) >= 2:
            return kids
        time.sleep(0.1)
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@in_thread
def test_quit_gets_221_with_an_enhanced_code(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    assert client.quit() == (221, b"2.0.0 Bye")
