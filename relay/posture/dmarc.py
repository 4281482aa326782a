"""DMARC (RFC 7489) for a From domain the relay signs: which record applies, its policy, and
whether the relay's DKIM signature and the envelope sender can align with the From domain.

Policy discovery (§6.6.3): `_dmarc.<From domain>` TXT; records not starting with
`v=DMARC1` are discarded; if none is left and the From domain is not its own organizational
domain, `_dmarc.<organizational domain>`; more than one record left means no DMARC applies.
The organizational domain (§3.2) is the public suffix plus one label, from the Public Suffix
List bundled with the `publicsuffixlist` package, ICANN and private sections alike (a
`github.io` user is its own organization); an unknown TLD counts as a public suffix (the
PSL's default rule `*`), so `mail.example.test` belongs to `example.test`.

`DmarcCheck.status`:
    ok         one valid record applies
    missing    no record, at the From domain or its organizational domain
    invalid    the record has no valid p= (or an invalid sp=): with a valid rua= it is taken
               as p=none (§6.6.3 step 6), without one no DMARC applies
    multiple   several DMARC records: no DMARC applies (§6.6.3 step 5)
    temperror  a DNS lookup failed
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace

from dkim.util import InvalidTagValueList, parse_tag_value
from publicsuffixlist import PublicSuffixList

from relay.dns.resolver import DnsNameError, DnsService, DnsTemporaryError
from relay.posture.dkim_record import tag_list_problem
from relay.posture.levels import FAIL, OK, WARN
from relay.spf.record import cut

POLICIES = ("none", "quarantine", "reject")
_VERSION = re.compile(rb"^v\s*=\s*DMARC1\s*(;|$)")
_MODES = {"r": "relaxed", "s": "strict"}


@functools.cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2: the registrable domain; a bare public suffix is its own."""
    domain = domain.lower().rstrip(".")
    return _psl().privatesuffix(domain) or domain


def aligned(a: str, b: str, mode: str) -> bool:
    """Identifier alignment (§3.1): strict is equality, relaxed equal organizational domains."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if mode == "s":
        return a == b
    return organizational_domain(a) == organizational_domain(b)


@dataclass(frozen=True)
class DmarcCheck:
    domain: str  # the From domain
    organizational_domain: str
    status: str
    found_at: str | None = None  # the _dmarc name whose record applies
    record: str | None = None
    policy: str | None = None  # p=
    subdomain_policy: str | None = None  # sp=
    applied_policy: str = "missing"  # none | quarantine | reject | missing (no DMARC applies)
    pct: int = 100
    adkim: str = "r"
    aspf: str = "r"
    rua: tuple[str, ...] = ()
    ruf: tuple[str, ...] = ()
    dkim_domain: str = ""
    dkim_aligned: bool = False
    envelope_domain: str = ""
    spf_aligned: bool = False
    problem: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def dkim_alignment(self) -> str:
        verb = "aligns" if self.dkim_aligned else "does not align"
        return f"DKIM d={self.dkim_domain} {verb} with From {self.domain} ({_MODES[self.adkim]}, adkim={self.adkim})"

    @property
    def spf_alignment(self) -> str:
        # For a smarthost the envelope sender is the client's MAIL FROM: SPF aligns only if
        # the application uses an address at the signing domain there.
        where = self.envelope_domain
        if self.aspf != "s":
            where += f" or any domain under {organizational_domain(self.domain)}"
        if not self.spf_aligned:
            return f"SPF cannot align: MAIL FROM domain {self.envelope_domain} vs From {self.domain} (aspf={self.aspf})"
        return f"SPF aligned if MAIL FROM uses {where} (aspf={self.aspf})"

    @property
    def level(self) -> str:
        if self.status in ("temperror", "multiple"):
            return FAIL
        if self.status == "invalid":
            return WARN if self.applied_policy != "missing" else FAIL
        if self.status == "ok" and not self.dkim_aligned:
            return FAIL
        if self.status == "missing" or self.warnings:
            return WARN
        return OK

    @property
    def summary(self) -> str:
        if self.status == "temperror":
            return f"DNS lookup failed: {self.problem}"
        if self.status in ("missing", "multiple"):
            return self.problem or self.status
        where = f" at {self.found_at}" if self.found_at else ""
        policy = f"policy {self.applied_policy}{where}"
        if self.found_at and self.found_at != f"_dmarc.{self.domain}":
            policy += f" ({'sp' if self.subdomain_policy else 'p'}= of the organizational domain)"
        if self.pct != 100:
            policy += f", pct={self.pct}"
        dkim = "DKIM aligned" if self.dkim_aligned else f"DKIM d={self.dkim_domain} NOT aligned"
        spf = self.spf_alignment.split(" (aspf=")[0]
        parts = [policy, f"{dkim} (adkim={self.adkim})", f"{spf} (aspf={self.aspf})"]
        if self.problem:
            parts.insert(0, self.problem)
        return "; ".join(parts + list(self.warnings))

    @property
    def remediation(self) -> str | None:
        org = self.organizational_domain
        start = f'_dmarc.{org} TXT "v=DMARC1; p=none; rua=mailto:dmarc@{org}"'
        if self.status == "temperror":
            return "the DNS lookup failed: check dns.nameservers and run the check again"
        if self.status == "missing":
            return f"publish {start}"
        if self.status == "multiple":
            return f"keep exactly one DMARC record at {self.found_at}"
        if self.status == "invalid":
            rua = ",".join(self.rua) or f"mailto:dmarc@{org}"
            return f'fix the policy: {self.found_at} TXT "v=DMARC1; p=none; rua={rua}"'
        if not self.dkim_aligned:
            return f"sign with a key whose d= aligns with {self.domain}"
        if not self.rua:
            return f"add rua=mailto:dmarc@{org} to {self.found_at} to receive aggregate reports"
        return None


async def check_dmarc(
    dns: DnsService, domain: str, *, dkim_domain: str | None = None, envelope_domain: str | None = None
) -> DmarcCheck:
    """The DMARC posture of From domain `domain`. `dkim_domain` is the d= the relay signs
    with and `envelope_domain` the MAIL FROM domain the upstream will use; both default to
    `domain` (the relay signs with d= the From domain; a smarthost keeps the client's MAIL FROM)."""
    domain = domain.lower().rstrip(".")
    org = organizational_domain(domain)
    base = _aligned(
        DmarcCheck(
            domain=domain,
            organizational_domain=org,
            status="",
            dkim_domain=(dkim_domain or domain).lower(),
            envelope_domain=(envelope_domain or domain).lower(),
        ),
        "r",
        "r",
    )
    names = [f"_dmarc.{domain}"] + ([f"_dmarc.{org}"] if org != domain else [])
    for name in names:
        try:
            answer = await dns.resolve(name, "TXT")
        except DnsTemporaryError as exc:
            return replace(base, status="temperror", problem=str(exc))
        except DnsNameError:
            continue
        records = [bytes(r) for r in answer.records if _VERSION.match(bytes(r))]
        if len(records) > 1:
            return replace(
                base,
                status="multiple",
                found_at=name,
                problem=f"{len(records)} DMARC records at {name}: no DMARC applies",
            )
        if records:
            return _evaluate(base, name, records[0], subdomain=name != f"_dmarc.{domain}")
    return replace(base, status="missing", problem=f"no DMARC record at {' or '.join(names)}")


def _aligned(check: DmarcCheck, adkim: str, aspf: str) -> DmarcCheck:
    """`check` with the alignment modes and whether DKIM and SPF align under them (§3.1)."""
    return replace(
        check,
        adkim=adkim,
        aspf=aspf,
        dkim_aligned=aligned(check.dkim_domain, check.domain, adkim),
        spf_aligned=aligned(check.envelope_domain, check.domain, aspf),
    )


def _evaluate(base: DmarcCheck, name: str, raw: bytes, *, subdomain: bool) -> DmarcCheck:
    record = raw.decode("ascii", errors="replace")
    syntax: str | None
    try:
        tags = {
            k.decode("ascii", "replace").lower(): v.decode("ascii", "replace").strip()
            for k, v in parse_tag_value(raw).items()
        }
    except InvalidTagValueList as exc:
        tags, syntax = {}, tag_list_problem(exc).replace("RFC 6376 §3.2", "RFC 7489 §6.4")
    else:
        syntax = None
    warnings: list[str] = []
    # §6.3: unknown or invalid optional values fall back to their defaults.
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    for tag, value in (("adkim", adkim), ("aspf", aspf)):
        if value not in _MODES:
            warnings.append(f"{tag}={cut(value)} is invalid (r assumed)")
    adkim = adkim if adkim in _MODES else "r"
    aspf = aspf if aspf in _MODES else "r"
    pct = 100
    if "pct" in tags:
        if tags["pct"].isdigit() and 0 <= int(tags["pct"]) <= 100:
            pct = int(tags["pct"])
        else:
            warnings.append(f"pct={cut(tags['pct'])} is invalid (100 assumed)")
    rua = _uris(tags.get("rua", ""))
    ruf = _uris(tags.get("ruf", ""))
    policy = tags.get("p", "").lower() or None
    sub = tags.get("sp", "").lower() or None
    problem = syntax
    status = "ok"
    if policy not in POLICIES or (sub is not None and sub not in POLICIES):
        # §6.6.3 step 6: no valid p= (or an invalid sp=): with a valid rua= act as p=none,
        # else no DMARC processing at all.
        status = "invalid"
        bad = f"p={cut(policy or '')}" if policy not in POLICIES else f"sp={cut(sub or '')}"
        problem = problem or (f"{bad} is not none, quarantine or reject" if policy or sub else "no p= tag")
        applied = "none" if any(u.lower().startswith("mailto:") for u in rua) else "missing"
        problem += "; taken as p=none (rua= present)" if applied == "none" else "; no DMARC applies"
    elif subdomain:
        # §6.3: sp= applies to subdomains of the domain where the record was found.
        applied = sub or policy
    else:
        applied = policy
    if status == "ok" and not rua:
        warnings.append("no rua=: no aggregate reports")
    if pct < 100:
        warnings.append(f"pct={pct}: the policy applies to {pct}% of failing mail")
    return replace(
        _aligned(base, adkim, aspf),
        status=status,
        found_at=name,
        record=record,
        policy=policy,
        subdomain_policy=sub,
        applied_policy=applied,
        pct=pct,
        rua=rua,
        ruf=ruf,
        problem=problem,
        warnings=tuple(warnings),
    )


def _uris(value: str) -> tuple[str, ...]:
    return tuple(u.strip() for u in value.split(",") if u.strip())
