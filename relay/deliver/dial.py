"""How delivery reaches an upstream's TCP port: directly, or through an egress proxy.

Contract (`Dialer.connect`): return a connected, blocking-mode-agnostic `socket.socket` whose
next bytes are the upstream's own (its SMTP greeting, or the TLS handshake for implicit TLS).
Nothing the upstream sent may be consumed by the dialer. On failure raise `SmtpError` with a
4xx (451 4.4.x): every dial failure is temporary for the client. The error's `reason` says
which hop failed and why, without credentials; its `label` is a fixed vocabulary used as the
metrics reason label.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from typing import Any, Protocol

from relay.errors import SmtpError


class HostResolver(Protocol):
    async def addresses(self, host: str) -> list[str]:
        """The addresses of `host` through the configured DNS (relay.dns.addresses), IPv4
        first. Raises SmtpError (451 4.4.x) when the name cannot be resolved."""
        ...


class Dialer(Protocol):
    @property
    def resolves_remotely(self) -> bool:
        """True when the proxy resolves the upstream's name (socks5h://, http:// CONNECT):
        the name is then passed as is; otherwise callers may pass an address they resolved."""
        ...

    async def connect(self, host: str, port: int) -> socket.socket: ...

    def describe(self) -> str:
        """A log-safe description of the path (e.g. 'direct', 'socks5://proxy:1080')."""
        ...


class DirectDialer:
    """Connect straight to the upstream (no egress proxy configured)."""

    resolves_remotely = False

    def __init__(self, connect_timeout: float = 30.0, resolver: HostResolver | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.resolver = resolver

    def describe(self) -> str:
        return "direct"

    async def connect(self, host: str, port: int) -> socket.socket:
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await connect_tcp(host, port, self.resolver)
        except TimeoutError as exc:
            raise SmtpError(
                451,
                "4.4.1",
                "Upstream not reachable, try again later",
                reason=f"connect to {host}:{port} timed out after {self.connect_timeout:g}s",
                label="upstream_timeout",
            ) from exc
        except OSError as exc:
            raise SmtpError(
                451,
                "4.4.1",
                "Upstream not reachable, try again later",
                reason=f"connect to {host}:{port} failed: {exc.strerror or exc}",
                label="upstream_unreachable",
            ) from exc


async def connect_tcp(host: str, port: int, resolver: HostResolver | None = None) -> socket.socket:
    """The connect loop every dialer shares: resolve `host` (through `resolver`, the configured
    DNS, when given; else the system's), try its addresses in turn, and return the first
    connected socket (non-blocking, TCP_NODELAY). Raises OSError (`socket.gaierror` when the
    system cannot resolve the name), or the resolver's SmtpError; the caller bounds the time."""
    loop = asyncio.get_running_loop()
    infos: Sequence[tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]]
    if resolver is not None and not _is_ip(host):
        infos = [
            (socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM, 0, "", (address, port))
            for address in await resolver.addresses(host)
        ]
    else:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
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
            # Cancelled (a timeout) mid-connect: the socket is still ours to close.
            sock.close()
            raise
    raise last or OSError(f"no address for {host}")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True
