"""The limits stage of the message path: checked at RCPT where they can be, counted at DATA.

    limiter.check_recipient(user, accepted)          # at each RCPT: user limits, no waiting
    reservation = await limiter.reserve(user, from_domain, recipients)   # at DATA
    ... deliver ...
    await reservation.give_back()                    # only if the message was not delivered

At RCPT only the user is known (the header From comes with DATA), so RCPT checks the user's
limits without counting anything; at DATA, `reserve` counts the message against the user
and its From domain in one step, all or nothing, just before the message is handed on.
A message therefore counts once it is handed to the upstream (or the spool); one that the
upstream does not take gives its count back, so an upstream outage and the clients'
retries do not burn a day's quota. A refusal always comes before the client's 250: a limit
never takes back a message that was acknowledged.

Replies (RFC 3463 §3.8 and §3.6): `451 4.7.0` with a text that names the limit (scope,
name and kind; the user's own figures, never another's), and at RCPT, when the user's
daily recipient quota is what is reached, `452 4.5.3` (RFC 5321 §4.5.3.1.10): the client
delivers to the recipients already accepted and sends the rest later.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from prometheus_client import Counter

from relay.errors import SmtpError
from relay.limits.counters import Counters, Demand, Excess, Taken
from relay.limits.rules import DAILY, DAILY_RECIPIENTS, DOMAIN, LISTENER, RATE, USER, Entity, LimitPolicy, Limits

LIMIT_REFUSALS = Counter(
    "relay_limit_refusals_total",
    "SMTP replies refusing a recipient or a message because a sending limit was reached.",
    ["scope", "name"],
)

_KIND_TEXT = {RATE: "sending rate", DAILY: "daily message quota", DAILY_RECIPIENTS: "daily recipient quota"}


class LimitExceeded(SmtpError):
    """A refusal by a sending limit; `limit` names it for the log (`user:billing:daily`)."""

    def __init__(self, excess: Excess, limits: Limits | None, *, at_rcpt: bool) -> None:
        entity, kind = excess.entity, excess.kind
        if at_rcpt and kind == DAILY_RECIPIENTS:
            code, enhanced, later = 452, "4.5.3", "send to the other recipients later"
        else:
            code, enhanced, later = 451, "4.7.0", "try again later"
        # The client's own figures (a user's, or its listener's for unauthenticated
        # clients), never a domain's: that is shared with others.
        figure = f" ({_figure(kind, limits)})" if entity.scope != DOMAIN and limits is not None else ""
        text = f"Sending limit reached: {_KIND_TEXT[kind]} of {entity}{figure}, {later}"
        reason = (
            f"{entity} reached its {_KIND_TEXT[kind]}: "
            + (
                f"{excess.used:.2f} of {excess.limit:g} tokens left"
                if kind == RATE
                else f"{excess.used:g} of {excess.limit:g} in the last 24 h"
            )
            + f"; fits again in ~{excess.retry_after:.0f} s"
        )
        super().__init__(code, enhanced, text, reason=reason, label="limit")
        self.excess = excess
        self.limit = f"{entity.scope}:{entity.name}:{kind}"


def _figure(kind: str, limits: Limits) -> str:
    if kind == RATE:
        counted = " recipients" if limits.rate_recipients else ""
        return f"{limits.rate}{counted}, burst {limits.burst}"
    if kind == DAILY:
        return f"{limits.daily} messages in 24 h"
    return f"{limits.daily_recipients} recipients in 24 h"


class Reservation:
    """What `reserve` counted for one message; `give_back` when it was not delivered."""

    def __init__(self, counters: Counters | None, taken: Taken | None) -> None:
        self._counters = counters
        self._taken = taken

    async def give_back(self) -> None:
        taken, self._taken = self._taken, None
        if taken is not None and self._counters is not None and taken.demands:
            await self._counters.give_back(taken)


NOTHING_RESERVED = Reservation(None, None)


class Limiter:
    def __init__(self, policy: LimitPolicy, counters: Counters) -> None:
        self.policy = policy
        self.counters = counters

    def check_recipient(self, user: str | None, accepted: int, *, listener: str | None = None) -> None:
        """Before accepting one more recipient (`accepted` are accepted already): raise
        LimitExceeded if the client's limits (its user's, or, unauthenticated, its
        listener's) are known to be reached. Counts nothing."""
        subject = self._client(user, listener)
        if subject is None:
            return
        entity, limits = subject
        # The message itself is checked with its first recipient; later ones only add
        # recipients.
        demand = Demand(entity, limits, 1 if accepted == 0 else 0, accepted + 1)
        excess = self.counters.peek([demand])
        if excess is not None:
            raise self._refusal(excess, at_rcpt=True)

    def _client(self, user: str | None, listener: str | None) -> tuple[Entity, Limits] | None:
        """Whose limits the client's messages count against: its user, or the clients of
        its listener that did not authenticate (else `auth: optional` would be a way around
        the user limits)."""
        if user is not None:
            limits = self.policy.for_user(user)
            return None if limits is None else (Entity(USER, user), limits)
        limits = self.policy.for_unauthenticated()
        return None if limits is None or listener is None else (Entity(LISTENER, listener), limits)

    async def reserve(
        self,
        user: str | None,
        from_domain: str | None,
        recipients: int,
        *,
        domain_limits: bool = True,
        listener: str | None = None,
    ) -> Reservation:
        """At DATA: count the message against the client (user, or unauthenticated on
        `listener`) and its From domain, or raise LimitExceeded having counted nothing.
        `domain_limits=False` leaves the domain to whoever paces deliveries (the spool)."""
        demands = self.demands(user, from_domain if domain_limits else None, recipients, listener=listener)
        if not demands:
            return NOTHING_RESERVED
        taken = await self.counters.take(demands)
        if isinstance(taken, Excess):
            raise self._refusal(taken, at_rcpt=False)
        return Reservation(self.counters, taken)

    async def pace_delivery(
        self, from_domain: str | None, recipients: int, *, counted: bool = False
    ) -> dict[str, Any] | None | float:
        """For a queue delivering a message it has already acknowledged (spool mode): count
        an attempt's `recipients` against its From domain, or say in how many seconds to try
        again. Never a refusal: a limit never takes back an acknowledged message, it only
        defers it. `counted`: the message itself was counted by an earlier attempt (that
        delivered to some recipients), so only these recipients are.

        Returns what was counted as plain data, for the queue to keep with the entry (a
        count must survive a restart) and to give back, all or in part, with
        `give_back_delivery`; None when no limit applies."""
        demands = self.demands(None, from_domain, recipients)
        if not demands:
            return None
        if counted:
            demands = [replace(demand, messages=0) for demand in demands]
        taken = await self.counters.take(demands)
        if isinstance(taken, Excess):
            return max(1.0, taken.retry_after)
        if not taken.demands:
            return None
        demand = taken.demands[0]
        return {
            "slot": taken.slot,
            "messages": demand.messages,
            "recipients": demand.recipients,
            "backend": taken.backend,
        }

    async def give_back_delivery(self, from_domain: str | None, counted: dict[str, Any]) -> None:
        """Give back what `pace_delivery` counted (or the part of it no delivery used)."""
        limits = self.policy.for_domain(from_domain)
        if limits is None or not from_domain:
            return  # the domain's limits are gone (a reload): nothing to give back to
        try:
            demand = Demand(
                Entity(DOMAIN, from_domain.lower()), limits, int(counted["messages"]), int(counted["recipients"])
            )
            taken = Taken((demand,), int(counted["slot"]), str(counted["backend"]))
        except (KeyError, TypeError, ValueError):
            return  # not what this version wrote: left counted (errs on the safe side)
        if demand.messages or demand.recipients:
            await self.counters.give_back(taken)

    def demands(
        self, user: str | None, from_domain: str | None, recipients: int, *, listener: str | None = None
    ) -> Sequence[Demand]:
        demands = []
        client = self._client(user, listener)
        if client is not None:
            demands.append(Demand(client[0], client[1], 1, recipients))
        domain_limits = self.policy.for_domain(from_domain)
        if domain_limits is not None and from_domain:
            demands.append(Demand(Entity(DOMAIN, from_domain.lower()), domain_limits, 1, recipients))
        return demands

    def _refusal(self, excess: Excess, *, at_rcpt: bool) -> LimitExceeded:
        entity = excess.entity
        limits = self.policy.for_entity(entity)
        LIMIT_REFUSALS.labels(entity.scope, entity.name).inc()
        return LimitExceeded(excess, limits, at_rcpt=at_rcpt)
