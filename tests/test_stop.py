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
