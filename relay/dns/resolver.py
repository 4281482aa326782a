"""The DNS service: one async resolver built from the `dns` config, with a TTL-respecting cache.

Contract (`DnsService.resolve`):
- `rdtype` is one of A, AAAA, MX, TXT, PTR.
- Records come back normalised: A/AAAA as address strings; MX as `(preference, exchange)`
  with the exchange lower-cased and without the trailing dot; TXT as bytes, the character
  strings of one record joined (RFC 7208 §3.3, RFC 6376 §3.6.2.2); PTR as host names
  without the trailing dot.
- A name that does not exist is `nxdomain=True` with no records; a name with no records of
  that type is `nxdomain=False` with no records (both are "void" in RFC 7208 §4.6.4 terms).
- Timeouts, SERVFAIL and unreachable servers raise `DnsTemporaryError` (never an empty
  answer: a DNS outage must not look like "no record").
- A syntactically invalid name raises `DnsNameError`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver
import dns.rrset

SUPPORTED_TYPES = frozenset({"A", "AAAA", "MX", "TXT", "PTR"})
# Negative answers carry the SOA minimum as their TTL (RFC 2308); without an SOA we still
# cache briefly so a burst of lookups for a missing name costs one query.
_DEFAULT_NEGATIVE_TTL = 60
_MAX_TTL = 3600
_MAX_CACHE_ENTRIES = 10_000


class DnsTemporaryError(Exception):
    """The answer is unknown right now (timeout, SERVFAIL, no server reachable)."""


class DnsNameError(ValueError):
    """The name is not a valid DNS name."""


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    # By type: A/AAAA and PTR str, MX (preference, host), TXT bytes (strings joined).
    records: tuple[Any, ...]
    nxdomain: bool = False
    ttl: int = 0


class DnsService(Protocol):
    async def resolve(self, name: str, rdtype: str) -> DnsAnswer:
        """Resolve `name`/`rdtype` as described in the module docstring."""
        ...


class DnsResolver:
    """dnspython's async resolver with the configured servers and a TTL cache."""

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        port: int = 53,
        timeout: float = 3.0,
        attempts: int = 2,
        cache: bool = True,
    ) -> None:
        if nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = list(nameservers)
        else:
            # The system's resolver (resolv.conf); in a VPC that is usually the .2 resolver.
            self._resolver = dns.asyncresolver.Resolver()
        self._resolver.port = port
        self._resolver.timeout = timeout
        self._resolver.lifetime = timeout * max(1, attempts)
        self._cache: dict[tuple[str, str], tuple[float, DnsAnswer]] | None = {} if cache else None

    async def resolve(self, name: str, rdtype: str) -> DnsAnswer:
        rdtype = rdtype.upper()
        if rdtype not in SUPPORTED_TYPES:
            raise ValueError(f"unsupported record type {rdtype}")
        key = (name.lower().rstrip("."), rdtype)
        if self._cache is not None:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > time.monotonic():
                return hit[1]
        answer = await self._query(key[0], rdtype)
        if self._cache is not None:
            if len(self._cache) >= _MAX_CACHE_ENTRIES:
                self._cache.clear()
            self._cache[key] = (time.monotonic() + min(answer.ttl, _MAX_TTL), answer)
        return answer

    async def _query(self, name: str, rdtype: str) -> DnsAnswer:
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as exc:
            raise DnsNameError(f"invalid DNS name {name!r}: {exc}") from exc
        try:
            answer = await self._resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            response = exc.response(qname) if exc.responses() else None  # type: ignore[no-untyped-call]
            return DnsAnswer((), nxdomain=True, ttl=_negative_ttl(response))
        except dns.resolver.NoNameservers as exc:
            raise DnsTemporaryError(f"{rdtype} {name}: no server answered ({_brief(exc)})") from exc
        except (dns.resolver.LifetimeTimeout, dns.exception.Timeout) as exc:
            raise DnsTemporaryError(f"{rdtype} {name}: timed out") from exc
        except dns.resolver.YXDOMAIN as exc:
            raise DnsNameError(f"{name}: name too long after substitution") from exc
        except dns.exception.DNSException as exc:
            raise DnsTemporaryError(f"{rdtype} {name}: {_brief(exc)}") from exc
        if answer.rrset is None:
            return DnsAnswer((), nxdomain=False, ttl=_negative_ttl(answer.response))
        return DnsAnswer(_normalise(rdtype, answer.rrset), nxdomain=False, ttl=answer.rrset.ttl)


def _normalise(rdtype: str, rrset: dns.rrset.RRset) -> tuple[Any, ...]:
    if rdtype in ("A", "AAAA"):
        return tuple(r.address for r in rrset)
    if rdtype == "MX":
        return tuple((r.preference, r.exchange.to_text(omit_final_dot=True).lower()) for r in rrset)
    if rdtype == "TXT":
        return tuple(b"".join(r.strings) for r in rrset)
    if rdtype == "PTR":
        return tuple(r.target.to_text(omit_final_dot=True).lower() for r in rrset)
    raise AssertionError(rdtype)


def _negative_ttl(response: dns.message.Message | None) -> int:
    if response is None:
        return _DEFAULT_NEGATIVE_TTL
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return min(int(rrset.ttl), int(rrset[0].minimum))
    return _DEFAULT_NEGATIVE_TTL


def _brief(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
