"""Failed SMTP AUTH attempts, counted across connections, per client address and per username.

A session already closes after `clients.max_auth_failures`; an attacker simply opens more
sessions. So failures are also counted per client address and per username over a window
(`clients.auth_throttle`):

- an address over its limit is refused at AUTH before any password is looked at (421 4.7.0,
  then the connection closes): no scrypt runs for it, so failed guesses cannot take the
  hashing threads from legitimate logins;
- a username over its limit accepts only credentials already verified (the directory's cache
  of successful logins, an HMAC): the application that knows its password logs in as fast as
  ever, while guesses for that username cost no scrypt and always fail.

Memory is bounded: at most `max_tracked` addresses and usernames each (the least recently
failing are forgotten first), and a count expires `window` after its first failure.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from prometheus_client import Counter, Gauge

AUTH_THROTTLED = Counter(
    "relay_auth_throttled_total",
    "AUTH attempts refused or answered without a password check because of earlier failures, "
    "by scope (address, username).",
    ["scope"],
)
AUTH_THROTTLE_TRACKED = Gauge(
    "relay_auth_throttle_tracked",
    "Client addresses and usernames with recent AUTH failures being counted, by scope.",
    ["scope"],
    multiprocess_mode="livesum",
)


# A username is whatever a client sends; only so much of it is kept as a key.
_KEY_LIMIT = 128


class _FailureWindow:
    """Failures per key, each key's count starting at its first failure and expiring `window`
    seconds later; at most `max_tracked` keys."""

    def __init__(self, scope: str, limit: int, window: float, max_tracked: int, clock: Callable[[], float]) -> None:
        self.scope = scope
        self.limit = limit
        self.window = window
        self.max_tracked = max_tracked
        self._clock = clock
        self._counts: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def over_limit(self, key: str) -> bool:
        entry = self._counts.get(key)
        if entry is None:
            return False
        started, count = entry
        if self._clock() - started >= self.window:
            del self._counts[key]
            self._gauge()
            return False
        return count >= self.limit

    def failed(self, key: str) -> None:
        now = self._clock()
        started, count = self._counts.pop(key, (now, 0))
        if now - started >= self.window:
            started, count = now, 0
        self._counts[key] = (started, count + 1)  # now the most recent
        while len(self._counts) > self.max_tracked:
            self._counts.popitem(last=False)
        self._gauge()

    def forget(self, key: str) -> None:
        if self._counts.pop(key, None) is not None:
            self._gauge()

    def __len__(self) -> int:
        return len(self._counts)

    def _gauge(self) -> None:
        AUTH_THROTTLE_TRACKED.labels(self.scope).set(len(self._counts))


class AuthThrottle:
    """Shared by every session of the process, kept across reloads (see wiring)."""

    def __init__(
        self,
        *,
        per_address: int,
        per_username: int,
        window: float,
        max_tracked: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.addresses = _FailureWindow("address", per_address, window, max_tracked, clock)
        self.usernames = _FailureWindow("username", per_username, window, max_tracked, clock)

    def address_blocked(self, address: str) -> bool:
        blocked = self.addresses.over_limit(address)
        if blocked:
            AUTH_THROTTLED.labels("address").inc()
        return blocked

    def username_limited(self, username: str) -> bool:
        """True: only already-verified credentials may pass for `username` (no scrypt)."""
        return self.usernames.over_limit(username[:_KEY_LIMIT])

    def failed(self, address: str, username: str, *, username_limited: bool) -> None:
        self.addresses.failed(address)
        self.usernames.failed(username[:_KEY_LIMIT])
        if username_limited:
            AUTH_THROTTLED.labels("username").inc()

    def succeeded(self, address: str) -> None:
        # The address knows a password: its earlier failures were typos, not guesses. The
        # username's count stays: other addresses may still be guessing it.
        self.addresses.forget(address)
