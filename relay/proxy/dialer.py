"""The egress proxy dialer: reach an upstream's TCP port through a SOCKS or HTTP CONNECT proxy.

`ProxyDialer` implements the `Dialer` protocol of `relay.deliver.dial` for one proxy URL
(`relay.proxy.url`). The socket it returns is connected (non-blocking, TCP_NODELAY) and its
next bytes are the upstream's own. Hand it to aiosmtplib with the upstream's real name, never
the proxy's, so TLS SNI and certificate checks are for the upstream::

    sock = await dialer.connect(mx_host, 25)
    smtp = aiosmtplib.SMTP(hostname=mx_host, port=None, sock=sock, start_tls=True, ...)
    await smtp.connect()            # implicit TLS (port 465): use_tls=True instead

Failures are 451 `SmtpError`s labelled as `relay.proxy.failures` describes.

Metrics (default registry): ``relay_proxy_connect_seconds{scheme}`` observes successful dials
(connect + handshake); ``relay_proxy_failures_total{scheme,reason}`` counts failures by label.
Both label sets are bounded: the four schemes and the failure labels.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from collections.abc import Callable

from prometheus_client import Counter, Histogram

from relay.deliver.dial import Dialer, DirectDialer, HostResolver, connect_tcp
from relay.errors import SmtpError
from relay.proxy.failures import FAILURE_LABELS, dial_error, os_text
from relay.proxy.http_connect import http_connect
from relay.proxy.socks import socks_handshake
from relay.proxy.url import ProxyUrl, host_port, parse_proxy_url

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

# What an upstream host may look like on the wire (CONNECT line, SOCKS5 domain): DNS names,
# including the underscores some MX names have. IP literals are checked separately.
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_.])?")


class ProxyDialer:
    """Connect to upstreams through one egress proxy (see the module docstring)."""

    def __init__(
        self,
        url: ProxyUrl | str,
        *,
        password: str | None = None,
        current_password: Callable[[], str | None] | None = None,
        connect_timeout: float = 30,
        handshake_timeout: float = 30,
        resolver: HostResolver | None = None,
    ) -> None:
        if connect_timeout <= 0 or handshake_timeout <= 0:
            raise ValueError("proxy connect and handshake timeouts must be positive")
        self.url = parse_proxy_url(url, password) if isinstance(url, str) else url.with_password(password)
        # A password from a secret reference is read at every dial, like the upstream's, so
        # a rotated proxy password is used without a reload.
        self._current_password = current_password
        self.connect_timeout = float(connect_timeout)
        self.handshake_timeout = float(handshake_timeout)
        # The configured DNS, for the proxy's name and (socks5://, socks4://) the upstream's.
        self.resolver = resolver
        for label in FAILURE_LABELS:  # export every series from the start, at 0
            PROXY_FAILURES.labels(self.scheme, label)
        PROXY_CONNECT_SECONDS.labels(self.scheme)

    @property
    def scheme(self) -> str:
        return self.url.scheme

    @property
    def username(self) -> str | None:
        return self.url.username

    @property
    def resolves_remotely(self) -> bool:
        return self.url.resolves_remotely

    def describe(self) -> str:
        """The proxy URL without its password, e.g. ``socks5://user@proxy.internal:1080``."""
        return self.url.describe()

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
            raise dial_error(
                "upstream_unreachable",
                f"upstream {host!r} port {port} via proxy {self.describe()}: host name cannot be sent to a proxy",
            )
        via = f"upstream {host_port(host, port)} via proxy {self.describe()}"
        if not (0 < port < 65536):
            raise dial_error("upstream_unreachable", f"{via}: invalid port")
        if self.scheme == "socks4" and is_ip and ":" in host:
            raise dial_error("upstream_unreachable", f"{via}: SOCKS4 carries IPv4 addresses only")
        dest = host
        if self.scheme in ("socks5", "socks4") and not is_ip:
            dest = await self._resolve_upstream(loop, host, port, via)
        url = self.url
        if self._current_password is not None:
            try:
                url = url.with_password(self._current_password())
            except ValueError as exc:  # a rotated value the protocol cannot carry
                raise dial_error("proxy_auth", f"{via}: proxy password unusable: {exc}") from None
        sock = await self._open_proxy_connection()
        try:
            async with asyncio.timeout(self.handshake_timeout):
                if self.scheme == "http":
                    await http_connect(loop, sock, url, host, port, via=via)
                else:
                    sock = await socks_handshake(loop, sock, url, dest, port, timeout=self.handshake_timeout, via=via)
        except TimeoutError as exc:
            sock.close()
            raise dial_error("proxy_timeout", f"{via}: handshake timed out after {self.handshake_timeout:g}s") from exc
        except SmtpError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise dial_error("proxy_protocol", f"{via}: connection lost during handshake: {os_text(exc)}") from exc
        except BaseException:
            sock.close()
            raise
        return sock

    async def _resolve_upstream(self, loop: asyncio.AbstractEventLoop, host: str, port: int, via: str) -> str:
        """The address to ask the proxy for (socks5://, socks4://): IPv4 first, as python-socks
        does (an egress proxy is more likely to reach IPv4); SOCKS4 can carry nothing else."""
        family = socket.AF_INET if self.scheme == "socks4" else socket.AF_UNSPEC
        if self.resolver is not None:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    found = await self.resolver.addresses(host)
            except TimeoutError as exc:
                raise dial_error(
                    "upstream_timeout", f"{via}: resolving the upstream timed out after {self.connect_timeout:g}s"
                ) from exc
            except SmtpError as exc:
                raise dial_error("upstream_unreachable", f"{via}: cannot resolve the upstream: {exc.reason}") from exc
            usable = [a for a in found if family == socket.AF_UNSPEC or ":" not in a]
            if not usable:
                raise dial_error("upstream_unreachable", f"{via}: no usable upstream address")
            return usable[0]  # IPv4 first (the resolver's order)
        try:
            async with asyncio.timeout(self.connect_timeout):
                infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
        except TimeoutError as exc:
            raise dial_error(
                "upstream_timeout",
                f"{via}: resolving the upstream timed out after {self.connect_timeout:g}s",
            ) from exc
        except OSError as exc:
            raise dial_error("upstream_unreachable", f"{via}: cannot resolve the upstream: {os_text(exc)}") from exc
        addresses = [info for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]
        if not addresses:
            raise dial_error("upstream_unreachable", f"{via}: no usable upstream address")
        addresses.sort(key=lambda info: info[0] != socket.AF_INET)
        return str(addresses[0][4][0])

    async def _open_proxy_connection(self) -> socket.socket:
        hop = f"proxy {self.describe()}"
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await connect_tcp(self.url.host, self.url.port, self.resolver)
        except TimeoutError as exc:
            raise dial_error("proxy_timeout", f"{hop}: connect timed out after {self.connect_timeout:g}s") from exc
        except SmtpError as exc:  # the configured DNS could not resolve the proxy's name
            raise dial_error("proxy_unreachable", f"{hop}: cannot resolve the proxy: {exc.reason}") from exc
        except socket.gaierror as exc:
            raise dial_error("proxy_unreachable", f"{hop}: cannot resolve the proxy: {os_text(exc)}") from exc
        except OSError as exc:
            raise dial_error("proxy_unreachable", f"{hop}: connect failed: {os_text(exc)}") from exc


def dialer_for(
    proxy: ProxyUrl | str | None,
    *,
    password: str | None = None,
    current_password: Callable[[], str | None] | None = None,
    connect_timeout: float = 30,
    handshake_timeout: float = 30,
    resolver: HostResolver | None = None,
) -> Dialer:
    """A `ProxyDialer` for `proxy`, or a `DirectDialer` when there is none (None or blank).
    `resolver`: the configured DNS for every name the dialer resolves itself (None: the system's)."""
    if proxy is None or (isinstance(proxy, str) and not proxy.strip()):
        return DirectDialer(connect_timeout=connect_timeout, resolver=resolver)
    return ProxyDialer(
        proxy,
        password=password,
        current_password=current_password,
        connect_timeout=connect_timeout,
        handshake_timeout=handshake_timeout,
        resolver=resolver,
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
