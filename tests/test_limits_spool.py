"""Spool mode counts a message once against its From domain's limits, however many
delivery attempts it takes and across restarts of the relay, with both counter backends:
a real upstream that refuses a recipient with 4xx and then takes it, the relay stopped
between attempts and in the middle of one, and a real redis-server for `backend: redis`.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest

from relay.limits.rules import DOMAIN, Entity
from relay.queue import admin
from relay.queue.store import Spool
from tests.support.inloop import LoopRelay, in_thread
from tests.support.redis import RedisServer
from tests.support.smtp import connect, message, reply

DOMAIN_LIMITS = {"example.com": {"daily": 10, "daily_recipients": 100}}


def send(relay: LoopRelay, pki, subject: str, rcpts: tuple[str, ...]) -> None:
    client = connect(relay, pki)
    try:
        assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
        for rcpt in rcpts:
            assert reply(client, f"RCPT TO:<{rcpt}>")[0] == 250
        code, _ = client.data(message(subject=subject))
        assert code == 250  # on disk: the spool delivers it
    finally:
        client.close()


def domain_usage(relay: LoopRelay) -> tuple[int, int]:
    """The From domain's messages and recipients in the window, as its counters hold them."""
    counters = relay.running.limit_counters.current
    assert counters is not None
    entity = Entity(DOMAIN, "example.com")
    usage = relay._in_loop(counters.usage([entity]), 10)
    return (usage[entity].messages, usage[entity].recipients) if entity in usage else (0, 0)


def spool_state(relay: LoopRelay) -> list[dict]:
    """The state files of the entries in the spool (one per entry that has had an attempt)."""
    spool = relay.config["queue"]["dir"]
    return [json.loads(p.read_bytes().split(b"\n", 1)[1]) for p in Path(spool).rglob("*.state")]


def state_id(relay: LoopRelay) -> str:
    (path,) = Path(relay.config["queue"]["dir"]).rglob("*.state")
    return path.name.removesuffix(".state")


def settled(relay: LoopRelay, condition, timeout: float = 30.0) -> None:
    """Wait until no delivery is under way and `condition()` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not relay.running.queue.runner.inflight and condition():
            return
        time.sleep(0.02)
    raise AssertionError("the spool did not settle; last lines:\n" + "\n".join(relay.log_text().splitlines()[-20:]))


@contextlib.contextmanager
def limits_backend(kind: str, tmp_path):
    if kind == "local":
        yield {"domains": DOMAIN_LIMITS}
        return
    with RedisServer(tmp_path) as redis:
        yield {"domains": DOMAIN_LIMITS, "backend": "redis", "redis": {"url": redis.url}}


BACKENDS = [pytest.param("local"), pytest.param("redis", marks=pytest.mark.binaries)]


@pytest.mark.parametrize("backend", BACKENDS)
@in_thread
def test_a_message_delivered_in_two_attempts_counts_once(make_loop_relay, upstream, pki, tmp_path, backend):
    """The upstream takes one recipient and defers the other (451), then takes it: one
    message and two recipients against the domain, not two messages and three recipients
    (each attempt used to count the message and its due recipients again)."""
    with limits_backend(backend, tmp_path) as limits:
        relay = make_loop_relay(
            upstream.port, queue={"mode": "spool", "dir": str(tmp_path / "spool"), "retry": ["1s"]}, limits=limits
        )
        upstream.behaviour.rcpt_replies["b@example.net"] = "451 4.2.1 mailbox busy, try later"
        send(relay, pki, "two attempts", ("a@example.net", "b@example.net"))
        upstream.wait_for(1)
        relay.wait_log(lambda e: e.get("msg") == "delivery attempt" and e.get("result") == "deferred")
        upstream.behaviour.rcpt_replies.clear()
        upstream.wait_for(2, timeout=30)
        settled(relay, lambda: not spool_state(relay))
        assert [m.rcpt_tos for m in upstream.messages] == [["a@example.net"], ["b@example.net"]]
        assert domain_usage(relay) == (1, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@in_thread
def test_a_restart_between_attempts_neither_counts_again_nor_forgets(make_loop_relay, upstream, pki, tmp_path, backend):
    """Partly delivered, then the relay restarts: the count is in the entry's state on disk,
    so the next process counts only the recipient it delivers."""
    with limits_backend(backend, tmp_path) as limits:
        relay = make_loop_relay(
            upstream.port, queue={"mode": "spool", "dir": str(tmp_path / "spool"), "retry": ["1h"]}, limits=limits
        )
        upstream.behaviour.rcpt_replies["b@example.net"] = "451 4.2.1 mailbox busy, try later"
        send(relay, pki, "across a restart", ("a@example.net", "b@example.net"))
        upstream.wait_for(1)
        settled(relay, lambda: bool(spool_state(relay)))
        assert domain_usage(relay) == (1, 1)  # the deferred recipient's count was given back
        (state,) = spool_state(relay)
        assert state["limits_counted"] is True and "limits_unsettled" not in state
        relay._in_loop(relay.astop(), 30)
        upstream.behaviour.rcpt_replies.clear()
        # What `relay queue retry` does: due now, not in an hour (keeping the count's mark).
        admin.retry(Spool(tmp_path / "spool"), state_id(relay))
        relay.start()
        upstream.wait_for(2, timeout=30)
        settled(relay, lambda: not spool_state(relay))
        assert domain_usage(relay) == (1, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@in_thread
def test_an_attempt_cut_short_by_a_stop_is_not_counted_twice(make_loop_relay, upstream, pki, tmp_path, backend):
    """The relay stops while the upstream holds the DATA of an attempt (the attempt is
    cancelled, nothing delivered): its count is still in the counters, and the entry says
    so on disk; the next attempt after the restart gives it back before counting."""
    with limits_backend(backend, tmp_path) as limits:
        relay = make_loop_relay(
            upstream.port, queue={"mode": "spool", "dir": str(tmp_path / "spool"), "retry": ["1s"]}, limits=limits
        )
        upstream.behaviour.data_delay = 60.0
        send(relay, pki, "cut short", ("a@example.net", "b@example.net"))
        relay.wait_log(lambda e: "DATA" in upstream.commands, timeout=30)
        # (The entry's state was saved with the count, before the upstream saw anything.)
        assert domain_usage(relay) == (1, 2)
        (state,) = spool_state(relay)
        assert state["limits_unsettled"]["messages"] == 1
        relay._in_loop(relay.astop(), 30)  # cancels the attempt under way
        upstream.behaviour.data_delay = 0.0
        relay.start()
        upstream.wait_for(1, timeout=30)
        settled(relay, lambda: not spool_state(relay))
        assert upstream.messages[0].rcpt_tos == ["a@example.net", "b@example.net"]
        assert domain_usage(relay) == (1, 2)
