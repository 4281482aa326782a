"""`relay check`: the preflight of the path out and of every signing domain's DNS posture.

`run_check` takes the same runtime objects the relay builds (resolver, key ring, the
default upstream's target and dialer: `relay.wiring.preflight` builds them), probes the
upstream, finds the egress IP, and assesses each signing domain with the code the running relay's monitor uses
(`relay.posture.assess`). `CheckReport.ok` is false when anything failed (✗); warnings (!)
do not fail. `to_json()` has a stable schema, version 1 (key by key in docs/json.md, which
tests/unit/test_json_doc.py holds to this code):

    {
      "version": 1,
      "ok": bool,
      "counts": {"fail": int, "warn": int},
      "upstream": {"level", "name", "ok": bool, "detail", "greeting", "warnings": [str]},
      "tokens": [{"level", "upstream", "provider", "endpoint", "ok": bool, "reason",
                  "detail", "remediation"}],      # upstreams with auth.provider, config order
      "limits": null | {"level", "backend": "redis", "where", "ok": bool, "detail",
                        "remediation"},            # limits.backend: redis only
      "egress": {"level", "ips": [str], "source": "config"|"upstream"|"ip_echo_url"|null,
                 "problem": str|null},
      "domains": [{                                   # sorted by domain
        "domain", "level",
        "spf": {"level", "status", "summary", "record", "records_found", "length",
                "lookups", "lookup_limit", "over_limit", "all", "smells": [str],
                "problem", "egress": [{"ip", "result", "mechanism", "problem"}],
                "remediation"},
        "dkim": [{"selector", "algorithm", "name", "level", "status", "summary",
                  "record", "dns_key_type", "dns_key_bits", "local_key_bits",
                  "test_mode", "problem", "warnings": [str], "expected",
                  "remediation"}],                    # config order
        "dmarc": {"level", "status", "summary", "found_at", "record",
                  "organizational_domain", "policy", "subdomain_policy",
                  "applied_policy", "pct", "adkim", "aspf", "rua": [str],
                  "ruf": [str], "dkim_aligned", "dkim_alignment", "spf_aligned",
                  "spf_alignment", "problem", "warnings": [str], "remediation"}
      }]
    }

`level` is "ok" | "warn" | "fail" everywhere. Statuses: spf — pass, fail, softfail,
neutral, none, permerror, temperror, unchecked (no egress IP); dkim — match, mismatch,
missing, revoked, invalid, multiple, temperror, unavailable; dmarc — ok, missing, invalid,
multiple, temperror. `summary`, `detail`, `problem` and `remediation` are sentences for
people, not for parsing; absent values are null, never "".
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from relay.config.schema import Settings, UpstreamSettings
from relay.deliver.base import UpstreamTarget
from relay.deliver.dial import Dialer
from relay.dns.resolver import DnsService
from relay.errors import SmtpError
from relay.posture.assess import DomainPosture, assess_all, key_specs
from relay.posture.dkim_record import DkimRecordCheck
from relay.posture.dmarc import DmarcCheck
from relay.posture.egress import Accept, Egress, discover_egress, is_public_unicast
from relay.posture.levels import FAIL, MARKS, OK, WARN, worst
from relay.posture.spf_posture import SpfPosture
from relay.sign.keyring import KeyRing
from relay.spf import MAX_DNS_TERMS

VERSION = 1


@dataclass(frozen=True)
class UpstreamCheck:
    name: str
    ok: bool
    detail: str
    greeting: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def level(self) -> str:
        if not self.ok:
            return FAIL
        return WARN if self.warnings else OK


@dataclass(frozen=True)
class TokenCheck:
    """An OAuth 2.0 access token fetched (or not) for an upstream with `auth.provider`."""

    upstream: str
    provider: str
    endpoint: str  # the token URL and the path to it
    ok: bool
    detail: str
    reason: str | None = None  # relay_upstream_token_failures_total's reason
    remediation: str | None = None

    @property
    def level(self) -> str:
        return OK if self.ok else FAIL


@dataclass(frozen=True)
class LimitsCheck:
    """The shared counters of `limits.backend: redis`: does the limit script run there?"""

    backend: str
    where: str  # the URL, without a secret
    ok: bool
    detail: str
    remediation: str | None = None

    @property
    def level(self) -> str:
        # Failing open keeps mail flowing, but every replica then counts alone: a limit set
        # for the whole fleet lets N times as much through. That is a failed preflight.
        return OK if self.ok else FAIL


def limits_remediation(kind: str, error: str) -> str:
    """What to do about a Redis the relay cannot use (kind: `unreachable` or `refused`)."""
    if kind == "refused":
        # READONLY: a replica after a failover; OOM: at maxmemory; NOPERM: the ACL user.
        return (
            "point limits.redis.url at the primary, give Redis room under maxmemory, and let "
            "the ACL user run EVALSHA/EVAL and write keys under limits.redis.key_prefix"
        )
    if "AuthenticationError" in error or "WRONGPASS" in error or "NOAUTH" in error:
        return "check the secret limits.redis.password names, and the user in limits.redis.url"
    return (
        "check limits.redis.url (host, port, rediss:// and limits.redis.ca_file) and the "
        "network path to it; until it answers, each replica counts its own traffic only"
    )


@dataclass
class CheckReport:
    upstream: UpstreamCheck
    egress: Egress
    egress_level: str
    domains: list[DomainPosture] = field(default_factory=list)
    tokens: list[TokenCheck] = field(default_factory=list)
    limits: LimitsCheck | None = None

    def levels(self) -> list[str]:
        out = [self.upstream.level, *(t.level for t in self.tokens), self.egress_level]
        if self.limits is not None:
            out.append(self.limits.level)
        for d in self.domains:
            out += [d.spf.level, d.dmarc.level, *(k.level for k in d.dkim)]
        return out

    @property
    def ok(self) -> bool:
        return worst(self.levels()) != FAIL

    def to_json(self) -> dict[str, Any]:
        levels = self.levels()
        return {
            "version": VERSION,
            "ok": self.ok,
            "counts": {"fail": levels.count(FAIL), "warn": levels.count(WARN)},
            "upstream": {
                "level": self.upstream.level,
                "name": self.upstream.name,
                "ok": self.upstream.ok,
                "detail": self.upstream.detail,
                "greeting": self.upstream.greeting,
                "warnings": list(self.upstream.warnings),
            },
            "tokens": [
                {
                    "level": t.level,
                    "upstream": t.upstream,
                    "provider": t.provider,
                    "endpoint": t.endpoint,
                    "ok": t.ok,
                    "reason": t.reason,
                    "detail": t.detail,
                    "remediation": t.remediation,
                }
                for t in self.tokens
            ],
            "limits": None
            if self.limits is None
            else {
                "level": self.limits.level,
                "backend": self.limits.backend,
                "where": self.limits.where,
                "ok": self.limits.ok,
                "detail": self.limits.detail,
                "remediation": self.limits.remediation,
            },
            "egress": {
                "level": self.egress_level,
                "ips": list(self.egress.ips),
                "source": self.egress.source,
                "problem": self.egress.problem,
            },
            "domains": [
                {
                    "domain": d.domain,
                    "level": d.level,
                    "spf": _spf_json(d.spf),
                    "dkim": [_dkim_json(k) for k in d.dkim],
                    "dmarc": _dmarc_json(d.dmarc),
                }
                for d in self.domains
            ],
        }

    def render(self) -> str:
        levels = self.levels()
        fails, warns = levels.count(FAIL), levels.count(WARN)
        if fails or warns:
            head = f"relay check: {fails} failed, {warns} warning{'s' if warns != 1 else ''}"
        else:
            head = "relay check: everything passed"
        lines = [head, ""]
        up = self.upstream
        up_text = f"{up.name}: {up.detail}" + (f" — {up.greeting}" if up.greeting else "")
        lines += _row(up.level, "upstream", up_text, None, width=9)
        lines += [f"    {' ' * 9}  ! {w}" for w in up.warnings]
        for t in self.tokens:
            lines += _row(t.level, "token", f"{t.upstream} ({t.provider}): {t.detail}", t.remediation, width=9)
        if (lim := self.limits) is not None:
            lines += _row(lim.level, "limits", f"{lim.backend} {lim.where}: {lim.detail}", lim.remediation, width=9)
        eg = self.egress
        eg_text = f"{', '.join(eg.ips)} (from {_SOURCES[eg.source]})" if eg.ips else f"unknown: {eg.problem}"
        lines += _row(self.egress_level, "egress IP", eg_text, None, width=9)
        if not self.domains:
            lines += ["", "no signing domains (dkim.keys is empty)"]
        for d in self.domains:
            lines += ["", f"{d.domain}  {MARKS[d.level]}"]
            lines += _row(d.spf.level, "SPF", d.spf.summary, d.spf.remediation)
            for k in d.dkim:
                lines += _row(k.level, "DKIM", k.summary, k.remediation)
            lines += _row(d.dmarc.level, "DMARC", d.dmarc.summary, d.dmarc.remediation)
        return "\n".join(lines)


_SOURCES = {
    "config": "spf.egress_ip",
    "upstream": "the upstream's EHLO reply",
    "ip_echo_url": "spf.ip_echo_url",
    None: "nowhere",
}


def _row(level: str, what: str, text: str, remedy: str | None, width: int = 9) -> list[str]:
    out = [f"  {MARKS[level]} {what:<{width}}  {text}"]
    if remedy and level != OK:
        out.append(f"    {' ' * width}  → {remedy}")
    return out


def _none(value: Any) -> Any:
    return value if value not in ("", ()) else None


def _spf_json(spf: SpfPosture) -> dict[str, Any]:
    rec = spf.record
    return {
        "level": spf.level,
        "status": spf.status,
        "summary": spf.summary,
        "record": rec.record,
        "records_found": rec.records_found,
        "length": rec.length,
        "lookups": rec.lookups,
        "lookup_limit": MAX_DNS_TERMS,
        "over_limit": rec.over_limit,
        "all": rec.all_qualifier,
        "smells": list(rec.smells),
        "problem": _none(rec.problem),
        "egress": [
            {
                "ip": v.ip,
                "result": v.result.result,
                "mechanism": _none(v.result.mechanism),
                "problem": _none(v.result.problem),
            }
            for v in spf.egress
        ],
        "remediation": spf.remediation,
    }


def _dkim_json(k: DkimRecordCheck) -> dict[str, Any]:
    return {
        "selector": k.selector,
        "algorithm": k.algorithm,
        "name": k.name,
        "level": k.level,
        "status": k.status,
        "summary": k.summary,
        "record": k.record,
        "dns_key_type": k.dns_key_type,
        "dns_key_bits": k.dns_key_bits,
        "local_key_bits": k.local_key_bits,
        "test_mode": k.test_mode,
        "problem": k.problem,
        "warnings": list(k.warnings),
        "expected": k.expected,
        "remediation": k.remediation,
    }


def _dmarc_json(m: DmarcCheck) -> dict[str, Any]:
    return {
        "level": m.level,
        "status": m.status,
        "summary": m.summary,
        "found_at": m.found_at,
        "record": m.record,
        "organizational_domain": m.organizational_domain,
        "policy": m.policy,
        "subdomain_policy": m.subdomain_policy,
        "applied_policy": m.applied_policy,
        "pct": m.pct,
        "adkim": m.adkim,
        "aspf": m.aspf,
        "rua": list(m.rua),
        "ruf": list(m.ruf),
        "dkim_aligned": m.dkim_aligned,
        "dkim_alignment": m.dkim_alignment,
        "spf_aligned": m.spf_aligned,
        "spf_alignment": m.spf_alignment,
        "problem": m.problem,
        "warnings": list(m.warnings),
        "remediation": m.remediation,
    }


# -- running the check ---------------------------------------------------------------------


class _ProbeOnce:
    """The upstream is dialled once; the upstream check and egress discovery share it."""

    def __init__(self, probe: Callable[[], Awaitable[str]]) -> None:
        self._probe = probe
        self._task: asyncio.Task[str] | None = None

    async def __call__(self) -> str:
        if self._task is None:
            self._task = asyncio.ensure_future(self._probe())
        return await asyncio.shield(self._task)


def egress_level(egress: Egress, settings: Settings) -> str:
    """No egress IP is a warning, or a failure with `on_fail: refuse` (the relay would then
    hold every message of the signing domains: see `PostureMonitor`)."""
    if egress.ips:
        return OK
    return FAIL if settings.spf.on_fail == "refuse" else WARN


async def check_upstream(
    upstream: UpstreamSettings, target: UpstreamTarget, probe: Callable[[], Awaitable[str]] | None
) -> UpstreamCheck:
    if upstream.mode == "outbox":
        return UpstreamCheck(upstream.label, True, "outbox mode: messages are written to files, nothing leaves")
    tls = upstream.effective_tls
    warnings = []
    if tls == "none":
        warnings.append("tls: none: mail to the upstream is not encrypted")
    elif not upstream.verify_tls:
        warnings.append("verify_tls: false: the upstream's certificate is not checked")
    via = target.describe() if hasattr(target, "describe") else upstream.label
    assert probe is not None  # every mode but outbox has one
    try:
        banner = await probe()
    except SmtpError as exc:
        return UpstreamCheck(upstream.label, False, f"{via}: {exc.reason}")
    tls_text = tls if tls == "none" else f"{tls}, certificate {'verified' if upstream.verify_tls else 'NOT verified'}"
    auth = ", authenticated" if upstream.username else ""
    if upstream.auth is not None and upstream.auth.uses_token:
        auth = f", authenticated with {(upstream.auth.effective_mechanism or '').upper()}"
    greeting = (banner or "").strip().splitlines()[0][:200] if (banner or "").strip() else None
    return UpstreamCheck(upstream.label, True, f"reachable: {via} ({tls_text}{auth})", greeting, tuple(warnings))


async def run_check(
    settings: Settings,
    *,
    dns: DnsService,
    keyring: KeyRing,
    target: UpstreamTarget,
    dialer: Dialer,
    accept: Accept = is_public_unicast,
    echo_tls_context: ssl.SSLContext | None = None,
    tokens: list[TokenCheck] | None = None,
    limits: LimitsCheck | None = None,
) -> CheckReport:
    """The whole preflight over parts built by `relay.wiring.preflight`: the default
    upstream's `target` and `dialer`, and the access tokens already fetched (`tokens`);
    never raises for a failed check (it is in the report)."""
    upstream = settings.upstream[0]
    probe = _ProbeOnce(target.probe) if upstream.mode != "outbox" else None
    upstream_check, egress = await asyncio.gather(
        check_upstream(upstream, target, probe),
        discover_egress(settings.spf, probe=probe, dialer=dialer, accept=accept, tls_context=echo_tls_context),
    )
    domains = await assess_all(dns, key_specs(settings.dkim, keyring), egress.ips)
    return CheckReport(upstream_check, egress, egress_level(egress, settings), domains, list(tokens or []), limits)
