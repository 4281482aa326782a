"""The egress proxy dialer: reach an upstream's TCP port through a SOCKS or HTTP CONNECT proxy.

`ProxyDialer` implements the `Dialer` protocol of `relay.deliver.dial` for one proxy URL:

    socks5://[user@]host[:port]    SOCKS5; the upstream name is resolved here (locally)
    socks5h://[user@]host[:port]   SOCKS5; the upstream name is sent to the proxy to resolve
    socks4://[userid@]host[:port]  SOCKS4; resolved locally (SOCKS4 carries IPv4 only)
    http://[user@]host:port        HTTP CONNECT (RFC 9110 §9.3.6), Basic proxy auth

A password may be in the URL (``user:pass@``, percent-encoded) or, as the real configuration
does, given separately as ``password=`` (a resolved secret), which then wins over the URL's.
Ports: the SOCKS schemes default to 1080 (the IANA-registered SOCKS port); an ``http://`` URL
must name its port, since HTTP proxies have no common one (3128 squid, 8888 tinyproxy, 8080...)
and guessing would just fail later with a less clear error. SOCKS4 has no passwords: a password
with ``socks4://`` is a configuration error (``ValueError``), as is anything else in the URL
that could not work (unknown scheme, a path, a user name the protocol cannot carry...).

SOCKS goes through python-socks (``python_socks.async_.asyncio.Proxy``); the TCP connection to
the proxy is opened here and handed to python-socks through its public ``forward=`` (proxy
chaining) parameter, so that connect and handshake get their own timeouts and errors. HTTP
CONNECT is done here: python-socks reads the proxy's reply with one ``recv(65536)`` and drops
whatever followed the reply headers in the same segment, i.e. the upstream's ``220`` greeting,
after which the SMTP session hangs. `_read_reply_head` peeks (MSG_PEEK) and consumes exactly
the bytes up to the blank line ending the reply headers, however the reply is segmented.

The socket returned is connected (non-blocking, TCP_NODELAY) and its next bytes are the
upstream's own. Hand it to aiosmtplib with the upstream's real name, never the proxy's, so TLS
SNI and certificate checks are for the upstream::

    sock = await dialer.connect(mx_host, 25)
    smtp = aiosmtplib.SMTP(hostname=mx_host, port=None, sock=sock, start_tls=True, ...)
    await smtp.connect()            # implicit TLS (port 465): use_tls=True instead

Failures are `SmtpError` 451 (every dial failure is temporary for the client) with a generic
client text, a log reason naming the hop that failed (never a password) and a fixed label:

    label                 enhanced  when
    proxy_unreachable     4.4.1     proxy host unresolvable, TCP connect to it refused/failed
    proxy_timeout         4.4.1     TCP connect to the proxy, or the handshake, timed out
    proxy_auth            4.4.0     proxy refused our credentials / wants some we lack
                                    (SOCKS5 auth failure or no acceptable method, HTTP 407
                                    or 401, SOCKS4 identd rejection 0x5C/0x5D)
    proxy_refused         4.4.1     proxy would not open the tunnel: HTTP non-2xx (403...),
                                    SOCKS5 reply 0x01-0x02, 0x07-0x08, SOCKS4 reply 0x5B
    upstream_unreachable  4.4.1     the proxy could not reach the upstream: SOCKS5 0x03-0x05,
                                    HTTP 502/503 (also: the upstream name does not resolve)
    upstream_timeout      4.4.1     the proxy timed out reaching it: SOCKS5 0x06, HTTP 504
    proxy_protocol        4.4.0     malformed/unexpected reply, proxy closed or reset mid-handshake
    upstream_unreachable  4.4.1     before the proxy is asked: no local address for the upstream
                                    (socks5://, socks4://), or a name that cannot be sent
    upstream_timeout      4.4.1     local resolution of the upstream name timed out

Why 4.4.0 and not 4.7.x for ``proxy_auth``: the credentials are the relay's own, for its own
egress route; the client's message and authorization are not at fault, and X.7.x (security or
policy status) would tell it otherwise. It is a routing failure the operator must fix, retried
meanwhile, like every dial failure (the `Dialer` contract is 451 4.4.x).

Metrics (default registry): ``relay_proxy_connect_seconds{scheme}`` observes successful dials
(connect + handshake); ``relay_proxy_failures_total{scheme,reason}`` counts failures by label.
Both label sets are bounded: the four schemes above and the labels in the table.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import re
import socket
import time
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from prometheus_client import Counter, Histogram
from python_socks import ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.asyncio import Proxy

from relay.deliver.dial import Dialer, DirectDialer
from relay.errors import SmtpError

__all__ = [
    "FAILURE_LABELS",
    "PROXY_CONNECT_SECONDS",
    "PROXY_FAILURES",
    "SCHEMES",
    "ProxyDialer",
    "make_dialer",
]

SCHEMES = ("socks5", "socks5h", "socks4", "http")
_PROXY_TYPES = {
    "socks5": ProxyType.SOCKS5,
    "socks5h": ProxyType.SOCKS5,
    "socks4": ProxyType.SOCKS4,
    "http": ProxyType.HTTP,
}
_DEFAULT_PORTS = {"socks5": 1080, "socks5h": 1080, "socks4": 1080}

# label -> enhanced status code; every failure is a 451.
_ENHANCED = {
    "proxy_unreachable": "4.4.1",
    "proxy_timeout": "4.4.1",
    "proxy_auth": "4.4.0",
    "proxy_refused": "4.4.1",
    "proxy_protocol": "4.4.0",
    "upstream_unreachable": "4.4.1",
    "upstream_timeout": "4.4.1",
}
FAILURE_LABELS = tuple(_ENHANCED)
_CLIENT_TEXT = "Upstream not reachable, try again later"

PROXY_CONNECT_SECONDS = Histogram(
    "relay_proxy_connect_seconds",
    "Time to open a tunnel to an upstream through the egress proxy (connect + handshake).",
    ["scheme"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
PROXY_FAILURES = Counter(
    "relay_proxy_failures_total",
    "Failed dials through the egress proxy, by failure label.",
    ["scheme", "reason"],
)

# Upper bound for the reply headers of an HTTP proxy (and for interim 1xx replies before it).
_MAX_REPLY_HEAD = 16 * 1024
_MAX_INTERIM_REPLIES = 4
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_STATUS_LINE = re.compile(rb"HTTP/(\d)\.(\d) ([0-9]{3})(?:[ \t]([^\r\n]*))?\r?\n")
# What an upstream host may look like on the wire (CONNECT line, SOCKS5 domain): DNS names,
# including the underscores some MX names have. IP literals are checked separately.
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_.])?")
# SOCKS4 reply codes 0x5C/0x5D: the proxy's identd check of the user id failed.
_SOCKS4_IDENT_FAILURES = (0x5C, 0x5D)


class _Credentials:
    """A user name and password whose repr never shows the password."""

    __slots__ = ("password", "username")

    def __init__(self, username: str | None, password: str | None) -> None:
        self.username = username
        self.password = password

    def __repr__(self) -> str:
        shown = "<set>" if self.password else "<unset>"
        return f"_Credentials(username={self.username!r}, password={shown})"


class _ProtocolError(Exception):
    """The HTTP proxy's reply is not what RFC 9110 allows (log-safe message)."""


class ProxyDialer:
    """Connect to upstreams through one egress proxy (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        connect_timeout: float = 30,
        handshake_timeout: float = 30,
    ) -> None:
        if connect_timeout <= 0 or handshake_timeout <= 0:
            raise ValueError("proxy connect and handshake timeouts must be positive")
        self.scheme, self.host, self.port, self._creds = _parse_proxy_url(url, password)
        self.connect_timeout = float(connect_timeout)
        self.handshake_timeout = float(handshake_timeout)
        for label in FAILURE_LABELS:  # export every series from the start, at 0
            PROXY_FAILURES.labels(self.scheme, label)
        PROXY_CONNECT_SECONDS.labels(self.scheme)

    @property
    def username(self) -> str | None:
        return self._creds.username

    @property
    def resolves_remotely(self) -> bool:
        return self.scheme in ("socks5h", "http")

    def describe(self) -> str:
        """The proxy URL without its password, e.g. ``socks5://user@proxy.internal:1080``."""
        user = f"{quote(self._creds.username, safe='')}@" if self._creds.username else ""
        return f"{self.scheme}://{user}{_host_port(self.host, self.port)}"

    def __repr__(self) -> str:
        return f"ProxyDialer({self.describe()!r})"

    async def connect(self, host: str, port: int) -> socket.socket:
        started = time.monotonic()
        try:
            sock = await self._connect(host, port)
        except SmtpError as exc:
            PROXY_FAILURES.labels(self.scheme, exc.label).inc()
            raise
        PROXY_CONNECT_SECONDS.labels(self.scheme).observe(time.monotonic() - started)
        return sock

    # -- the phases of a dial -----------------------------------------------------------

    async def _connect(self, host: str, port: int) -> socket.socket:
        loop = asyncio.get_running_loop()
        is_ip = _is_ip(host)
        if not is_ip and not _HOSTNAME.fullmatch(host):
            raise self._error(
                "upstream_unreachable",
                f"upstream {host!r} port {port} via proxy {self.describe()}: host name cannot be sent to a proxy",
            )
        via = f"upstream {_host_port(host, port)} via proxy {self.describe()}"
        if not (0 < port < 65536):
            raise self._error("upstream_unreachable", f"{via}: invalid port")
        if self.scheme == "socks4" and is_ip and ":" in host:
            raise self._error("upstream_unreachable", f"{via}: SOCKS4 carries IPv4 addresses only")
        dest = host
        if self.scheme in ("socks5", "socks4") and not is_ip:
            dest = await self._resolve_upstream(loop, host, port, via)
        sock = await self._open_proxy_connection(loop)
        try:
            async with asyncio.timeout(self.handshake_timeout):
                if self.scheme == "http":
                    await self._http_connect(loop, sock, host, port, via)
                else:
                    sock = await self._socks_connect(loop, sock, dest, port, via)
        except TimeoutError as exc:
            sock.close()
            raise self._error("proxy_timeout", f"{via}: handshake timed out after {self.handshake_timeout:g}s") from exc
        except SmtpError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise self._error("proxy_protocol", f"{via}: connection lost during handshake: {_os_text(exc)}") from exc
        except BaseException:
            sock.close()
            raise
        return sock

    async def _resolve_upstream(self, loop: asyncio.AbstractEventLoop, host: str, port: int, via: str) -> str:
        """The address to ask the proxy for (socks5://, socks4://): IPv4 first, as python-socks
        does (an egress proxy is more likely to reach IPv4); SOCKS4 can carry nothing else."""
        family = socket.AF_INET if self.scheme == "socks4" else socket.AF_UNSPEC
        try:
            async with asyncio.timeout(self.connect_timeout):
                infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
        except TimeoutError as exc:
            raise self._error(
                "upstream_timeout",
                f"{via}: resolving the upstream timed out after {self.connect_timeout:g}s",
            ) from exc
        except OSError as exc:
            raise self._error("upstream_unreachable", f"{via}: cannot resolve the upstream: {_os_text(exc)}") from exc
        addresses = [info for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]
        if not addresses:
            raise self._error("upstream_unreachable", f"{via}: no usable upstream address")
        addresses.sort(key=lambda info: info[0] != socket.AF_INET)
        return str(addresses[0][4][0])

    async def _open_proxy_connection(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        hop = f"proxy {self.describe()}"
        try:
            async with asyncio.timeout(self.connect_timeout):
                infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
                last: OSError | None = None
                for family, type_, proto, _, addr in infos:
                    sock = socket.socket(family, type_, proto)
                    try:
                        sock.setblocking(False)
                        await loop.sock_connect(sock, addr)
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        return sock
                    except OSError as exc:
                        sock.close()
                        last = exc
                    except BaseException:
                        sock.close()
                        raise
                raise last or OSError(f"no address for {self.host}")
        except TimeoutError as exc:
            raise self._error("proxy_timeout", f"{hop}: connect timed out after {self.connect_timeout:g}s") from exc
        except socket.gaierror as exc:
            raise self._error("proxy_unreachable", f"{hop}: cannot resolve the proxy: {_os_text(exc)}") from exc
        except OSError as exc:
            raise self._error("proxy_unreachable", f"{hop}: connect failed: {_os_text(exc)}") from exc

    async def _socks_connect(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        dest: str,
        port: int,
        via: str,
    ) -> socket.socket:
        proxy = Proxy(
            _PROXY_TYPES[self.scheme],
            self.host,
            self.port,
            username=self._creds.username,
            password=self._creds.password,
            rdns=self.scheme == "socks5h",
            forward=_Connected(sock),  # type: ignore[arg-type]  # duck-typed first hop
            loop=loop,
        )
        try:
            # Our own asyncio.timeout (the caller's) bounds the handshake; python-socks' must
            # not fire first.
            return await proxy.connect(dest, port, timeout=self.handshake_timeout + 60)
        except ProxyTimeoutError as exc:
            raise TimeoutError from exc
        except ProxyError as exc:
            raise self._socks_error(exc, via) from exc

    def _socks_error(self, exc: ProxyError, via: str) -> SmtpError:
        text = _printable(str(exc))
        code = exc.error_code
        kind = "SOCKS4" if self.scheme == "socks4" else "SOCKS5"
        hop = f"proxy {self.describe()}"
        if code is not None:
            if self.scheme == "socks4" and code in _SOCKS4_IDENT_FAILURES:
                return self._error("proxy_auth", f"{hop}: user id refused ({kind} reply {code:#04x}: {text})")
            # The proxy worked but the upstream behind it did not answer: that is the
            # upstream's failure, not the proxy's (alerts tell the two apart by label).
            # SOCKS5 (RFC 1928 §6) 0x03-0x05: network/host unreachable, connection refused;
            # 0x06: TTL expired. Others (0x01 general failure, 0x02 ruleset) are the proxy's.
            if self.scheme != "socks4" and code in (0x03, 0x04, 0x05):
                label = "upstream_unreachable"
            elif self.scheme != "socks4" and code == 0x06:
                label = "upstream_timeout"
            else:
                label = "proxy_refused"
            return self._error(label, f"{via}: connect refused ({kind} reply {code:#04x}: {text})")
        lowered = text.lower()
        if "authentication failure" in lowered or "no acceptable authentication" in lowered:
            hint = "" if self._creds.username else ", and no credentials are configured"
            return self._error("proxy_auth", f"{hop}: authentication refused ({text}{hint})")
        return self._error("proxy_protocol", f"{hop}: {kind} protocol error: {text}")

    async def _http_connect(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        host: str,
        port: int,
        via: str,
    ) -> None:
        authority = _host_port(host, port)
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if self._creds.username is not None:
            secret = f"{self._creds.username}:{self._creds.password or ''}".encode()
            lines.append(f"Proxy-Authorization: Basic {base64.b64encode(secret).decode()}")
        await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
        hop = f"proxy {self.describe()}"
        try:
            for _ in range(_MAX_INTERIM_REPLIES + 1):
                head = await _read_reply_head(loop, sock, _MAX_REPLY_HEAD)
                code, phrase = _parse_status(head)
                if not (100 <= code < 200):
                    break
                if code == 101:
                    raise _ProtocolError("unexpected 101 Switching Protocols")
            else:
                raise _ProtocolError("too many interim 1xx replies")
        except _ProtocolError as exc:
            raise self._error("proxy_protocol", f"{hop}: bad CONNECT reply: {exc}") from None
        status = f"{code} {phrase}".strip()
        if 200 <= code < 300:
            return
        if code in (401, 407):
            # 407 is the standard answer; tinyproxy 1.11 answers wrong credentials with 401.
            hint = "" if self._creds.username else ", and no credentials are configured"
            raise self._error("proxy_auth", f"{hop}: authentication refused ({status}{hint})")
        # 502/503: the proxy could not reach the upstream; 504: it timed out doing so.
        label = {502: "upstream_unreachable", 503: "upstream_unreachable", 504: "upstream_timeout"}.get(
            code, "proxy_refused"
        )
        raise self._error(label, f"{via}: CONNECT refused ({status})")

    def _error(self, label: str, reason: str) -> SmtpError:
        return SmtpError(451, _ENHANCED[label], _CLIENT_TEXT, reason=reason, label=label)


class _Connected:
    """python-socks' ``forward`` hop that hands over an already connected socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    async def connect(self, dest_host: str, dest_port: int, *args: Any, **kw: Any) -> socket.socket:
        return self._sock


def make_dialer(
    proxy_url: str | None,
    *,
    password: str | None = None,
    connect_timeout: float = 30,
    handshake_timeout: float = 30,
) -> Dialer:
    """A `ProxyDialer` for ``proxy_url``, or a `DirectDialer` when there is none (None/empty)."""
    if proxy_url is None or not proxy_url.strip():
        return DirectDialer(connect_timeout=connect_timeout)
    return ProxyDialer(
        proxy_url,
        password=password,
        connect_timeout=connect_timeout,
        handshake_timeout=handshake_timeout,
    )


# -- URL parsing ------------------------------------------------------------------------


def _parse_proxy_url(url: str, password_override: str | None) -> tuple[str, str, int, _Credentials]:
    """Split and check a proxy URL. Error messages never repeat the URL (it may hold a secret)."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("proxy URL is empty")
    url = url.strip()
    if "://" not in url:
        raise ValueError("proxy URL needs a scheme: socks5://, socks5h://, socks4:// or http://")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError("proxy URL is malformed") from None
    scheme = parts.scheme.lower()
    if scheme not in _PROXY_TYPES:
        shown = repr(scheme) if re.fullmatch(r"[a-z0-9+.-]{1,16}", scheme) else "in the URL"
        extra = " (TLS to the proxy is not supported)" if scheme == "https" else ""
        raise ValueError(
            f"proxy URL scheme {shown} is not supported{extra}: use socks5://, socks5h://, socks4:// or http://"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{scheme} proxy URL must be only [user[:password]@]host:port")
    try:
        host = parts.hostname
        port = parts.port
    except ValueError:
        raise ValueError(f"{scheme} proxy URL has a malformed host or port") from None
    if not host:
        raise ValueError(f"{scheme} proxy URL has no host")
    if port is None:
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(f"{scheme} proxy URL needs an explicit port (HTTP proxies have no common one)")
        port = _DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        raise ValueError(f"{scheme} proxy URL port must be 1-65535")

    username = unquote(parts.username) if parts.username else None
    url_password = unquote(parts.password) if parts.password is not None else None
    password = password_override if password_override is not None else url_password

    if scheme == "socks4":
        if password is not None:
            raise ValueError("socks4 proxies have no passwords (only a user id): drop the password or use socks5://")
    elif password is not None and username is None:
        raise ValueError(f"{scheme} proxy password given but the URL has no user name")
    if scheme in ("socks5", "socks5h") and username is not None:
        if not password:
            raise ValueError(f"{scheme} proxy user name given without a password")
        if len(username.encode()) > 255 or len(password.encode()) > 255:
            raise ValueError(f"{scheme} proxy user name and password must be 255 bytes at most")
    if scheme == "http" and username is not None and ":" in username:
        raise ValueError("http proxy user name cannot contain ':' (Basic authentication)")
    if username is not None and any(ord(c) < 0x20 or ord(c) == 0x7F for c in username):
        raise ValueError(f"{scheme} proxy user name has control characters")
    return scheme, host, port, _Credentials(username, password)


# -- HTTP CONNECT reply -----------------------------------------------------------------


async def _read_reply_head(loop: asyncio.AbstractEventLoop, sock: socket.socket, limit: int) -> bytes:
    """Read one HTTP reply head (status line + headers + blank line), not one byte more.

    The bytes are peeked first and then consumed exactly up to the end of the head, so
    whatever the proxy relays right after it (the upstream's greeting, possibly in the same
    segment) stays in the socket. A head split over many segments is put together.
    """
    head = bytearray()
    while True:
        room = limit - len(head)
        if room <= 0:
            raise _ProtocolError(f"reply headers longer than {limit} bytes")
        try:
            peeked = sock.recv(room, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            await _readable(loop, sock)
            continue
        if not peeked:
            where = "before replying" if not head else "in the middle of its reply"
            raise _ProtocolError(f"proxy closed the connection {where}")
        # The blank line may straddle what was consumed already and what was peeked now.
        start = max(0, len(head) - 3)
        match = _HEAD_END.search(bytes(head[start:]) + peeked)
        take = len(peeked) if match is None else match.end() - (len(head) - start)
        head += await _recv_exactly(loop, sock, take)
        if not b"HTTP/".startswith(bytes(head[:5])):
            start_text = _printable(bytes(head[:16]).decode("latin-1"))
            raise _ProtocolError(f"not an HTTP reply: {start_text!r}")
        if match is not None:
            return bytes(head)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Wait until the socket has something to read (asyncio has no async MSG_PEEK)."""
    waiter = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, _wake, waiter)
    try:
        await waiter
    finally:
        loop.remove_reader(fd)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            raise _ProtocolError("proxy closed the connection in the middle of its reply")
        data += chunk
    return bytes(data)


def _parse_status(head: bytes) -> tuple[int, str]:
    match = _STATUS_LINE.match(head)
    if match is None:
        first = head.split(b"\n", 1)[0].decode("latin-1")
        raise _ProtocolError(f"malformed status line {_printable(first)!r}")
    return int(match.group(3)), _printable((match.group(4) or b"").decode("latin-1"))


# -- small helpers ----------------------------------------------------------------------


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _printable(text: str, limit: int = 120) -> str:
    """Peer-supplied text made safe for one log line."""
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text).strip()
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def _os_text(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__
