"""SPF record analysis for the posture report: what a domain's record costs and risks.

Follows include/redirect statically (as far as the macros allow) to count the DNS-querying
terms against the limit of 10 (RFC 7208 §4.6.4) and to name risky choices (+all, ?all, ptr).
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.dns.resolver import DnsNameError, DnsService, DnsTemporaryError
from relay.spf.macros import MacroString, expand, letters_used
from relay.spf.record import (
    DNS_MECHANISMS,
    MAX_DNS_TERMS,
    SpfPermError,
    SpfRecord,
    as_bytes,
    is_spf,
    parse_record,
    truncate,
    valid_name,
)


@dataclass(frozen=True)
class SpfRecordReport:
    domain: str
    record: str | None
    records_found: int
    length: int
    lookups: int  # DNS-querying terms reachable through include/redirect (§4.6.4), capped
    over_limit: bool
    all_qualifier: str | None  # '+', '-', '~', '?' or None
    smells: tuple[str, ...]
    problem: str  # permerror/temperror description or ""


_ANALYSIS_CAP = 30  # stop following include/redirect once clearly over the limit


class _Analyser:
    def __init__(self, dns: DnsService) -> None:
        self.dns = dns
        self.lookups = 0
        self.problems: list[str] = []
        self.uses_ptr = False
        self.path: list[str] = []  # the include/redirect chain being walked
        self.looped = False

    async def records(self, domain: str) -> list[bytes]:
        answer = await self.dns.resolve(domain, "TXT")
        return [r for r in (as_bytes(x) for x in answer.records) if is_spf(r)]

    async def walk(self, domain: str, record: SpfRecord) -> str | None:
        """Count the DNS-querying terms of `record` and below; return its `all` qualifier."""
        self.path.append(domain)
        try:
            return await self._walk(domain, record)
        finally:
            self.path.pop()

    async def _walk(self, domain: str, record: SpfRecord) -> str | None:
        all_qualifier = None
        for d in record.directives:
            if d.name == "all" and all_qualifier is None:
                all_qualifier = d.qualifier
            if d.name == "ptr":
                self.uses_ptr = True
            if d.name in DNS_MECHANISMS:
                self.lookups += 1
            if d.name == "include":
                await self.follow(d.domain, domain, d.text)
        # §6.1: redirect is ignored when the record has an "all" mechanism.
        if record.redirect is not None and all_qualifier is None:
            self.lookups += 1
            all_qualifier = await self.follow(record.redirect, domain, "redirect")
        return all_qualifier

    async def follow(self, spec: MacroString | None, domain: str, term: str) -> str | None:
        if spec is None or self.lookups > _ANALYSIS_CAP:
            return None
        if not letters_used(spec) <= {"d"}:
            return None  # depends on the sender or client: cannot be followed statically
        target = truncate((await expand(spec, {"d": domain})).rstrip(".")).lower()
        if target in self.path:
            # Evaluation would follow it until the 10-lookup limit (§4.6.4): a permerror for
            # every sender, whatever the record's other terms say.
            loop = " -> ".join([*self.path[self.path.index(target) :], target])
            self.problems.append(f"{term} loops: {loop} (permerror)")
            self.looped = True
            return None
        try:
            found = await self.records(target) if valid_name(target) else []
        except (DnsTemporaryError, DnsNameError) as exc:
            self.problems.append(f"{term}: temperror: {exc}")
            return None
        if len(found) != 1:
            what = "no SPF record" if not found else "multiple SPF records"
            self.problems.append(f"{term}: {what} at {target} (permerror)")
            return None
        try:
            record = parse_record(found[0].decode("ascii"))
        except (SpfPermError, UnicodeDecodeError) as exc:
            self.problems.append(f"{term}: {target}: {exc} (permerror)")
            return None
        return await self.walk(target, record)


async def analyze_record(dns: DnsService, domain: str) -> SpfRecordReport:
    """Describe `domain`'s SPF record: lookups it costs (§4.6.4), risky choices, errors."""
    domain = domain.strip().rstrip(".").lower()
    analyser = _Analyser(dns)
    smells: list[str] = []
    try:
        found = await analyser.records(domain)
    except (DnsTemporaryError, DnsNameError) as exc:
        return SpfRecordReport(domain, None, 0, 0, 0, False, None, (), f"temperror: {exc}")
    if not found:
        return SpfRecordReport(domain, None, 0, 0, 0, False, None, ("no SPF record",), "")
    raw = found[0]
    text = raw.decode("ascii", errors="replace")
    if len(found) > 1:
        smells.append("multiple SPF records (permerror)")
        analyser.problems.append(f"{len(found)} SPF records (permerror, RFC 7208 §4.5)")
    if len(raw) > 255:
        # The DNS service joins the character-strings, so only the total is visible here.
        smells.append("record longer than 255 bytes: must be split into several TXT strings")
    if len(raw) > 450:
        smells.append("record longer than 450 bytes may not fit a UDP answer (RFC 7208 §3.4)")
    all_qualifier = None
    try:
        if not raw.isascii():
            raise SpfPermError("non-ASCII SPF record")
        all_qualifier = await analyser.walk(domain, parse_record(text))
    except SpfPermError as exc:
        analyser.problems.insert(0, f"{exc} (permerror)")
    lookups = min(analyser.lookups, _ANALYSIS_CAP + 1)
    # A loop is followed by evaluation until the limit: over it for every sender.
    over_limit = lookups > MAX_DNS_TERMS or analyser.looped
    if all_qualifier == "+":
        smells.append("+all authorizes the whole internet")
    elif all_qualifier == "?":
        smells.append("?all makes SPF meaningless")
    elif all_qualifier is None and not analyser.problems:
        smells.append("no all mechanism: unlisted senders get neutral")
    if analyser.uses_ptr:
        smells.append("ptr mechanism is deprecated (RFC 7208 §5.5)")
    if lookups > MAX_DNS_TERMS:
        smells.append(f"{lookups} DNS lookups, over the limit of {MAX_DNS_TERMS} (permerror)")
        analyser.problems.append(f"more than {MAX_DNS_TERMS} DNS-querying terms (permerror)")
    elif analyser.looped:
        smells.append(f"include/redirect loop: evaluation goes over the limit of {MAX_DNS_TERMS} lookups (permerror)")
    return SpfRecordReport(
        domain=domain,
        record=text,
        records_found=len(found),
        length=len(raw),
        lookups=lookups,
        over_limit=over_limit,
        all_qualifier=all_qualifier,
        smells=tuple(smells),
        problem="; ".join(analyser.problems),
    )
