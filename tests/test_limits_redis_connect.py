"""How relay connects to the limits' Redis: a rotated password (the secret behind
`limits.redis.password` changes) is used without a restart, and no password reaches the logs,
`/readyz` or the metrics. With a real redis-server whose password is changed (ACL, and
`CONFIG SET requirepass`) and the secret rotated in its file.
"""

from __future__ import annotations

import time

import pytest
from redis.asyncio.connection import Connection, SSLConnection

from tests.support.inloop import LoopRelay, in_thread
from tests.support.redis import RedisServer
from tests.support.smtp import connect, message

pytestmark = pytest.mark.binaries

OLD = "old-Redis-pw-4a7f"
NEW = "new-Redis-pw-9c21"


def test_redis_py_still_has_the_members_relay_connects_through():
    """relay.limits.redis_connect overrides these to resolve through dns.nameservers."""
    for cls in (Connection, SSLConnection):
        assert callable(getattr(cls, "_connect", None)) and callable(getattr(cls, "_connection_arguments", None))


def sent_and_counted(relay: LoopRelay, pki, redis: RedisServer, counted: int) -> None:
    """One message; it must be counted in Redis (the `counted`th of user app)."""
    connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message())
    assert redis.cli("HGET", "relay:limits:user:app", "m").strip() == str(counted)


def wait_for_secret(relay: LoopRelay, ref: str, value: str, timeout: float = 30.0) -> None:
    """Until the secret store has read the rotated value (file:// is polled every 5 s)."""
    deadline = time.monotonic() + timeout
    while (current := relay.running.store.get(ref)) is None or current.text() != value:
        assert time.monotonic() < deadline, "the secret store did not read the rotated secret"
        time.sleep(0.05)


def no_password_shown(relay: LoopRelay) -> None:
    shown = relay.log_text() + relay.scrape() + relay.http("/readyz")[1]
    assert OLD not in shown and NEW not in shown


@in_thread
def test_a_rotated_redis_password_is_used_without_a_restart(make_loop_relay, upstream, pki, tmp_path):
    """An ACL user's password rotated the usual way: the new one added, the secret rotated,
    the old one removed and its connections closed. relay used to keep the password it had
    read at start, so its next connection was refused and the limits fell back to local."""
    secret = tmp_path / "redis-password"
    secret.write_text(OLD)
    with RedisServer(tmp_path) as redis:
        redis.cli("ACL", "SETUSER", "relay", "on", f">{OLD}", "~*", "+@all")
        url = f"redis://relay@127.0.0.1:{redis.port}/0"
        relay = make_loop_relay(
            upstream.port,
            limits={
                "users": {"daily": 100},
                "backend": "redis",
                "redis": {"url": url, "password": f"file://{secret}"},
            },
        )
        sent_and_counted(relay, pki, redis, 1)
        redis.cli("ACL", "SETUSER", "relay", f">{NEW}")
        secret.write_text(NEW)
        wait_for_secret(relay, f"file://{secret}", NEW)
        redis.cli("ACL", "SETUSER", "relay", f"<{OLD}")
        redis.cli("CLIENT", "KILL", "USER", "relay")
        sent_and_counted(relay, pki, redis, 2)
        sent_and_counted(relay, pki, redis, 3)
        assert relay.metric("relay_limit_fail_open_total", backend="redis") == 0
        assert relay.running.readiness_detail() == {"limits": None}
        assert any(e.get("msg") == "redis password changed; reconnecting" for e in relay.logs())
        no_password_shown(relay)


@in_thread
def test_redis_refusing_the_old_password_recovers_when_the_secret_rotates(make_loop_relay, upstream, pki, tmp_path):
    """Redis's password changed first (`requirepass`): relay falls back to local counters
    and says so without the password; once the secret carries the new one, relay reconnects
    by itself and counts in Redis again."""
    secret = tmp_path / "redis-password"
    secret.write_text(OLD)
    with RedisServer(tmp_path) as redis:
        redis.cli("CONFIG", "SET", "requirepass", OLD)
        redis.password = OLD
        relay = make_loop_relay(
            upstream.port,
            limits={
                "users": {"daily": 100},
                "backend": "redis",
                "redis": {"url": redis.url, "password": f"file://{secret}"},
            },
        )
        sent_and_counted(relay, pki, redis, 1)
        redis.cli("CONFIG", "SET", "requirepass", NEW)
        redis.password = NEW
        redis.cli("CLIENT", "KILL", "TYPE", "normal")
        connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message())  # counted locally
        assert relay.metric("relay_limit_fail_open_total", backend="redis") == 1
        assert "redis unreachable" in (relay.running.readiness_detail()["limits"] or "")
        secret.write_text(NEW)
        relay.wait_log(
            lambda e: e.get("msg") == "redis reachable again; limits shared across replicas again", timeout=30
        )
        sent_and_counted(relay, pki, redis, 2)
        no_password_shown(relay)
