"""The process lifecycle: start, reload (SIGHUP), drain (SIGTERM), stop.

`Relay` runs what `relay.wiring` builds: startup → serve → graceful shutdown (the first
SIGTERM drains, the second exits at once, like uvicorn), and SIGHUP reloads the config and
keys without dropping a session (an invalid new config is refused and the running one stays).

    relay = Relay(settings, config_path=path)
    await relay.start()            # binds the listeners and the metrics port
    ...                            # relay.listeners[...].sockets() for port 0 binds
    await relay.drain()            # or relay.stop() at once
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path

from relay import startup_signals
from relay.cancel import cancel_and_wait
from relay.config.load import ConfigError, load_settings, redacted
from relay.config.schema import ListenerSettings, Settings
from relay.errors import SmtpError
from relay.limits.usage import LimitUsage
from relay.listen import patches
from relay.listen.budget import DataBudget
from relay.listen.connections import Connections
from relay.listen.listeners import ListenerServer, ServerTls, check_tls_files
from relay.oauth.upstream_auth import UpstreamTokenAuth
from relay.observe.http import HealthServer
from relay.observe.logs import setup_logging
from relay.pipeline import Pipeline, finish_background
from relay.secrets.base import SecretValue
from relay.wiring import (
    Components,
    LimitCounters,
    SpoolParts,
    UpstreamTargets,
    build_components,
    build_spool,
    new_secret_store,
)

log = logging.getLogger("relay")

UPSTREAM_PROBE_INTERVAL = 30.0
KEY_AGE_INTERVAL = 15.0
STOP_RELOAD_WAIT_S = 60.0  # stop: how long a reload under way may take to end
STOP_BACKGROUND_WAIT_S = 10.0  # stop: how long closing what a reload retired may take

ListenerKey = tuple[str, str, str]


class Relay:
    def __init__(
        self,
        settings: Settings,
        *,
        config_path: Path | None,
        reload_settings: Callable[[], Settings] | None = None,
        reuse_port: bool = False,
        tls_context: ssl.SSLContext | None = None,  # made before the workers' fork (relay.cli)
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self._reload_settings = reload_settings or self._load_config_file
        self.reuse_port = reuse_port
        self.store = new_secret_store(settings)
        self.targets = UpstreamTargets()
        self.limit_counters = LimitCounters()
        self.components: Components | None = None
        self.tls = ServerTls(settings.tls, context=tls_context)
        self.listeners: dict[ListenerKey, ListenerServer] = {}
        self.connections = Connections()
        # One budget for the DATA of every listener's sessions (relay.listen.budget).
        self.data_budget = DataBudget(settings.clients.max_bytes_in_flight)
        self.health = HealthServer(self.readiness, detail=self.readiness_detail, scraped=self._scraped)
        self._draining = False
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []  # run until stop()
        self._background: set[asyncio.Task[object]] = set()  # drain, reload, closing retired targets
        self._posture_task: asyncio.Task[None] | None = None
        self._upstream_problem: str | None = "not probed yet"
        self._signals = 0
        # One reload at a time (each may wait on the network: secrets, tokens); a SIGHUP
        # during one queues one more, and further ones meanwhile add nothing to it.
        self._reloading = asyncio.Lock()
        self._reload_queued = False
        self._stopping = False
        self.queue: SpoolParts | None = None  # spool mode: the spool and its delivery loop

    def _load_config_file(self) -> Settings:
        assert self.config_path is not None, "the dev default reloads through reload_settings"
        return load_settings(self.config_path)

    # -- what the SMTP sessions see (relay.listen.session.SessionContext) -------------------
    @property
    def pipeline(self) -> Pipeline:
        assert self.components is not None
        return self.components.pipeline

    @property
    def draining(self) -> bool:
        return self._draining

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        patches.apply()
        settings = self.settings
        log.info(
            "effective configuration",
            extra={"config": redacted(settings), "source": str(self.config_path or "embedded dev default")},
        )
        self.queue = build_spool(settings, self._components)
        host, port = settings.metrics.bind
        if self.queue is not None:
            # /healthz answers while a large backlog is scanned (a startupProbe must not kill
            # the process for it); /readyz says "spool: opening" until the scan is done.
            await self.health.start(host, port, reuse_port=self.reuse_port)
            await asyncio.to_thread(self.queue.spool.open)  # OSError: "cannot start"
        spool = self.queue.target if self.queue is not None else None
        self.components = await build_components(
            settings, self.store, self.targets, spool=spool, counters=self.limit_counters
        )
        assert self.components.upstreams is not None
        self.targets.commit(self.components.upstreams)
        if self.components.counters is not None:
            self.limit_counters.adopt(self.components.counters)
        self.store.subscribe(self._secret_changed)
        # Access tokens before the listeners open: the first message finds one ready.
        await self._start_token_auths(self.components.token_auths)
        self.components.pipeline.keyring.attach()
        self._report_keys(self.components.pipeline)
        for lst in settings.listeners:
            server = self._listener(lst, settings)
            await server.start()
            self.listeners[_listener_key(lst)] = server
        if self.queue is None:
            await self.health.start(host, port, reuse_port=self.reuse_port)
        self._tasks.append(asyncio.create_task(self.store.run(), name="secret-refresh"))
        self._tasks.append(asyncio.create_task(self._probe_upstreams(), name="upstream-probe"))
        self._tasks.append(asyncio.create_task(self._update_key_ages(), name="key-ages"))
        self._posture_task = asyncio.create_task(self.components.posture.run(), name="posture")
        if self.queue is not None:
            self.queue.runner.start()  # what an earlier run left in the spool goes out now

    def _components(self) -> Components:
        assert self.components is not None
        return self.components

    def _listener(self, lst: ListenerSettings, settings: Settings) -> ListenerServer:
        return ListenerServer(
            lst, self, self.connections, self.tls, settings, reuse_port=self.reuse_port, budget=self.data_budget
        )

    def _report_keys(self, pipeline: Pipeline) -> None:
        for ident, why in pipeline.keyring.never_loaded().items():
            log.error(
                "DKIM key not loaded; mail from this domain gets 451 until it is",
                extra={"key": ident, "reason": why},
            )

    def readiness(self) -> dict[str, str | None]:
        checks: dict[str, str | None] = {}
        unbound = [s.name for s in self.listeners.values() if not s.bound]
        checks["listeners"] = f"not listening: {', '.join(unbound)}" if unbound else None
        if self._draining:
            checks["listeners"] = "draining"
        missing = self.components.pipeline.keyring.never_loaded() if self.components else {"all": "starting"}
        checks["dkim_keys"] = "; ".join(f"{k}: {v}" for k, v in missing.items()) or None
        if self.queue is None:
            checks.update(self._upstream_problems())
        else:
            # Spool mode takes mail while the upstream is away: that is what the spool is
            # for. Failing readiness then would have the load balancer take every replica
            # out during exactly that outage; the problem is in the detail instead.
            checks.update(dict.fromkeys(self._upstream_problems()))
            if self.queue.spool.opened_scan is None:
                checks["spool"] = "opening (scanning the spool)"
            else:
                checks["spool"] = self.queue.spool.unwritable() or self.queue.runner.problem()
        return checks

    async def _start_token_auths(self, token_auths: list[UpstreamTokenAuth]) -> None:
        await asyncio.gather(*(a.start() for a in token_auths))

    def _secret_changed(self, ref: str, value: SecretValue) -> None:
        for token_auth in self.targets.token_auths():
            token_auth.secret_changed(ref)

    def _upstream_problems(self) -> dict[str, str | None]:
        """The default upstream's path at the last probe, and every upstream that cannot
        get (or use) an access token: the reason (invalid_client, consent_missing, ...) and
        the token endpoint's own words."""
        problems = [(a.label, a.problem) for a in self.targets.token_auths()]
        return {
            "upstream": self._upstream_problem,
            "upstream_token": "; ".join(f"{label}: {p}" for label, p in problems if p) or None,
        }

    def readiness_detail(self) -> dict[str, str | None]:
        """What /readyz reports without failing: limits running on local counters because
        Redis is unreachable (fail open) is worth knowing, not worth taking relay out of
        the load balancer; so is, in spool mode, an upstream that cannot take mail now."""
        counters = self.limit_counters.current
        detail = {"limits": counters.problem() if counters is not None else None}
        if self.queue is not None:
            detail.update(self._upstream_problems())
        return detail

    def _scraped(self) -> list[LimitUsage]:
        usage = self.components.limit_usage if self.components is not None else None
        return [usage] if usage is not None else []

    async def _probe_upstreams(self) -> None:
        """Check the path to the default upstream now and then, for /readyz."""
        while True:
            try:
                # The real upstream, also in spool mode (where the pipeline's target is the spool).
                await self._components().router.default.probe()
                self._upstream_problem = None
            except SmtpError as exc:
                # A token failure is the upstream_token check's (which clears as soon as a
                # token is fetched); the path up to AUTH worked.
                self._upstream_problem = exc.reason if exc.label != "upstream_token" else None
                log.warning("upstream probe failed", extra={"reason": exc.reason})
            except Exception as exc:  # a probe must never kill the relay
                self._upstream_problem = f"probe error: {type(exc).__name__}"
            await asyncio.sleep(UPSTREAM_PROBE_INTERVAL)

    async def _update_key_ages(self) -> None:
        """Key ages grow by themselves: `relay_dkim_key_age_seconds` is set now and then."""
        while True:
            await asyncio.sleep(KEY_AGE_INTERVAL)
            if self.components is not None:
                self.components.pipeline.keyring.update_ages()

    async def reload(self) -> bool:
        """SIGHUP: load, validate and apply a new config; keep the old one on any error.
        Reloads run one after the other, each reading the config as it is when it starts."""
        async with self._reloading:
            self._reload_queued = False
            if self._draining or self._stopping:
                log.info("reload not done: the relay is stopping")
                return False
            return await self._reload()

    def _sighup(self) -> None:
        if self._stopping:
            # Not a task the stop would have to wait for (or leave pending at the loop's end).
            log.info("reload not done: the relay is stopping")
        elif not self._reload_queued:
            self._reload_queued = True
            self._in_background(self.reload())

    async def _reload(self) -> bool:
        try:
            # In a thread: reading and validating a large config (tens of thousands of users:
            # seconds) must not stall every session meanwhile.
            settings = await asyncio.to_thread(self._reload_settings)
            problem = check_tls_files(settings.tls)
            if problem:
                raise ConfigError(str(self.config_path), [("tls", problem)])
        except ConfigError as exc:
            log.error("reload refused; the running configuration stays", extra={"problems": exc.problems})
            return False
        old = self.components
        assert old is not None
        new: Components | None = None
        try:
            if settings.queue != old.settings.queue:
                log.warning("queue settings changed; they take effect at the next restart")
            spool = self.queue.target if self.queue is not None else None
            new = await build_components(
                settings, self.store, self.targets, previous=old, spool=spool, counters=self.limit_counters
            )
            await self._start_token_auths(new.token_auths)  # new upstreams' (the others run)
            if self._draining or self._stopping:
                # The stop began while this was built (it waits for this reload): nothing
                # built for it may outlive the stop.
                assert new.upstreams is not None
                await self.targets.discard(new.upstreams)
                await self.limit_counters.discard(new.counters)
                log.info("reload abandoned: the relay is stopping")
                return False
            await self._apply_listeners(settings)
            self.tls.load(settings.tls)
        except (ConfigError, OSError) as exc:
            # What was built for the refused config goes; what runs stays as it was.
            if new is not None and new.upstreams is not None:
                self._in_background(self.targets.discard(new.upstreams))
            log.error("reload failed; the running configuration stays", extra={"reason": str(exc)})
            await self.limit_counters.discard(new.counters if new is not None else None)
            return False
        assert new.upstreams is not None
        self.targets.commit(new.upstreams)
        old.pipeline.keyring.detach()
        self._in_background(old.pipeline.keyring.close())  # its key fetches end
        new.pipeline.keyring.attach()
        old.pipeline.successor = new.pipeline  # before the retired targets close (below)
        self.components = new
        if self._posture_task is not None:
            self._posture_task.cancel()
            # Ended by stop() if it lets this cancellation go by (relay.cancel).
            self._tasks = [t for t in self._tasks if not t.done()] + [self._posture_task]
        self._posture_task = asyncio.create_task(new.posture.run(), name="posture")
        self.settings = settings
        self.data_budget.limit = settings.clients.max_bytes_in_flight
        setup_logging(settings.logging.format, settings.logging.level)
        self._report_keys(new.pipeline)
        for target in new.retired:
            self._in_background(target.close())
        for token_auth in new.retired_token_auths:
            self._in_background(token_auth.retire())
        retired_counters = self.limit_counters.adopt(new.counters) if new.counters is not None else None
        if retired_counters is not None:
            self._in_background(retired_counters.close())
        log.info("configuration reloaded", extra={"config": redacted(settings)})
        return True

    async def _apply_listeners(self, settings: Settings) -> None:
        """New listeners are bound first: if one cannot be (OSError), those just bound close
        again and the running ones are left as they are."""
        wanted = {_listener_key(lst): lst for lst in settings.listeners}
        started: dict[ListenerKey, ListenerServer] = {}
        try:
            for key, lst in wanted.items():
                if key not in self.listeners:
                    server = self._listener(lst, settings)
                    await server.start()
                    started[key] = server
        except BaseException:
            for server in started.values():
                server.stop_accepting()
            raise
        for key, lst in wanted.items():
            if key in self.listeners:
                self.listeners[key].update(settings, lst)
        self.listeners.update(started)
        for key in [k for k in self.listeners if k not in wanted]:
            self.listeners.pop(key).stop_accepting()

    async def drain(self) -> None:
        """Stop accepting, let transactions in flight finish, then stop."""
        if self._draining:
            return
        self._draining = True
        timeout = self.settings.drain_timeout
        log.info("draining", extra={"sessions": len(self.connections), "timeout_s": timeout})
        for server in self.listeners.values():
            server.stop_accepting()
        # Idle sessions go now (RFC 5321 §3.8: 421 then close); a session inside a
        # transaction gets its 421 after the DATA reply (RelaySMTP.shutdown).
        self.connections.shutdown()
        deadline = asyncio.get_running_loop().time() + timeout
        # Spool mode: deliveries under way finish within the same timeout; what is left
        # stays in the spool for the next start.
        runner = self.queue.runner.stop(timeout) if self.queue is not None else asyncio.sleep(0)
        closed, _ = await asyncio.gather(self.connections.wait_closed(timeout), runner)
        if not closed:
            log.warning("drain timeout; closing remaining sessions", extra={"sessions": len(self.connections)})
            self.connections.close()
        # Work that outlives its session: upstream aborts, "relayed" notices (relay.pipeline).
        await finish_background(deadline - asyncio.get_running_loop().time())
        await self.stop()

    async def stop(self) -> None:
        self._stopping = True
        # A reload under way ends first (its every wait is bounded; it keeps nothing once it
        # sees the stop), so that what it builds is not left open after the stop.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_RELOAD_WAIT_S), self._reloading:
                pass
        for server in self.listeners.values():
            server.stop_accepting()  # also one a reload bound during the drain
        if self._posture_task is not None:
            self._tasks.append(self._posture_task)
        await cancel_and_wait(self._tasks)
        for task in self._tasks:
            if task.done() and not task.cancelled():
                task.exception()  # its end (an error already logged) is not stop's
        await finish_background(0)
        # The relay's own work beside the sessions: closing what a reload retired (pools,
        # token caches, Redis clients, an old key ring's fetches), a reload queued behind the
        # stop. Each is bounded; one still running after the bound is ended.
        others = self._background - {asyncio.current_task()}  # a drain runs this stop
        if others:
            _done, running = await asyncio.wait(others, timeout=STOP_BACKGROUND_WAIT_S)
            await cancel_and_wait(running)
        if self.components is not None:
            await self.components.pipeline.keyring.close()
        if self.queue is not None:
            await self.queue.runner.stop(0)  # a no-op after a drain
            await self.queue.spool.close()
        await asyncio.gather(*(t.close() for t in self.targets.all()), return_exceptions=True)
        await asyncio.gather(*(a.close() for a in self.targets.token_auths()), return_exceptions=True)
        if self.limit_counters.current is not None:
            await self.limit_counters.current.close()
        await self.health.stop()
        await self.store.close()
        self._stopped.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in startup_signals.stop_signals():  # a worker leaves SIGINT to its supervisor
            loop.add_signal_handler(sig, self._stop_signal)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
        # What arrived while the relay started (relay.startup_signals), read only now that
        # the handlers above take any further signal: none falls between the two.
        requested = startup_signals.take()
        if requested.stop:
            log.info("stop requested while starting")
            self._stop_signal()
        elif requested.reload:
            log.info("reload requested while starting")
            self._sighup()

    def _stop_signal(self) -> None:
        if self._stopped.is_set():
            return  # stopped already: the process is on its way out (relay.startup_signals)
        self._signals += 1
        if self._signals > 1:
            log.warning("second stop signal: exiting now")
            os._exit(1)
        self._in_background(self.drain())

    def _in_background(self, work: Coroutine[object, object, object]) -> None:
        # The loop keeps only weak references to tasks: hold them until they are done.
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _listener_key(lst: ListenerSettings) -> ListenerKey:
    return (lst.name, str(lst.bind), lst.tls)


def freeze_gc() -> None:
    """Once the relay has started: what start made (modules, config, keys, pools) is moved out
    of the cyclic GC's reach, so no collection traverses it again. With --workers the
    supervisor does the same before the fork (relay.supervisor); a single process did not,
    and its collections kept walking the whole start-up heap: about 6 % of its CPU per
    message on the one-connection-per-message workload (bench/tls_ab.py, standard error
    3.5 %). Raising the young threshold on top of it measured no change, so it stays the
    default."""
    gc.freeze()


async def serve(
    settings: Settings,
    *,
    config_path: Path | None,
    reload_settings: Callable[[], Settings] | None = None,
    on_started: Callable[[Relay], None] | None = None,
    reuse_port: bool = False,
    tls_context: ssl.SSLContext | None = None,
) -> int:
    """`relay serve`'s one process (or worker): start, run until stopped; the exit code. Run
    by asyncio.run in the main thread, which calls `startup_signals.ignore_until_exit()`
    once the loop has closed (the signals are blocked from the stop until then)."""
    relay = Relay(
        settings,
        config_path=config_path,
        reload_settings=reload_settings,
        reuse_port=reuse_port,
        tls_context=tls_context,
    )
    try:
        await relay.start()
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        log.error("cannot start", extra={"reason": f"{exc.strerror or exc}{where}"})
        await relay.stop()
        startup_signals.hold_until_exit()
        return 1
    freeze_gc()
    relay.install_signal_handlers()
    if on_started:
        on_started(relay)
    await relay.wait_stopped()
    log.info("stopped")
    # What is left is the loop's end and the interpreter's: the signals wait from now on
    # (the caller ignores them once the loop has closed).
    startup_signals.hold_until_exit()
    return 0
