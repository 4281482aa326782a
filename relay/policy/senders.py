"""Sender authorization: a user sends only as its own domains or addresses.

Checked twice: the envelope MAIL FROM (RFC 5321 §4.1.1.2) at MAIL, and the header From
(RFC 5322 §3.6.2) at DATA, because DMARC aligns on the header From and the DKIM key is
chosen by it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable


class SenderPolicy:
    """Entries: `example.com` (that domain), `*.example.com` (its subdomains), or a full
    address `app@example.com`. Matching is case-insensitive."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.addresses: set[str] = set()
        self.domains: set[str] = set()
        self.suffixes: tuple[str, ...] = ()
        suffixes = []
        for pattern in patterns:
            pattern = pattern.lower()
            if "@" in pattern:
                self.addresses.add(pattern)
            elif pattern.startswith("*."):
                suffixes.append(pattern[1:])  # ".example.com"
            else:
                self.domains.add(pattern)
        self.suffixes = tuple(suffixes)

    def allows_domain(self, domain: str) -> bool:
        domain = domain.lower().rstrip(".")
        if domain in self.domains:
            return True
        return bool(self.suffixes) and domain.endswith(self.suffixes)

    def allows(self, address: str) -> bool:
        address = address.lower()
        if address in self.addresses:
            return True
        local, at, domain = address.rpartition("@")
        return bool(at) and bool(local) and self.allows_domain(domain)

    def describe(self) -> str:
        return ", ".join(sorted(self.domains | self.addresses | {"*" + s for s in self.suffixes}))


class ClientNetworks:
    """`clients.networks`: only these source addresses get past the greeting."""

    def __init__(self, networks: Iterable[str]) -> None:
        self._networks = [ipaddress.ip_network(n) for n in networks]

    def allows(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._networks)
