"""The posture of one signing domain: SPF for the egress IPs, each DKIM key's record, DMARC.

One implementation for both users: `relay check` (`relay.posture.report`) and the running
relay's `PostureMonitor` (`relay.posture.monitor`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from relay.config.schema import DkimSettings
from relay.dns.resolver import DnsService
from relay.posture.dkim_record import DkimRecordCheck, check_dkim_record
from relay.posture.dmarc import DmarcCheck, check_dmarc
from relay.posture.levels import worst
from relay.posture.spf_posture import SpfPosture, check_spf
from relay.sign.keyring import KeyRing
from relay.sign.keys import SigningKey


@dataclass(frozen=True)
class KeySpec:
    """A configured DKIM key and, if loaded, its material."""

    domain: str
    selector: str
    algorithm: str
    key: SigningKey | None
    problem: str | None = None  # why it is not loaded


def key_specs(settings: DkimSettings, keyring: KeyRing) -> dict[str, list[KeySpec]]:
    """The keys meant to sign, by domain (domains sorted, keys in config or key-set order):
    static `dkim.keys` and the active keys of key sets."""
    missing = keyring.never_loaded()
    out: dict[str, list[KeySpec]] = {}
    for cfg in sorted(keyring.signing_entries(), key=lambda k: k.domain):
        loaded = {k.selector: k for k in keyring.keys_for(cfg.domain)}
        out.setdefault(cfg.domain, []).append(
            KeySpec(
                cfg.domain,
                cfg.selector,
                cfg.algorithm,
                loaded.get(cfg.selector),
                missing.get(f"{cfg.domain}/{cfg.selector}"),
            )
        )
    return out


@dataclass(frozen=True)
class DomainPosture:
    domain: str
    spf: SpfPosture
    dkim: tuple[DkimRecordCheck, ...]
    dmarc: DmarcCheck

    @property
    def level(self) -> str:
        return worst([self.spf.level, self.dmarc.level, *(d.level for d in self.dkim)])


async def assess_domain(
    dns: DnsService, domain: str, keys: Sequence[KeySpec], egress_ips: Sequence[str]
) -> DomainPosture:
    spf, dmarc, dkim = await asyncio.gather(
        check_spf(dns, domain, egress_ips),
        check_dmarc(dns, domain),
        asyncio.gather(
            *(
                check_dkim_record(
                    dns, domain=domain, selector=k.selector, algorithm=k.algorithm, key=k.key, key_problem=k.problem
                )
                for k in keys
            )
        ),
    )
    return DomainPosture(domain, spf, tuple(dkim), dmarc)


async def assess_all(
    dns: DnsService, specs: dict[str, list[KeySpec]], egress_ips: Sequence[str]
) -> list[DomainPosture]:
    return list(await asyncio.gather(*(assess_domain(dns, domain, keys, egress_ips) for domain, keys in specs.items())))
