"""ProxyDialer against real proxies: microsocks (SOCKS5), tinyproxy (HTTP CONNECT), danted
(SOCKS4 and SOCKS5 without auth), on loopback.

Every proxy binds its outgoing side to 127.0.0.2, and the upstreams record their peers: a
peer of 127.0.0.2 proves the traffic went through the proxy. The upstream greeter sends its
greeting right on accept (the case where the greeting follows a CONNECT reply closely, which
a dialer that reads too much loses). Only the HTTP CONNECT reply framing edge cases use a
hand-written fake proxy, since no real proxy can be made to split its reply on demand.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage

import aiosmtplib
import pytest
import trustme
from aiosmtpd.controller import Controller
from prometheus_client import REGISTRY

from relay.deliver.dial import DirectDialer
from relay.errors import SmtpError
from relay.proxy import FAILURE_LABELS, SCHEMES, ProxyDialer, dialer_for
from tests.support.procs import (
    MissingBinaryError,
    ProcessError,
    dead_port,
    free_port,
    holding_dead_ports,
    require_binary,
    reserved_port,
    running,
    wait_port,
)

pytestmark = pytest.mark.binaries

GREETING = b"220 upstream.test ESMTP greeter ready\r\n"
PROXY_USER = "user"
PROXY_PASSWORD = "pA55-w0rd-Zq7"  # distinctive: must never show up in any text
WRONG_PASSWORD = "wr0ng-Secret-Xk9"
EGRESS_IP = "127.0.0.2"  # every real proxy binds its outgoing connections here
LOOP = "127.0.0.1"
CLIENT_NAME = "relay.test"  # our EHLO name


# -- upstream servers --------------------------------------------------------------------


@dataclass
class Ports:
    # Held from the start of the module (the proxies' configs name them) until their servers
    # listen: a free_port() could be taken meanwhile by a port-0 listener or an outgoing
    # connection, and a tunnel then reach it.
    greeter: int = field(default_factory=reserved_port)
    smtp: int = field(default_factory=reserved_port)  # plain SMTP, STARTTLS offered
    smtps: int = field(default_factory=reserved_port)  # implicit TLS
    forbidden: int = field(default_factory=dead_port)  # no proxy lets a tunnel go there
    closed: int = field(default_factory=dead_port)  # nothing ever listens here


@pytest.fixture(scope="module")
def ports() -> Iterator[Ports]:
    with holding_dead_ports():
        yield Ports()


@dataclass
class Greeter:
    port: int
    peers: list[str] = field(default_factory=list)


@pytest.fixture
async def greeter(ports: Ports):
    """An upstream that sends its greeting the moment it accepts, then waits for EOF."""
    state = Greeter(ports.greeter)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.peers.append(writer.get_extra_info("peername")[0])
        writer.write(GREETING)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, LOOP, ports.greeter, reuse_port=True)  # reserved_port()
    async with server:
        yield state
        server.close()


@dataclass
class Received:
    peer: str
    tls: bool
    mail_from: str
    rcpt_tos: list[str]
    content: bytes


class Recorder:
    def __init__(self) -> None:
        self.messages: list[Received] = []

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802
        self.messages.append(
            Received(
                peer=session.peer[0],
                # session.ssl: after STARTTLS; the transport's ssl_object: implicit TLS
                tls=session.ssl is not None or server.transport.get_extra_info("ssl_object") is not None,
                mail_from=envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                content=envelope.original_content,
            )
        )
        return "250 2.0.0 OK queued"


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def client_tls(tls_ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    tls_ca.configure_trust(ctx)
    return ctx


class ReservedPortController(Controller):
    """aiosmtpd's Controller listening with SO_REUSEPORT, on a `reserved_port()`."""

    def _create_server(self):
        return self.loop.create_server(
            self._factory_invoker, host=self.hostname, port=self.port, ssl=self.ssl_context, reuse_port=True
        )


@pytest.fixture(scope="module")
def smtp_upstream(ports: Ports, tls_ca: trustme.CA):
    """Real aiosmtpd servers: plain with STARTTLS, and implicit TLS; certificate for
    'localhost' only (not for 127.0.0.1), so TLS passes only when aiosmtplib checks the
    upstream's name."""
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("localhost").configure_cert(server_tls)
    recorder = Recorder()
    # explicit names everywhere: no getfqdn() lookups (no DNS in tests)
    common = {"hostname": LOOP, "server_hostname": "upstream.test"}
    plain = ReservedPortController(recorder, port=ports.smtp, tls_context=server_tls, **common)
    implicit = ReservedPortController(recorder, port=ports.smtps, ssl_context=server_tls, **common)
    plain.start()
    try:
        implicit.start()
        try:
            yield recorder
        finally:
            implicit.stop()
    finally:
        plain.stop()


# -- real proxies ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def microsocks(tmp_path_factory, ports: Ports) -> str:
    """SOCKS5 with user/password; yields host:port."""
    binary = require_binary("microsocks")
    port = free_port()
    log = tmp_path_factory.mktemp("microsocks") / "microsocks.log"
    argv = [
        binary,
        "-i",
        LOOP,
        "-p",
        str(port),
        "-u",
        PROXY_USER,
        "-P",
        PROXY_PASSWORD,
        "-b",
        EGRESS_IP,
    ]
    with running(argv, ready=(LOOP, port), log_path=log):
        yield f"{LOOP}:{port}"


@pytest.fixture(scope="module")
def tinyproxy(tmp_path_factory, ports: Ports) -> str:
    """HTTP CONNECT with Basic auth, tunnels only to the upstream test ports; yields host:port."""
    binary = require_binary("tinyproxy")
    port = free_port()
    workdir = tmp_path_factory.mktemp("tinyproxy")
    conf = workdir / "tinyproxy.conf"
    conf.write_text(
        "\n".join(
            [
                f"Listen {LOOP}",
                f"Port {port}",
                f"Bind {EGRESS_IP}",
                f"Allow {LOOP}",
                f"BasicAuth {PROXY_USER} {PROXY_PASSWORD}",
                # tinyproxy allows CONNECT to 443 and 563 only unless told otherwise
                f"ConnectPort {ports.greeter}",
                f"ConnectPort {ports.smtp}",
                f"ConnectPort {ports.smtps}",
                "Timeout 60",
                "MaxClients 50",
                "LogLevel Info",
                f'PidFile "{workdir / "tinyproxy.pid"}"',
                "",
            ]
        )
    )
    with running([binary, "-d", "-c", str(conf)], ready=(LOOP, port), log_path=workdir / "tinyproxy.log"):
        yield f"{LOOP}:{port}"


@pytest.fixture(scope="module")
def danted(tmp_path_factory, ports: Ports) -> str:
    """Dante: SOCKS4 and SOCKS5 without authentication, tunnels only to the upstream test
    ports (anything else gets a ruleset refusal); yields host:port."""
    binary = require_binary("danted")
    port = free_port()
    workdir = tmp_path_factory.mktemp("danted")
    conf = workdir / "danted.conf"
    allowed = "\n".join(
        f"socks pass {{\n  from: 127.0.0.1/32 to: 127.0.0.1/32 port = {p}\n  command: connect\n  protocol: tcp\n}}"
        for p in (ports.greeter, ports.smtp, ports.smtps)
    )
    conf.write_text(
        f"""logoutput: stderr
internal: {LOOP} port = {port}
external: {EGRESS_IP}
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{
  from: 127.0.0.1/32 to: 0.0.0.0/0
}}
{allowed}
socks block {{
  from: 0.0.0.0/0 to: 0.0.0.0/0
  log: error
}}
"""
    )
    argv = [binary, "-f", str(conf), "-p", str(workdir / "danted.pid"), "-N", "1"]
    with running(argv, ready=(LOOP, port), log_path=workdir / "danted.log"):
        yield f"{LOOP}:{port}"


# Through every real proxy: (id, fixture, url template, password override, upstream host)
ROUTES = [
    (
        "socks5-url-password",
        "microsocks",
        f"socks5://{PROXY_USER}:{PROXY_PASSWORD}@{{}}",
        None,
        LOOP,
    ),
    ("socks5-secret", "microsocks", f"socks5://{PROXY_USER}@{{}}", PROXY_PASSWORD, "localhost"),
    ("socks5h", "microsocks", f"socks5h://{PROXY_USER}@{{}}", PROXY_PASSWORD, "localhost"),
    ("socks5-noauth", "danted", "socks5://{}", None, LOOP),
    ("socks4", "danted", "socks4://{}", None, LOOP),
    ("socks4-userid-localname", "danted", "socks4://someone@{}", None, "localhost"),
    ("http", "tinyproxy", f"http://{PROXY_USER}@{{}}", PROXY_PASSWORD, LOOP),
    (
        "http-url-password",
        "tinyproxy",
        f"http://{PROXY_USER}:{PROXY_PASSWORD}@{{}}",
        None,
        "localhost",
    ),
]


def route_params():
    return [pytest.param(*route[1:], id=route[0]) for route in ROUTES]


def make_route(request, fixture: str, template: str, password: str | None, **kw) -> ProxyDialer:
    return ProxyDialer(template.format(request.getfixturevalue(fixture)), password=password, **kw)


# -- helpers -----------------------------------------------------------------------------


async def read_line(sock: socket.socket, timeout: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(timeout):
        while not data.endswith(b"\n"):
            chunk = await loop.sock_recv(sock, 1024)
            if not chunk:
                break
            data += chunk
    return data


def assert_no_secret(*texts: object) -> None:
    for text in texts:
        for secret in (PROXY_PASSWORD, WRONG_PASSWORD):
            assert secret not in str(text)


def assert_dial_error(exc: SmtpError, label: str, enhanced: str, dialer: ProxyDialer) -> None:
    assert exc.label == label, exc.reason
    assert exc.code == 451
    assert exc.reply.enhanced == enhanced
    assert exc.temporary
    # the client sees a generic text only
    assert "127.0.0" not in exc.reply.text and "proxy" not in exc.reply.text.lower()
    assert dialer.describe() in exc.reason
    # the whole chain as it would be logged, causes included
    logged = "".join(traceback.format_exception(exc))
    assert_no_secret(exc, exc.reason, repr(exc), exc.reply, logged, dialer.describe(), repr(dialer))


def failures(scheme: str, label: str) -> float:
    value = REGISTRY.get_sample_value("relay_proxy_failures_total", {"scheme": scheme, "reason": label})
    return value or 0.0


def connects(scheme: str) -> float:
    value = REGISTRY.get_sample_value("relay_proxy_connect_seconds_count", {"scheme": scheme})
    return value or 0.0


# -- through real proxies ----------------------------------------------------------------


@pytest.mark.parametrize(("fixture", "template", "password", "host"), route_params())
async def test_greeting_arrives_intact_through_proxy(request, greeter: Greeter, fixture, template, password, host):
    dialer = make_route(request, fixture, template, password)
    before = connects(dialer.scheme)
    sock = await dialer.connect(host, greeter.port)
    try:
        assert await read_line(sock) == GREETING
        # the tunnel carries our bytes too
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"QUIT\r\n")
    finally:
        sock.close()
    assert greeter.peers == [EGRESS_IP]
    assert connects(dialer.scheme) == before + 1
    assert_no_secret(dialer.describe(), repr(dialer))


@pytest.mark.parametrize(("fixture", "template", "password", "host"), route_params())
async def test_aiosmtplib_sends_through_proxy(
    request, smtp_upstream: Recorder, ports: Ports, fixture, template, password, host
):
    dialer = make_route(request, fixture, template, password)
    sock = await dialer.connect(host, ports.smtp)
    smtp = aiosmtplib.SMTP(hostname=host, port=None, sock=sock, start_tls=False, local_hostname=CLIENT_NAME, timeout=10)
    msg = EmailMessage()
    msg["From"] = "sender@example.org"
    msg["To"] = "rcpt@example.net"
    msg["Subject"] = f"via {dialer.describe()}"
    msg.set_content("hello through the tunnel\n")
    await smtp.connect()
    try:
        errors, _ = await smtp.send_message(msg)
    finally:
        await smtp.quit()
    assert errors == {}
    got = smtp_upstream.messages[-1]
    assert got.peer == EGRESS_IP
    assert got.mail_from == "sender@example.org"
    assert got.rcpt_tos == ["rcpt@example.net"]
    assert f"via {dialer.describe()}".encode() in got.content


@pytest.mark.parametrize(
    ("fixture", "template", "password"),
    [
        pytest.param("microsocks", f"socks5h://{PROXY_USER}@{{}}", PROXY_PASSWORD, id="socks5h"),
        pytest.param("danted", "socks4://{}", None, id="socks4"),
        pytest.param("tinyproxy", f"http://{PROXY_USER}@{{}}", PROXY_PASSWORD, id="http"),
    ],
)
@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_tls_through_proxy_checks_upstream_name(
    request, smtp_upstream: Recorder, ports: Ports, client_tls, fixture, template, password, mode
):
    """The certificate is for 'localhost' only: TLS succeeds because aiosmtplib checks the
    upstream's name given as hostname=, not the proxy's address."""
    dialer = make_route(request, fixture, template, password)
    port = ports.smtp if mode == "starttls" else ports.smtps
    sock = await dialer.connect("localhost", port)
    smtp = aiosmtplib.SMTP(
        hostname="localhost",
        port=None,
        sock=sock,
        local_hostname=CLIENT_NAME,
        tls_context=client_tls,
        start_tls=mode == "starttls",
        use_tls=mode == "implicit",
        timeout=10,
    )
    await smtp.connect()
    try:
        assert smtp.get_transport_info("sslcontext") is not None
        errors, _ = await smtp.sendmail("a@example.org", ["b@example.net"], b"Subject: tls\r\n\r\nx\r\n")
    finally:
        await smtp.quit()
    assert errors == {}
    got = smtp_upstream.messages[-1]
    assert (got.peer, got.tls) == (EGRESS_IP, True)


async def test_tls_name_mismatch_is_not_masked_by_proxy(danted: str, smtp_upstream: Recorder, ports: Ports, client_tls):
    """Control for the test above: checked against the IP address, the same certificate fails."""
    dialer = ProxyDialer(f"socks4://{danted}")
    sock = await dialer.connect(LOOP, ports.smtps)
    smtp = aiosmtplib.SMTP(
        hostname=LOOP,
        port=None,
        sock=sock,
        tls_context=client_tls,
        use_tls=True,
        local_hostname=CLIENT_NAME,
        timeout=10,
    )
    with pytest.raises(aiosmtplib.SMTPConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        await smtp.connect()
    sock.close()


# -- failures through real proxies -------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "template"),
    [
        pytest.param("microsocks", f"socks5://{PROXY_USER}@{{}}", id="socks5"),
        pytest.param("microsocks", f"socks5h://{PROXY_USER}@{{}}", id="socks5h"),
        pytest.param("tinyproxy", f"http://{PROXY_USER}@{{}}", id="http"),
    ],
)
async def test_wrong_password_is_proxy_auth(request, greeter: Greeter, fixture, template):
    dialer = make_route(request, fixture, template, WRONG_PASSWORD)
    before = failures(dialer.scheme, "proxy_auth")
    with pytest.raises(SmtpError) as info:
        await dialer.connect(LOOP, greeter.port)
    assert_dial_error(info.value, "proxy_auth", "4.4.0", dialer)
    assert "authentication refused" in info.value.reason
    assert info.value.reason.startswith(f"proxy {dialer.describe()}: ")
    assert failures(dialer.scheme, "proxy_auth") == before + 1
    assert greeter.peers == []


@pytest.mark.parametrize(
    ("fixture", "scheme"),
    [
        pytest.param("microsocks", "socks5", id="socks5"),
        pytest.param("tinyproxy", "http", id="http"),
    ],
)
async def test_missing_credentials_is_proxy_auth(request, greeter: Greeter, fixture, scheme):
    dialer = ProxyDialer(f"{scheme}://{request.getfixturevalue(fixture)}")
    with pytest.raises(SmtpError) as info:
        await dialer.connect(LOOP, greeter.port)
    assert_dial_error(info.value, "proxy_auth", "4.4.0", dialer)
    assert "no credentials are configured" in info.value.reason


@pytest.mark.parametrize(
    ("template", "password"),
    [
        pytest.param(f"socks5://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{{}}", None, id="socks5"),
        pytest.param(f"socks5h://{PROXY_USER}@127.0.0.1:{{}}", PROXY_PASSWORD, id="socks5h"),
        pytest.param("socks4://127.0.0.1:{}", None, id="socks4"),
        pytest.param(f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{{}}", None, id="http"),
    ],
)
async def test_proxy_down_is_proxy_unreachable(ports: Ports, template, password):
    dialer = ProxyDialer(template.format(ports.closed), password=password)
    before = failures(dialer.scheme, "proxy_unreachable")
    with pytest.raises(SmtpError) as info:
        # an address: socks5:// and socks4:// would resolve a name here first (no DNS in tests)
        await dialer.connect(LOOP, 25)
    assert_dial_error(info.value, "proxy_unreachable", "4.4.1", dialer)
    assert info.value.reason.startswith(f"proxy {dialer.describe()}: connect failed")
    assert failures(dialer.scheme, "proxy_unreachable") == before + 1


async def test_connect_forbidden_by_tinyproxy_is_proxy_refused(tinyproxy: str, ports: Ports):
    dialer = ProxyDialer(f"http://{PROXY_USER}@{tinyproxy}", password=PROXY_PASSWORD)
    with pytest.raises(SmtpError) as info:
        await dialer.connect(LOOP, ports.forbidden)
    assert_dial_error(info.value, "proxy_refused", "4.4.1", dialer)
    assert info.value.reason == (
        f"upstream {LOOP}:{ports.forbidden} via proxy {dialer.describe()}: CONNECT refused (403 Access violation)"
    )


@pytest.mark.parametrize(("scheme", "code"), [("socks4", "0x5b"), ("socks5", "0x02")])
async def test_connect_forbidden_by_dante_ruleset_is_proxy_refused(danted: str, ports: Ports, scheme, code):
    dialer = ProxyDialer(f"{scheme}://{danted}")
    with pytest.raises(SmtpError) as info:
        await dialer.connect(LOOP, ports.forbidden)
    assert_dial_error(info.value, "proxy_refused", "4.4.1", dialer)
    assert info.value.reason.startswith(
        f"upstream {LOOP}:{ports.forbidden} via proxy {dialer.describe()}: connect refused"
    )
    assert f"reply {code}" in info.value.reason


async def test_microsocks_upstream_refused_is_upstream_unreachable(microsocks: str, ports: Ports):
    # SOCKS5 reply 0x05: the proxy works, the upstream behind it refused the connection.
    dialer = ProxyDialer(f"socks5://{PROXY_USER}@{microsocks}", password=PROXY_PASSWORD)
    with pytest.raises(SmtpError) as info:
        await dialer.connect(LOOP, ports.closed)
    assert_dial_error(info.value, "upstream_unreachable", "4.4.1", dialer)
    assert "via proxy" in info.value.reason


@contextlib.contextmanager
def blackhole_listener():
    """A real listening socket whose accept queue is full: further connects hang (SYNs are
    dropped), like a proxy behind a firewall that drops packets."""
    srv = socket.socket()
    srv.bind((LOOP, 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(16):
            sock = socket.socket()
            sock.settimeout(0.3)
            fillers.append(sock)
            try:
                sock.connect((LOOP, port))
            except TimeoutError:
                break
        else:
            pytest.fail("could not fill the accept queue of the blackhole listener")
        yield port
    finally:
        for sock in fillers:
            sock.close()
        srv.close()


async def test_proxy_connect_timeout_is_proxy_timeout():
    with blackhole_listener() as port:
        dialer = ProxyDialer(f"socks5://127.0.0.1:{port}", connect_timeout=0.5)
        with pytest.raises(SmtpError) as info:
            await dialer.connect(LOOP, 25)
    assert_dial_error(info.value, "proxy_timeout", "4.4.1", dialer)
    assert "connect timed out after 0.5s" in info.value.reason


# -- HTTP CONNECT reply framing (hand-written fake proxy) ----------------------------------


CLOSE = b"<close>"  # in a FakeHttpProxy script: close the connection here


@dataclass
class FakeHttpProxy:
    """A scripted HTTP proxy: reads one CONNECT request, then writes `chunks` one by one
    (each its own TCP segment: TCP_NODELAY and a pause in between), then keeps the line
    open until the client closes (or closes it at a `CLOSE` in the script)."""

    chunks: list[bytes]
    pause: float = 0.05
    requests: list[bytes] = field(default_factory=list)
    port: int = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            for chunk in self.chunks:
                if chunk is CLOSE:
                    return
                writer.write(chunk)
                await writer.drain()
                await asyncio.sleep(self.pause)
            await reader.read()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def serve(self):
        server = await asyncio.start_server(self._handle, LOOP, 0)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            yield self
            server.close()


HEAD = b"HTTP/1.1 200 Connection established\r\nProxy-Agent: fake/1.0\r\n\r\n"


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param([HEAD + GREETING], id="head-and-greeting-in-one-write"),
        pytest.param(
            [HEAD[:7], HEAD[7:20], HEAD[20:-3], HEAD[-3:-1], HEAD[-1:] + GREETING],
            id="split-blank-line-then-greeting-with-its-last-byte",
        ),
        pytest.param([HEAD[:-2], HEAD[-2:], GREETING], id="split-at-blank-line"),
        pytest.param([bytes([b]) for b in HEAD] + [GREETING], id="byte-by-byte"),
        pytest.param([b"HTTP/1.1 100 Continue\r\n\r\n" + HEAD + GREETING], id="interim-100"),
        pytest.param([b"HTTP/1.0 200 OK\n\n" + GREETING], id="bare-LF"),
        pytest.param([b"HTTP/1.1 204\r\n\r\n", GREETING], id="no-reason-phrase"),
    ],
)
async def test_connect_reply_framing_keeps_the_greeting(chunks):
    async with FakeHttpProxy(chunks).serve() as fake:
        dialer = ProxyDialer(f"http://{PROXY_USER}@127.0.0.1:{fake.port}", password=PROXY_PASSWORD)
        sock = await dialer.connect("mx.example.com", 25)
        try:
            assert await read_line(sock) == GREETING
        finally:
            sock.close()
    token = base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode()).decode()
    assert fake.requests == [
        b"CONNECT mx.example.com:25 HTTP/1.1\r\nHost: mx.example.com:25\r\n"
        + f"Proxy-Authorization: Basic {token}\r\n\r\n".encode()
    ]


async def test_connect_request_without_credentials_and_ipv6_target():
    async with FakeHttpProxy([HEAD, GREETING]).serve() as fake:
        sock = await ProxyDialer(f"http://127.0.0.1:{fake.port}").connect("2001:db8::25", 25)
        sock.close()
    assert fake.requests == [b"CONNECT [2001:db8::25]:25 HTTP/1.1\r\nHost: [2001:db8::25]:25\r\n\r\n"]


@pytest.mark.parametrize(
    ("chunks", "label", "fragment"),
    [
        pytest.param([b"SSH-2.0-OpenSSH_9.2\r\n"], "proxy_protocol", "not an HTTP reply", id="not-http"),
        pytest.param([b"HTTP/1.1 2OO OK\r\n\r\n"], "proxy_protocol", "malformed status line", id="bad-status"),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nX: y", CLOSE],
            "proxy_protocol",
            "in the middle of its reply",
            id="closed-mid-reply",
        ),
        pytest.param([CLOSE], "proxy_protocol", "before replying", id="closed-before-reply"),
        pytest.param(
            [b"HTTP/1.1 101 Switching Protocols\r\n\r\n"],
            "proxy_protocol",
            "101",
            id="switching-protocols",
        ),
        pytest.param(
            [b"HTTP/1.1 100 Continue\r\n\r\n" * 6],
            "proxy_protocol",
            "interim",
            id="endless-interim",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nX-Filler: " + b"a" * 20000 + b"\r\n\r\n"],
            "proxy_protocol",
            "longer than",
            id="huge-headers",
        ),
        pytest.param(
            [b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n"],
            "upstream_unreachable",
            "CONNECT refused (502 Bad Gateway)",
            id="502",
        ),
        pytest.param(
            [b"HTTP/1.1 504 Gateway Timeout\r\n\r\n"],
            "upstream_timeout",
            "CONNECT refused (504 Gateway Timeout)",
            id="504",
        ),
        pytest.param(
            [b"HTTP/1.1 403 Forbidden\r\n\r\n"],
            "proxy_refused",
            "CONNECT refused (403 Forbidden)",
            id="403",
        ),
        pytest.param(
            [b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"],
            "proxy_auth",
            "authentication refused (407 Proxy Authentication Required)",
            id="407",
        ),
    ],
)
async def test_bad_connect_replies(chunks, label, fragment):
    async with FakeHttpProxy(chunks).serve() as fake:
        dialer = ProxyDialer(f"http://{PROXY_USER}@127.0.0.1:{fake.port}", password=PROXY_PASSWORD)
        with pytest.raises(SmtpError) as info:
            await dialer.connect("mx.example.com", 25)
    enhanced = {"proxy_protocol": "4.4.0", "proxy_auth": "4.4.0"}.get(label, "4.4.1")
    assert_dial_error(info.value, label, enhanced, dialer)
    assert fragment in info.value.reason


async def test_handshake_timeout_is_proxy_timeout():
    async with FakeHttpProxy([b"HTTP/1.1 200 Connection est"]).serve() as fake:
        dialer = ProxyDialer(f"http://127.0.0.1:{fake.port}", handshake_timeout=0.3)
        before = failures("http", "proxy_timeout")
        with pytest.raises(SmtpError) as info:
            await dialer.connect("mx.example.com", 25)
    assert_dial_error(info.value, "proxy_timeout", "4.4.1", dialer)
    assert info.value.reason == (
        f"upstream mx.example.com:25 via proxy {dialer.describe()}: handshake timed out after 0.3s"
    )
    assert failures("http", "proxy_timeout") == before + 1


# -- construction ------------------------------------------------------------------------


def test_describe_and_repr_never_show_the_password():
    dialer = ProxyDialer(f"socks5://{PROXY_USER}:{PROXY_PASSWORD}@proxy.internal:1080")
    assert dialer.describe() == "socks5://user@proxy.internal:1080"
    assert repr(dialer) == "ProxyDialer('socks5://user@proxy.internal:1080')"
    assert_no_secret(repr(vars(dialer)))
    assert ProxyDialer("http://[::1]:3128").describe() == "http://[::1]:3128"
    assert ProxyDialer("SOCKS5H://p.example").describe() == "socks5h://p.example:1080"
    assert ProxyDialer("socks4://id@p.example").describe() == "socks4://id@p.example:1080"
    # percent-encoded user names and passwords
    odd = ProxyDialer("http://us%40er:p%3Aw%40d@p.example:8080")
    assert odd.describe() == "http://us%40er@p.example:8080"
    assert odd.url.password == "p:w@d"


def test_password_override_wins():
    dialer = ProxyDialer("socks5://user:old@p.example:1080", password="new")
    assert dialer.url.password == "new"
    assert dialer.username == "user"


@pytest.mark.parametrize(
    ("url", "kwargs", "message"),
    [
        ("", {}, "empty"),
        ("proxy.internal:1080", {}, "needs a scheme"),
        (f"ftp://u:{PROXY_PASSWORD}@p.example:21", {}, "scheme 'ftp' is not supported"),
        ("https://p.example:443", {}, "TLS to the proxy is not supported"),
        ("http://p.example", {}, "explicit port"),
        (f"socks4://u:{PROXY_PASSWORD}@p.example:1080", {}, "socks4 proxies have no passwords"),
        ("socks4://u@p.example:1080", {"password": PROXY_PASSWORD}, "no passwords"),
        ("socks5://p.example:1080", {"password": PROXY_PASSWORD}, "has no user name"),
        ("socks5://u@p.example:1080", {}, "without a password"),
        (f"socks5://u:{PROXY_PASSWORD}@p.example:99999", {}, "port"),
        (
            f"socks5://u:{PROXY_PASSWORD}@p.example:1080/path",
            {},
            "only [user[:password]@]host:port",
        ),
        (f"socks5://u:{PROXY_PASSWORD}@:1080", {}, "no host"),
        ("http://a%3Ab@p.example:8080", {"password": PROXY_PASSWORD}, "cannot contain ':'"),
        ("socks5://p.example:1080", {"connect_timeout": 0}, "positive"),
    ],
)
def test_invalid_urls_are_rejected_without_echoing_secrets(url, kwargs, message):
    with pytest.raises(ValueError) as info:
        ProxyDialer(url, **kwargs)
    assert message in str(info.value)
    assert_no_secret(str(info.value), repr(info.value.__cause__), repr(info.value.__context__))


async def test_invalid_upstream_name_is_refused_before_any_traffic(ports: Ports):
    dialer = ProxyDialer(f"http://127.0.0.1:{ports.closed}")
    with pytest.raises(SmtpError) as info:
        await dialer.connect("mx.example.com\r\nX-Injected: 1", 25)
    assert_dial_error(info.value, "upstream_unreachable", "4.4.1", dialer)
    assert "\r\n" not in info.value.reason


async def test_socks4_cannot_carry_ipv6(ports: Ports):
    dialer = ProxyDialer(f"socks4://127.0.0.1:{ports.closed}")
    with pytest.raises(SmtpError) as info:
        await dialer.connect("2001:db8::25", 25)
    assert_dial_error(info.value, "upstream_unreachable", "4.4.1", dialer)
    assert "IPv4 addresses only" in info.value.reason


def test_dialer_for():
    assert isinstance(dialer_for(None), DirectDialer)
    assert isinstance(dialer_for("  "), DirectDialer)
    assert dialer_for(None, connect_timeout=7).connect_timeout == 7
    dialer = dialer_for("socks5h://u@p.example:1080", password="x", handshake_timeout=5)
    assert isinstance(dialer, ProxyDialer)
    assert (dialer.scheme, dialer.handshake_timeout) == ("socks5h", 5)


def test_metrics_series_are_preinitialised_and_bounded():
    ProxyDialer("socks4://p.example")
    for label in FAILURE_LABELS:
        value = REGISTRY.get_sample_value("relay_proxy_failures_total", {"scheme": "socks4", "reason": label})
        assert value is not None
    # whatever ran before (this module dials a lot): only schemes and fixed labels, no addresses
    for metric in REGISTRY.collect():
        if metric.name in ("relay_proxy_failures", "relay_proxy_connect_seconds"):
            for sample in metric.samples:
                assert sample.labels["scheme"] in SCHEMES
                assert sample.labels.get("reason", FAILURE_LABELS[0]) in FAILURE_LABELS
    assert set(FAILURE_LABELS) == {
        "proxy_unreachable",
        "proxy_timeout",
        "proxy_auth",
        "proxy_refused",
        "proxy_protocol",
        "upstream_unreachable",
        "upstream_timeout",
    }


# -- tests.support.procs -----------------------------------------------------------------


def test_require_binary_fails_with_instructions():
    with pytest.raises(MissingBinaryError, match=r"not installed.*bash \.ci/run"):
        require_binary("no-such-program-relay-test")
    assert require_binary("danted").startswith("/")  # found in sbin even if not on PATH


def test_running_reports_the_log_tail_when_start_fails(tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text("Port 1\nThisIsNotADirective yes\n")
    with pytest.raises(ProcessError) as info:
        with running(
            [require_binary("tinyproxy"), "-d", "-c", conf],
            ready=(LOOP, free_port()),
            log_path=tmp_path / "bad.log",
            ready_timeout=5,
        ):
            pytest.fail("must not start")
    assert "tinyproxy did not start" in str(info.value)
    assert "last lines of" in str(info.value)
    assert "Syntax error on line 2" in str(info.value)


def test_running_stops_the_process(tmp_path):
    port = free_port()
    argv = [require_binary("microsocks"), "-i", LOOP, "-p", str(port)]
    with running(argv, ready=(LOOP, port), log_path=tmp_path / "ms.log") as proc:
        wait_port(LOOP, port, 1)
    assert proc.returncode is not None
    with pytest.raises(OSError):
        socket.create_connection((LOOP, port), timeout=1).close()
