"""DNS as one injected service: MX routing, SPF, DKIM and DMARC checks all resolve through it."""

from relay.dns.resolver import (
    DnsAnswer,
    DnsNameError,
    DnsResolver,
    DnsService,
    DnsTemporaryError,
)

__all__ = ["DnsAnswer", "DnsNameError", "DnsResolver", "DnsService", "DnsTemporaryError"]
