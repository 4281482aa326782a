"""The metrics port: `/metrics` (Prometheus), `/healthz` (alive), `/readyz` (ready to relay).

`/readyz` answers 200 only when every check passes and 503 otherwise, with a JSON body
naming each check and why it fails, so a load balancer and a human read the same thing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Gauge, generate_latest

from relay import __version__

log = logging.getLogger("relay.http")

# A gauge rather than an Info: Info does not work in prometheus-client's multiprocess mode.
BUILD_INFO = Gauge("relay_build_info", "Version of the running relay (always 1).", ["version"],
                   multiprocess_mode="max")
BUILD_INFO.labels(__version__).set(1)
READY = Gauge("relay_ready", "1 when /readyz passes, else 0.", multiprocess_mode="min")

ReadinessCheck = Callable[[], dict[str, str | None]]


def metrics_registry() -> CollectorRegistry:
    """The registry to expose: the process's own, or, with several worker processes, the
    aggregate of all of them (prometheus-client's multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


class HealthServer:
    def __init__(self, readiness: ReadinessCheck) -> None:
        self._readiness = readiness
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True, reuse_port=reuse_port or None)
        await site.start()
        log.info("metrics and health listening", extra={"bind": f"{host}:{port}"})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        # relay_ready tracks readiness even where nothing probes /readyz.
        READY.set(1 if all(v is None for v in self._readiness().values()) else 0)
        body = await asyncio.to_thread(generate_latest, metrics_registry())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        checks = self._readiness()
        ready = all(v is None for v in checks.values())
        READY.set(1 if ready else 0)
        body = {"status": "ready" if ready else "not ready",
                "checks": {k: ("ok" if v is None else v) for k, v in checks.items()}}
        return web.Response(text=json.dumps(body), status=200 if ready else 503,
                            content_type="application/json")
