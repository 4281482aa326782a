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
import socket
from typing import Protocol

from relay.errors import SmtpError


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

    def __init__(self, connect_timeout: float = 30.0) -> None:
        self.connect_timeout = connect_timeout

    def describe(self) -> str:
        return "direct"

    async def connect(self, host: str, port: int) -> socket.socket:
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await connect_tcp(host, port)
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


async def connect_tcp(host: str, port: int) -> socket.socket:
    """The connect loop every dialer shares: resolve `host`, try its addresses in turn, and
    return the first connected socket (non-blocking, TCP_NODELAY). Raises OSError
    (`socket.gaierror` when the name does not resolve); the caller bounds the time."""
    loop = asyncio.get_running_loop()
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
