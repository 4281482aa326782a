"""The AUTH failure counters alone: expiry, bounds, and the busy answer when too many
password checks wait."""

from __future__ import annotations

import pytest

from relay.auth import users
from relay.auth.throttle import AuthThrottle
from relay.config.load import settings_from_mapping
from relay.errors import SmtpError
from tests.support.config import APP_PASSWORD, relay_config
from tests.support.pipeline import FakeTarget, build_test_pipeline


def test_counts_expire_after_the_window_and_stay_bounded():
    now = [0.0]
    throttle = AuthThrottle(per_address=2, per_username=3, window=60, max_tracked=100, clock=lambda: now[0])
    for _ in range(2):
        throttle.failed("10.0.0.1", "app", username_limited=False)
    assert throttle.address_blocked("10.0.0.1") and not throttle.username_limited("app")
    now[0] = 61.0
    assert not throttle.address_blocked("10.0.0.1")
    for n in range(500):
        throttle.failed(f"10.1.{n // 256}.{n % 256}", f"user{n}", username_limited=False)
    assert len(throttle.addresses) == 100 and len(throttle.usernames) == 100
    throttle.succeeded("10.1.1.243")
    assert len(throttle.addresses) == 99


async def test_too_many_waiting_password_checks_get_454(tmp_path, pki, dkim_keys, app_password_hash, monkeypatch):
    settings = settings_from_mapping(relay_config(tmp_path, pki, dkim_keys, 25, app_password_hash))
    pipeline = await build_test_pipeline(settings, FakeTarget())
    monkeypatch.setattr(users, "_HASH_QUEUE", 0)
    with pytest.raises(SmtpError) as busy:
        await pipeline.authenticate("app", APP_PASSWORD.encode(), "10.0.0.1")
    assert (busy.value.code, busy.value.reply.enhanced, busy.value.label) == (454, "4.7.0", "auth_busy")
    monkeypatch.setattr(users, "_HASH_QUEUE", 16)
    assert await pipeline.authenticate("app", APP_PASSWORD.encode(), "10.0.0.1") is not None
