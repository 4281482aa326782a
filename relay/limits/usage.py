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
from collections.abc import Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from relay.limits.counters import Counters
from relay.limits.rules import LimitPolicy

log = logging.getLogger("relay.limits")

REFRESH_TIMEOUT = 2.0


class LimitUsage(Collector):
    def __init__(self, policy: LimitPolicy, counters: Counters, usernames: Iterable[str]) -> None:
        self._entities = policy.with_daily_quota(usernames)
        self._counters = counters
        self._ratios: dict[tuple[str, str], float] = {}

    async def refresh(self) -> None:
        """Read current usage; called by the metrics endpoint before it renders."""
        try:
            async with asyncio.timeout(REFRESH_TIMEOUT):
                usage = await self._counters.usage([entity for entity, _ in self._entities])
        except TimeoutError:
            usage = {}
        self._ratios = {
            (entity.scope, entity.name): usage[entity].ratio(limits)
            for entity, limits in self._entities
            if entity in usage
        }

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "relay_limit_usage_ratio",
            "Share used of the highest daily quota (messages or recipients, rolling 24 h), by scope and name.",
            labels=["scope", "name"],
        )
        for (scope, name), ratio in sorted(self._ratios.items()):
            family.add_metric([scope, name], ratio)
        yield family
