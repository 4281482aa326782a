"""`relay dkim rotate` and `relay dkim status`: the commands around `Rotation`.

Exit codes as for every relay command: 0 done, waiting for a date, or nothing to do;
1 stopped (DNS does not serve the new key, a backend or DNS API failed); 2 bad config or
arguments (a domain without a key set).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime

from relay.config.schema import DkimKeySetSettings, Settings
from relay.config.units import parse_duration
from relay.dns.resolver import DnsResolver
from relay.rotate.clock import Clock, SystemClock
from relay.rotate.publish import publisher_for
from relay.rotate.rotation import Rotation
from relay.rotate.status import DomainStatus, domain_status, render, to_json
from relay.rotate.storage import RotationSecrets
from relay.secrets.base import SecretBackend, SecretFetchError
from relay.sign.keyset import KeySet, KeySetError

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
Out = Callable[[str], None]


async def rotate_command(
    settings: Settings,
    *,
    domain: str,
    algorithm: str | None = None,
    publish: str | None = None,
    overlap: str | None = None,
    dry_run: bool = False,
    start: bool = True,
    out: Out = print,
    err: Out = print,
    clock: Clock | None = None,
) -> int:
    domain = domain.strip().lower().rstrip(".")
    config = key_set_for(settings, domain)
    if config is None:
        err(
            f"relay dkim rotate: {domain} has no dkim.key_sets entry; rotation keeps its keys in a key set "
            "(see README, 'Rotate a DKIM key')"
        )
        return EXIT_CONFIG
    updates: dict[str, object] = {}
    if algorithm:
        updates["algorithm"] = algorithm
    if publish:
        if publish != "print" and not (publish.startswith("route53:") and len(publish) > len("route53:")):
            err("relay dkim rotate: --publish takes print or route53:ZONE_ID")
            return EXIT_CONFIG
        updates["publish"] = publish
    config = config.model_copy(update=updates)
    rotation_settings = settings.dkim.rotation
    if overlap:
        try:
            rotation_settings = rotation_settings.model_copy(update={"overlap": parse_duration(overlap)})
        except ValueError as exc:
            err(f"relay dkim rotate: --overlap: {exc}")
            return EXIT_CONFIG
    secrets = RotationSecrets(await secret_backends(settings))
    try:
        rotation = Rotation(
            config,
            rotation_settings,
            secrets=secrets,
            publishers=lambda target: publisher_for(target, rotation_settings, out),
            dns=build_uncached_dns(settings),
            clock=clock or SystemClock(),
            say=out,
            static_keys=settings.dkim.keys,
            protected_refs=protected_refs(settings, domain),
            allow_weak_rsa=settings.dkim.allow_weak_rsa,
            resolver=resolver_name(settings),
        )
        if dry_run:
            try:
                steps = await rotation.plan()
            except (KeySetError, SecretFetchError, ValueError) as exc:
                err(f"relay dkim rotate: {domain}: {exc}")
                return EXIT_FAILED
            out(f"{domain}: dry run, nothing is changed. Remaining steps:")
            out("\n".join(f"  {s.when_text}: {s.action}" for s in steps) or "  none")
            return EXIT_OK
        outcome = await rotation.advance(start=start)
        (out if outcome.ok else err)(outcome.message)
        if outcome.status == "waiting":
            for step in await rotation.plan():
                out(f"  next: {step.when_text}: {step.action}")
        return EXIT_OK if outcome.ok else EXIT_FAILED
    finally:
        await secrets.close()


async def status_command(
    settings: Settings, *, as_json: bool = False, out: Out = print, now: datetime | None = None
) -> int:
    now = now or SystemClock().now()
    secrets = RotationSecrets(await secret_backends(settings))
    statuses: list[DomainStatus] = []
    try:
        domains = sorted({k.domain for k in settings.dkim.keys} | {ks.domain for ks in settings.dkim.key_sets})
        for domain in domains:
            config = key_set_for(settings, domain)
            keyset, problem = None, None
            if config is not None:
                try:
                    value = await secrets.read(config.key_set)
                    keyset = KeySet.from_bytes(value.data, domain) if value is not None else None
                except (KeySetError, SecretFetchError) as exc:
                    problem = f"cannot read the key set: {exc}"
            statuses.append(
                domain_status(
                    domain,
                    config=config,
                    settings=settings.dkim.rotation,
                    keyset=keyset,
                    static_keys=settings.dkim.keys,
                    now=now,
                    problem=problem,
                    resolver=resolver_name(settings),
                )
            )
    finally:
        await secrets.close()
    out(json.dumps(to_json(statuses), indent=2) if as_json else (render(statuses) or "no DKIM keys configured"))
    return EXIT_FAILED if any(s.problem for s in statuses) else EXIT_OK


def key_set_for(settings: Settings, domain: str) -> DkimKeySetSettings | None:
    return next((ks for ks in settings.dkim.key_sets if ks.domain == domain), None)


def protected_refs(settings: Settings, domain: str) -> set[str]:
    """References rotation must never delete: everything the config uses, except the
    rotated domain's own static keys (adopted by its key set, retired like any other)."""
    refs = {k.key for k in settings.dkim.keys if k.domain != domain}
    refs |= {ks.key_set for ks in settings.dkim.key_sets}
    refs |= {u.password for u in settings.clients.users if u.password}
    for upstream in settings.upstream:
        refs |= {r for r in (upstream.password, upstream.proxy_password) if r}
    vault = settings.secrets.vault
    if vault is not None:
        refs |= {r for r in (vault.token, vault.secret_id) if r}
    return refs


def build_uncached_dns(settings: Settings) -> DnsResolver:
    """The configured resolver, asked afresh every time (rotation polls it)."""
    dns = settings.dns
    return DnsResolver(dns.nameservers, port=dns.port, timeout=dns.timeout, attempts=dns.attempts, cache=False)


def resolver_name(settings: Settings) -> str:
    servers = settings.dns.nameservers
    if not servers:
        return "the system resolver"
    port = "" if settings.dns.port == 53 else f" port {settings.dns.port}"
    return f"resolver {', '.join(servers)}{port}"


async def secret_backends(settings: Settings) -> list[SecretBackend]:
    """The backends the relay itself would build, plus AWS when a key set lives there."""
    from relay.secrets.local import EnvBackend, FileBackend
    from relay.secrets.store import SecretStore
    from relay.wiring import build_secret_backends, vault_bootstrap_refs

    bootstrap = SecretStore([FileBackend(), EnvBackend()], settings.secrets.refresh)
    await bootstrap.ensure(vault_bootstrap_refs(settings))
    backends = build_secret_backends(settings, bootstrap)
    if not any(b.scheme == "aws-sm" for b in backends):
        from relay.secrets.aws import AwsSecretsBackend

        backends.append(
            AwsSecretsBackend(region=settings.secrets.aws.region, endpoint_url=settings.secrets.aws.endpoint_url)
        )
    return backends
