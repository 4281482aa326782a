"""RFC 7208 SPF: an asyncio `check_host()` and a record analyser, over the DNS service.

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

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from dataclasses import dataclass, field

from relay.dns.resolver import DnsAnswer, DnsNameError, DnsService, DnsTemporaryError
from relay.posture.spf_macros import (
    ALL_LETTERS,
    MacroString,
    MacroSyntaxError,
    expand,
    letters_used,
    parse_domain_spec,
    parse_macro_string,
)

MAX_DNS_TERMS = 10  # §4.6.4
MAX_VOID_LOOKUPS = 2  # §4.6.4
MAX_NAMES = 10  # §4.6.4: MX and PTR names looked up per mechanism / %{p}
EVALUATION_TIMEOUT = 30.0  # §4.6.4: SHOULD allow at least 20 seconds, then temperror

_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_DNS_MECHANISMS = frozenset({"include", "a", "mx", "ptr", "exists"})
_MODIFIER = re.compile(r"([a-zA-Z][a-zA-Z0-9\-_.]*)=(.*)", re.S)
_MECHANISM = re.compile(r"([+\-~?]?)([a-zA-Z][a-zA-Z0-9]*)([:/].*)?", re.S)
_CIDR = r"(?:0|[1-9][0-9]*)"  # no leading zeros, like ip4-network's qnum
_DOMAIN_AND_CIDR = re.compile(rf"(?::(.*?))?(?:/({_CIDR}))?(?://({_CIDR}))?", re.S)
_QNUM = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_IP4 = re.compile(rf":({_QNUM}(?:\.{_QNUM}){{3}})(?:/({_CIDR}))?")
_IP6 = re.compile(rf":([0-9a-fA-F:.]+)(?:/({_CIDR}))?")


@dataclass(frozen=True)
class SpfResult:
    result: str  # "none" | "neutral" | "pass" | "fail" | "softfail" | "temperror" | "permerror"
    explanation: str = ""  # from exp= for fail, else ""
    mechanism: str = ""  # the term that matched, e.g. "ip4:192.0.2.0/24", "default" or ""
    problem: str = ""  # why none/permerror/temperror, human readable
    lookups: int = 0  # DNS-querying mechanisms/modifiers counted against the limit of 10
    void_lookups: int = 0


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


class _PermError(Exception):
    pass


class _TempError(Exception):
    pass


# --- record syntax (§4.5, §4.6, §5, §6, §12) -------------------------------------------


@dataclass(frozen=True)
class _Directive:
    text: str  # the term as written
    qualifier: str
    name: str  # lower-case mechanism name
    domain: MacroString | None = None  # None: the current domain
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    cidr4: int = 32
    cidr6: int = 128


@dataclass(frozen=True)
class _Record:
    directives: tuple[_Directive, ...]
    redirect: MacroString | None
    exp: MacroString | None


def _is_spf(txt: bytes) -> bool:
    # §4.5: exactly "v=spf1" (case-insensitive) followed by a space or the end.
    return txt[:6].lower() == b"v=spf1" and txt[6:7] in (b"", b" ")


def _parse_record(text: str) -> _Record:
    """Parse a whole record; any syntax error anywhere is a permerror (§4.6)."""
    directives: list[_Directive] = []
    modifiers: dict[str, MacroString] = {}
    for term in text[6:].split(" "):  # §4.6.1: terms are separated by SP only
        if not term:
            continue
        modifier = _MODIFIER.fullmatch(term)
        try:
            if modifier is None:
                directives.append(_parse_directive(term))
                continue
            name, value = modifier[1].lower(), modifier[2]
            if name in ("redirect", "exp"):
                if name in modifiers:  # §6: each at most once
                    raise _PermError(f"{name}= appears twice")
                modifiers[name] = parse_domain_spec(value)
            else:
                # §6: unknown modifiers are ignored, but must be syntactically valid (A/3).
                parse_macro_string(value, letters=ALL_LETTERS)
        except MacroSyntaxError as exc:
            raise _PermError(f"{term!r}: {exc}") from exc
    return _Record(tuple(directives), modifiers.get("redirect"), modifiers.get("exp"))


def _parse_directive(term: str) -> _Directive:
    match = _MECHANISM.fullmatch(term)
    if match is None:
        raise _PermError(f"unknown term {term!r}")
    qualifier, name, rest = match[1] or "+", match[2].lower(), match[3] or ""
    if name == "all":
        if rest:
            raise _PermError(f"{term!r}: all takes no argument (§5.1)")
        return _Directive(term, qualifier, name)
    if name in ("include", "exists", "ptr"):
        # §5.2, §5.5, §5.7: ":" domain-spec (optional for ptr), no CIDR length.
        if name == "ptr" and not rest:
            return _Directive(term, qualifier, name)
        if not rest.startswith(":"):
            raise _PermError(f"{term!r}: expected ':' domain-spec")
        return _Directive(term, qualifier, name, domain=_domain_spec(term, rest[1:]))
    if name in ("a", "mx"):
        # §5.3, §5.4: [":" domain-spec] [dual-cidr-length]
        parts = _DOMAIN_AND_CIDR.fullmatch(rest)
        if parts is None:
            raise _PermError(f"{term!r}: bad CIDR length")
        spec, c4, c6 = parts.groups()
        cidr4, cidr6 = int(c4 or 32), int(c6 or 128)
        if cidr4 > 32 or cidr6 > 128:
            raise _PermError(f"{term!r}: CIDR length out of range (§5.6)")
        domain = None if spec is None else _domain_spec(term, spec)
        return _Directive(term, qualifier, name, domain=domain, cidr4=cidr4, cidr6=cidr6)
    if name in ("ip4", "ip6"):
        return _Directive(term, qualifier, name, network=_network(term, name, rest))
    raise _PermError(f"unknown mechanism {term!r}")


def _domain_spec(term: str, text: str) -> MacroString:
    try:
        return parse_domain_spec(text)
    except MacroSyntaxError as exc:
        raise _PermError(f"{term!r}: {exc}") from exc


def _network(term: str, name: str, rest: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    # §5.6: ip4 ":" ip4-network [ip4-cidr-length], ip6 ":" ip6-network [ip6-cidr-length]
    match = (_IP4 if name == "ip4" else _IP6).fullmatch(rest)
    limit = 32 if name == "ip4" else 128
    if match is None or int(match[2] or limit) > limit:
        raise _PermError(f"invalid {term!r}")
    try:
        return ipaddress.ip_network(f"{match[1]}/{match[2] or limit}", strict=False)
    except ValueError as exc:
        raise _PermError(f"invalid {term!r}") from exc


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
            raise _PermError(f"more than {MAX_DNS_TERMS} DNS-querying terms (at {term})")

    async def query(self, name: str, rdtype: str, *, count_void: bool) -> tuple:
        if _valid_name(name):
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
                raise _PermError(f"more than {MAX_VOID_LOOKUPS} void lookups (at {rdtype} {name})")
        return answer.records

    async def target(self, spec: MacroString | None, domain: str) -> str:
        if spec is None:
            return domain
        name = await expand(spec, {**self.macro_values, "d": domain}, lambda: self.ptr_name(domain))
        return _truncate(name.rstrip("."))

    async def addresses(self, name: str, *, count_void: bool) -> list:
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


def _valid_name(name: str) -> bool:
    labels = name.split(".")
    return 0 < len(name) <= 253 and all(0 < len(label.encode()) <= 63 for label in labels)


def _within(name: str, domain: str) -> bool:
    name, domain = name.lower(), domain.lower()
    return name == domain or name.endswith("." + domain)


def _truncate(name: str) -> str:
    # §7.3: drop left-hand labels until the expanded name fits in 253 characters.
    while len(name) > 253 and "." in name:
        name = name.split(".", 1)[1]
    return name


async def _fetch_record(ev: _Evaluation, domain: str) -> str | None:
    # §4.4/§4.5: TXT only; no "v=spf1" record → None; several → permerror.
    records = [_as_bytes(r) for r in await ev.query(domain, "TXT", count_void=False)]
    spf = [r for r in records if _is_spf(r)]
    if not spf:
        return None
    if len(spf) > 1:
        raise _PermError(f"{domain}: {len(spf)} SPF records")
    try:
        return spf[0].decode("ascii")  # §3.1: SPF records are 7-bit ASCII
    except UnicodeDecodeError as exc:
        raise _PermError(f"{domain}: non-ASCII SPF record") from exc


def _as_bytes(record: bytes | str) -> bytes:
    return record.encode("utf-8") if isinstance(record, str) else record


async def _evaluate(ev: _Evaluation, domain: str, *, want_exp: bool) -> _Outcome:
    text = await _fetch_record(ev, domain)
    if text is None:
        return _Outcome("none", problem=f"no SPF record at {domain}")
    try:
        record = _parse_record(text)
    except _PermError as exc:
        raise _PermError(f"{domain}: {exc}") from exc
    for directive in record.directives:
        if await _matches(ev, directive, domain):
            result = _QUALIFIERS[directive.qualifier]
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
            raise _PermError(f"redirect={target}: no SPF record")
        return outcome
    return _Outcome("neutral", "default")  # §4.7


async def _matches(ev: _Evaluation, d: _Directive, domain: str) -> bool:
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
            raise _PermError(f"include:{target}: no SPF record")
        return inner.result == "pass"
    if d.name == "exists":
        return bool(await ev.query(target, "A", count_void=True))  # §5.7: always type A
    if d.name == "a":
        return _in_any(ev, await ev.addresses(target, count_void=True), d)
    if d.name == "mx":
        mxs = await ev.query(target, "MX", count_void=True)
        if len(mxs) > MAX_NAMES:  # §4.6.4: more than 10 MX names is a permerror
            raise _PermError(f"{d.text}: {target} has more than {MAX_NAMES} MX records")
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


def _in_any(ev: _Evaluation, addrs: list, d: _Directive) -> bool:
    prefix = d.cidr4 if ev.ip.version == 4 else d.cidr6
    net = ipaddress.ip_network(f"{ev.ip}/{prefix}", strict=False)
    return any(addr in net for addr in addrs)


async def _explain(ev: _Evaluation, spec: MacroString, domain: str) -> str:
    # §6.2: any problem with the explanation just means there is none; never a new result.
    try:
        name = await ev.target(spec, domain)
        if not _valid_name(name):
            return ""
        records = (await ev.dns.resolve(name, "TXT")).records
        if len(records) != 1:
            return ""
        text = _as_bytes(records[0]).decode("ascii")
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
    return (
        _valid_name(domain) and len(labels) >= 2 and not labels[-1].isdigit() and not any(c in domain for c in "[]@ ")
    )


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
    except _PermError as exc:
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


# --- record analysis (reporting) ----------------------------------------------------------

_ANALYSIS_CAP = 30  # stop following include/redirect once clearly over the limit


class _Analyser:
    def __init__(self, dns: DnsService) -> None:
        self.dns = dns
        self.lookups = 0
        self.problems: list[str] = []
        self.uses_ptr = False

    async def records(self, domain: str) -> list[bytes]:
        answer = await self.dns.resolve(domain, "TXT")
        return [r for r in (_as_bytes(x) for x in answer.records) if _is_spf(r)]

    async def walk(self, domain: str, record: _Record) -> str | None:
        """Count the DNS-querying terms of `record` and below; return its `all` qualifier."""
        all_qualifier = None
        for d in record.directives:
            if d.name == "all" and all_qualifier is None:
                all_qualifier = d.qualifier
            if d.name == "ptr":
                self.uses_ptr = True
            if d.name in _DNS_MECHANISMS:
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
        target = _truncate((await expand(spec, {"d": domain})).rstrip("."))
        try:
            found = await self.records(target) if _valid_name(target) else []
        except (DnsTemporaryError, DnsNameError) as exc:
            self.problems.append(f"{term}: temperror: {exc}")
            return None
        if len(found) != 1:
            what = "no SPF record" if not found else "multiple SPF records"
            self.problems.append(f"{term}: {what} at {target} (permerror)")
            return None
        try:
            record = _parse_record(found[0].decode("ascii"))
        except (_PermError, UnicodeDecodeError) as exc:
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
            raise _PermError("non-ASCII SPF record")
        all_qualifier = await analyser.walk(domain, _parse_record(text))
    except _PermError as exc:
        analyser.problems.insert(0, f"{exc} (permerror)")
    lookups = min(analyser.lookups, _ANALYSIS_CAP + 1)
    over_limit = lookups > MAX_DNS_TERMS
    if all_qualifier == "+":
        smells.append("+all authorizes the whole internet")
    elif all_qualifier == "?":
        smells.append("?all makes SPF meaningless")
    elif all_qualifier is None and not analyser.problems:
        smells.append("no all mechanism: unlisted senders get neutral")
    if analyser.uses_ptr:
        smells.append("ptr mechanism is deprecated (RFC 7208 §5.5)")
    if over_limit:
        smells.append(f"{lookups} DNS lookups, over the limit of {MAX_DNS_TERMS} (permerror)")
        analyser.problems.append(f"more than {MAX_DNS_TERMS} DNS-querying terms (permerror)")
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
