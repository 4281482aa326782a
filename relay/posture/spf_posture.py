"""SPF posture of one signing domain: does its record authorize every egress IP, and is the
record itself sound (one record, at most 10 DNS lookups, no +all/?all)?

With a smarthost the envelope sender (MAIL FROM) is the client's, an address at the signing
domain, so receivers evaluate `check_host(egress IP, <domain>, postmaster@<domain>)`
(RFC 7208 §4.1): that is what runs here, once per egress IP, with the same evaluator the
relay uses everywhere (`relay.spf`).

`SpfPosture.status`: "pass" when every egress IP passes; "unchecked" when no egress IP is
known; else the first result that is not pass (fail, softfail, neutral, none, permerror,
temperror).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from relay.dns.resolver import DnsService
from relay.posture.levels import FAIL, OK, WARN
from relay.spf import MAX_DNS_TERMS, SpfRecordReport, SpfResult, analyze_record, check_host

# Smells of analyze_record that are advice rather than risk (the record works as meant).
_HARMLESS = ("record longer than 255 bytes",)


@dataclass(frozen=True)
class EgressVerdict:
    ip: str
    result: SpfResult


@dataclass(frozen=True)
class SpfPosture:
    domain: str
    egress: tuple[EgressVerdict, ...]
    record: SpfRecordReport

    @property
    def status(self) -> str:
        if not self.egress:
            return "unchecked"
        for verdict in self.egress:
            if verdict.result.result != "pass":
                return verdict.result.result
        return "pass"

    @property
    def definite(self) -> bool:
        """A verdict DNS gave for sure: every egress IP evaluated without temperror."""
        return bool(self.egress) and all(v.result.result != "temperror" for v in self.egress)

    @property
    def failing(self) -> EgressVerdict | None:
        return next((v for v in self.egress if v.result.result != "pass"), None)

    @property
    def smells(self) -> tuple[str, ...]:
        return tuple(s for s in self.record.smells if not s.startswith(_HARMLESS))

    @property
    def level(self) -> str:
        status = self.status
        if status not in ("pass", "unchecked"):
            return FAIL
        if self.record.over_limit or self.record.records_found > 1:
            return FAIL
        if status == "unchecked" or self.record.problem or self.smells:
            return WARN
        return OK

    @property
    def summary(self) -> str:
        parts = []
        if self.status == "unchecked":
            parts.append("egress IP unknown: not evaluated")
        for v in self.egress:
            r = v.result
            how = f" ({r.mechanism})" if r.mechanism and r.result == "pass" else ""
            why = f" ({r.problem})" if r.problem and r.result in ("permerror", "temperror", "none") else ""
            parts.append(f"{r.result} for {v.ip}{how}{why}")
        rec = self.record
        if self.include_loop:
            parts.append(self.include_loop)
        elif rec.record is not None and not rec.over_limit:
            parts.append(f"{rec.lookups}/{MAX_DNS_TERMS} DNS lookups")
        elif rec.record is None and rec.problem and not any(v.result.result == "temperror" for v in self.egress):
            parts.append(rec.problem)
        return "; ".join(parts + list(self.smells))

    @property
    def include_loop(self) -> str | None:
        """The include/redirect chain that comes back to a domain on it, as the analysis found
        it: evaluation meets it only as "more than 10 DNS-querying terms"."""
        return next((p for p in self.record.problem.split("; ") if " loops: " in p), None)

    @property
    def remediation(self) -> str | None:
        status, rec = self.status, self.record
        if status == "temperror" or rec.problem.startswith("temperror"):
            return "the DNS lookup failed: check dns.nameservers and run the check again"
        if rec.records_found > 1:
            return f"merge the {rec.records_found} SPF records of {self.domain} into one"
        if self.include_loop:
            return f"break the loop in the SPF records of {self.domain}: {self.include_loop}"
        if rec.over_limit:
            return (
                f"cut the record to at most {MAX_DNS_TERMS} DNS lookups (now {rec.lookups}): "
                "replace include:/a/mx terms with ip4:/ip6:"
            )
        missing = [v.ip for v in self.egress if v.result.result not in ("pass", "permerror")]
        if status == "permerror":
            return f"fix the SPF record of {self.domain}: {self.failing.result.problem}"  # type: ignore[union-attr]
        if missing:
            terms = " ".join(_term(ip) for ip in missing)
            if rec.record is None:
                return f'publish {self.domain} TXT "v=spf1 {terms} ~all"'
            return f'add {terms}: {self.domain} TXT "{with_terms(rec.record, terms)}"'
        if status == "unchecked":
            return "set spf.egress_ip (or spf.ip_echo_url) so the egress IP can be checked"
        if rec.all_qualifier in ("+", "?"):
            return f"end the SPF record of {self.domain} with -all or ~all instead of {rec.all_qualifier}all"
        return None


def _term(ip: str) -> str:
    return f"ip{ipaddress.ip_address(ip).version}:{ip}"


def with_terms(record: str, terms: str) -> str:
    """`record` with `terms` inserted before its `all` (or at the end if it has none)."""
    words = record.split(" ")
    for i, word in enumerate(words):
        if word.lower().lstrip("+-~?") == "all":
            return " ".join(words[:i] + [terms] + words[i:])
    return f"{record} {terms}"


async def check_spf(dns: DnsService, domain: str, egress_ips: Sequence[str]) -> SpfPosture:
    sender = f"postmaster@{domain}"
    record, verdicts = await asyncio.gather(
        analyze_record(dns, domain),
        asyncio.gather(*(check_host(dns, ip, domain, sender) for ip in egress_ips)),
    )
    return SpfPosture(
        domain=domain,
        egress=tuple(EgressVerdict(ip, r) for ip, r in zip(egress_ips, verdicts, strict=True)),
        record=record,
    )
