"""HTTP CONNECT (RFC 9110 §9.3.6) done here, reading not one byte past the proxy's reply.

python-socks reads the proxy's reply with one ``recv(65536)`` and drops whatever followed the
reply headers in the same segment, i.e. the upstream's ``220`` greeting, after which the SMTP
session hangs. `_read_reply_head` peeks (MSG_PEEK) and consumes exactly the bytes up to the
blank line ending the reply headers, however the reply is segmented.
"""

from __future__ import annotations

import asyncio
import base64
import re
import socket

from relay.proxy.failures import dial_error, printable
from relay.proxy.url import ProxyUrl, host_port

# Upper bound for the reply headers of an HTTP proxy (and for interim 1xx replies before it).
_MAX_REPLY_HEAD = 16 * 1024
_MAX_INTERIM_REPLIES = 4
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_STATUS_LINE = re.compile(rb"HTTP/(\d)\.(\d) ([0-9]{3})(?:[ \t]([^\r\n]*))?\r?\n")


class _ProtocolError(Exception):
    """The HTTP proxy's reply is not what RFC 9110 allows (log-safe message)."""


async def http_connect(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, url: ProxyUrl, host: str, port: int, *, via: str
) -> None:
    """Open the tunnel to `host`:`port` on `sock`; the socket's next bytes are the upstream's."""
    authority = host_port(host, port)
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if url.username is not None:
        secret = f"{url.username}:{url.password or ''}".encode()
        lines.append(f"Proxy-Authorization: Basic {base64.b64encode(secret).decode()}")
    await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
    hop = f"proxy {url.describe()}"
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
        raise dial_error("proxy_protocol", f"{hop}: bad CONNECT reply: {exc}") from None
    status = f"{code} {phrase}".strip()
    if 200 <= code < 300:
        return
    if code in (401, 407):
        # 407 is the standard answer; tinyproxy 1.11 answers wrong credentials with 401.
        hint = "" if url.username else ", and no credentials are configured"
        raise dial_error("proxy_auth", f"{hop}: authentication refused ({status}{hint})")
    # 502/503: the proxy could not reach the upstream; 504: it timed out doing so.
    label = {502: "upstream_unreachable", 503: "upstream_unreachable", 504: "upstream_timeout"}.get(
        code, "proxy_refused"
    )
    raise dial_error(label, f"{via}: CONNECT refused ({status})")


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
            start_text = printable(bytes(head[:16]).decode("latin-1"))
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
        raise _ProtocolError(f"malformed status line {printable(first)!r}")
    return int(match.group(3)), printable((match.group(4) or b"").decode("latin-1"))
