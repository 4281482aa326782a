"""How relay connects to the limits' Redis: a rotated password (the secret behind
`limits.redis.password` changes) is used without a restart, and no password reaches the logs,
`/readyz` or the metrics. With a real redis-server whose password is changed (ACL, and
`CONFIG SET requirepass`) and the secret rotated in its file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from redis.asyncio.connection import Connection, SSLConnection

from tests.support.config import relay_config
from tests.support.inloop import LoopRelay, in_thread
from tests.support.procs import dead_port
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


# -- relay check ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["shared", "wrong-password", "replica", "nothing-there"])
def test_relay_check_runs_the_limit_script_on_the_shared_redis(
    case, tmp_path, pki, dkim_keys, app_password_hash, upstream
):
    """`relay check` used to say nothing of the limits' Redis: a wrong password or a replica
    address passed the preflight, and the fleet then ran on per-replica counts (fail open),
    letting N times the limit through. The check runs the script the relay runs."""
    secret = tmp_path / "redis-password"
    secret.write_text(OLD if case != "wrong-password" else NEW)
    with RedisServer(tmp_path) as redis:
        redis.cli("ACL", "SETUSER", "relay", "on", f">{OLD}", "~*", "+@all")
        if case == "replica":
            redis.cli("REPLICAOF", "127.0.0.1", "1")
        port = dead_port() if case == "nothing-there" else redis.port
        url = f"redis://relay@127.0.0.1:{port}/0"
        limits = {"users": {"daily": 100}, "backend": "redis", "redis": {"url": url, "password": f"file://{secret}"}}
        config = relay_config(tmp_path, pki, dkim_keys, upstream.port, app_password_hash, limits=limits)
        path = tmp_path / "relay.yaml"
        path.write_text(json.dumps(config))
        checked = [sys.executable, "-m", "relay", "check", "-c", str(path)]
        result = subprocess.run([*checked, "--json"], capture_output=True, text=True, timeout=120)
        table = subprocess.run(checked, capture_output=True, text=True, timeout=120).stdout
        doc = json.loads(result.stdout)
        limits_row = doc["limits"]
        assert limits_row["backend"] == "redis" and limits_row["where"] == url
        if case == "shared":
            assert limits_row["ok"] and limits_row["level"] == "ok" and limits_row["remediation"] is None
            assert redis.cli("EXISTS", "relay:limits:probe").strip() == "1"  # the script wrote
            assert f"✓ limits     redis {url}: the limit script runs" in table
            return
    assert result.returncode == 1 and not limits_row["ok"] and limits_row["level"] == "fail"
    detail, remedy = limits_row["detail"], limits_row["remediation"]
    if case == "wrong-password":
        assert detail.startswith("unreachable: AuthenticationError")
        assert "limits.redis.password" in remedy
    elif case == "replica":
        assert detail.startswith("refused: ReadOnlyError") and "read only replica" in detail
        assert "primary" in remedy
    else:
        assert detail.startswith("unreachable: ConnectionError") and "limits.redis.url" in remedy
    assert f"✗ limits     redis {url}: {detail}" in table and f"→ {remedy}" in table
    assert OLD not in result.stdout + result.stderr + table and NEW not in result.stdout + result.stderr + table
