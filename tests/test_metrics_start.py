"""Counters the alert rules read with `increase()` exist at 0 from the start: a series born
at 1 hides its first step from `increase()` and `rate()` (Prometheus takes its first
sample as the base), so the first failures would go unseen."""

from __future__ import annotations

import uuid

from prometheus_client import REGISTRY

from relay.limits.local import LocalCounters
from tests.support.inloop import in_thread


@in_thread
def test_secret_refresh_failures_are_exported_at_zero_for_every_secret(make_loop_relay, upstream):
    name = f"RELAY_TEST_PASSWORD_{uuid.uuid4().hex[:8].upper()}"  # a series no other test made
    relay = make_loop_relay(upstream.port, start=False, env={name: "svc-password"})
    relay.config["clients"]["users"].append({"username": "svc", "password": f"env://{name}", "senders": ["x.example"]})
    relay.start()
    assert f'relay_secret_refresh_failures_total{{secret="env://{name}"}} 0.0' in relay.scrape().splitlines()


async def test_limit_fail_open_is_exported_at_zero_once_limits_count(tmp_path):
    counters = LocalCounters(tmp_path / "limits")
    try:
        assert REGISTRY.get_sample_value("relay_limit_fail_open_total", {"backend": "local"}) is not None
    finally:
        await counters.close()


@in_thread
def test_each_listener_shows_zero_sessions_and_messages_before_its_first_client(make_loop_relay, upstream):
    name = f"quiet-{uuid.uuid4().hex[:8]}"  # a listener no other test named
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["listeners"][0]["name"] = name
    relay.start()
    lines = relay.scrape().splitlines()
    assert f'relay_sessions_active{{listener="{name}"}} 0.0' in lines
    assert f'relay_messages_received_total{{listener="{name}"}} 0.0' in lines
