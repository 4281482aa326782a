"""`relay_limit_usage_ratio{scope,name}`: how much of its daily quotas each user and domain
has used, read from the counters when Prometheus scrapes (not pushed on every message).

The ratio is the higher of messages/`daily` and recipients/`daily_recipients` over the
rolling 24 hours; the token bucket is left out (it refills within seconds, and an alert on
it would only echo bursts). Only entities with a daily quota have a series. With Redis,
every replica reports the same shared figure (aggregate with `max`); while Redis is
unreachable the series are absent rather than wrong.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from relay.limits.counters import Counters
from relay.limits.rules import LimitPolicy

log = logging.getLogger("relay.limits")

REFRESH_TIMEOUT = 2.0
# Figures younger than this are served again: several Prometheus servers (or a scrape
# retried) cost one read of the counters, not one each.
REFRESH_MAX_AGE = 10.0


class LimitUsage(Collector):
    def __init__(
        self, policy: LimitPolicy, counters: Counters, usernames: Iterable[str], listeners: Iterable[str] = ()
    ) -> None:
        self._entities = policy.with_daily_quota(usernames, listeners)
        self._counters = counters
        self._ratios: dict[tuple[str, str], float] = {}
        self._refreshed = -REFRESH_MAX_AGE
        self._refreshing: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        """Read current usage; called by the metrics endpoint before it renders. At most one
        read at a time and one per REFRESH_MAX_AGE; a read that takes too long leaves the
        series absent for this scrape."""
        if time.monotonic() - self._refreshed < REFRESH_MAX_AGE:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._read(), name="limit-usage")
        try:
            await asyncio.wait_for(asyncio.shield(self._refreshing), REFRESH_TIMEOUT)
        except TimeoutError:
            self._ratios = {}

    async def _read(self) -> None:
        usage = await self._counters.usage([entity for entity, _ in self._entities])
        self._ratios = {
            (entity.scope, entity.name): usage[entity].ratio(limits)
            for entity, limits in self._entities
            if entity in usage
        }
        self._refreshed = time.monotonic()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "relay_limit_usage_ratio",
            "Share used of the highest daily quota (messages or recipients, rolling 24 h), by scope and name.",
            labels=["scope", "name"],
        )
        for (scope, name), ratio in sorted(self._ratios.items()):
            family.add_metric([scope, name], ratio)
        yield family
