"""What the SMTP edge reports about client sessions: metrics, and the refused-session log line.

The edge (`relay.listen`) calls these at the session's events; nothing here decides anything.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Iterable

from prometheus_client import Counter, Gauge

from relay.errors import SmtpError

log = logging.getLogger("relay.session")
message_log = logging.getLogger("relay.message")

SESSIONS_ACTIVE = Gauge(
    "relay_sessions_active",
    "Client sessions currently open.",
    ["listener"],
    multiprocess_mode="livesum",
)
SESSIONS_TOTAL = Counter(
    "relay_sessions_total",
    "Client sessions ended, by the TLS version they used (none for plain).",
    ["listener", "tls"],
)
SESSIONS_REFUSED = Counter(
    "relay_sessions_refused_total", "Client connections refused at the greeting.", ["listener", "reason"]
)
AUTH_ATTEMPTS = Counter(
    "relay_auth_attempts_total",
    "SMTP AUTH attempts by mechanism and result.",
    ["listener", "mechanism", "result"],
)

# The counters' label children, looked up once per label values: prometheus-client's
# labels() checks and locks on every call, and a session makes several. labels() returns the
# same child for the same values (a counter's are never removed), so a child evicted past
# maxsize is only looked up again; a listener renamed on reload is new label values, a new
# child. The gauge is looked up each time: a gauge's series can be cleared (the in-process
# tests do, so that each relay starts with none, as a process does).
_ended = functools.lru_cache(maxsize=256)(SESSIONS_TOTAL.labels)
_auth_attempts = functools.lru_cache(maxsize=256)(AUTH_ATTEMPTS.labels)


def export_listeners(listeners: Iterable[str]) -> None:
    """Each configured listener's active sessions at 0 before its first session: the
    dashboard shows 0, not "No data"."""
    for listener in listeners:
        SESSIONS_ACTIVE.labels(listener)


def session_admitted(listener: str) -> None:
    SESSIONS_ACTIVE.labels(listener).inc()


def session_refused(listener: str, client: str, refusal: SmtpError) -> None:
    SESSIONS_REFUSED.labels(listener, refusal.label).inc()
    message_log.info(
        "session refused",
        extra={
            "event": "session_refused",
            "listener": listener,
            "client": client,
            "code": refusal.code,
            "reason": refusal.reason,
        },
    )


def session_ended(listener: str, tls_version: str | None) -> None:
    """Counted at the end, so a STARTTLS session shows the TLS version it ended with."""
    SESSIONS_ACTIVE.labels(listener).dec()
    _ended(listener, tls_version or "none").inc()


def auth_attempt(listener: str, mechanism: str, ok: bool, *, client: str, username: str, known: bool) -> None:
    _auth_attempts(listener, mechanism, "success" if ok else "failure").inc()
    if not ok:
        # A username that is not configured may be a password typed into the wrong field:
        # it is logged only as a short hash keyed per process, enough to see one name
        # repeated, useless for guessing it offline.
        who = {"user": username} if known else {"user": None, "user_hash": _short_hash(username)}
        log.info("authentication failed", extra={"listener": listener, "client": client, **who})


def _short_hash(text: str) -> str:
    return hashlib.blake2s(text.encode("utf-8", "replace"), digest_size=6, key=_HASH_KEY).hexdigest()


_HASH_KEY = os.urandom(16)


def auth_not_checked(listener: str, mechanism: str, refusal: SmtpError, *, client: str) -> None:
    """An AUTH attempt answered without checking the password (throttled, or busy)."""
    AUTH_ATTEMPTS.labels(listener, mechanism, refusal.label).inc()
    log.info("authentication not checked", extra={"listener": listener, "client": client, "reason": refusal.reason})


def auth_unavailable(listener: str, mechanism: str, *, client: str, reason: str) -> None:
    """A password that could not be checked (its secret is not loaded): answered 454."""
    AUTH_ATTEMPTS.labels(listener, mechanism, "unavailable").inc()
    log.warning("authentication unavailable", extra={"listener": listener, "client": client, "reason": reason})


def session_error(listener: str, error: Exception) -> None:
    log.error(
        "session error",
        exc_info=log.isEnabledFor(logging.DEBUG),
        extra={"listener": listener, "error": type(error).__name__},
    )
