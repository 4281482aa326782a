"""Relay.stop ends the relay's own tasks even when one lets a cancellation go by.

Python 3.11's asyncio.wait_for (dnspython waits with it) returns the awaited
result instead of raising when the cancellation lands just as that operation completes; the
posture monitor, cancelled that way under load, kept checking, and the relay never exited
on SIGTERM.
"""

from __future__ import annotations

import asyncio

from tests.support.cancel import LateCancel


async def test_stop_ends_a_task_that_let_its_first_cancellation_go_by(make_loop_relay, upstream):
    relay = make_loop_relay(upstream.port, start=False)
    await relay.astart()
    late = LateCancel()
    relay.relay._tasks.append(asyncio.create_task(late.run()))  # beside its own tasks
    await asyncio.sleep(0.1)
    stopping = asyncio.create_task(relay.astop())
    done, _ = await asyncio.wait({stopping}, timeout=60)  # bounded: before the fix, for ever
    assert done, "stop is still waiting for the task"
    assert late.cancellations == 2


async def test_stop_ends_background_work_that_lets_its_first_cancellation_go_by(make_loop_relay, upstream):
    """Upstream aborts and "relayed" notices outlive their session (relay.pipeline); the ones
    still running at the stop are cancelled, and one that lets it go by is cancelled again."""
    from relay.pipeline import _in_background

    relay = make_loop_relay(upstream.port, start=False)
    await relay.astart()
    late = LateCancel()
    _in_background(late.run())
    await asyncio.sleep(0.1)
    stopping = asyncio.create_task(relay.astop())
    done, _ = await asyncio.wait({stopping}, timeout=60)  # bounded: before the fix, for ever
    assert done, "stop is still waiting for the background work"
    assert late.cancellations == 2


async def test_a_reload_under_way_when_the_relay_stops_keeps_nothing_it_built(make_loop_relay, upstream, dkim_keys):
    """SIGHUP, then SIGTERM while the reload still fetches its secrets: the stop waits for the
    reload, which then keeps nothing. Before, the stop closed what ran, and the reload then
    committed a new pool and started a posture task that nothing would stop."""
    from relay.config.load import settings_from_mapping
    from tests.support.held_vault import HeldVault
    from tests.support.inloop import on_port_zero

    pem = dkim_keys.rsa_path.read_text()
    with HeldVault({"relay/dkim": {"key": pem}, "relay/dkim-next": {"key": pem}}) as vault:
        vault.release()
        relay = make_loop_relay(upstream.port, start=False, env=vault.env)
        relay.config["secrets"] = {"vault": vault.config()}
        relay.config["dkim"]["keys"][0]["key"] = "vault://secret/relay/dkim#key"
        await relay.astart()
        running = relay.running
        # The new config: a key from a path not fetched yet (held), and a new upstream pool.
        relay.config["dkim"]["keys"][0]["key"] = "vault://secret/relay/dkim-next#key"
        relay.config["upstream"]["pool"]["max_connections"] = 3
        new = on_port_zero(settings_from_mapping(relay.config, source="relay.yaml"))
        running._reload_settings = lambda: new
        vault.hold()
        arrived = vault.requests
        reloading = asyncio.create_task(running.reload())
        await asyncio.to_thread(vault.wait_held, arrived + 1)  # the reload waits on Vault
        stopping = asyncio.create_task(relay.astop())
        for _ in range(1000):  # until the stop has begun (its first steps take no wait)
            if stopping.done() or getattr(running, "_stopping", False):
                break
            await asyncio.sleep(0)
        vault.release()
        done, _ = await asyncio.wait({reloading, stopping}, timeout=60)
        assert done == {reloading, stopping}
        assert reloading.result() is False  # abandoned: before the fix, True (committed after the stop)
        assert running._posture_task is not None and running._posture_task.done()
        assert running.settings.upstream[0].pool.max_connections != 3


# -- what the relay started beside its sessions ends with the stop ---------------------------
# Each of these once outlived the stop: still pending when the loop closed ("Task was
# destroyed but it is pending"), or running on after a single cancellation (relay.cancel).


async def test_stop_ends_the_key_rings_fetches(make_loop_relay, upstream):
    relay = make_loop_relay(upstream.port, start=False)
    await relay.astart()
    late = LateCancel()
    try:
        relay.running.components.pipeline.keyring._tasks.add(await late.start())  # a key fetch under way
        await asyncio.wait_for(relay.astop(), 60)
        assert late.task.done(), "the fetch outlived the stop"  # before the fix: never cancelled
        assert late.cancellations == 2
    finally:
        await late.end()


async def test_a_reload_ends_the_old_key_rings_fetches(make_loop_relay, upstream):
    from relay.config.load import settings_from_mapping
    from tests.support.inloop import on_port_zero

    relay = make_loop_relay(upstream.port, start=False)
    await relay.astart()
    running = relay.running
    late = LateCancel()
    try:
        running.components.pipeline.keyring._tasks.add(await late.start())
        relay.config["upstream"]["pool"]["max_connections"] = 3
        new = on_port_zero(settings_from_mapping(relay.config, source="relay.yaml"))
        running._reload_settings = lambda: new
        assert await running.reload()
        done, _ = await asyncio.wait({late.task}, timeout=30)  # before the fix: cancelled once only
        assert done, "the old ring's fetch still runs after the reload"
        assert late.cancellations == 2
    finally:
        await late.end()
    await relay.astop()


async def test_stop_waits_for_closing_what_a_reload_retired_then_ends_it(make_loop_relay, upstream, monkeypatch):
    """Closing a retired upstream's pool, retiring a token cache: started by a reload, in
    the background. Before, the stop did not wait for them, and the loop closed under them."""
    import relay.server

    monkeypatch.setattr(relay.server, "STOP_BACKGROUND_WAIT_S", 0.2, raising=False)  # then it is cancelled
    loop_relay = make_loop_relay(upstream.port, start=False)
    await loop_relay.astart()
    running = loop_relay.running
    late = LateCancel()
    try:
        before = set(running._background)
        running._in_background(late.run())  # as a reload hands it a retired target's close()
        [late.task] = running._background - before
        await asyncio.sleep(0)  # its first step
        await asyncio.wait_for(loop_relay.astop(), 60)
        assert late.task.done(), "the background work outlived the stop"
        assert late.cancellations == 2
    finally:
        await late.end()


async def test_a_redis_password_change_ends_the_old_recovery(tmp_path):
    """Redis down, its password changes: a new recovery starts with the new password, and the
    old one ends. Before, it was cancelled once: one that let that go by ran beside the new
    one, and nothing ended it (close() ended the new one only)."""
    import time

    from relay.limits.local import LocalCounters
    from relay.limits.redis_counters import RedisCounters

    class Secrets:
        def subscribe(self, listener):
            self.changed = listener

        def unsubscribe(self, listener):
            pass

    counters = RedisCounters("redis://127.0.0.1:1/0", fallback=LocalCounters(tmp_path / "limits"))
    secrets = Secrets()
    counters.follow_secret(secrets, "env://REDIS_PASSWORD")
    late = LateCancel()
    try:
        counters._down_since, counters._recovery = time.monotonic(), await late.start()  # down, recovering
        secrets.changed("env://REDIS_PASSWORD", None)
        done, _ = await asyncio.wait({late.task}, timeout=30)
        assert done, "the old recovery still runs"
        assert late.cancellations == 2
    finally:
        await late.end()
        await counters.close()
