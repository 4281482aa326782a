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


@in_thread
def test_an_unusable_dkim_key_counts_and_logs_one_failure(make_loop_relay, upstream, tmp_path):
    """The key ring re-reads what the secret store holds each time it re-indexes; at start
    that made one unusable key count 4 failures (and log 4 errors)."""
    selector = f"junk{uuid.uuid4().hex[:8]}"  # a series no other test made
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"not a key")
    junk.chmod(0o600)
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["dkim"]["keys"].append({"domain": "example.com", "selector": selector, "key": f"file://{junk}"})
    relay.start(wait_ready=False)
    relay.wait_log(lambda e: e.get("msg") == "listening")
    assert relay.metric("relay_dkim_key_load_failures_total", domain="example.com", selector=selector) == 1
    unusable = [
        e for e in relay.logs() if e.get("msg", "").startswith("DKIM key unusable") and e["selector"] == selector
    ]
    assert len(unusable) == 1
