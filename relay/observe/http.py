"""The metrics port: `/metrics` (Prometheus), `/healthz` (alive), `/readyz` (ready to relay).

`/readyz` answers 200 only when every check passes and 503 otherwise, with a JSON body
naming each check and why it fails, so a load balancer and a human read the same thing.

The server is a few lines of asyncio on purpose: it answers three GET paths to scrapers
and probes, one request per connection, and a web framework would cost every worker
process 25 MiB of memory for that.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from relay import __version__

log = logging.getLogger("relay.http")

# A gauge rather than an Info: Info does not work in prometheus-client's multiprocess mode.
BUILD_INFO = Gauge("relay_build_info", "Version of the running relay (always 1).", ["version"], multiprocess_mode="max")
BUILD_INFO.labels(__version__).set(1)
READY = Gauge("relay_ready", "1 when /readyz passes, else 0.", multiprocess_mode="min")

ReadinessCheck = Callable[[], dict[str, str | None]]


class ScrapedSource(Collector, Protocol):
    """Metrics read when Prometheus scrapes (not kept current on every event): `refresh`
    reads them, `collect` yields them."""

    async def refresh(self) -> None: ...


class _Exposition:
    """The registry to expose plus the sources read at this scrape."""

    def __init__(self, registry: Collector, sources: Sequence[Collector]) -> None:
        self._registry = registry
        self._sources = sources

    def collect(self) -> Iterable[Metric]:
        yield from self._registry.collect()
        for source in self._sources:
            yield from source.collect()


_MAX_REQUEST_HEAD = 8192


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """The request line, once the whole head (up to the empty line) is in: lines end in
    CRLF or, from a hand-typed request, a bare LF (RFC 9112 §2.2). Past _MAX_REQUEST_HEAD
    octets in all: ValueError."""
    request_line = b""
    read = 0
    while True:
        line = await reader.readuntil(b"\n")
        read += len(line)
        if read > _MAX_REQUEST_HEAD:
            raise ValueError("request head too long")
        line = line.rstrip(b"\r\n")
        if not line:
            if not request_line:
                continue  # RFC 9112 §2.2: empty lines before the request line are ignored
            return request_line
        if not request_line:
            request_line = line


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def metrics_registry() -> CollectorRegistry:
    """The registry to expose: the process's own, or, with several worker processes, the
    aggregate of all of them (prometheus-client's multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


class HealthServer:
    def __init__(
        self,
        readiness: ReadinessCheck,
        *,
        detail: ReadinessCheck | None = None,
        scraped: Callable[[], Sequence[ScrapedSource]] | None = None,
    ) -> None:
        self._readiness = readiness
        self._detail = detail
        self._scraped = scraped
        self._server: asyncio.Server | None = None
        self._making: asyncio.Future[bytes] | None = None  # the exposition being made
        self._queued: asyncio.Future[bytes] | None = None  # the next, for requests arriving meanwhile

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        self._server = await asyncio.get_running_loop().create_server(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=_MAX_REQUEST_HEAD), self._serve),
            host=host,
            port=port,
            reuse_address=True,
            reuse_port=reuse_port or None,
        )
        log.info("metrics and health listening", extra={"bind": f"{host}:{port}"})

    def sockets(self) -> list[socket.socket]:
        return list(self._server.sockets) if isinstance(self._server, asyncio.Server) else []

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = ""
        try:
            async with asyncio.timeout(10):
                request_line = await _read_head(reader)
            method, path, _ = request_line.decode("latin-1").split(" ", 2)
            path = path.split("?", 1)[0]
            # RFC 9110 §9.3.2: HEAD is GET without the body (curl -I, some health checkers).
            status, content_type, body = await self._respond("GET" if method == "HEAD" else method, path)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            status, content_type, body = 400, "text/plain", b"bad request\n"
        except ConnectionError:
            writer.close()
            return
        # RFC 9110 §15.5.6: a 405 names the methods the resource takes.
        allow = "Allow: GET, HEAD\r\n" if status == 405 else ""
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{allow}Connection: close\r\n\r\n"
        ).encode("latin-1")
        if method == "HEAD":
            body = b""
        try:
            writer.write(head + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _scrape(self) -> asyncio.Future[bytes]:
        """The exposition for a request arriving now. One is made at a time, and every request
        that arrives while one is being made shares the next (made after it, so never older
        than the request): many clients scraping at once cost the event loop, which the
        SMTP sessions share, about what one does."""
        if self._queued is None:
            self._queued = asyncio.ensure_future(self._generate(self._making))
        return self._queued

    async def _generate(self, before: asyncio.Future[bytes] | None) -> bytes:
        if before is not None:
            await asyncio.wait([before])
        self._making, self._queued = self._queued, None
        ready = all(v is None for v in self._readiness().values())
        READY.set(1 if ready else 0)  # relay_ready tracks readiness even if nothing probes
        sources = self._scraped() if self._scraped is not None else []
        await asyncio.gather(*(source.refresh() for source in sources))
        return await asyncio.to_thread(generate_latest, _Exposition(metrics_registry(), sources))

    async def _respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method != "GET":
            return 405, "text/plain", b"GET only\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, await asyncio.shield(self._scrape())
        if path == "/healthz":
            return 200, "application/json", b'{"status": "ok"}'
        if path == "/readyz":
            checks = self._readiness()
            ready = all(v is None for v in checks.values())
            READY.set(1 if ready else 0)
            report: dict[str, object] = {
                "status": "ready" if ready else "not ready",
                "checks": {k: ("ok" if v is None else v) for k, v in checks.items()},
            }
            # Worth knowing, not failing readiness for (e.g. limits counted locally while
            # Redis is unreachable).
            detail = {k: v for k, v in (self._detail() if self._detail else {}).items() if v is not None}
            if detail:
                report["detail"] = detail
            return (200 if ready else 503), "application/json", json.dumps(report).encode()
        return 404, "text/plain", b"not found: try /metrics, /healthz or /readyz\n"
