"""The relay in the test's own event loop: the fast tier.

The same `relay.server.Relay` that `relay serve` runs, built by the same wiring, started in
the test's event loop with every listener (and the metrics port) on port 0. Its logs and
metrics are read in memory, the same shapes a process test reads from stderr and /metrics.
Clients are real (smtplib, swaks, aiosmtplib) and talk over real sockets.

    @in_thread                                   # the body runs in a worker thread
    def test_something(make_loop_relay, upstream, pki):
        relay = make_loop_relay(upstream.port)   # started (and ready) in the test's loop
        submit(relay, pki)                       # blocking clients are fine in the thread
        assert relay.metric("relay_messages_relayed_total") == 1

An `async def` test can use it directly: `relay = make_loop_relay(port, start=False)`, then
`await relay.astart()`, and only non-blocking clients (aiosmtplib).

Metrics live in one registry per test process, so `metric()` counts from the relay's start
(the value then is subtracted). A relay here has no signals and no reload from a file: what
only a process shows (signals, workers, the CLI, SIGHUP) stays in the e2e tests.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, ParamSpec

from prometheus_client import REGISTRY, Gauge

from relay.config.load import settings_from_mapping
from relay.config.schema import Settings
from relay.config.units import HostPort
from relay.observe.logs import JsonFormatter
from relay.pipeline import finish_background
from relay.server import Relay

P = ParamSpec("P")

# Loggers held at WARNING whatever the level, as `relay serve` does (relay.observe.logs).
_QUIET = (
    "mail.log",
    "aiosmtplib",
    "asyncio",
    "botocore",
    "aiobotocore",
    "urllib3",
    "aiohttp.access",
    "httpx2",
    "httpcore2",
)


def in_thread(test: Callable[P, None]) -> Callable[P, Coroutine[Any, Any, None]]:
    """Run a synchronous test body in a worker thread while the test's event loop serves
    the relay, so that the body can use blocking clients and helpers unchanged."""

    @functools.wraps(test)
    async def run(*args: P.args, **kwargs: P.kwargs) -> None:
        await asyncio.to_thread(test, *args, **kwargs)

    return run


def on_port_zero(settings: Settings) -> Settings:
    """The same settings with every listener and the metrics port on port 0 (the kernel
    picks free ports: no race with other tests)."""
    listeners = [lst.model_copy(update={"bind": HostPort(lst.bind.host, 0)}) for lst in settings.listeners]
    metrics = settings.metrics.model_copy(update={"bind": HostPort(settings.metrics.bind.host, 0)})
    return settings.model_copy(update={"listeners": listeners, "metrics": metrics})


class _Capture(logging.Handler):
    """Log records as the JSON objects `relay serve` writes (one per line on stderr)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        with self._lock:
            self.lines.append(line)

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self.lines)


def _forget_gauge_series() -> None:
    """A relay process starts with no labelled gauge series; so does this one. Counters and
    histograms are counted from the start instead (`LoopRelay.metric`)."""
    # prometheus-client has no public list of a registry's collectors.
    for collector in list(REGISTRY._collector_to_names):
        if isinstance(collector, Gauge) and collector._labelnames and collector._name != "relay_build_info":
            collector.clear()


def _samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], tuple[str, float]]:
    """Every sample of the registry: (name, labels) → (family type, value)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): (family.type, sample.value)
        for family in REGISTRY.collect()
        for sample in family.samples
    }


class LoopRelay:
    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
        *,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.config = config
        self.loop = loop
        # Environment variables for env:// secrets, set while the relay runs.
        self.env = dict(env or {})
        self._saved_env: dict[str, str | None] = {}
        self.relay: Relay | None = None
        self._capture = _Capture()
        self._baseline: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[str, float]] = {}
        self._root_level = logging.WARNING

    # -- lifecycle (astart/astop in the loop; start/stop from the test's worker thread) -----
    async def astart(self, *, wait_ready: bool = True, timeout: float = 20.0) -> LoopRelay:
        settings = on_port_zero(settings_from_mapping(self.config, source=str(self.workdir / "relay.yaml")))
        for name, value in self.env.items():
            self._saved_env.setdefault(name, os.environ.get(name))
            os.environ[name] = value
        root = logging.getLogger()
        self._root_level = root.level
        root.addHandler(self._capture)
        root.setLevel(logging.INFO)
        for name in _QUIET:
            logging.getLogger(name).setLevel(logging.WARNING)
        # A session error's traceback goes with its log line (relay.observe.sessions).
        logging.getLogger("relay.session").setLevel(logging.DEBUG)
        _forget_gauge_series()
        self._baseline = _samples()
        self.relay = Relay(settings, config_path=None)
        await self.relay.start()
        if wait_ready:
            await self.await_ready(timeout)
        return self

    async def await_ready(self, timeout: float = 20.0) -> None:
        assert self.relay is not None
        deadline = time.monotonic() + timeout
        while True:
            checks = self.relay.readiness()
            if all(v is None for v in checks.values()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"relay not ready: {checks}")
            await asyncio.sleep(0.02)

    async def astop(self) -> None:
        if self.relay is not None:
            for server in self.relay.listeners.values():
                server.stop_accepting()
            self.relay.connections.close()
            await self.relay.stop()
            self.relay = None
        root = logging.getLogger()
        root.removeHandler(self._capture)
        root.setLevel(self._root_level)
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env.clear()

    def start(self, *, wait_ready: bool = True, timeout: float = 20.0) -> LoopRelay:
        return self._in_loop(self.astart(wait_ready=wait_ready, timeout=timeout), timeout + 10)

    def wait_ready(self, timeout: float = 20.0) -> None:
        self._in_loop(self.await_ready(timeout), timeout + 10)

    def settle(self, timeout: float = 20.0) -> None:
        """Wait until the work that outlives a session is done: upstream aborts and "relayed"
        notices (relay.pipeline runs them after the client's reply)."""
        self._in_loop(finish_background(timeout), timeout + 10)

    def _in_loop(self, work: Coroutine[Any, Any, Any], timeout: float) -> Any:
        if _in_loop_thread(self.loop):
            raise RuntimeError("called in the event loop's thread: use `await relay.astart()`, or @in_thread")
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout)

    # -- observation (thread-safe) -------------------------------------------------------
    @property
    def running(self) -> Relay:
        assert self.relay is not None, "the relay is not running"
        return self.relay

    def port(self, listener_name: str) -> int:
        for server in self.running.listeners.values():
            if server.name == listener_name:
                return int(server.sockets()[0].getsockname()[1])
        raise KeyError(listener_name)

    @property
    def metrics_addr(self) -> tuple[str, int]:
        host, port = self.running.health.sockets()[0].getsockname()[:2]
        return str(host), int(port)

    def log_text(self) -> str:
        return "\n".join(self._capture.snapshot())

    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self._capture.snapshot()]

    def message_logs(self) -> list[dict[str, Any]]:
        return [e for e in self.logs() if e.get("event") == "message"]

    def wait_log(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.logs():
                if predicate(entry):
                    return entry
            time.sleep(0.02)
        raise AssertionError("no matching log line; last lines:\n" + "\n".join(self._capture.snapshot()[-20:]))

    def metric(self, name: str, /, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 if none): counters
        and histograms counted from the relay's start; gauges as they are (their labelled
        series were cleared at start)."""
        total = 0.0
        for key, (kind, value) in _samples().items():
            sample, found = key[0], dict(key[1])
            if sample == name and all(found.get(k) == v for k, v in labels.items()):
                start = 0.0 if kind == "gauge" else self._baseline.get(key, (kind, 0.0))[1]
                total += value - start
        return total

    def http(self, path: str) -> tuple[int, str]:
        host, port = self.metrics_addr
        try:
            with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def http_json(self, path: str) -> tuple[int, dict[str, Any]]:
        status, text = self.http(path)
        try:
            return status, json.loads(text)
        except ValueError:
            return status, {"raw": text}

    def scrape(self) -> str:
        status, text = self.http("/metrics")
        assert status == 200
        return text


def _in_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
