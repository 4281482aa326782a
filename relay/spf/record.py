"""SPF record syntax (RFC 7208 §4.5, §4.6, §5, §6, §12): a record parsed once into terms.

A syntax error anywhere in a record is a permerror (§4.6), found before anything is
evaluated; both the evaluator (`relay.spf.check`) and the analyser (`relay.spf.analyze`)
read records through `parse_record`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from relay.spf.macros import (
    ALL_LETTERS,
    MacroString,
    MacroSyntaxError,
    parse_domain_spec,
    parse_macro_string,
)

MAX_DNS_TERMS = 10  # §4.6.4
MAX_VOID_LOOKUPS = 2  # §4.6.4
MAX_NAMES = 10  # §4.6.4: MX and PTR names looked up per mechanism / %{p}
EVALUATION_TIMEOUT = 30.0  # §4.6.4: SHOULD allow at least 20 seconds, then temperror

QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
DNS_MECHANISMS = frozenset({"include", "a", "mx", "ptr", "exists"})
_MODIFIER = re.compile(r"([a-zA-Z][a-zA-Z0-9\-_.]*)=(.*)", re.S)
_MECHANISM = re.compile(r"([+\-~?]?)([a-zA-Z][a-zA-Z0-9]*)([:/].*)?", re.S)
_CIDR = r"(?:0|[1-9][0-9]*)"  # no leading zeros, like ip4-network's qnum
_DOMAIN_AND_CIDR = re.compile(rf"(?::(.*?))?(?:/({_CIDR}))?(?://({_CIDR}))?", re.S)
_QNUM = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_IP4 = re.compile(rf":({_QNUM}(?:\.{_QNUM}){{3}})(?:/({_CIDR}))?")
_IP6 = re.compile(rf":([0-9a-fA-F:.]+)(?:/({_CIDR}))?")


class SpfPermError(Exception):
    pass


# --- record syntax (§4.5, §4.6, §5, §6, §12) -------------------------------------------


@dataclass(frozen=True)
class Directive:
    text: str  # the term as written
    qualifier: str
    name: str  # lower-case mechanism name
    domain: MacroString | None = None  # None: the current domain
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    cidr4: int = 32
    cidr6: int = 128


@dataclass(frozen=True)
class SpfRecord:
    directives: tuple[Directive, ...]
    redirect: MacroString | None
    exp: MacroString | None


def is_spf(txt: bytes) -> bool:
    # §4.5: exactly "v=spf1" (case-insensitive) followed by a space or the end.
    return txt[:6].lower() == b"v=spf1" and txt[6:7] in (b"", b" ")


def parse_record(text: str) -> SpfRecord:
    """Parse a whole record; any syntax error anywhere is a permerror (§4.6)."""
    directives: list[Directive] = []
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
                    raise SpfPermError(f"{name}= appears twice")
                modifiers[name] = parse_domain_spec(value)
            else:
                # §6: unknown modifiers are ignored, but must be syntactically valid (A/3).
                parse_macro_string(value, letters=ALL_LETTERS)
        except MacroSyntaxError as exc:
            raise SpfPermError(f"{shown(term)}: {exc}") from exc
    return SpfRecord(tuple(directives), modifiers.get("redirect"), modifiers.get("exp"))


def _parse_directive(term: str) -> Directive:
    match = _MECHANISM.fullmatch(term)
    if match is None:
        raise SpfPermError(f"unknown term {shown(term)}")
    qualifier, name, rest = match[1] or "+", match[2].lower(), match[3] or ""
    if name == "all":
        if rest:
            raise SpfPermError(f"{shown(term)}: all takes no argument (§5.1)")
        return Directive(term, qualifier, name)
    if name in ("include", "exists", "ptr"):
        # §5.2, §5.5, §5.7: ":" domain-spec (optional for ptr), no CIDR length.
        if name == "ptr" and not rest:
            return Directive(term, qualifier, name)
        if not rest.startswith(":"):
            raise SpfPermError(f"{shown(term)}: expected ':' domain-spec")
        return Directive(term, qualifier, name, domain=_domain_spec(term, rest[1:]))
    if name in ("a", "mx"):
        # §5.3, §5.4: [":" domain-spec] [dual-cidr-length]
        parts = _DOMAIN_AND_CIDR.fullmatch(rest)
        if parts is None:
            raise SpfPermError(f"{shown(term)}: bad CIDR length")
        spec, c4, c6 = parts.groups()
        cidr4, cidr6 = int(c4 or 32), int(c6 or 128)
        if cidr4 > 32 or cidr6 > 128:
            raise SpfPermError(f"{shown(term)}: CIDR length out of range (§5.6)")
        domain = None if spec is None else _domain_spec(term, spec)
        return Directive(term, qualifier, name, domain=domain, cidr4=cidr4, cidr6=cidr6)
    if name in ("ip4", "ip6"):
        return Directive(term, qualifier, name, network=_network(term, name, rest))
    raise SpfPermError(f"unknown mechanism {shown(term)}")


def _domain_spec(term: str, text: str) -> MacroString:
    try:
        return parse_domain_spec(text)
    except MacroSyntaxError as exc:
        raise SpfPermError(f"{shown(term)}: {exc}") from exc


def _network(term: str, name: str, rest: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    # §5.6: ip4 ":" ip4-network [ip4-cidr-length], ip6 ":" ip6-network [ip6-cidr-length]
    match = (_IP4 if name == "ip4" else _IP6).fullmatch(rest)
    limit = 32 if name == "ip4" else 128
    if match is None or int(match[2] or limit) > limit:
        raise SpfPermError(f"invalid {shown(term)}")
    try:
        return ipaddress.ip_network(f"{match[1]}/{match[2] or limit}", strict=False)
    except ValueError as exc:
        raise SpfPermError(f"invalid {shown(term)}") from exc


_SHOWN_MAX = 80


def shown(term: str) -> str:
    """A term quoted for an error message, cut: a record may be 64 KiB of one term, and its
    error goes into `relay check`'s report and, at every posture check, the log."""
    if len(term) <= _SHOWN_MAX:
        return repr(term)
    return f"{term[:_SHOWN_MAX]!r}... ({len(term)} characters)"


def cut(term: str) -> str:
    """`shown` without the quotes."""
    return term if len(term) <= _SHOWN_MAX else f"{term[:_SHOWN_MAX]}... ({len(term)} characters)"


def valid_name(name: str) -> bool:
    labels = name.split(".")
    return 0 < len(name) <= 253 and all(0 < len(label.encode()) <= 63 for label in labels)


def truncate(name: str) -> str:
    # §7.3: drop left-hand labels until the expanded name fits in 253 characters.
    while len(name) > 253 and "." in name:
        name = name.split(".", 1)[1]
    return name


def as_bytes(record: bytes | str) -> bytes:
    return record.encode("utf-8") if isinstance(record, str) else record
