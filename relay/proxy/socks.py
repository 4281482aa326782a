"""SOCKS5 / SOCKS5h / SOCKS4 handshakes, through python-socks.

The TCP connection to the proxy is opened by the dialer and handed to python-socks through
its public ``forward=`` (proxy chaining) parameter, so that connect and handshake get their
own timeouts and errors. python-socks' errors are mapped to the labels of
`relay.proxy.failures`.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from python_socks import ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.asyncio import Proxy

from relay.errors import SmtpError
from relay.proxy.failures import dial_error, printable
from relay.proxy.url import ProxyUrl

_PROXY_TYPES = {"socks5": ProxyType.SOCKS5, "socks5h": ProxyType.SOCKS5, "socks4": ProxyType.SOCKS4}
# SOCKS4 reply codes 0x5C/0x5D: the proxy's identd check of the user id failed.
_SOCKS4_IDENT_FAILURES = (0x5C, 0x5D)


async def socks_handshake(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    url: ProxyUrl,
    dest: str,
    port: int,
    *,
    timeout: float,
    via: str,
) -> socket.socket:
    """Ask the proxy on `sock` for a tunnel to `dest`:`port`. The caller bounds the time;
    python-socks' own timeout (`timeout` + 60) must not fire first."""
    proxy = Proxy(
        _PROXY_TYPES[url.scheme],
        url.host,
        url.port,
        username=url.username,
        password=url.password,
        rdns=url.scheme == "socks5h",
        forward=_Connected(sock),  # type: ignore[arg-type]  # duck-typed first hop
        loop=loop,
    )
    try:
        tunnel: socket.socket = await proxy.connect(dest, port, timeout=timeout + 60)
    except ProxyTimeoutError as exc:
        raise TimeoutError from exc
    except ProxyError as exc:
        raise _socks_error(url, exc, via) from exc
    return tunnel


def _socks_error(url: ProxyUrl, exc: ProxyError, via: str) -> SmtpError:
    text = printable(str(exc))
    code = exc.error_code
    kind = "SOCKS4" if url.scheme == "socks4" else "SOCKS5"
    hop = f"proxy {url.describe()}"
    if code is not None:
        if url.scheme == "socks4" and code in _SOCKS4_IDENT_FAILURES:
            return dial_error("proxy_auth", f"{hop}: user id refused ({kind} reply {code:#04x}: {text})")
        # The proxy worked but the upstream behind it did not answer: that is the
        # upstream's failure, not the proxy's (alerts tell the two apart by label).
        # SOCKS5 (RFC 1928 §6) 0x03-0x05: network/host unreachable, connection refused;
        # 0x06: TTL expired. Others (0x01 general failure, 0x02 ruleset) are the proxy's.
        if url.scheme != "socks4" and code in (0x03, 0x04, 0x05):
            label = "upstream_unreachable"
        elif url.scheme != "socks4" and code == 0x06:
            label = "upstream_timeout"
        else:
            label = "proxy_refused"
        return dial_error(label, f"{via}: connect refused ({kind} reply {code:#04x}: {text})")
    lowered = text.lower()
    if "authentication failure" in lowered or "no acceptable authentication" in lowered:
        hint = "" if url.username else ", and no credentials are configured"
        return dial_error("proxy_auth", f"{hop}: authentication refused ({text}{hint})")
    return dial_error("proxy_protocol", f"{hop}: {kind} protocol error: {text}")


class _Connected:
    """python-socks' ``forward`` hop that hands over an already connected socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    async def connect(self, dest_host: str, dest_port: int, *args: Any, **kw: Any) -> socket.socket:
        return self._sock
