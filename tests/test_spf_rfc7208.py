"""The openspf RFC 7208 test suite (tests/data/spf/rfc7208-tests.yml) against check_host().

Each suite document's `zonedata` becomes a `ZoneDns`, a fake of the DNS-service seam
(`DnsService.resolve`) that follows the suite driver's conventions (pyspf's testspf.py):

- `SPF` records are copied to `TXT` unless the name has a `TXT` entry of its own
  (`TXT: NONE` means "no TXT records"); RFC 7208 evaluators only ever ask for TXT.
- A TXT/SPF value is one string or a list of character-strings (joined, RFC 7208 §3.3).
- `TIMEOUT` makes a query time out unless a record of the asked type came before it.
- CNAMEs are followed; a CNAME loop is a server failure (a temporary error).
- Names the real resolver cannot turn into a DNS name raise `DnsNameError`, as it does.
- `explanation: DEFAULT` means "the implementation's default": SpfResult.explanation "".
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import dns.exception
import dns.name
import pytest
import yaml

from relay.dns.resolver import DnsAnswer, DnsNameError, DnsTemporaryError
from relay.spf import check_host

SUITE = Path(__file__).parent / "data" / "spf" / "rfc7208-tests.yml"

# Suite cases this implementation knowingly does not pass: {name: reason}. Keep it empty.
KNOWN_DIFFERENCES: dict[str, str] = {}

_TIMEOUT = ("TIMEOUT", None)


class ZoneDns:
    """A DnsService over one suite document's zonedata."""

    def __init__(self, zonedata: dict) -> None:
        self.zone = {_key(name): _entries(records) for name, records in zonedata.items()}
        self.queries: list[tuple[str, str]] = []

    async def resolve(self, name: str, rdtype: str, _depth: int = 0) -> DnsAnswer:
        self.queries.append((name, rdtype))
        try:
            dns.name.from_text(name)  # what relay.dns.resolver does first
        except dns.exception.DNSException as exc:
            raise DnsNameError(f"invalid DNS name {name!r}: {exc}") from exc
        entries = self.zone.get(_key(name))
        if entries is None:
            return DnsAnswer((), nxdomain=True)
        records: list = []
        cname = None
        for rtype, value in entries:
            if (rtype, value) == _TIMEOUT:
                if not records:
                    raise DnsTemporaryError(f"{rdtype} {name}: timed out")
                break
            if rtype == rdtype:
                records.append(value)
            elif rtype == "CNAME" and cname is None:
                cname = value
        if not records and cname is not None:
            if _depth > 8:
                raise DnsTemporaryError(f"{rdtype} {name}: CNAME loop")
            return await self.resolve(cname, rdtype, _depth + 1)
        return DnsAnswer(tuple(records))


def _key(name: str) -> str:
    return name.lower().rstrip(".")


def _entries(records: list) -> list[tuple[str, object]]:
    entries: list[tuple[str, object]] = []
    generated: list[tuple[str, object]] = []
    has_txt = False
    for record in records:
        if record == "TIMEOUT":
            entries.append(_TIMEOUT)
            continue
        ((rtype, value),) = record.items()
        if rtype == "TXT":
            has_txt = True
        if value == "NONE":
            continue
        if value == "TIMEOUT":
            entries.append(_TIMEOUT)
            continue
        value = _normalise(rtype, value)
        if rtype == "SPF":
            generated.append(("TXT", value))  # the suite's "auto-magic duplication"
        entries.append((rtype, value))
    # Like the reference driver: generated TXT records come last, after any TIMEOUT.
    return entries if has_txt else entries + generated


def _normalise(rtype: str, value):
    """Shape values the way relay.dns.resolver returns them."""
    if rtype in ("TXT", "SPF"):
        strings = value if isinstance(value, list) else [value]
        return b"".join(str(s).encode("utf-8") for s in strings)
    if rtype in ("A", "AAAA"):
        return str(ipaddress.ip_address(value))
    if rtype == "MX":
        preference, exchange = value
        return (int(preference), _key(str(exchange)))
    if rtype in ("PTR", "CNAME"):
        return _key(str(value))
    raise AssertionError(f"unexpected record type {rtype}")


def _cases():
    with SUITE.open(encoding="utf-8") as f:
        documents = list(yaml.safe_load_all(f))
    for document in documents:
        for name, case in document["tests"].items():
            marks = []
            if name in KNOWN_DIFFERENCES:
                marks.append(pytest.mark.xfail(reason=KNOWN_DIFFERENCES[name], strict=True))
            yield pytest.param(document["zonedata"], case, id=name, marks=marks)


@pytest.mark.parametrize(("zonedata", "case"), list(_cases()))
async def test_rfc7208_suite(zonedata: dict, case: dict) -> None:
    mailfrom, helo = str(case.get("mailfrom") or ""), str(case.get("helo") or "")
    domain = mailfrom.rpartition("@")[2] if mailfrom else helo
    result = await check_host(ZoneDns(zonedata), str(case["host"]), domain, mailfrom, helo=helo)

    expected = case["result"] if isinstance(case["result"], list) else [case["result"]]
    assert result.result in expected, result
    if "explanation" in case:
        wanted = "" if case["explanation"] == "DEFAULT" else case["explanation"]
        assert result.explanation == wanted, result


def test_suite_is_complete() -> None:
    """Guard against a truncated copy of the suite data."""
    assert len(list(_cases())) == 203
    assert set(KNOWN_DIFFERENCES) <= {p.id for p in _cases()}
