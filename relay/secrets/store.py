"""The secret store: resolves references through their backends, keeps the last good value,
and refreshes every `secrets.refresh` so rotations need no restart.

A failed refresh keeps serving the last good value (a secrets-manager outage must not stop
mail), logs why, and counts it. Subscribers hear about changed values only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from relay.secrets.base import SecretBackend, SecretFetchError, SecretRef, SecretValue

log = logging.getLogger("relay.secrets")

SECRET_AGE = Gauge(
    "relay_secret_age_seconds",
    "Seconds since the secret was last fetched successfully from its backend.",
    ["secret"],
    multiprocess_mode="max",
)
SECRET_REFRESH_FAILURES = Counter(
    "relay_secret_refresh_failures_total",
    "Failed fetches of a secret from its backend (the last good value stays in use).",
    ["secret"],
)

Listener = Callable[[str, SecretValue], None]
LOCAL_POLL_INTERVAL = 5.0


@dataclass(slots=True)
class _Entry:
    value: SecretValue | None = None
    fetched_at: float = 0.0
    error: str | None = None


class SecretStore:
    def __init__(self, backends: Iterable[SecretBackend], refresh_interval: float) -> None:
        self._backends = {b.scheme: b for b in backends}
        self.refresh_interval = refresh_interval
        self._entries: dict[str, _Entry] = {}
        self._listeners: list[Listener] = []

    def set_backend(self, backend: SecretBackend) -> None:
        """Install (or replace, after a reload) the backend for its scheme."""
        self._backends[backend.scheme] = backend

    def backend(self, scheme: str) -> SecretBackend | None:
        return self._backends.get(scheme)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def get(self, ref: str) -> SecretValue | None:
        entry = self._entries.get(ref)
        return entry.value if entry else None

    def error(self, ref: str) -> str | None:
        entry = self._entries.get(ref)
        return entry.error if entry else "not loaded"

    async def ensure(self, refs: Iterable[str]) -> None:
        """Fetch every reference not fetched yet (new ones after a reload)."""
        missing = [r for r in dict.fromkeys(refs) if r not in self._entries]
        for ref in missing:
            # At 0 from the start: `increase()` (RelaySecretRefreshStale) cannot see a
            # counter's first step when the series is born at 1.
            SECRET_REFRESH_FAILURES.labels(ref)
        await asyncio.gather(*(self._fetch(r) for r in missing))

    def retain(self, refs: Iterable[str]) -> None:
        """Forget references the current config no longer uses."""
        keep = set(refs)
        for ref in list(self._entries):
            if ref not in keep:
                del self._entries[ref]
                if _has_label(SECRET_AGE, ref):
                    SECRET_AGE.remove(ref)

    def forget(self, ref: str) -> None:
        """Stop fetching one reference (a key that its key set no longer lists)."""
        if self._entries.pop(ref, None) is not None and _has_label(SECRET_AGE, ref):
            SECRET_AGE.remove(ref)

    async def refresh(self) -> None:
        await asyncio.gather(*(self._fetch(r) for r in list(self._entries)))

    async def run(self) -> None:
        """Refresh forever. Local references (mounted files, which Kubernetes updates by a
        symlink swap) are re-read every few seconds, since that costs a `stat` and a small
        read; remote backends every `refresh_interval`. The age gauges stay current."""
        next_refresh = time.monotonic() + self.refresh_interval
        while True:
            self.update_ages()
            await asyncio.sleep(min(LOCAL_POLL_INTERVAL, max(0.0, next_refresh - time.monotonic())))
            if time.monotonic() >= next_refresh:
                await self.refresh()
                next_refresh = time.monotonic() + self.refresh_interval
            else:
                local = [r for r in self._entries if r.startswith(("file://", "env://"))]
                await asyncio.gather(*(self._fetch(r) for r in local))

    def update_ages(self) -> None:
        now = time.monotonic()
        for ref, entry in self._entries.items():
            if entry.value is not None:
                SECRET_AGE.labels(ref).set(round(now - entry.fetched_at, 1))

    async def close(self) -> None:
        for backend in self._backends.values():
            await backend.close()

    def _backend(self, ref: str) -> SecretBackend:
        parsed = SecretRef.parse(ref)
        backend = self._backends.get(parsed.scheme)
        if backend is None:
            raise SecretFetchError(f"{ref}: no {parsed.scheme}:// backend is configured")
        return backend

    async def _fetch(self, ref: str) -> None:
        entry = self._entries.setdefault(ref, _Entry())
        try:
            value = await self._backend(ref).fetch(SecretRef.parse(ref))
        except SecretFetchError as exc:
            entry.error = str(exc)
            SECRET_REFRESH_FAILURES.labels(ref).inc()
            log.warning(
                "secret fetch failed; keeping the last good value"
                if entry.value
                else "secret fetch failed; no value yet",
                extra={"secret": ref, "reason": str(exc)},
            )
            return
        except Exception as exc:  # a backend bug must not kill the refresh loop
            entry.error = f"{ref}: {type(exc).__name__}"
            SECRET_REFRESH_FAILURES.labels(ref).inc()
            log.error("secret backend error", extra={"secret": ref, "reason": type(exc).__name__})
            return
        changed = entry.value is None or entry.value.version != value.version or entry.value.data != value.data
        entry.value, entry.fetched_at, entry.error = value, time.monotonic(), None
        SECRET_AGE.labels(ref).set(0)
        if changed:
            for listener in list(self._listeners):
                try:
                    listener(ref, value)
                except Exception:
                    log.exception("secret listener failed", extra={"secret": ref})


def _has_label(metric: Gauge | Counter, ref: str) -> bool:
    return (ref,) in getattr(metric, "_metrics", {})
