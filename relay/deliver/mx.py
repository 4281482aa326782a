"""Delivery straight to the recipients' MX hosts (RFC 5321 §5).

One transaction goes to one recipient domain. The relay is a passthrough, so it must never
tell a client "failed" for a recipient that was in fact delivered, nor "delivered" for one
that failed; with recipients of several domains in one transaction a single DATA reply
could not be true for all of them. So the first recipient's domain fixes the transaction,
and a recipient of another domain gets `452 4.5.3`, which RFC 5321 §4.5.3.1.10 lets the
client send again in a new transaction (every SMTP client library does this for 452).

Per domain: MX records in preference order, a random order among equal preferences
(§5.1); the domain itself when there is no MX (implicit MX); a null MX (RFC 7505) means
the domain accepts no mail (556 5.1.10). Each MX host is tried in turn until one takes the
transaction: a connection failure, a 4xx greeting or a 4xx to MAIL FROM ("not now, here")
moves on to the next host; a 5xx is the answer. When every host that answered said 4xx to
MAIL FROM, the client gets the last such reply with its text.
At most MAX_MX_HOSTS hosts are tried for one transaction (Postfix's smtp_mx_address_limit):
each costs up to connect_timeout and command_timeout while the client waits at RCPT, so a
domain with twenty unreachable MX hosts would hold it for many minutes.
"""

from __future__ import annotations

import random

from relay.deliver.base import NO_DSN, DsnRequest, Envelope
from relay.deliver.connection import UpstreamConnection, UpstreamConnector
from relay.deliver.smarthost import SmtpTransaction, begin_on
from relay.dns.resolver import DnsNameError, DnsService, DnsTemporaryError
from relay.errors import Reply, SmtpError
from relay.message import WireMessage

MAX_MX_HOSTS = 5


def recipient_domain(address: str) -> str:
    domain = address.rpartition("@")[2].strip().rstrip(".").lower()
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


class MxTransaction:
    """An SMTP transaction with one MX host, for recipients of one domain."""

    def __init__(self, inner: SmtpTransaction, domain: str) -> None:
        self._inner = inner
        self.domain = domain
        self.upstream = inner.upstream

    @property
    def carries_dsn(self) -> bool:
        return self._inner.carries_dsn

    async def add_recipient(self, address: str, dsn: DsnRequest = NO_DSN) -> Reply:
        if recipient_domain(address) != self.domain:
            return Reply(452, "4.5.3", f"Send recipients outside {self.domain} in a separate transaction")
        return await self._inner.add_recipient(address, dsn)

    async def send(self, message: WireMessage) -> Reply:
        return await self._inner.send(message)

    async def abort(self) -> None:
        await self._inner.abort()


class MxTarget:
    def __init__(self, name: str, connector: UpstreamConnector, dns: DnsService) -> None:
        self.name = name
        self.connector = connector
        self.dns = dns

    def describe(self) -> str:
        via = self.connector.dialer.describe()
        return "MX hosts" if via == "direct" else f"MX hosts via {via}"

    async def mx_hosts(self, domain: str) -> list[str]:
        """The hosts to try, in order. Raises SmtpError for null MX, NXDOMAIN, DNS failure."""
        try:
            answer = await self.dns.resolve(domain, "MX")
        except DnsTemporaryError as exc:
            raise SmtpError(
                451,
                "4.4.3",
                f"DNS lookup for {domain} failed, try again later",
                reason=f"MX lookup for {domain}: {exc}",
                label="dns_temporary",
            ) from None
        except DnsNameError:
            raise SmtpError(
                550,
                "5.1.2",
                f"Recipient domain {domain} is not a valid domain",
                reason=f"invalid recipient domain {domain!r}",
                label="bad_domain",
            ) from None
        if answer.nxdomain:
            raise SmtpError(
                550,
                "5.1.2",
                f"Recipient domain {domain} does not exist",
                reason=f"{domain}: NXDOMAIN",
                label="no_domain",
            )
        records = answer.records
        if len(records) == 1 and records[0][1] in ("", ".", "@"):
            # RFC 7505 §3: a single MX of "." declares that the domain accepts no mail.
            raise SmtpError(
                556,
                "5.1.10",
                f"Recipient domain {domain} does not accept mail (null MX)",
                reason=f"{domain}: null MX",
                label="null_mx",
            )
        if not records:
            return [domain]  # RFC 5321 §5.1: the implicit MX
        by_preference: dict[int, list[str]] = {}
        for preference, host in records:
            if host not in ("", ".", "@"):
                by_preference.setdefault(preference, []).append(host)
        hosts: list[str] = []
        for preference in sorted(by_preference):
            group = by_preference[preference]
            random.shuffle(group)  # §5.1: spread load among equal preferences
            hosts += group
        return hosts

    async def begin(self, envelope: Envelope, recipient: str, dsn: DsnRequest | None = None) -> MxTransaction:
        domain = recipient_domain(recipient)
        found = await self.mx_hosts(domain)
        hosts = found[:MAX_MX_HOSTS]
        last: SmtpError | None = None
        refused: SmtpError | None = None
        for host in hosts:
            try:
                conn = await self._connect(host)
            except SmtpError as exc:
                last = exc
                continue
            try:
                inner = await begin_on(self.name, conn, None, envelope, (recipient, dsn) if dsn is not None else None)
            except SmtpError as exc:
                if exc.label in ("upstream_disconnected", "upstream_error", "upstream_timeout"):
                    last = exc
                    continue
                if exc.label == "upstream_refused" and exc.temporary:
                    # 4xx to MAIL FROM: this host cannot take mail now (RFC 5321 §4.2.1), as
                    # after a 4xx greeting; another MX of the domain may (§5.1: try each
                    # address until a delivery attempt succeeds).
                    last = refused = exc
                    continue
                raise  # the MX answered for good: its refusal is the answer
            return MxTransaction(inner, domain)
        if refused is not None:
            raise refused  # a host answered "not now": that answer, rather than "unreachable"
        assert last is not None
        raise SmtpError(
            451,
            last.reply.enhanced if last.temporary else "4.4.1",
            f"No MX host of {domain} could be reached, try again later",
            reason=f"{_tried(hosts, found)} of {domain} failed; last: {last.reason}",
            label=last.label,
        )

    async def _connect(self, host: str) -> UpstreamConnection:
        try:
            return await self.connector.open(host)
        except SmtpError as exc:
            if exc.label != "upstream_tls" or self.connector.endpoint.tls != "opportunistic":
                raise
        # Opportunistic TLS that fails its handshake falls back to plaintext with the same
        # host, as opportunistic security intends (RFC 7435 §3); tls: require never does.
        return await self.connector.open(host, tls="none")

    async def probe(self) -> str:
        # There is no single host to probe before a recipient is known; MX delivery is
        # checked per message (and by `relay check` through the proxy).
        return ""

    async def close(self) -> None:
        return None


def _tried(hosts: list[str], found: list[str]) -> str:
    if len(found) > len(hosts):
        return f"the first {len(hosts)} of {len(found)} MX hosts (the most tried per message)"
    return f"all {len(hosts)} MX hosts"
