"""Host name → addresses for outgoing connections, through the configured resolver.

With `dns.nameservers` configured, every name the relay connects to is resolved there (a
private subnet's resolver, not the container's default). Without it, the system resolver
(`getaddrinfo`: /etc/hosts, then resolv.conf) is used, as any other program would.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from relay.dns.resolver import DnsNameError, DnsService, DnsTemporaryError
from relay.errors import SmtpError


class AddressResolver:
    def __init__(self, dns: DnsService | None) -> None:
        self.dns = dns

    async def addresses(self, host: str) -> list[str]:
        """IPv4 first, then IPv6. Raises SmtpError 451 (4.4.3 DNS failure, 4.4.4 no address)."""
        literal = host.strip("[]")
        try:
            return [str(ipaddress.ip_address(literal))]
        except ValueError:
            pass
        if host.lower().rstrip(".") == "localhost" or host.lower().rstrip(".").endswith(".localhost"):
            # RFC 6761 §6.3: localhost names are loopback and are not asked of DNS.
            return ["127.0.0.1", "::1"]
        if self.dns is None:
            return await self._system(host)
        found: list[str] = []
        try:
            for rdtype in ("A", "AAAA"):
                found += list((await self.dns.resolve(host, rdtype)).records)
        except DnsTemporaryError as exc:
            raise SmtpError(
                451,
                "4.4.3",
                "DNS lookup failed, try again later",
                reason=f"resolving {host}: {exc}",
                label="dns_temporary",
            ) from None
        except DnsNameError as exc:
            raise SmtpError(
                451, "4.4.4", "Upstream host name invalid", reason=str(exc), label="dns_no_address"
            ) from None
        if not found:
            raise SmtpError(
                451,
                "4.4.4",
                "Upstream host has no address, try again later",
                reason=f"{host} has no A/AAAA record",
                label="dns_no_address",
            )
        return found

    async def _system(self, host: str) -> list[str]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise SmtpError(
                451,
                "4.4.4",
                "Upstream host name not found, try again later",
                reason=f"resolving {host}: {exc.strerror}",
                label="dns_no_address",
            ) from None
        ordered = sorted({str(info[4][0]) for info in infos}, key=lambda a: ":" in a)
        return ordered
