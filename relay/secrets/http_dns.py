"""Host names of the secrets backends' HTTP clients (Vault, AWS Secrets Manager) resolved
through `dns.nameservers`, like every other name the relay connects to.

aiohttp asks its connector's resolver for every host it connects to (an HTTPS proxy's too);
this one answers from the relay's `AddressResolver`. Imported only with the `aws` or `vault`
extra (aiohttp).
"""

from __future__ import annotations

import socket
from typing import Protocol

from aiohttp.abc import AbstractResolver, ResolveResult

from relay.errors import SmtpError


class HostAddresses(Protocol):
    async def addresses(self, host: str) -> list[str]: ...


class ConfiguredDnsResolver(AbstractResolver):
    def __init__(self, resolver: HostAddresses) -> None:
        self._resolver = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            found = await self._resolver.addresses(host)
        except SmtpError as exc:
            # aiohttp reports an OSError from its resolver as a DNS failure of the request.
            raise OSError(f"cannot resolve {host}: {exc.reason}") from None
        results: list[ResolveResult] = []
        for address in found:
            address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
            if family in (socket.AF_UNSPEC, address_family):
                results.append(
                    ResolveResult(
                        hostname=host,
                        host=address,
                        port=port,
                        family=address_family,
                        proto=0,
                        flags=socket.AI_NUMERICHOST,
                    )
                )
        if not results:
            raise OSError(f"cannot resolve {host}: no address of the requested family")
        return results

    async def close(self) -> None:
        return None
