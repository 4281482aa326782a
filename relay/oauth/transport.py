"""HTTPS to a token endpoint over connections opened by the relay's own `Dialer`.

The private subnets relay runs in often have no way out but the egress proxy, so the token
endpoint is reached exactly like the upstream: through `upstream.proxy` (SOCKS5, SOCKS5h,
SOCKS4 or HTTP CONNECT, with the same credentials, timeouts and metrics), or directly when
there is none. httpcore2's documented network-backend interface is the seam: the backend
dials through the `Dialer`, TLS runs end to end with the endpoint (SNI and certificate
checks for the endpoint's name, with the configured CA bundle), and httpx2 speaks HTTP/1.1
on top. httpx2's own proxy support is not used: it has no SOCKS4, and it would be a second
proxy implementation with its own failure modes.

Token requests are rare (one an hour per upstream), so connections are not kept alive:
each request gets a fresh tunnel and nothing goes stale in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpcore2
import httpx2

from relay.deliver.dial import Dialer
from relay.errors import SmtpError

# A token response is a few kilobytes; anything far larger is not one.
MAX_RESPONSE_BYTES = 256 * 1024


def endpoint_tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Verification always on; `ca_file` adds a bundle to the system's (a private endpoint,
    a TLS-inspecting egress)."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class DialerTransport(httpx2.AsyncBaseTransport):
    """An httpx2 transport whose TCP connections come from a relay `Dialer`."""

    def __init__(self, dialer: Dialer, tls_context: ssl.SSLContext) -> None:
        self._pool = httpcore2.AsyncConnectionPool(
            ssl_context=tls_context,
            network_backend=_DialerBackend(dialer),
            max_connections=4,
            max_keepalive_connections=0,
            http1=True,
            http2=False,
        )

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        assert isinstance(request.stream, httpx2.AsyncByteStream)
        core_request = httpcore2.Request(
            method=request.method,
            url=httpcore2.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        try:
            response = await self._pool.handle_async_request(core_request)
        except httpcore2.TimeoutException as exc:
            raise httpx2.TimeoutException(str(exc), request=request) from exc
        except (httpcore2.NetworkError, httpcore2.ProtocolError, httpcore2.UnsupportedProtocol) as exc:
            raise httpx2.TransportError(str(exc)) from exc
        return httpx2.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_BoundedBody(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


class _BoundedBody(httpx2.AsyncByteStream):
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        size = 0
        try:
            async for part in self._stream:
                size += len(part)
                if size > MAX_RESPONSE_BYTES:
                    raise httpx2.TransportError(f"response body larger than {MAX_RESPONSE_BYTES} bytes")
                yield part
        except httpcore2.TimeoutException as exc:
            raise httpx2.TimeoutException(str(exc)) from exc
        except (httpcore2.NetworkError, httpcore2.ProtocolError) as exc:
            raise httpx2.TransportError(str(exc)) from exc

    async def aclose(self) -> None:
        if hasattr(self._stream, "aclose"):
            await self._stream.aclose()


class _DialerBackend(httpcore2.AsyncNetworkBackend):
    def __init__(self, dialer: Dialer) -> None:
        self._dialer = dialer

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                sock = await self._dialer.connect(host, port)
        except TimeoutError as exc:
            raise httpcore2.ConnectTimeout(f"connect to {host}:{port} timed out") from exc
        except SmtpError as exc:
            # The dialer's reason names the hop that failed (the proxy, or the endpoint behind it).
            error = httpcore2.ConnectTimeout if exc.label.endswith("_timeout") else httpcore2.ConnectError
            raise error(exc.reason) from exc
        try:
            reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_RESPONSE_BYTES)
        except BaseException:
            sock.close()
            raise
        return _SocketStream(reader, writer)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore2.AsyncNetworkStream:
        raise httpcore2.ConnectError("token endpoints are reached over TCP only")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _SocketStream(httpcore2.AsyncNetworkStream):
    """asyncio streams behind httpcore2's stream interface, its exceptions mapped."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError as exc:
            raise httpcore2.ReadTimeout("no reply from the token endpoint in time") from exc
        except (OSError, ssl.SSLError) as exc:
            raise httpcore2.ReadError(_os_text(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            async with asyncio.timeout(timeout):
                self._writer.write(buffer)
                await self._writer.drain()
        except TimeoutError as exc:
            raise httpcore2.WriteTimeout("sending to the token endpoint timed out") from exc
        except (OSError, ssl.SSLError) as exc:
            raise httpcore2.WriteError(_os_text(exc)) from exc

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            async with asyncio.timeout(1):
                await self._writer.wait_closed()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore2.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except TimeoutError as exc:
            await self.aclose()
            raise httpcore2.ConnectTimeout("TLS handshake with the token endpoint timed out") from exc
        except (OSError, ssl.SSLError) as exc:
            await self.aclose()
            raise httpcore2.ConnectError(f"TLS with the token endpoint failed: {_os_text(exc)}") from exc
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._writer.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._writer.get_extra_info("sockname")
        if info == "server_addr":
            return self._writer.get_extra_info("peername")
        if info == "socket":
            return self._writer.get_extra_info("socket")
        return None


def _os_text(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
