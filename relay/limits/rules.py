"""What is limited: rates, the 24-hour window, and the effective limits of each user and domain.

A limit applies to an `Entity`: an authenticated user (`user`, by username) or a header-From
domain (`domain`). Each entity may have:

- `rate` with `burst`: a token bucket of messages (or of recipients, with `rate_counts:
  recipients`, as SES counts its sending rate). `burst` may go at once, then one more each
  1/rate seconds. It is the brake on a runaway loop. A message with more recipients than
  the burst goes when the bucket is full and leaves it in debt: the rate holds on average.
- `daily`: messages, and `daily_recipients`: recipients, in a rolling 24 hours. Upstreams
  count both ways (Amazon SES's quota and Microsoft 365's cap count recipients; Google's
  caps count messages and recipients), so both can be set.

The day is a rolling 24 hours, not a calendar day in some time zone: that is how the
upstreams that impose daily quotas count (SES, Microsoft 365 and Google all use a rolling
window), and a calendar day would let a job send twice its quota across midnight, which
is exactly what those upstreams suspend accounts for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.config.schema import LimitsSettings, _LimitFields

USER = "user"
DOMAIN = "domain"
LISTENER = "listener"  # the clients of one listener that did not authenticate, together

RATE = "rate"
DAILY = "daily"
DAILY_RECIPIENTS = "daily_recipients"

# The rolling window is counted in slots of 15 minutes: 96 whole slots before the current
# one, so a count covers the last 24 h to 24 h 15 min. Erring on the long side means relay
# refuses a little early rather than letting an upstream's rolling 24 h be passed.
SLOT_SECONDS = 900
WINDOW_SLOTS = 86400 // SLOT_SECONDS + 1

# The one rate grammar of the config (`limits.*.rate` here, `upstream.max_rate` through
# relay.config.units): a count per a unit, the unit optionally with a multiple (`100/5m`).
_RATE = re.compile(
    r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*$", re.IGNORECASE
)
_UNIT_SECONDS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hour": 3600,
    "d": 86400,
    "day": 86400,
}


def split_rate(text: str) -> tuple[str, float] | None:
    """`600/m` → ("600", 60.0), `100/5m` → ("100", 300.0), `0.5/s` → ("0.5", 1.0); None when
    `text` is not a rate."""
    match = _RATE.match(text)
    if not match:
        return None
    count, multiple, unit = match.groups()
    return count, float(multiple or 1) * _UNIT_SECONDS[unit.lower()]


@dataclass(frozen=True, slots=True)
class Rate:
    """`count` messages per `seconds`."""

    count: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.count / self.seconds

    def __str__(self) -> str:
        for unit in ("d", "h", "m", "s"):
            if self.seconds == _UNIT_SECONDS[unit]:
                return f"{self.count}/{unit}"
        return f"{self.count}/{self.seconds:g}s"


def parse_rate(value: object) -> Rate:
    """`10/s`, `600/m`, `1000/h`, `50000/d`, `100/5m`."""
    if isinstance(value, Rate):
        return value
    parts = split_rate(value) if isinstance(value, str) else None
    if parts is None or not parts[0].isdigit():  # a whole count of messages
        raise ValueError(f"expected a rate like 10/s, 600/m or 1000/h, got {value!r}")
    count, seconds = parts
    if int(count) < 1 or seconds <= 0:
        raise ValueError(f"a rate needs a count of at least 1 per a positive time, got {value!r}")
    return Rate(int(count), seconds)


@dataclass(frozen=True, slots=True)
class Entity:
    scope: str  # USER, DOMAIN or LISTENER
    name: str

    @property
    def key(self) -> str:
        return f"{self.scope}:{self.name}"

    def __str__(self) -> str:
        return f"{self.scope} {self.name}"


@dataclass(frozen=True, slots=True)
class Limits:
    """The effective limits of one entity; None means not limited."""

    rate: Rate | None = None
    burst: int = 1
    daily: int | None = None
    daily_recipients: int | None = None
    rate_recipients: bool = False  # the bucket's tokens are recipients, not messages

    @property
    def empty(self) -> bool:
        return self.rate is None and self.daily is None and self.daily_recipients is None

    @property
    def has_daily(self) -> bool:
        return self.daily is not None or self.daily_recipients is not None


def _limits(fields: Mapping[str, object]) -> Limits:
    rate = fields.get("rate")
    burst = fields.get("burst")
    daily = fields.get("daily")
    daily_recipients = fields.get("daily_recipients")
    rate_counts = fields.get("rate_counts")
    assert rate is None or isinstance(rate, Rate)
    assert burst is None or isinstance(burst, int)
    assert daily is None or isinstance(daily, int)
    assert daily_recipients is None or isinstance(daily_recipients, int)
    if rate is not None and burst is None:
        # Without a burst, a rate of N per unit lets N go at once: `600/m` is 600 at once,
        # then 10 a second.
        burst = rate.count
    return Limits(
        rate=rate,
        burst=burst or 1,
        daily=daily,
        daily_recipients=daily_recipients,
        rate_recipients=rate is not None and rate_counts == "recipients",
    )


def _declared(settings: _LimitFields) -> dict[str, object]:
    """The fields written in the config (an explicit `null` included)."""
    return {name: getattr(settings, name) for name in settings.model_fields_set if name in _FIELDS}


_FIELDS = ("rate", "burst", "rate_counts", "daily", "daily_recipients")


class LimitPolicy:
    """The limits of every user and domain, from `limits` in the config.

    A user's override replaces the default field by field; a field set to null in an
    override lifts that limit for the user. A rate given without a burst takes the burst of
    that rate, not the default's. Domains have no default: only listed domains are limited.
    """

    def __init__(self, settings: LimitsSettings) -> None:
        default = _declared(settings.users)
        self._default_user = _limits(default)
        self._users: dict[str, Limits] = {}
        for username, override in (settings.users.model_extra or {}).items():
            fields = {**default, **_declared(override)}
            if "rate" in _declared(override) and "burst" not in _declared(override):
                fields.pop("burst", None)
            self._users[username] = _limits(fields)
        self._domains = {domain: _limits(_declared(limits)) for domain, limits in settings.domains.items()}
        unauthenticated = settings.unauthenticated
        self._unauthenticated = None if unauthenticated is None else _limits(_declared(unauthenticated))

    def for_user(self, username: str | None) -> Limits | None:
        if username is None:
            return None
        limits = self._users.get(username, self._default_user)
        return None if limits.empty else limits

    def for_unauthenticated(self) -> Limits | None:
        """The limits of the clients of one listener that did not authenticate (`auth:
        optional`/`none`), counted together per listener; None when not set."""
        limits = self._unauthenticated
        return None if limits is None or limits.empty else limits

    def for_entity(self, entity: Entity) -> Limits | None:
        if entity.scope == USER:
            return self.for_user(entity.name)
        if entity.scope == DOMAIN:
            return self.for_domain(entity.name)
        return self.for_unauthenticated()

    def for_domain(self, domain: str | None) -> Limits | None:
        if not domain:
            return None
        limits = self._domains.get(domain.lower())
        return None if limits is None or limits.empty else limits

    def with_daily_quota(self, usernames: Iterable[str], listeners: Iterable[str] = ()) -> list[tuple[Entity, Limits]]:
        """Every entity that has a daily quota: the ones whose usage is exported
        (`listeners`: those where clients may send without authenticating)."""
        out = []
        unauthenticated = self.for_unauthenticated()
        if unauthenticated is not None and unauthenticated.has_daily:
            out += [(Entity(LISTENER, listener), unauthenticated) for listener in listeners]
        for username in usernames:
            limits = self.for_user(username)
            if limits is not None and limits.has_daily:
                out.append((Entity(USER, username), limits))
        for domain, limits in self._domains.items():
            if limits.has_daily:
                out.append((Entity(DOMAIN, domain), limits))
        return out

    @property
    def limits_users(self) -> bool:
        return not self._default_user.empty or any(not v.empty for v in self._users.values())

    @property
    def limits_anything(self) -> bool:
        return (
            not self._default_user.empty
            or any(not v.empty for v in (*self._users.values(), *self._domains.values()))
            or self.for_unauthenticated() is not None
        )
