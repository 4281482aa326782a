"""SIGHUP that changes the upstream (host, port, credentials) while clients are mid-transaction:
a transaction begun upstream ends on its old connection, and one whose MAIL came before the
reload but whose first RCPT comes after begins on the new upstream. No client gets a 4xx."""

from __future__ import annotations

import asyncio
import threading

from tests.support.inloop import in_thread
from tests.support.smtp import connect, message
from tests.support.upstream import Upstream


@in_thread
def test_a_reload_that_moves_the_upstream_costs_no_transaction_a_4xx(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    old_target = relay.running.components.router.default
    begun = connect(relay, pki)  # MAIL and RCPT before the reload: its upstream is the old one
    assert begun.mail("app@example.com")[0] == 250
    assert begun.rcpt("begun@example.net")[0] == 250
    waiting = connect(relay, pki)  # MAIL before the reload, RCPT after
    assert waiting.mail("app@example.com")[0] == 250
    with Upstream(tls="starttls", server_context=pki.server_context()) as moved:
        settings = relay.running.settings
        new_settings = settings.model_copy(
            update={"upstream": [settings.upstream[0].model_copy(update={"port": moved.port})]}
        )
        relay.running._reload_settings = lambda: new_settings
        assert relay._in_loop(relay.running.reload(), 20)
        relay._in_loop(old_target.close(), 20)  # the retired pool is closed (the reload does it in the background)
        assert old_target.pool._closed
        assert waiting.rcpt("waiting@example.net")[0] == 250
        assert waiting.data(message(subject="waiting"))[0] == 250
        assert begun.data(message(subject="begun"))[0] == 250
        [on_new] = moved.wait_for(1)
        [on_old] = upstream.wait_for(1)
    assert on_new.rcpt_tos == ["waiting@example.net"]
    assert on_old.rcpt_tos == ["begun@example.net"]
    for client in (begun, waiting):
        client.quit()
    assert relay.metric("relay_messages_relayed_total", listener="submission", upstream=settings.upstream[0].label) == 1
    assert relay.metric("relay_upstream_pool_connections", upstream=settings.upstream[0].label, state="busy") == 0


@in_thread
def test_reloads_between_every_step_of_staggered_transactions_cost_no_4xx(make_loop_relay, upstream, pki):
    """Twelve transactions, each a step further than the one before; after each round of steps
    the upstream moves to the other port, and the pool size changes (a new pool)."""
    relay = make_loop_relay(upstream.port)
    settings = relay.running.settings
    with Upstream(tls="starttls", server_context=pki.server_context()) as other:
        configs = [
            settings.model_copy(
                update={
                    "upstream": [
                        settings.upstream[0].model_copy(
                            update={
                                "port": port,
                                "pool": settings.upstream[0].pool.model_copy(update={"max_connections": size}),
                            }
                        )
                    ]
                }
            )
            for port, size in ((other.port, 3), (upstream.port, 4), (other.port, 5), (upstream.port, 2))
        ]
        steps = ["connect", "mail", "rcpt", "rcpt2", "data"]
        clients: list = [None] * 12
        replies: list[int] = []
        for round_ in range(len(clients) + len(steps)):
            for i in range(len(clients)):
                step = round_ - i
                if not 0 <= step < len(steps):
                    continue
                if steps[step] == "connect":
                    clients[i] = connect(relay, pki)
                elif steps[step] == "mail":
                    replies.append(clients[i].mail("app@example.com")[0])
                elif steps[step] == "rcpt":
                    replies.append(clients[i].rcpt(f"u{i}@example.net")[0])
                elif steps[step] == "rcpt2":
                    replies.append(clients[i].rcpt(f"v{i}@example.net")[0])
                else:
                    replies.append(clients[i].data(message(subject=f"m{i}"))[0])
                    clients[i].quit()
            relay.running._reload_settings = lambda config=configs[round_ % len(configs)]: config
            assert relay._in_loop(relay.running.reload(), 20)
        relay.settle()
        delivered = len(upstream.wait_for(0)) + len(other.wait_for(0))
    assert replies == [250] * (4 * len(clients))
    assert delivered == len(clients)


@in_thread
def test_sessions_are_answered_while_a_reload_reads_its_config(make_loop_relay, upstream, pki):
    """The config was read and validated in the event loop: a config of 50,000 users takes
    ~35 s to parse, and every session waited that long for its next reply."""
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    settings = relay.running.settings
    reading, release = threading.Event(), threading.Event()

    def slow_config():
        reading.set()
        release.wait(30)  # stands for a long parse; bounded
        return settings

    relay.running._reload_settings = slow_config
    reload = asyncio.run_coroutine_threadsafe(relay.running.reload(), relay.loop)
    try:
        assert reading.wait(10)
        client.sock.settimeout(10)
        assert client.noop()[0] == 250  # while the config is being read
    finally:
        release.set()
    assert reload.result(30)
    client.quit()
