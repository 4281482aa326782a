"""Sending limits over real SMTP: the replies at RCPT and DATA, the log line and metrics,
counts given back when the upstream does not take a message; then, with real processes
and a real redis-server, one limit across `--workers 2`, two relay instances sharing
Redis, and Redis killed mid-run.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.support.inloop import in_thread
from tests.support.redis import RedisServer
from tests.support.smtp import connect, message, reply


def limits(**users) -> dict:
    return {"users": users}


def send(relay, pki, subject: str, rcpts=("u@example.net",)) -> tuple[int, str]:
    """One message in its own session; the first refusal's (code, text), or (250, ...)."""
    client = connect(relay, pki)
    try:
        code, text = reply(client, "MAIL FROM:<app@example.com>")
        assert code == 250
        accepted = 0
        refusal = None
        for rcpt in rcpts:
            code, text = reply(client, f"RCPT TO:<{rcpt}>")
            if code == 250:
                accepted += 1
            elif refusal is None:
                refusal = (code, text)
        if not accepted:
            return refusal
        code, text = client.data(message(subject=subject))
        return (code, text.decode()) if code != 250 or refusal is None else refusal
    finally:
        client.close()


@in_thread
def test_over_the_rate_rcpt_gets_451_naming_the_limit(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port, limits=limits(rate="1/h", burst=2))
    assert send(relay, pki, "one")[0] == 250
    assert send(relay, pki, "two")[0] == 250
    mail_commands = upstream.mail_commands
    assert send(relay, pki, "three") == (
        451,
        "4.7.0 Sending limit reached: sending rate of user app (1/h, burst 2), try again later",
    )
    assert upstream.mail_commands == mail_commands  # refused before the upstream heard of it
    line = relay.wait_log(lambda e: e.get("event") == "message" and e.get("code") == 451)
    assert line["limit"] == "user:app:rate"
    assert "tokens left" in line["reason"]
    assert relay.metric("relay_limit_refusals_total", scope="user", name="app") == 1
    assert relay.metric("relay_messages_rejected_total", reason="limit") == 1


@in_thread
def test_daily_recipient_quota_refuses_the_excess_recipients_with_452(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port, limits=limits(daily_recipients=3))
    assert send(relay, pki, "first", rcpts=["a@example.net", "b@example.net"])[0] == 250
    code, text = send(relay, pki, "second", rcpts=["c@example.net", "d@example.net"])
    assert (code, text) == (
        452,
        "4.5.3 Sending limit reached: daily recipient quota of user app (3 recipients in 24 h), "
        "send to the other recipients later",
    )
    # The recipient that fitted was delivered; the other one waits for the client's retry.
    assert [m.rcpt_tos for m in upstream.wait_for(2)] == [["a@example.net", "b@example.net"], ["c@example.net"]]


@in_thread
def test_a_domain_quota_refuses_at_data_without_figures(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port, limits={"domains": {"example.com": {"daily": 1}}})
    assert send(relay, pki, "one")[0] == 250
    assert send(relay, pki, "two") == (
        451,
        "4.7.0 Sending limit reached: daily message quota of domain example.com, try again later",
    )
    assert len(upstream.messages) == 1
    line = relay.wait_log(lambda e: e.get("event") == "message" and e.get("code") == 451)
    assert line["limit"] == "domain:example.com:daily"
    assert line["from_domain"] == "example.com"
    assert relay.metric("relay_limit_refusals_total", scope="domain", name="example.com") == 1


@in_thread
def test_a_message_the_upstream_refused_gives_its_count_back(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port, limits=limits(daily=1))
    upstream.behaviour.data_reply = "451 4.3.0 upstream busy"
    assert send(relay, pki, "refused upstream")[0] == 451
    upstream.behaviour.data_reply = None
    assert send(relay, pki, "retried")[0] == 250  # the quota of one was not spent on the failure
    assert send(relay, pki, "over")[0] == 451


@in_thread
def test_usage_ratio_is_read_at_scrape(make_loop_relay, upstream, pki):
    relay = make_loop_relay(
        upstream.port, limits={"users": {"daily": 4}, "domains": {"example.com": {"daily_recipients": 10}}}
    )
    assert send(relay, pki, "one", rcpts=["a@example.net", "b@example.net"])[0] == 250
    assert send(relay, pki, "two")[0] == 250
    scrape = relay.scrape()
    assert 'relay_limit_usage_ratio{name="app",scope="user"} 0.5' in scrape
    assert 'relay_limit_usage_ratio{name="example.com",scope="domain"} 0.3' in scrape
    status, body = relay.http_json("/readyz")
    assert status == 200 and "detail" not in body


@in_thread
def test_limits_are_kept_across_a_reload(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port, limits=limits(daily=2))
    assert send(relay, pki, "one")[0] == 250
    settings = relay.running.settings
    raised = settings.model_copy(
        update={
            "limits": settings.limits.model_copy(
                update={"users": settings.limits.users.model_copy(update={"daily": 3})}
            )
        }
    )
    relay.running._reload_settings = lambda: raised
    assert relay._in_loop(relay.running.reload(), 20)
    assert send(relay, pki, "two")[0] == 250
    assert send(relay, pki, "three")[0] == 250  # the count of "one" survived the reload
    assert send(relay, pki, "four")[0] == 451


@in_thread
def test_counters_that_cannot_be_kept_let_mail_through(make_loop_relay, upstream, pki, tmp_path):
    relay = make_loop_relay(upstream.port, start=False, limits=limits(daily=1))
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    relay.config["data_dir"] = str(blocked)  # limits/ cannot be made under a file
    relay.start()
    assert [send(relay, pki, f"m{i}")[0] for i in range(2)] == [250, 250]
    assert relay.metric("relay_limit_fail_open_total", backend="local") == 2
    status, body = relay.http_json("/readyz")
    assert status == 200 and "local limit counters failing" in body["detail"]["limits"]


@pytest.mark.binaries
@in_thread
def test_redis_outage_fails_open_and_says_so_in_readyz(make_loop_relay, upstream, pki, tmp_path):
    with RedisServer(tmp_path) as redis:
        relay = make_loop_relay(
            upstream.port, limits={"users": {"daily": 3}, "backend": "redis", "redis": {"url": redis.url}}
        )
        assert send(relay, pki, "shared")[0] == 250
        assert redis.cli("HGET", "relay:limits:user:app", "m").strip() == "1"
        redis.kill()
        # Mail keeps flowing on this host's counters, which still enforce the limit.
        assert [send(relay, pki, f"outage {i}")[0] for i in range(4)] == [250, 250, 250, 451]
        # Three messages counted locally; the fourth was refused at RCPT by those counts.
        assert relay.metric("relay_limit_fail_open_total", backend="redis") == 3
        status, body = relay.http_json("/readyz")
        assert status == 200, body
        assert "redis unreachable since" in body["detail"]["limits"]
        assert sum("redis unreachable" in e.get("msg", "") for e in relay.logs()) == 1
        redis.start()
        deadline = time.monotonic() + 30
        while "detail" in relay.http_json("/readyz")[1]:
            assert time.monotonic() < deadline, "relay did not reconnect to Redis"
            time.sleep(0.2)
        assert send(relay, pki, "back")[0] == 250
        assert redis.cli("HGET", "relay:limits:user:app", "m").strip() == "1"


# -- processes ------------------------------------------------------------------------------
def test_one_limit_across_two_workers(make_relay, upstream, pki):
    """`--workers 2`: the workers share one count; ten sessions, whichever worker takes
    each, get exactly the daily quota of four."""
    relay = make_relay(upstream.port, start=False, limits=limits(daily=4))
    relay.args = ["--workers", "2"]
    relay.start()
    codes = [send(relay, pki, f"w{i}")[0] for i in range(10)]
    assert codes.count(250) == 4 and codes.count(451) == 6, codes
    assert len(upstream.messages) == 4
    assert relay.metric("relay_limit_refusals_total") == 6


@pytest.mark.binaries
def test_two_instances_share_redis_and_survive_its_outage(make_relay, upstream, pki, tmp_path):
    with RedisServer(tmp_path) as redis:
        shared = {"users": {"daily": 4}, "backend": "redis", "redis": {"url": redis.url, "timeout": "2s"}}
        first = make_relay(upstream.port, limits=shared)
        second = make_relay(upstream.port, limits=shared)
        codes = [send(relay, pki, f"r{i}")[0] for i, relay in zip(range(6), [first, second] * 3, strict=False)]
        assert codes == [250, 250, 250, 250, 451, 451]  # one quota for both replicas
        assert first.metric("relay_limit_usage_ratio", scope="user", name="app") == 1.0
        assert second.metric("relay_limit_usage_ratio", scope="user", name="app") == 1.0
        # A new day for the test: the quota is raised (SIGHUP), the counts stay.
        for relay in (first, second):
            relay.config["limits"] = {**shared, "users": {"daily": 10}}
            relay.write_config()
            relay.signal(signal.SIGHUP)
            relay.wait_log(lambda e: e.get("msg") == "configuration reloaded")
        assert first.metric("relay_limit_usage_ratio", scope="user", name="app") == 0.4

        redis.kill()
        # Each replica now counts its own traffic against the quota: mail flows again.
        assert send(first, pki, "outage a")[0] == 250
        assert send(second, pki, "outage b")[0] == 250
        for relay in (first, second):
            status, body = relay.http_json("/readyz")
            assert status == 200 and "redis unreachable" in body["detail"]["limits"]
            assert relay.metric("relay_limit_fail_open_total", backend="redis") >= 1
        redis.start()
        for relay in (first, second):
            deadline = time.monotonic() + 30
            while "detail" in relay.http_json("/readyz")[1]:
                assert time.monotonic() < deadline, "relay did not reconnect to Redis"
                time.sleep(0.2)
        # Redis came back empty: counting starts again, shared.
        assert send(first, pki, "after")[0] == 250
        assert redis.cli("HGET", "relay:limits:user:app", "m").strip() == "1"


# -- spool mode ------------------------------------------------------------------------------
@in_thread
def test_spool_defers_a_domain_excess_and_refuses_a_user_excess(make_loop_relay, upstream, pki, tmp_path):
    """Spool mode: a From domain's limit stands for what the upstream takes, so the excess
    is acknowledged and waits in the spool; a user's limit is refused as in passthrough."""
    relay = make_loop_relay(
        upstream.port,
        queue={"mode": "spool", "dir": str(tmp_path / "spool"), "retry": ["1s"]},
        limits={"users": {"daily": 3}, "domains": {"example.com": {"rate": "1/h", "burst": 1}}},
    )
    codes = [send(relay, pki, f"s{i}") for i in range(4)]
    assert [code for code, _ in codes[:3]] == [250, 250, 250]  # all acknowledged (on disk)
    assert codes[3][0] == 451 and "daily message quota of user app" in codes[3][1]
    upstream.wait_for(1)
    relay.wait_log(lambda e: e.get("msg") == "delivery deferred by a sending limit")
    assert len(upstream.messages) == 1  # the domain's rate lets one through; two wait, queued
    assert relay.metric("relay_limit_refusals_total", scope="domain", name="example.com") == 0


def test_effective_configuration_shows_no_redis_url_secret(tmp_path):
    """What the startup and reload lines log. Validation refuses a password or options in
    limits.redis.url; should one ever get there, the logged URL still carries no secret."""
    from relay.config.load import redacted, settings_from_mapping

    data = {
        "listeners": [{"name": "side", "bind": "127.0.0.1:2525", "tls": "none", "auth": "none"}],
        "upstream": {"host": "smtp.example.com"},
        "limits": {"domains": {"example.com": {"daily": 5}}, "backend": "redis", "redis": {"url": "redis://r:6379/0"}},
    }
    settings = settings_from_mapping(data, offline=True)
    assert settings.limits is not None and settings.limits.redis is not None
    leaky = settings.limits.redis.model_copy(
        update={"url": "rediss://app:pw-in-userinfo@r:6379/0?password=pw-in-query"}
    )
    settings = settings.model_copy(update={"limits": settings.limits.model_copy(update={"redis": leaky})})
    logged = str(redacted(settings))
    assert "pw-in-userinfo" not in logged and "pw-in-query" not in logged
    assert "rediss://app:<redacted>@r:6379/0?<redacted>" in logged


@pytest.mark.binaries
@in_thread
def test_with_redis_the_retry_of_a_message_the_upstream_refused_is_not_refused(
    make_loop_relay, upstream, pki, tmp_path
):
    """test_a_message_the_upstream_refused_gives_its_count_back, with `backend: redis`: the
    count given back in Redis used to stay in what RCPT checks against, until the slot ended."""
    with RedisServer(tmp_path) as redis:
        relay = make_loop_relay(
            upstream.port, limits={"users": {"daily": 1}, "backend": "redis", "redis": {"url": redis.url}}
        )
        upstream.behaviour.data_reply = "451 4.3.0 upstream busy"
        assert send(relay, pki, "refused upstream")[0] == 451
        upstream.behaviour.data_reply = None
        assert redis.cli("HGET", "relay:limits:user:app", "m").strip() == "0"  # given back in Redis
        assert send(relay, pki, "retried")[0] == 250
        assert send(relay, pki, "one too many")[0] == 451


@in_thread
def test_spool_keeps_a_limit_deferral_across_scans(make_loop_relay, upstream, pki, tmp_path):
    """A deferral by a sending limit is not an attempt, so it is not in the entry's state;
    every scan used to put the entry back at its on-disk due time (past): read from disk,
    parsed and counted again, scan after scan, for as long as the limit held."""
    relay = make_loop_relay(
        upstream.port,
        queue={"mode": "spool", "dir": str(tmp_path / "spool"), "retry": ["1m"]},
        limits={"domains": {"example.com": {"rate": "1/h", "burst": 1}}},
    )
    runner = relay.running.queue.runner
    runner.scan_interval = 0.2  # 10 s in production; only makes the test quicker
    for i in range(5):
        assert send(relay, pki, f"p{i}")[0] == 250
    upstream.wait_for(1)

    def deferrals() -> list[dict]:
        return [e for e in relay.logs() if e.get("msg") == "delivery deferred by a sending limit"]

    relay.wait_log(lambda e: len(deferrals()) >= 4)
    scans = []
    relay.wait_log(lambda e: scans.append(runner._last_scan) or len(set(scans)) >= 10, timeout=30)
    assert all(e["wait_s"] > 3000 for e in deferrals())  # "try again in an hour"...
    assert len(deferrals()) == 4  # ...and each of the four waits: no scan reads it again
    assert len(upstream.messages) == 1
    assert relay.metric("relay_queue_messages", state="deferred") == 4

    async def the_hour_is_over() -> None:  # as if: the domain's gate and deferrals end now
        for entry_id, (domain, _until) in list(runner._paced.items()):
            runner._paced[entry_id] = (domain, 0.0)
        runner._domain_gates.clear()
        for entry_id in list(runner._paced):
            runner._schedule(entry_id, 0.0)

    relay._in_loop(the_hour_is_over(), 10)
    relay.wait_log(lambda e: len(deferrals()) >= 5)
    scans.clear()
    relay.wait_log(lambda e: scans.append(runner._last_scan) or len(set(scans)) >= 5, timeout=30)
    # One entry tried the domain's limit (still reached: the rate is 1/h); the other three
    # waited for its outcome instead of each being read and counted to learn the same.
    assert len(deferrals()) == 5
    assert len(upstream.messages) == 1


@in_thread
def test_skipping_auth_on_an_optional_listener_does_not_escape_the_limits(make_loop_relay, upstream, pki):
    """On an `auth: optional` listener a client could leave its user's limits by not
    authenticating. `limits.unauthenticated` counts those clients together, per listener;
    without it, the relay says at start that the user limits can be skipped there."""

    def send_as(login: bool, subject: str) -> tuple[int, str]:
        client = connect(relay, pki, login=login)
        try:
            assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
            code, text = reply(client, "RCPT TO:<u@example.net>")
            if code != 250:
                return code, text
            code, text = client.data(message(subject=subject))
            return code, text.decode()
        finally:
            client.close()

    relay = make_loop_relay(upstream.port, start=False, limits={"users": {"daily": 1}})
    relay.config["listeners"][0]["auth"] = "optional"
    relay.start()
    warning = relay.wait_log(lambda e: "user limits apply to authenticated clients only" in e.get("msg", ""))
    assert warning["listeners"] == ["submission"]

    relay = make_loop_relay(upstream.port, start=False, limits={"users": {"daily": 1}, "unauthenticated": {"daily": 2}})
    relay.config["listeners"][0]["auth"] = "optional"
    relay.start()
    assert send_as(True, "a1")[0] == 250
    assert send_as(True, "a2")[0] == 451  # the user's daily quota of 1
    assert [send_as(False, f"n{i}")[0] for i in range(2)] == [250, 250]
    code, text = send_as(False, "n3")  # the same app without AUTH: the listener's quota of 2
    assert code == 451 and "daily message quota of listener submission (2 messages in 24 h)" in text
    assert relay.metric("relay_limit_refusals_total", scope="listener", name="submission") == 1


@in_thread
def test_a_failed_reload_keeps_the_counters_in_use_and_closes_the_new_ones(make_loop_relay, upstream, pki, tmp_path):
    """A reload that fails after the counters were rebuilt (here a new listener on a port
    in use, with a new data_dir) used to leave them current: /readyz detail and stop()
    looked at counters nothing used, and the ones in use were never closed."""
    import socket

    from relay.config.schema import ListenerSettings
    from relay.limits import local

    relay = make_loop_relay(upstream.port, limits={"users": {"daily": 5}})
    running = relay.running
    in_use = running.pipeline.limiter.counters
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        settings = running.settings
        busy = ListenerSettings.model_validate(
            {"name": "extra", "bind": f"127.0.0.1:{taken.getsockname()[1]}", "tls": "starttls", "auth": "required"}
        )
        elsewhere = tmp_path / "elsewhere"
        new = settings.model_copy(update={"data_dir": elsewhere, "listeners": [*settings.listeners, busy]})
        running._reload_settings = lambda: new
        assert relay._in_loop(running.reload(), 20) is False  # "the running configuration stays"
    finally:
        taken.close()
    assert running.pipeline.limiter.counters is in_use
    assert running.limit_counters.current is in_use  # what /readyz detail and stop() look at
    opened = [path for _pid, path in local._environments._current]
    assert not [path for path in opened if path.startswith(str(elsewhere))]  # the new ones closed
    assert send(relay, pki, "after")[0] == 250


async def test_redis_counters_close_their_local_fallback(tmp_path):
    from relay.limits.local import LocalCounters
    from relay.limits.redis_counters import RedisCounters

    fallback = LocalCounters(tmp_path / "limits")
    counters = RedisCounters("redis://127.0.0.1:1/0", fallback=fallback)
    await counters.close()
    assert fallback._env is None  # every reload that rebuilt Redis counters kept one open
