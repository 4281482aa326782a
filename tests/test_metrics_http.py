"""The metrics port under clients that are not Prometheus: curl -I, hand-typed requests,
methods it does not serve, oversized heads. Real sockets against the real HealthServer."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time

import pytest

from relay import server
from relay.observe.http import HealthServer
from tests.support.inloop import in_thread
from tests.support.proxies import microsocks
from tests.support.smtp import submit


@pytest.fixture
async def health_server():
    server = HealthServer(lambda: {"listeners": None})
    await server.start("127.0.0.1", 0)
    try:
        yield server, server.sockets()[0].getsockname()[:2]
    finally:
        await server.stop()


@pytest.fixture
def health(health_server):
    return health_server[1]


async def exchange(addr: tuple[str, int], request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(request)
        # A bound, not a measure: the server closes each connection after its answer.
        return await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()


async def test_head_is_get_without_the_body(health):
    answer = await exchange(health, b"HEAD /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length: 16\r\n" in head + b"\r\n"  # the length GET's body has
    assert body == b""


async def test_a_method_it_does_not_serve_is_told_which_it_does(health):
    answer = await exchange(health, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    head = answer.partition(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"HTTP/1.1 405 Method Not Allowed"
    assert b"Allow: GET, HEAD" in head  # RFC 9110 §15.5.6


async def test_a_request_with_bare_lf_line_ends_is_answered(health):
    # printf 'GET /healthz HTTP/1.0\n\n' | nc ...: answered at once, not after the timeout.
    answer = await exchange(health, b"GET /healthz HTTP/1.0\nHost: relay\n\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b'{"status": "ok"}')


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /" + b"a" * 1_000_000 + b" HTTP/1.1\r\n\r\n",  # a 1 MB request line
        b"GET /healthz HTTP/1.1\r\n" + (b"X-Pad: " + b"p" * 100 + b"\r\n") * 100 + b"\r\n",  # many fields
        b"\r\n" * 10_000,  # empty lines only, never a request
    ],
    ids=["long-line", "long-head", "empty-lines"],
)
async def test_a_head_over_8_kib_is_a_400(health, request_head):
    try:
        answer = await exchange(health, request_head)
    except ConnectionResetError:
        answer = None  # closed with the rest of the 1 MB unread: the kernel's RST may come first
    if answer is not None:
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert (await exchange(health, b"GET /healthz HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200 OK\r\n")


# -- /readyz: "keys loaded, upstream path reachable" (PRODUCT.md), while the relay runs ------


@pytest.mark.binaries
@in_thread
def test_readyz_follows_the_upstream_path_and_keeps_keys_loaded_through_a_failed_refresh(
    make_loop_relay, upstream, pki, dkim_keys, tmp_path, monkeypatch
):
    monkeypatch.setattr(server, "UPSTREAM_PROBE_INTERVAL", 0.2)  # the probe runs every 30 s
    key = tmp_path / "s1.key"
    shutil.copyfile(dkim_keys.rsa_path, key)
    key.chmod(0o600)
    with microsocks(tmp_path, user="relay", password="proxy-secret") as proxy_port:
        relay = make_loop_relay(upstream.port, start=False, env={"RELAY_TEST_PROXY_PW": "proxy-secret"})
        relay.config["upstream"]["proxy"] = f"socks5://relay@127.0.0.1:{proxy_port}"
        relay.config["upstream"]["proxy_password"] = "env://RELAY_TEST_PROXY_PW"
        relay.config["dkim"]["keys"][0]["key"] = f"file://{key}"
        relay.config["secrets"] = {"refresh": "1s"}
        relay.start()
        assert relay.http_json("/readyz")[0] == 200
        # The key's secret cannot be read any more: the key loaded stays in use.
        key.unlink()
        wait_until(lambda: relay.metric("relay_secret_refresh_failures_total", secret=f"file://{key}") >= 1)
        status, body = relay.http_json("/readyz")
        assert (status, body["checks"]["dkim_keys"]) == (200, "ok")
        assert submit(relay, pki) == {}
    # The proxy is gone: the upstream path is not reachable.
    wait_until(lambda: relay.http_json("/readyz")[0] == 503)
    checks = relay.http_json("/readyz")[1]["checks"]
    assert checks["dkim_keys"] == "ok" and f"127.0.0.1:{proxy_port}" in checks["upstream"]


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


async def test_many_scrapes_at_once_share_expositions_made_one_at_a_time(health_server, monkeypatch):
    """Fifty clients scraping at once made fifty expositions, up to six at a time in threads
    that compete with the SMTP sessions' event loop for the interpreter. Now one is made at a
    time and the requests that arrive meanwhile share the next (never one older than them)."""
    from relay.observe import http

    server, addr = health_server
    release = threading.Event()
    made: list[int] = []

    def generate(registry):
        made.append(1)
        if len(made) == 1:
            release.wait(60)  # the first exposition is held until every request has arrived
        return b"# exposition\n"

    monkeypatch.setattr(http, "generate_latest", generate)
    arrived = 0
    respond = server._respond

    async def counting(method, path):
        nonlocal arrived
        arrived += 1
        return await respond(method, path)

    server._respond = counting
    answers = [asyncio.ensure_future(exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n")) for _ in range(50)]
    for _ in range(3000):  # bounded: until the server has read every request
        if arrived == 50:
            break
        await asyncio.sleep(0.01)
    release.set()
    for answer in await asyncio.gather(*answers):
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"# exposition\n")
    assert arrived == 50 and len(made) <= 2  # the held one, and one for those that came during it
