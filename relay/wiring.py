"""The composition root: every runtime object is built from `Settings` here, and only here.

`relay serve` (through `relay.server`), `relay check` (`preflight`) and the tests build
their parts with these functions, so what is tested is what runs. Nothing here starts a
task or binds a socket: `relay.server` runs what this module builds (like uvicorn's
`Config.load()` → `Server.serve()`).

    store = new_secret_store(settings)
    targets = UpstreamTargets()
    parts = await build_components(settings, store, targets)      # at start
    targets.commit(parts.upstreams)
    parts = await build_components(new, store, targets, previous=parts)   # at reload
    targets.commit(parts.upstreams)       # once it runs (else: targets.discard(parts.upstreams))

Spool mode (`queue.mode: spool`): the spool and its delivery loop outlive config snapshots
(`build_spool` once, at start); each snapshot's pipeline delivers to the spool, and the
delivery loop to the snapshot's real targets (`Components.router`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relay.auth.users import UserDirectory
from relay.config.load import redacted_url, secret_references
from relay.config.schema import Settings, UpstreamSettings
from relay.deliver.base import UpstreamTarget
from relay.deliver.connection import UpstreamConnector, UpstreamEndpoint, upstream_tls_context
from relay.deliver.dial import Dialer
from relay.deliver.failover import FailoverTarget
from relay.deliver.mx import MxTarget
from relay.deliver.outbox import OutboxTarget
from relay.deliver.pool import ConnectionPool
from relay.deliver.smarthost import SmarthostTarget
from relay.dns.addresses import AddressResolver
from relay.dns.resolver import DnsResolver, DnsService
from relay.limits.counters import Counters
from relay.limits.limiter import Limiter
from relay.limits.local import LocalCounters, counters_dir
from relay.limits.rules import LimitPolicy
from relay.limits.usage import LimitUsage
from relay.oauth.cache import TokenCache
from relay.oauth.providers import token_source
from relay.oauth.token import TokenError, remediation
from relay.oauth.upstream_auth import UpstreamTokenAuth
from relay.observe import messages, sessions
from relay.pipeline import Pipeline
from relay.posture.egress import Accept, is_public_unicast
from relay.posture.monitor import PostureMonitor
from relay.posture.report import CheckReport, LimitsCheck, TokenCheck, limits_remediation, run_check
from relay.proxy import dialer_for
from relay.queue.dsn import report_signer
from relay.queue.pacing import PacedTarget, pacing_state
from relay.queue.runner import QueueRunner
from relay.queue.schedule import RetryPolicy
from relay.queue.spooled import SpoolTarget
from relay.queue.store import Spool
from relay.route.router import Router
from relay.secrets.base import SecretBackend
from relay.secrets.local import EnvBackend, FileBackend
from relay.secrets.store import SecretStore
from relay.sign.keyring import KeyRing


def new_secret_store(settings: Settings) -> SecretStore:
    """The store every secret reference is read from; file:// and env:// are always there,
    the other backends are installed by `load_secrets` as the config asks for them."""
    return SecretStore([FileBackend(), EnvBackend()], settings.secrets.refresh)


def build_secret_backends(settings: Settings, bootstrap: SecretStore | None = None) -> list[SecretBackend]:
    backends: list[SecretBackend] = [FileBackend(), EnvBackend()]
    # The HTTP backends' host names (Secrets Manager, Vault) also go through dns.nameservers.
    resolver = configured_resolver(settings, build_dns(settings))
    key_patterns = [ks.key for ks in settings.dkim.key_sets]  # keys a key set will list
    refs = secret_refs(settings) + vault_bootstrap_refs(settings) + key_patterns
    if any(ref.startswith("aws-sm://") for ref in refs):
        # Imported only when used: the AWS SDK costs each worker ~35 MiB of memory.
        from relay.secrets.aws import AwsSecretsBackend

        backends.append(
            AwsSecretsBackend(
                region=settings.secrets.aws.region, endpoint_url=settings.secrets.aws.endpoint_url, resolver=resolver
            )
        )
    vault = settings.secrets.vault
    if vault is not None:
        from relay.secrets.vault import VaultBackend

        def resolved(ref: str | None) -> str | None:
            if ref is None or bootstrap is None:
                return None
            value = bootstrap.get(ref)
            return value.text() if value else None

        backends.append(
            VaultBackend(
                vault.url,
                auth=vault.auth,
                token=resolved(vault.token),
                role=vault.role,
                role_id=vault.role_id,
                secret_id=resolved(vault.secret_id),
                kubernetes_token_path=vault.kubernetes_token_path,
                auth_mount=vault.auth_mount,
                namespace=vault.namespace,
                ca_file=str(vault.ca_file) if vault.ca_file else None,
                resolver=resolver,
            )
        )
    return backends


def secret_refs(settings: Settings) -> list[str]:
    """The references the relay itself uses (Vault's own credentials are `vault_bootstrap_refs`)."""
    return list(dict.fromkeys(ref for path, ref in secret_references(settings) if not path.startswith("secrets.")))


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


def build_dialer(upstream: UpstreamSettings, store: SecretStore, resolver: AddressResolver | None = None) -> Dialer:
    password_ref = upstream.proxy_password

    def current_password() -> str | None:
        # Read at every dial: the store keeps the secret current (rotation, no reload).
        value = store.get(password_ref) if password_ref else None
        return value.text() if value else None

    return dialer_for(
        upstream.proxy,
        current_password=current_password if password_ref else None,
        connect_timeout=upstream.connect_timeout,
        handshake_timeout=upstream.connect_timeout,
        resolver=resolver,
    )


def configured_resolver(settings: Settings, dns: DnsService) -> AddressResolver | None:
    """Names the relay connects to (upstream, proxy) go through `dns.nameservers` when they
    are configured (a VPC's resolver, not the container's default); else the system's
    resolver, which also reads /etc/hosts. socks5h:// and CONNECT proxies resolve the
    upstream's name themselves."""
    return AddressResolver(dns) if settings.dns.nameservers else None


def build_dns(settings: Settings) -> DnsResolver:
    dns = settings.dns
    return DnsResolver(dns.nameservers, port=dns.port, timeout=dns.timeout, attempts=dns.attempts)


def build_token_auth(
    upstream: UpstreamSettings, store: SecretStore, resolver: AddressResolver | None = None
) -> UpstreamTokenAuth | None:
    """The access-token side of an upstream with `auth.provider` (None for the others): its
    token endpoint is reached through the upstream's own egress path, names resolved by
    `resolver` (`configured_resolver`: dns.nameservers) like the upstream's own."""
    auth = upstream.auth
    if auth is None or not auth.uses_token or upstream.username is None:
        return None

    def secret(ref: str) -> bytes | None:
        value = store.get(ref)
        return value.data if value else None

    source = token_source(auth, upstream.username, build_dialer(upstream, store, resolver), secret)
    cache = TokenCache(source, upstream=upstream.label)
    mechanism = auth.effective_mechanism
    assert mechanism is not None
    return UpstreamTokenAuth(cache, mechanism=mechanism, username=upstream.username, secrets=tuple(auth.secret_refs))


def build_target(
    upstream: UpstreamSettings,
    settings: Settings,
    store: SecretStore,
    dns: DnsService | None = None,
    token_auth: UpstreamTokenAuth | None = None,
) -> UpstreamTarget:
    """`token_auth` (from `build_token_auth`) when the upstream authenticates with a token."""
    target = _build_target(upstream, settings, store, dns, token_auth)
    if upstream.max_rate is not None and settings.queue.mode == "spool":
        # Pacing applies to deliveries from the spool; in passthrough the client waits.
        # One bucket for every worker on this spool: max_rate is the upstream's limit.
        return PacedTarget(target, upstream.max_rate, shared=pacing_state(settings.queue.dir, target.name))
    return target


def _build_target(
    upstream: UpstreamSettings,
    settings: Settings,
    store: SecretStore,
    dns: DnsService | None = None,
    token_auth: UpstreamTokenAuth | None = None,
) -> UpstreamTarget:
    if upstream.mode == "outbox":
        assert upstream.outbox_dir is not None
        upstream.outbox_dir.mkdir(parents=True, exist_ok=True)
        return OutboxTarget(upstream.outbox_dir)
    password_ref = upstream.password

    def password() -> str | None:
        value = store.get(password_ref) if password_ref else None
        return value.text() if value else None

    tls_context = None
    if upstream.effective_tls != "none":
        tls_context = upstream_tls_context(str(upstream.ca_file) if upstream.ca_file else None, upstream.verify_tls)
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
        password_mechanism=upstream.auth.mechanism if upstream.auth and not upstream.auth.uses_token else None,
        auth=token_auth,
        connect_timeout=upstream.connect_timeout,
        command_timeout=upstream.command_timeout,
    )
    if upstream.mode == "mx":
        # MX hosts are always resolved through the configured DNS service.
        connector = UpstreamConnector(
            endpoint, build_dialer(upstream, store, configured_resolver(settings, dns)), AddressResolver(dns)
        )
        return MxTarget(upstream.label, connector, dns)
    resolver = configured_resolver(settings, dns)
    # Without nameservers the smarthost's name goes to the system resolver (AddressResolver(None)).
    connector = UpstreamConnector(endpoint, build_dialer(upstream, store, resolver), resolver or AddressResolver(None))
    pool = ConnectionPool(
        upstream.label,
        connector.open,
        max_connections=upstream.pool.max_connections,
        max_messages=upstream.pool.max_messages_per_connection,
        idle_timeout=upstream.pool.idle_timeout,
        acquire_timeout=upstream.pool.acquire_timeout,
    )
    return SmarthostTarget(upstream.label, connector, pool)


@dataclass
class BuiltTargets:
    targets: list[UpstreamTarget]  # in config order
    retired: list[UpstreamTarget]  # no longer used: to be closed
    token_auths: list[UpstreamTokenAuth]  # of the upstreams with a token provider
    retired_token_auths: list[UpstreamTokenAuth]
    by_config: dict[str, tuple[UpstreamTarget, UpstreamTokenAuth | None]] = field(default_factory=dict, repr=False)


class UpstreamTargets:
    """Upstream targets by upstream config; an unchanged upstream keeps its pool (and its
    access token) across reloads.

    Two steps, so that a reload that fails leaves the running ones as they are: `build`
    makes what a config needs (reusing the running ones) without changing what runs;
    `commit` makes it what runs, once the config is in use; `discard` closes what was
    built for a config that was not."""

    def __init__(self) -> None:
        self._by_config: dict[str, tuple[UpstreamTarget, UpstreamTokenAuth | None]] = {}

    def build(self, settings: Settings, store: SecretStore, dns: DnsService) -> BuiltTargets:
        """The targets for `settings`, and what the running config uses that this one does not."""
        wanted: dict[str, tuple[UpstreamTarget, UpstreamTokenAuth | None]] = {}
        for upstream in settings.upstream:
            key = upstream.model_dump_json() + settings.hostname + settings.dns.model_dump_json() + settings.queue.mode
            built = self._by_config.get(key)
            if built is None:
                token_auth = build_token_auth(upstream, store, configured_resolver(settings, dns))
                built = (build_target(upstream, settings, store, dns, token_auth), token_auth)
            wanted[key] = built
        retired = [built for k, built in self._by_config.items() if k not in wanted]
        return BuiltTargets(
            [t for t, _ in wanted.values()],
            [t for t, _ in retired],
            [a for _, a in wanted.values() if a is not None],
            [a for _, a in retired if a is not None],
            wanted,
        )

    def commit(self, built: BuiltTargets) -> None:
        self._by_config = built.by_config

    async def discard(self, built: BuiltTargets) -> None:
        running = {id(part) for pair in self._by_config.values() for part in pair}
        unused = [pair for pair in built.by_config.values() if id(pair[0]) not in running]
        await asyncio.gather(
            *(target.close() for target, _ in unused),
            *(auth.close() for _, auth in unused if auth is not None),
            return_exceptions=True,
        )

    def all(self) -> list[UpstreamTarget]:
        return [t for t, _ in self._by_config.values()]

    def token_auths(self) -> list[UpstreamTokenAuth]:
        return [a for _, a in self._by_config.values() if a is not None]


def build_router(settings: Settings, targets: list[UpstreamTarget]) -> Router:
    by_name = {u.name: t for u, t in zip(settings.upstream, targets, strict=True) if u.name}
    routes = [(r.sender_domain, by_name[r.upstream]) for r in settings.routes]
    default = targets[0] if len(targets) == 1 else FailoverTarget(targets)
    return Router(default, routes)


def build_pipeline(
    settings: Settings,
    store: SecretStore,
    targets: list[UpstreamTarget],
    dns: DnsService,
    previous: PostureMonitor | None = None,
    previous_pipeline: Pipeline | None = None,
    spool: UpstreamTarget | None = None,
    limiter: Limiter | None = None,
) -> tuple[Pipeline, PostureMonitor]:
    """The pipeline for one config snapshot, and the DNS posture monitor that gates it.
    With `spool`, every transaction goes to it (the real targets are the delivery loop's)."""
    keyring = KeyRing(settings.dkim, store)
    router = build_router(settings, targets)
    monitor = PostureMonitor(
        settings,
        dns,
        keyring,
        router.default,
        dialer=build_dialer(settings.upstream[0], store, configured_resolver(settings, dns)),
        previous=previous,
    )
    pipeline = Pipeline(
        settings,
        users=UserDirectory(settings.clients.users, store),
        keyring=keyring,
        router=Router(spool) if spool is not None else router,
        gate=monitor,
        # AUTH failures counted so far survive a reload that keeps the same limits.
        throttle=(
            previous_pipeline.throttle
            if previous_pipeline is not None
            and previous_pipeline.settings.clients.auth_throttle == settings.clients.auth_throttle
            else None
        ),
        limiter=limiter,
    )
    return pipeline, monitor


class LimitCounters:
    """The counters of sending limits. Built once and kept across reloads while the backend
    settings stay the same: the counts live on, whatever the limits become.

    A reload builds new counters only when those settings change, and they become the
    current ones only when the reload is applied (`adopt`); a reload that fails after
    building them closes them (`discard`), and the running ones stay current."""

    def __init__(self) -> None:
        self._key: str | None = None
        self._counters: Counters | None = None

    @property
    def current(self) -> Counters | None:
        return self._counters

    def build(self, settings: Settings, store: SecretStore) -> BuiltCounters:
        """The counters `settings` asks for: the current ones, or new ones (`fresh`)."""
        limits = settings.limits
        key = None
        if limits is not None:
            key = f"{limits.backend} {limits.redis} {settings.data_dir}"
            if limits.backend == "redis":
                key += f" {settings.dns}"  # the resolver the Redis host name goes through
        if key == self._key:
            return BuiltCounters(self._counters, key, fresh=False)
        return BuiltCounters(None if limits is None else build_counters(settings, store), key, fresh=True)

    def adopt(self, built: BuiltCounters) -> Counters | None:
        """Make `built` current (the config it came with is applied); returns the counters
        it replaces, to be closed."""
        if not built.fresh:
            return None
        retired, self._counters, self._key = self._counters, built.counters, built.key
        return retired

    async def discard(self, built: BuiltCounters | None) -> None:
        """The config `built` came with was not applied: close what was built for it."""
        if built is not None and built.fresh and built.counters is not None:
            await built.counters.close()


@dataclass(frozen=True)
class BuiltCounters:
    counters: Counters | None
    key: str | None  # the backend settings they were built for
    fresh: bool  # built for this config (not the current ones)


def build_counters(settings: Settings, store: SecretStore) -> Counters:
    assert settings.limits is not None
    local = LocalCounters(counters_dir(settings.data_dir))
    redis = settings.limits.redis
    if settings.limits.backend != "redis" or redis is None:
        return local
    from relay.limits.redis_counters import RedisCounters

    counters = RedisCounters(redis.url, fallback=local, **_redis_options(settings, store))
    if redis.password:
        counters.follow_secret(store, redis.password)
    return counters


def _redis_options(settings: Settings, store: SecretStore) -> dict[str, Any]:
    """How relay connects to the limits' Redis: for the counters and for `relay check`."""
    assert settings.limits is not None and settings.limits.redis is not None
    redis = settings.limits.redis
    password_ref = redis.password

    def password() -> str | None:
        # The store's current value: a rotated secret is used by the next connection.
        value = store.get(password_ref) if password_ref else None
        return value.text() if value else None

    return {
        "password": password if password_ref else None,
        "timeout": redis.timeout,
        "key_prefix": redis.key_prefix,
        "ca_file": redis.ca_file,
        # The Redis host is resolved like every other name relay connects to.
        "resolver": configured_resolver(settings, build_dns(settings)),
    }


async def check_limits(settings: Settings, store: SecretStore) -> LimitsCheck | None:
    """`relay check`'s row for shared limits: the script run once on the Redis of
    `limits.redis`, as the relay runs it. None when the limits are not shared."""
    limits = settings.limits
    if limits is None or limits.backend != "redis" or limits.redis is None:
        return None
    from relay.limits.redis_counters import probe

    where = redacted_url(limits.redis.url)
    problem = await probe(limits.redis.url, **_redis_options(settings, store))
    if problem is None:
        return LimitsCheck("redis", where, True, "the limit script runs: counters shared by every replica")
    kind, error = problem
    return LimitsCheck("redis", where, False, f"{kind}: {error}", limits_remediation(kind, error))


def build_limiter(settings: Settings, counters: Counters | None) -> tuple[Limiter | None, LimitUsage | None]:
    """The limits stage and its usage gauge, or None when nothing is limited."""
    if settings.limits is None or counters is None:
        return None, None
    policy = LimitPolicy(settings.limits)
    if not policy.limits_anything:
        return None, None
    unauthenticated = [listener.name for listener in settings.listeners if listener.auth != "required"]
    optional = [listener.name for listener in settings.listeners if listener.auth == "optional"]
    if optional and policy.limits_users and policy.for_unauthenticated() is None:
        logging.getLogger("relay.limits").warning(
            "user limits apply to authenticated clients only: on these listeners a client can "
            "skip AUTH and them; set limits.unauthenticated to limit those clients too",
            extra={"listeners": optional},
        )
    usage = LimitUsage(policy, counters, [user.username for user in settings.clients.users], unauthenticated)
    return Limiter(policy, counters), usage


@dataclass
class Components:
    """Everything one config snapshot needs at run time, built by `build_components`."""

    settings: Settings
    dns: DnsResolver
    pipeline: Pipeline
    posture: PostureMonitor
    router: Router  # the real upstream targets (in spool mode the pipeline's router is the spool's)
    # Targets of the previous snapshot that this one no longer uses (to be closed).
    retired: list[UpstreamTarget] = field(default_factory=list)
    # Token sides of the upstreams with a token provider (started by the server), and the
    # previous snapshot's that this one no longer uses (to be closed).
    token_auths: list[UpstreamTokenAuth] = field(default_factory=list)
    retired_token_auths: list[UpstreamTokenAuth] = field(default_factory=list)
    limit_usage: LimitUsage | None = None  # relay_limit_usage_ratio, read at scrape
    # The upstream targets and token sides as built (`UpstreamTargets.commit` / `discard`).
    upstreams: BuiltTargets | None = None
    # The limit counters this snapshot uses (LimitCounters.adopt them once it is applied).
    counters: BuiltCounters | None = None


async def build_components(
    settings: Settings,
    store: SecretStore,
    targets: UpstreamTargets,
    *,
    previous: Components | None = None,
    spool: SpoolTarget | None = None,
    counters: LimitCounters | None = None,
) -> Components:
    """Load the secrets `settings` uses and build its pipeline, targets and posture monitor.

    `previous` (at a reload) hands over the posture monitor's verdicts; unchanged upstreams
    keep their targets (and pools) through `targets`, which changes only at
    `targets.commit(components.upstreams)`. Raises OSError for unreadable files.
    """
    await load_secrets(store, settings)
    dns = build_dns(settings)
    built = targets.build(settings, store, dns)
    limit_counters = (counters or LimitCounters()).build(settings, store)
    try:
        limiter, limit_usage = build_limiter(settings, limit_counters.counters)
        pipeline, posture = build_pipeline(
            settings,
            store,
            built.targets,
            dns,
            previous=previous.posture if previous is not None else None,
            previous_pipeline=previous.pipeline if previous is not None else None,
            spool=spool,
            limiter=limiter,
        )
        await pipeline.keyring.fetch_missing()  # the keys key-set documents list
    except BaseException:
        # A config that cannot be built leaves nothing open: its new targets and counters go.
        await targets.discard(built)
        await (counters or LimitCounters()).discard(limit_counters)
        raise
    listeners = [listener.name for listener in settings.listeners]
    sessions.export_listeners(listeners)
    messages.export_listeners(listeners)
    return Components(
        settings,
        dns,
        pipeline,
        posture,
        build_router(settings, built.targets),
        retired=built.retired,
        token_auths=built.token_auths,
        retired_token_auths=built.retired_token_auths,
        limit_usage=limit_usage,
        upstreams=built,
        counters=limit_counters,
    )


class SpoolParts:
    """Spool mode's long-lived parts: the spool, its delivery loop, the pipeline's target."""

    def __init__(self, settings: Settings, current: Callable[[], Components]) -> None:
        queue = settings.queue
        self.spool = Spool(queue.dir, max_bytes=queue.max_bytes)

        def sign_report(report: bytes) -> bytes:
            pipeline = current().pipeline
            return report_signer(pipeline.keyring.keys_for, pipeline.signer, settings.hostname)(report)

        self.runner = QueueRunner(
            self.spool,
            lambda: current().router,
            RetryPolicy(queue.retry, max_age=queue.max_age),
            hostname=settings.hostname,
            bounce=queue.bounce,
            dead_letter_age=queue.dead_letter_age,
            sign_report=sign_report,
            pacer=lambda: current().pipeline.limiter,
        )
        self.target = SpoolTarget(self.spool, self.runner, lambda: current().router)


def build_spool(settings: Settings, current: Callable[[], Components]) -> SpoolParts | None:
    """The spool parts when `queue.mode: spool`, else None. Opening the spool (directories,
    a scan, the journal replay of a stopped process) is `SpoolParts.spool.open()`."""
    if settings.queue.mode != "spool":
        return None
    return SpoolParts(settings, current)


async def preflight(
    settings: Settings, *, accept: Accept = is_public_unicast, echo_tls_context: ssl.SSLContext | None = None
) -> CheckReport:
    """`relay check`: the same parts the relay builds, probed once; never raises for a
    failed check (it is in the report)."""
    dns = build_dns(settings)
    store = new_secret_store(settings)
    target: UpstreamTarget | None = None
    token_auths: list[UpstreamTokenAuth | None] = []
    try:
        await load_secrets(store, settings)
        token_auths = [build_token_auth(u, store, configured_resolver(settings, dns)) for u in settings.upstream]
        # Tokens first: the upstream probe then authenticates with the one just fetched.
        tokens = [await check_token(a) for a in token_auths if a is not None]
        upstream = settings.upstream[0]
        target = build_target(upstream, settings, store, dns, token_auths[0])
        keyring = KeyRing(settings.dkim, store)
        await keyring.fetch_missing()
        limits = await check_limits(settings, store)
        return await run_check(
            settings,
            dns=dns,
            keyring=keyring,
            target=target,
            dialer=build_dialer(upstream, store, configured_resolver(settings, dns)),
            accept=accept,
            echo_tls_context=echo_tls_context,
            tokens=tokens,
            limits=limits,
        )
    finally:
        if target is not None:
            await target.close()
        for token_auth in token_auths:
            if token_auth is not None:
                await token_auth.close()
        await store.close()


async def check_token(token_auth: UpstreamTokenAuth) -> TokenCheck:
    source = token_auth.cache.source
    try:
        token = await token_auth.cache.token()
    except TokenError as exc:
        return TokenCheck(
            token_auth.label,
            source.provider,
            source.describe(),
            False,
            f"{exc.reason}: {exc.detail}",
            exc.reason,
            remediation(source.provider, exc.reason),
        )
    return TokenCheck(
        token_auth.label, source.provider, source.describe(), True, f"token issued, valid for {token.lifetime:.0f} s"
    )
