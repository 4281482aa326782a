"""The running relay's posture monitor: re-checks every `spf.check_interval`, exports the
posture gauges, and, as the pipeline's `SendGate`, holds mail whose SPF does not pass.

    monitor = PostureMonitor(settings, dns, keyring, delivery, dialer=dialer, previous=old)
    task = asyncio.create_task(monitor.run())       # forever; never raises
    Pipeline(..., gate=monitor)                      # monitor.check(from_domain) at DATA

`delivery` is the default upstream's (it is probed to find the egress IP with
`spf.egress_ip: auto`); `dialer` is the same upstream's dialer, needed only for
`spf.ip_echo_url`. `previous` is the monitor of the config before a reload: its verdicts and
egress IPs carry over when the `spf` settings and the default upstream are unchanged, so a
reload never opens a window where `refuse` holds mail that was passing.

SPF verdict per signing domain, for `check()` with `spf.on_fail: refuse`:
- pass (every egress IP passes): the message goes;
- a definite non-pass (fail, softfail, neutral, none, permerror, for any egress IP): 451
  4.7.23 (RFC 7372 "SPF validation failed") until a later check passes;
- unknown: a DNS temperror keeps the last definite verdict (an outage is never a pass, and
  never a permanent refusal); when there never was one (a temperror or an unknown egress IP
  since start, or the first check still running) the message is held with 451 4.7.24 (RFC
  7372 "SPF validation error"): `refuse` means "do not send unless SPF is known to pass".
With `on_fail: warn` nothing is held: a failing verdict is logged at every check and
counted per message. Domains the relay does not sign for are not the monitor's business.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from relay.config.schema import Settings
from relay.deliver.base import UpstreamTarget
from relay.deliver.dial import Dialer
from relay.dns.resolver import DnsService
from relay.errors import SmtpError
from relay.posture.assess import DomainPosture, assess_all, key_specs
from relay.posture.dmarc import POLICIES
from relay.posture.egress import Accept, Egress, discover_egress, is_public_unicast
from relay.sign.keyring import KeyRing

log = logging.getLogger("relay.posture")

# Gauges of state use live* modes: under prometheus-client's multiprocess mode the value of
# a worker that exited goes away (with mark_process_dead) instead of sticking forever.
# "min" for pass/match: one worker seeing a failure is enough to alert.
SPF_EGRESS_PASS = Gauge(
    "relay_spf_egress_pass",
    "1 if the domain's SPF record authorizes every egress IP, 0 if not (last definite verdict).",
    ["domain"],
    multiprocess_mode="livemin",
)
DKIM_DNS_KEY_MATCH = Gauge(
    "relay_dkim_dns_key_match",
    "1 if the DKIM key published in DNS is the relay's key for the selector, 0 if not.",
    ["domain", "selector"],
    multiprocess_mode="livemin",
)
DMARC_POLICY = Gauge(
    "relay_dmarc_policy",
    "1 for the DMARC policy that applies to the domain (none, quarantine, reject or missing), 0 for the others.",
    ["domain", "policy"],
    multiprocess_mode="livemax",
)
SPF_LOOKUPS = Gauge(
    "relay_spf_lookups",
    "DNS lookups the domain's SPF record needs (RFC 7208 §4.6.4 allows 10).",
    ["domain"],
    multiprocess_mode="livemax",
)
LAST_CHECK = Gauge(
    "relay_posture_last_check_timestamp_seconds",
    "Unix time the last posture check finished.",
    multiprocess_mode="max",
)
CHECK_ERRORS = Counter(
    "relay_posture_check_errors_total",
    "Posture checks that could not conclude (DNS temperror, egress IP not found), by check.",
    ["check"],
)
GATE_MESSAGES = Counter(
    "relay_spf_gate_messages_total",
    "Messages of a signing domain whose SPF does not pass the egress IP: held (on_fail: refuse) or sent anyway (warn).",
    ["domain", "action"],
)

RUN_TIMEOUT = 300.0  # one pass may not hang the loop forever (DNS and probes have their own)


@dataclass(frozen=True)
class SpfVerdict:
    passed: bool
    reason: str  # for the log and the reply
    at: float


class PostureMonitor:
    def __init__(
        self,
        settings: Settings,
        dns: DnsService,
        keyring: KeyRing,
        delivery: UpstreamTarget | None,
        *,
        dialer: Dialer | None = None,
        accept: Accept = is_public_unicast,
        previous: PostureMonitor | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.dns = dns
        self.keyring = keyring
        self.delivery = delivery
        self.dialer = dialer
        self.accept = accept
        self.clock = clock
        self.refuse = settings.spf.on_fail == "refuse"
        self.domains = frozenset(k.domain for k in settings.dkim.keys)
        self.egress = Egress((), None, "first check not run yet")
        self.verdicts: dict[str, SpfVerdict] = {}
        self.pending: dict[str, str] = {}  # domain → why there is no definite verdict yet
        self.last: list[DomainPosture] = []
        if previous is not None and self._same_path(previous):
            self.egress = previous.egress
            self.verdicts = {d: v for d, v in previous.verdicts.items() if d in self.domains}

    def _same_path(self, other: PostureMonitor) -> bool:
        return other.settings.spf == self.settings.spf and other.settings.upstream[0] == self.settings.upstream[0]

    # -- SendGate --------------------------------------------------------------------------
    def check(self, from_domain: str) -> None:
        domain = from_domain.lower()
        if domain not in self.domains:
            return
        verdict = self.verdicts.get(domain)
        if verdict is not None and verdict.passed:
            return
        if not self.refuse:
            if verdict is not None:
                GATE_MESSAGES.labels(domain, "warned").inc()
            return
        GATE_MESSAGES.labels(domain, "held").inc()
        if verdict is not None:
            text = f"{verdict.reason}; try again later"
            raise SmtpError(451, "4.7.23", text, reason=text, label="spf_egress")
        why = self.pending.get(domain, "the first check has not finished")
        raise SmtpError(
            451,
            "4.7.24",
            f"SPF for {domain} not verified yet; try again later",
            reason=f"SPF for {domain} not verified yet ({why}); on_fail: refuse holds mail",
            label="spf_egress",
        )

    # -- checking --------------------------------------------------------------------------
    async def run(self) -> None:
        """Check now, then every `spf.check_interval`, forever. Never raises (but can be
        cancelled)."""
        while True:
            try:
                async with asyncio.timeout(RUN_TIMEOUT):
                    await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the monitor must never take the relay down
                log.exception("posture check failed")
            await asyncio.sleep(self.settings.spf.check_interval)

    async def run_once(self) -> list[DomainPosture]:
        """One pass over every signing domain: update verdicts and gauges; return the findings."""
        if not self.domains or self.settings.upstream[0].mode == "outbox":
            # Nothing signed, or nothing leaves (the dev outbox): nothing to check, and no
            # DNS traffic for it. `relay check` still runs on demand.
            LAST_CHECK.set(self.clock())
            return []
        egress = await self._discover()
        specs = key_specs(self.settings.dkim, self.keyring)
        results = await assess_all(self.dns, specs, egress.ips)
        for posture in results:
            self._record(posture, egress)
        self.last = results
        LAST_CHECK.set(self.clock())
        return results

    async def _discover(self) -> Egress:
        probe = self.delivery.probe if self.delivery is not None else None
        found = await discover_egress(self.settings.spf, probe=probe, dialer=self.dialer, accept=self.accept)
        if found.ips:
            self.egress = found
            return found
        CHECK_ERRORS.labels("egress").inc()
        if self.egress.ips:
            log.warning(
                "egress IP not found; keeping the last known one",
                extra={"reason": found.problem, "egress_ips": list(self.egress.ips)},
            )
            return self.egress
        log.warning("egress IP unknown; SPF cannot be checked", extra={"reason": found.problem})
        self.egress = found
        return found

    def _record(self, posture: DomainPosture, egress: Egress) -> None:
        domain, spf = posture.domain, posture.spf
        # SPF
        if any(v.result.result == "temperror" for v in spf.egress) or spf.record.problem.startswith("temperror"):
            CHECK_ERRORS.labels("spf").inc()
        if spf.definite:
            failing = spf.failing
            if failing is None:
                reason = f"SPF for {domain} authorizes egress IP {', '.join(egress.ips)}"
            else:
                reason = f"SPF for {domain} does not authorize egress IP {failing.ip} (result {failing.result.result})"
            self.verdicts[domain] = SpfVerdict(failing is None, reason, self.clock())
            self.pending.pop(domain, None)
            SPF_EGRESS_PASS.labels(domain).set(1 if failing is None else 0)
            if failing is not None:
                log.warning(
                    "SPF does not authorize the egress IP",
                    extra={"domain": domain, "reason": reason, "on_fail": self.settings.spf.on_fail},
                )
        else:
            why = (
                (egress.problem or "egress IP unknown")
                if not spf.egress
                else (next(v.result.problem for v in spf.egress if v.result.result == "temperror"))
            )
            self.pending[domain] = why
            kept = self.verdicts.get(domain)
            log.warning(
                "SPF check inconclusive; %s",
                "keeping the last verdict" if kept else "no verdict yet",
                extra={"domain": domain, "reason": why},
            )
        if spf.record.record is not None and not spf.record.problem.startswith("temperror"):
            SPF_LOOKUPS.labels(domain).set(spf.record.lookups)
        # DKIM
        for key in posture.dkim:
            if key.status == "temperror":
                CHECK_ERRORS.labels("dkim").inc()
            elif key.status != "unavailable":
                DKIM_DNS_KEY_MATCH.labels(domain, key.selector).set(1 if key.status == "match" else 0)
                if key.status != "match":
                    log.warning(
                        "DKIM key in DNS does not match",
                        extra={"domain": domain, "selector": key.selector, "reason": key.problem},
                    )
        # DMARC
        dmarc = posture.dmarc
        if dmarc.status == "temperror":
            CHECK_ERRORS.labels("dmarc").inc()
        else:
            for policy in (*POLICIES, "missing"):
                DMARC_POLICY.labels(domain, policy).set(1 if policy == dmarc.applied_policy else 0)
