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
    # True when the proxy resolves the upstream's name (socks5h://, http:// CONNECT): the
    # name is then passed as is; otherwise callers may pass an address they resolved.
    resolves_remotely: bool

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
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                last: OSError | None = None
                for family, type_, proto, _, addr in infos:
                    sock = socket.socket(family, type_, proto)
                    sock.setblocking(False)
                    try:
                        await loop.sock_connect(sock, addr)
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        return sock
                    except OSError as exc:
                        sock.close()
                        last = exc
                raise last or OSError(f"no address for {host}")
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
