"""The composition root and the process lifecycle.

`build_*` functions turn declared settings into runtime objects, in one place. `Relay`
runs them: startup → serve → graceful shutdown (the first SIGTERM drains, the second
exits at once), and SIGHUP reloads the config and keys without dropping a session (an
invalid new config is refused and the running one stays).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

from relay.auth.users import UserDirectory
from relay.config.load import ConfigError, load_settings, redacted
from relay.config.schema import Settings, UpstreamSettings
from relay.deliver.base import Delivery
from relay.deliver.connection import UpstreamConnector, UpstreamEndpoint, upstream_tls_context
from relay.deliver.dial import Dialer, DirectDialer
from relay.deliver.failover import FailoverDelivery
from relay.deliver.mx import MxDelivery
from relay.deliver.outbox import OutboxDelivery
from relay.deliver.pool import ConnectionPool
from relay.deliver.smarthost import SmarthostDelivery
from relay.dns.addresses import AddressResolver
from relay.dns.resolver import DnsResolver, DnsService
from relay.errors import SmtpError
from relay.listen.listeners import ListenerServer, ServerTls, check_tls_files
from relay.listen.smtp import RelaySMTP
from relay.observe.http import HealthServer
from relay.observe.logs import setup_logging
from relay.pipeline import Pipeline
from relay.posture.monitor import PostureMonitor
from relay.route.router import Router
from relay.secrets.base import SecretBackend
from relay.secrets.local import EnvBackend, FileBackend
from relay.secrets.store import SecretStore
from relay.sign.keyring import KeyRing

log = logging.getLogger("relay")

UPSTREAM_PROBE_INTERVAL = 30.0
KEY_AGE_INTERVAL = 15.0


# -- composition ---------------------------------------------------------------------------
def build_secret_backends(settings: Settings, bootstrap: SecretStore | None = None) -> list[SecretBackend]:
    backends: list[SecretBackend] = [FileBackend(), EnvBackend()]
    key_patterns = [ks.key for ks in settings.dkim.key_sets]  # keys a key set will list
    refs = secret_refs(settings) + vault_bootstrap_refs(settings) + key_patterns
    if any(ref.startswith("aws-sm://") for ref in refs):
        # Imported only when used: the AWS SDK costs each worker ~35 MiB of memory.
        from relay.secrets.aws import AwsSecretsBackend

        backends.append(AwsSecretsBackend(region=settings.secrets.aws.region,
                                          endpoint_url=settings.secrets.aws.endpoint_url))
    vault = settings.secrets.vault
    if vault is not None:
        from relay.secrets.vault import VaultBackend

        def resolved(ref: str | None) -> str | None:
            if ref is None or bootstrap is None:
                return None
            value = bootstrap.get(ref)
            return value.text() if value else None

        backends.append(VaultBackend(
            vault.url, auth=vault.auth, token=resolved(vault.token), role=vault.role,
            role_id=vault.role_id, secret_id=resolved(vault.secret_id),
            kubernetes_token_path=vault.kubernetes_token_path, auth_mount=vault.auth_mount,
            namespace=vault.namespace, ca_file=str(vault.ca_file) if vault.ca_file else None,
        ))
    return backends


def secret_refs(settings: Settings) -> list[str]:
    refs = [k.key for k in settings.dkim.keys] + [ks.key_set for ks in settings.dkim.key_sets]
    refs += [u.password for u in settings.clients.users if u.password]
    for upstream in settings.upstream:
        refs += [r for r in (upstream.password, upstream.proxy_password) if r]
    return list(dict.fromkeys(refs))


def vault_bootstrap_refs(settings: Settings) -> list[str]:
    vault = settings.secrets.vault
    return [r for r in (vault.token, vault.secret_id) if r] if vault else []


async def load_secrets(store: SecretStore, settings: Settings) -> None:
    """Install the backends `settings` asks for and fetch every reference it uses."""
    store.refresh_interval = settings.secrets.refresh
    # Vault's own credentials come from the other backends, so they load first.
    await store.ensure(vault_bootstrap_refs(settings))
    for backend in build_secret_backends(settings, store):
        store.set_backend(backend)
    refs = vault_bootstrap_refs(settings) + secret_refs(settings)
    await store.ensure(refs)
    store.retain(refs)


def build_dialer(upstream: UpstreamSettings, store: SecretStore) -> Dialer:
    if upstream.proxy is None:
        return DirectDialer(connect_timeout=upstream.connect_timeout)
    from relay.deliver.proxy import ProxyDialer

    password = store.get(upstream.proxy_password) if upstream.proxy_password else None
    return ProxyDialer(
        upstream.proxy,
        password=password.text() if password else None,
        connect_timeout=upstream.connect_timeout,
        handshake_timeout=upstream.connect_timeout,
    )


def build_dns(settings: Settings) -> DnsResolver:
    dns = settings.dns
    return DnsResolver(dns.nameservers, port=dns.port, timeout=dns.timeout, attempts=dns.attempts)


def build_delivery(upstream: UpstreamSettings, settings: Settings, store: SecretStore,
                   dns: DnsService | None = None) -> Delivery:
    if upstream.mode == "outbox":
        assert upstream.outbox_dir is not None
        upstream.outbox_dir.mkdir(parents=True, exist_ok=True)
        return OutboxDelivery(upstream.outbox_dir)
    password_ref = upstream.password

    def password() -> str | None:
        value = store.get(password_ref) if password_ref else None
        return value.text() if value else None

    tls_context = None
    if upstream.effective_tls != "none":
        tls_context = upstream_tls_context(
            str(upstream.ca_file) if upstream.ca_file else None, upstream.verify_tls
        )
    dns = dns or build_dns(settings)
    endpoint = UpstreamEndpoint(
        label=upstream.label,
        host=upstream.host or "",
        port=upstream.effective_port,
        tls=upstream.effective_tls,
        tls_context=tls_context,
        helo_name=upstream.helo_name or settings.hostname,
        username=upstream.username,
        password=password if password_ref else None,
        connect_timeout=upstream.connect_timeout,
        command_timeout=upstream.command_timeout,
    )
    if upstream.mode == "mx":
        # MX hosts are always resolved through the configured DNS service.
        connector = UpstreamConnector(endpoint, build_dialer(upstream, store), AddressResolver(dns))
        return MxDelivery(upstream.label, connector, dns)
    # A smarthost name goes through the configured resolver when one is configured, else
    # through the system's (which also reads /etc/hosts).
    resolver = AddressResolver(dns if settings.dns.nameservers else None)
    connector = UpstreamConnector(endpoint, build_dialer(upstream, store), resolver)
    pool = ConnectionPool(
        upstream.label,
        connector.open,
        max_connections=upstream.pool.max_connections,
        max_messages=upstream.pool.max_messages_per_connection,
        idle_timeout=upstream.pool.idle_timeout,
        acquire_timeout=upstream.pool.acquire_timeout,
    )
    return SmarthostDelivery(upstream.label, connector, pool)


class Deliveries:
    """Deliveries by upstream config; an unchanged upstream keeps its pool across reloads."""

    def __init__(self) -> None:
        self._by_config: dict[str, Delivery] = {}

    def build(self, settings: Settings, store: SecretStore, dns: DnsService) -> tuple[list[Delivery], list[Delivery]]:
        """Deliveries for `settings`, in config order, and the ones no longer used."""
        wanted: dict[str, Delivery] = {}
        for upstream in settings.upstream:
            key = upstream.model_dump_json() + settings.hostname + settings.dns.model_dump_json()
            wanted[key] = self._by_config.get(key) or build_delivery(upstream, settings, store, dns)
        retired = [d for k, d in self._by_config.items() if k not in wanted]
        self._by_config = wanted
        return list(wanted.values()), retired

    def all(self) -> list[Delivery]:
        return list(self._by_config.values())


def build_router(settings: Settings, deliveries: list[Delivery]) -> Router:
    by_name = {u.name: d for u, d in zip(settings.upstream, deliveries, strict=True) if u.name}
    routes = [(r.sender_domain, by_name[r.upstream]) for r in settings.routes]
    default = deliveries[0] if len(deliveries) == 1 else FailoverDelivery(deliveries)
    return Router(default, routes)


def build_pipeline(settings: Settings, store: SecretStore, deliveries: list[Delivery], dns: DnsService,
                   previous: PostureMonitor | None = None) -> tuple[Pipeline, PostureMonitor]:
    """The pipeline for one config snapshot, and the DNS posture monitor that gates it."""
    keyring = KeyRing(settings.dkim, store)
    router = build_router(settings, deliveries)
    monitor = PostureMonitor(settings, dns, keyring, router.default,
                             dialer=build_dialer(settings.upstream[0], store), previous=previous)
    pipeline = Pipeline(
        settings,
        users=UserDirectory(settings.clients.users, store),
        keyring=keyring,
        router=router,
        gate=monitor,
    )
    return pipeline, monitor


# -- the running process -------------------------------------------------------------------
class Relay:
    def __init__(self, settings: Settings, *, config_path: Path | None,
                 reload_settings: Callable[[], Settings] | None = None, reuse_port: bool = False) -> None:
        self.settings = settings
        self.config_path = config_path
        self._reload_settings = reload_settings or (lambda: load_settings(config_path))  # type: ignore[arg-type]
        self.reuse_port = reuse_port
        self.store = SecretStore([FileBackend(), EnvBackend()], settings.secrets.refresh)
        self.deliveries = Deliveries()
        self.dns = build_dns(settings)
        self._pipeline: Pipeline | None = None
        self.tls = ServerTls(settings.tls)
        self.listeners: dict[tuple, ListenerServer] = {}
        self.health = HealthServer(self.readiness)
        self._sessions: set[RelaySMTP] = set()
        self._all_closed = asyncio.Event()
        self._draining = False
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.posture: PostureMonitor | None = None
        self._posture_task: asyncio.Task | None = None
        self._upstream_problem: str | None = "not probed yet"
        self._signals = 0

    # RelayState
    @property
    def pipeline(self) -> Pipeline:
        assert self._pipeline is not None
        return self._pipeline

    @property
    def draining(self) -> bool:
        return self._draining

    def track(self, server: RelaySMTP) -> None:
        self._sessions.add(server)

    def untrack(self, server: RelaySMTP) -> None:
        self._sessions.discard(server)
        if not self._sessions:
            self._all_closed.set()

    # lifecycle
    async def start(self) -> None:
        settings = self.settings
        log.info("effective configuration", extra={"config": redacted(settings),
                                                     "source": str(self.config_path or "embedded dev default")})
        await self._load_secrets(settings)
        deliveries, _ = self.deliveries.build(settings, self.store, self.dns)
        self._pipeline, self.posture = build_pipeline(settings, self.store, deliveries, self.dns)
        self._pipeline.keyring.attach()
        await self._pipeline.keyring.fetch_missing()
        self._report_keys(self._pipeline)
        for lst in settings.listeners:
            server = ListenerServer(lst, self, self.tls, settings, reuse_port=self.reuse_port)
            await server.start()
            self.listeners[_listener_key(lst)] = server
        host, port = settings.metrics.bind
        await self.health.start(host, port, reuse_port=self.reuse_port)
        self._tasks.append(asyncio.create_task(self.store.run(), name="secret-refresh"))
        self._tasks.append(asyncio.create_task(self._probe_upstreams(), name="upstream-probe"))
        self._tasks.append(asyncio.create_task(self._update_key_ages(), name="key-ages"))
        self._posture_task = asyncio.create_task(self.posture.run(), name="posture")

    async def _load_secrets(self, settings: Settings) -> None:
        await load_secrets(self.store, settings)

    def _report_keys(self, pipeline: Pipeline) -> None:
        for ident, why in pipeline.keyring.never_loaded().items():
            log.error("DKIM key not loaded; mail from this domain gets 451 until it is",
                      extra={"key": ident, "reason": why})

    def readiness(self) -> dict[str, str | None]:
        checks: dict[str, str | None] = {}
        unbound = [s.name for s in self.listeners.values() if not s.bound]
        checks["listeners"] = f"not listening: {', '.join(unbound)}" if unbound else None
        if self._draining:
            checks["listeners"] = "draining"
        missing = self._pipeline.keyring.never_loaded() if self._pipeline else {"all": "starting"}
        checks["dkim_keys"] = "; ".join(f"{k}: {v}" for k, v in missing.items()) or None
        checks["upstream"] = self._upstream_problem
        return checks

    async def _probe_upstreams(self) -> None:
        """Check the path to the default upstream now and then, for /readyz."""
        while True:
            try:
                await self.pipeline.router.default.probe()
                self._upstream_problem = None
            except SmtpError as exc:
                self._upstream_problem = exc.reason
                log.warning("upstream probe failed", extra={"reason": exc.reason})
            except Exception as exc:  # a probe must never kill the relay
                self._upstream_problem = f"probe error: {type(exc).__name__}"
            await asyncio.sleep(UPSTREAM_PROBE_INTERVAL)

    async def _update_key_ages(self) -> None:
        while True:
            await asyncio.sleep(KEY_AGE_INTERVAL)
            self.pipeline.keyring.update_ages()

    async def reload(self) -> bool:
        """SIGHUP: load, validate and apply a new config; keep the old one on any error."""
        try:
            settings = self._reload_settings()
            problem = check_tls_files(settings.tls)
            if problem:
                raise ConfigError(str(self.config_path), [("tls", problem)])
        except ConfigError as exc:
            log.error("reload refused; the running configuration stays", extra={"problems": exc.problems})
            return False
        old_pipeline = self.pipeline
        try:
            await self._load_secrets(settings)
            self.dns = build_dns(settings)
            deliveries, retired = self.deliveries.build(settings, self.store, self.dns)
            pipeline, posture = build_pipeline(settings, self.store, deliveries, self.dns, previous=self.posture)
            await pipeline.keyring.fetch_missing()
            await self._apply_listeners(settings)
            self.tls.load(settings.tls)
        except (ConfigError, OSError) as exc:
            log.error("reload failed; the running configuration stays", extra={"reason": str(exc)})
            return False
        old_pipeline.keyring.detach()
        pipeline.keyring.attach()
        self._pipeline = pipeline
        self._posture_task.cancel()
        self.posture = posture
        self._posture_task = asyncio.create_task(posture.run(), name="posture")
        self.settings = settings
        setup_logging(settings.logging.format, settings.logging.level)
        self._report_keys(pipeline)
        for delivery in retired:
            asyncio.create_task(delivery.close())
        log.info("configuration reloaded", extra={"config": redacted(settings)})
        return True

    async def _apply_listeners(self, settings: Settings) -> None:
        wanted = {_listener_key(lst): lst for lst in settings.listeners}
        for key, lst in wanted.items():
            if key in self.listeners:
                self.listeners[key].update(settings, lst)
            else:
                server = ListenerServer(lst, self, self.tls, settings, reuse_port=self.reuse_port)
                await server.start()
                self.listeners[key] = server
        for key in [k for k in self.listeners if k not in wanted]:
            self.listeners.pop(key).stop_accepting()

    async def drain(self) -> None:
        """Stop accepting, let transactions in flight finish, then stop."""
        if self._draining:
            return
        self._draining = True
        timeout = self.settings.drain_timeout
        log.info("draining", extra={"sessions": len(self._sessions), "timeout_s": timeout})
        for server in self.listeners.values():
            server.stop_accepting()
        for session in list(self._sessions):
            # Idle sessions go now (RFC 5321 §3.8: 421 then close); a session inside a
            # transaction gets its 421 after the DATA reply (see RelaySMTP.smtp_DATA).
            if session.session is not None and session.session.transaction is None and session.transport:
                session.transport.write(b"421 4.3.2 Service shutting down, closing connection\r\n")
                session.close()
        if self._sessions:
            self._all_closed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), timeout)
        if self._sessions:
            log.warning("drain timeout; closing remaining sessions", extra={"sessions": len(self._sessions)})
            for session in list(self._sessions):
                session.close()
        await self.stop()

    async def stop(self) -> None:
        if self._posture_task is not None:
            self._tasks.append(self._posture_task)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.gather(*(d.close() for d in self.deliveries.all()), return_exceptions=True)
        await self.health.stop()
        await self.store.close()
        self._stopped.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()

        def on_term() -> None:
            self._signals += 1
            if self._signals > 1:
                log.warning("second stop signal: exiting now")
                os._exit(1)
            asyncio.create_task(self.drain())

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_term)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.create_task(self.reload()))

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _listener_key(lst) -> tuple:
    return (lst.name, str(lst.bind), lst.tls)


async def serve(settings: Settings, *, config_path: Path | None,
                reload_settings: Callable[[], Settings] | None = None,
                on_started: Callable[[Relay], None] | None = None, reuse_port: bool = False) -> int:
    relay = Relay(settings, config_path=config_path, reload_settings=reload_settings, reuse_port=reuse_port)
    try:
        await relay.start()
    except OSError as exc:
        log.error("cannot start", extra={"reason": f"{exc.strerror or exc}"})
        await relay.stop()
        return 1
    relay.install_signal_handlers()
    if on_started:
        on_started(relay)
    await relay.wait_stopped()
    log.info("stopped")
    return 0
