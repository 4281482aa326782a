"""RFC 7208 SPF: an asyncio `check_host()` over the DNS service.

`check_host()` follows RFC 7208 §4-§7 and passes the openspf RFC 7208 test suite
(tests/test_spf_rfc7208.py). Every DNS query goes through `DnsService.resolve`, so an
evaluation never blocks the loop. Deliberate choices where the RFC leaves room:

- A target name that cannot be a DNS name (empty or >63-byte label, after macro
  expansion) is treated as non-existent: the mechanism does not match (§4.8, cf. §4.3).
- Void lookups (§4.6.4) are counted for the first query of a, mx, ptr and exists only;
  the address lookups of MX/PTR names have their own limit of 10 names.
- %{i} of an IPv6 address uses upper-case nibbles (as the test suite expects; DNS is
  case-insensitive so queries are unaffected).
"""

import asyncio
import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any

from relay.dns.resolver import DnsAnswer, DnsNameError, DnsService, DnsTemporaryError
from relay.spf.macros import ALL_LETTERS, MacroString, MacroSyntaxError, expand, parse_macro_string
from relay.spf.record import (
    EVALUATION_TIMEOUT,
    MAX_DNS_TERMS,
    MAX_NAMES,
    MAX_VOID_LOOKUPS,
    QUALIFIERS,
    Directive,
    SpfPermError,
    as_bytes,
    cut,
    is_spf,
    parse_record,
    truncate,
    valid_name,
)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class SpfResult:
    result: str  # "none" | "neutral" | "pass" | "fail" | "softfail" | "temperror" | "permerror"
    explanation: str = ""  # from exp= for fail, else ""
    mechanism: str = ""  # the term that matched, e.g. "ip4:192.0.2.0/24", "default" or ""
    problem: str = ""  # why none/permerror/temperror, human readable
    lookups: int = 0  # DNS-querying mechanisms/modifiers counted against the limit of 10
    void_lookups: int = 0


class _TempError(Exception):
    pass


# --- evaluation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    result: str
    mechanism: str = ""
    explanation: str = ""
    problem: str = ""


@dataclass
class _Evaluation:
    """State of one check_host() call, shared by its include/redirect recursion."""

    dns: DnsService
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    macro_values: dict[str, str]
    lookups: int = 0
    void_lookups: int = 0
    _validated: list[str] | None = field(default=None, repr=False)

    def count_term(self, term: str) -> None:
        # §4.6.4: at most 10 mechanisms/modifiers that query DNS, else permerror.
        self.lookups += 1
        if self.lookups > MAX_DNS_TERMS:
            raise SpfPermError(f"more than {MAX_DNS_TERMS} DNS-querying terms (at {cut(term)})")

    async def query(self, name: str, rdtype: str, *, count_void: bool) -> tuple[Any, ...]:
        if valid_name(name):
            try:
                answer = await self.dns.resolve(name, rdtype)
            except DnsNameError:
                answer = DnsAnswer((), nxdomain=True)
            except DnsTemporaryError as exc:
                raise _TempError(str(exc)) from exc
        else:
            answer = DnsAnswer((), nxdomain=True)  # not a DNS name: treat as non-existent
        if count_void and not answer.records:
            # §4.6.4: more than two void (NXDOMAIN / no data) lookups is a permerror.
            self.void_lookups += 1
            if self.void_lookups > MAX_VOID_LOOKUPS:
                raise SpfPermError(f"more than {MAX_VOID_LOOKUPS} void lookups (at {rdtype} {name})")
        return answer.records

    async def target(self, spec: MacroString | None, domain: str) -> str:
        if spec is None:
            return domain
        name = await expand(spec, {**self.macro_values, "d": domain}, lambda: self.ptr_name(domain))
        return truncate(name.rstrip("."))

    async def addresses(self, name: str, *, count_void: bool) -> list[IpAddress]:
        rdtype = "A" if self.ip.version == 4 else "AAAA"
        addrs = []
        for record in await self.query(name, rdtype, count_void=count_void):
            try:
                addrs.append(ipaddress.ip_address(record))
            except ValueError:
                continue
        return addrs

    async def ptr_names(self, *, count_void: bool) -> list[str]:
        # §5.5: a DNS error on the PTR query means no match; only 10 names are used (§4.6.4).
        try:
            names = await self.query(self.ip.reverse_pointer, "PTR", count_void=count_void)
        except _TempError:
            return []
        return [n.lower().rstrip(".") for n in names[:MAX_NAMES]]

    async def validates(self, name: str) -> bool:
        # §5.5: a DNS error on the address lookup skips that name.
        try:
            return self.ip in await self.addresses(name, count_void=False)
        except _TempError:
            return False

    async def ptr_name(self, domain: str) -> str:
        # §7.3 %{p}: a validated name, preferring <domain>, then a subdomain of it.
        if self._validated is None:
            names = await self.ptr_names(count_void=False)
            self._validated = [n for n in names if await self.validates(n)]
        for candidate in self._validated:
            if candidate == domain.lower():
                return candidate
        for candidate in self._validated:
            if _within(candidate, domain):
                return candidate
        return self._validated[0] if self._validated else "unknown"


def _within(name: str, domain: str) -> bool:
    name, domain = name.lower(), domain.lower()
    return name == domain or name.endswith("." + domain)


async def _fetch_record(ev: _Evaluation, domain: str) -> str | None:
    # §4.4/§4.5: TXT only; no "v=spf1" record → None; several → permerror.
    records = [as_bytes(r) for r in await ev.query(domain, "TXT", count_void=False)]
    spf = [r for r in records if is_spf(r)]
    if not spf:
        return None
    if len(spf) > 1:
        raise SpfPermError(f"{domain}: {len(spf)} SPF records")
    try:
        return spf[0].decode("ascii")  # §3.1: SPF records are 7-bit ASCII
    except UnicodeDecodeError as exc:
        raise SpfPermError(f"{domain}: non-ASCII SPF record") from exc


async def _evaluate(ev: _Evaluation, domain: str, *, want_exp: bool) -> _Outcome:
    text = await _fetch_record(ev, domain)
    if text is None:
        return _Outcome("none", problem=f"no SPF record at {domain}")
    try:
        record = parse_record(text)
    except SpfPermError as exc:
        raise SpfPermError(f"{domain}: {exc}") from exc
    for directive in record.directives:
        if await _matches(ev, directive, domain):
            result = QUALIFIERS[directive.qualifier]
            explanation = ""
            if result == "fail" and want_exp and record.exp is not None:
                explanation = await _explain(ev, record.exp, domain)
            return _Outcome(result, directive.text, explanation)
    if record.redirect is not None:
        # §6.1: only when no mechanism matched; the target's record (and exp=) replaces ours.
        ev.count_term("redirect")
        target = await ev.target(record.redirect, domain)
        outcome = await _evaluate(ev, target, want_exp=want_exp)
        if outcome.result == "none":
            raise SpfPermError(f"redirect={target}: no SPF record")
        return outcome
    return _Outcome("neutral", "default")  # §4.7


async def _matches(ev: _Evaluation, d: Directive, domain: str) -> bool:
    if d.name == "all":
        return True
    if d.name in ("ip4", "ip6"):
        return d.network is not None and ev.ip in d.network  # an IPv4 client never matches ip6
    ev.count_term(d.text)
    target = await ev.target(d.domain, domain)
    if d.name == "include":
        # §5.2: pass matches, fail/softfail/neutral do not, none is a permerror, errors propagate.
        inner = await _evaluate(ev, target, want_exp=False)
        if inner.result == "none":
            raise SpfPermError(f"include:{target}: no SPF record")
        return inner.result == "pass"
    if d.name == "exists":
        return bool(await ev.query(target, "A", count_void=True))  # §5.7: always type A
    if d.name == "a":
        return _in_any(ev, await ev.addresses(target, count_void=True), d)
    if d.name == "mx":
        mxs = await ev.query(target, "MX", count_void=True)
        if len(mxs) > MAX_NAMES:  # §4.6.4: more than 10 MX names is a permerror
            raise SpfPermError(f"{cut(d.text)}: {target} has more than {MAX_NAMES} MX records")
        for _, exchange in sorted(mxs):
            exchange = exchange.lower().rstrip(".")
            # RFC 7505 null MX (".") names no host; never fall back to the target's A (§5.4).
            if exchange and _in_any(ev, await ev.addresses(exchange, count_void=False), d):
                return True
        return False
    if d.name == "ptr":
        # §5.5: only names inside <target-name> need validating.
        for name in await ev.ptr_names(count_void=True):
            if _within(name, target) and await ev.validates(name):
                return True
        return False
    raise AssertionError(d.name)


def _in_any(ev: _Evaluation, addrs: list[IpAddress], d: Directive) -> bool:
    prefix = d.cidr4 if ev.ip.version == 4 else d.cidr6
    net = ipaddress.ip_network(f"{ev.ip}/{prefix}", strict=False)
    return any(addr in net for addr in addrs)


async def _explain(ev: _Evaluation, spec: MacroString, domain: str) -> str:
    # §6.2: any problem with the explanation just means there is none; never a new result.
    try:
        name = await ev.target(spec, domain)
        if not valid_name(name):
            return ""
        records = (await ev.dns.resolve(name, "TXT")).records
        if len(records) != 1:
            return ""
        text = as_bytes(records[0]).decode("ascii")
        tokens = parse_macro_string(text, letters=ALL_LETTERS, spaces=True)
        return await expand(tokens, {**ev.macro_values, "d": domain}, lambda: ev.ptr_name(domain))
    except (_TempError, DnsTemporaryError, DnsNameError, MacroSyntaxError, UnicodeDecodeError):
        return ""


def _client_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(ip.strip())
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped  # §5 (and §5.6): an IPv4-mapped client is an IPv4 client
    return addr


def _checkable_domain(domain: str) -> bool:
    # §4.3: malformed, single-label or literal domains give "none" without a lookup.
    labels = domain.split(".")
    return valid_name(domain) and len(labels) >= 2 and not labels[-1].isdigit() and not any(c in domain for c in "[]@ ")


async def check_host(
    dns: DnsService,
    ip: str,
    domain: str,
    sender: str,
    helo: str = "",
    receiver: str = "unknown",
    now: float | None = None,
) -> SpfResult:
    """RFC 7208 check_host(ip, domain, sender). Raises ValueError if `ip` is not an address."""
    addr = _client_ip(ip)
    domain = domain.strip().rstrip(".")
    if not _checkable_domain(domain):
        return SpfResult("none", problem=f"not a checkable domain: {domain!r}")
    # §4.3: a null reverse-path means postmaster@<domain>; an empty local-part is "postmaster".
    local, at, sender_domain = (sender or "").rpartition("@")
    if not at:
        local, sender_domain = "", sender or domain
    local = local or "postmaster"
    macro_values = {
        "s": f"{local}@{sender_domain}",
        "l": local,
        "o": sender_domain,
        "i": str(addr) if addr.version == 4 else ".".join(f"{int(addr):032X}"),
        "v": "in-addr" if addr.version == 4 else "ip6",
        "h": helo or "unknown",
        "c": str(addr),
        "r": receiver or "unknown",
        "t": str(int(time.time() if now is None else now)),
    }
    ev = _Evaluation(dns, addr, macro_values)
    try:
        async with asyncio.timeout(EVALUATION_TIMEOUT):
            outcome = await _evaluate(ev, domain, want_exp=True)
    except SpfPermError as exc:
        outcome = _Outcome("permerror", problem=str(exc))
    except _TempError as exc:
        outcome = _Outcome("temperror", problem=str(exc))
    except TimeoutError:
        outcome = _Outcome("temperror", problem=f"evaluation took over {EVALUATION_TIMEOUT:g}s")
    return SpfResult(
        outcome.result,
        explanation=outcome.explanation,
        mechanism=outcome.mechanism,
        problem=outcome.problem,
        lookups=ev.lookups,
        void_lookups=ev.void_lookups,
    )
