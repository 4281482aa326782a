"""The user directory: SMTP AUTH credentials and each user's allowed senders.

Password hashes are scrypt (≈50 ms of CPU), so verification runs in a worker thread, never
on the event loop, and a successful verification is remembered (as an HMAC under a
per-process key, never the password) so a busy application does not pay scrypt on every
connection. A password given as a secret reference is compared in constant time with the
store's current value, so rotating it needs no reload.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter

from relay.auth.passwords import hash_password, verify_password
from relay.errors import SmtpError
from relay.policy.senders import SenderPolicy
from relay.secrets.store import SecretStore

# Verified against when the username is unknown, so that unknown users cost the same time
# as known ones (no username discovery by timing).
_DUMMY_HASH = hash_password(os.urandom(16).hex())

# scrypt runs on threads of its own, never on the event loop nor on the loop's default
# executor (which file secrets, DNS and TLS setup share); at most this many checks wait for
# one, then AUTH answers 454 at once instead of queueing without bound.
_HASH_THREADS = 2
_HASH_QUEUE = 16

HASH_VERIFICATIONS = Counter(
    "relay_auth_hash_verifications_total", "Password hash (scrypt) verifications run for SMTP AUTH."
)


class AuthBusy(Exception):
    """Too many password checks in progress: the client should try again shortly."""


class UserEntry(Protocol):
    """One configured user (`clients.users[]`, relay.config.schema.UserSettings)."""

    @property
    def username(self) -> str: ...
    @property
    def password_hash(self) -> str | None: ...
    @property
    def password(self) -> str | None: ...  # a secret reference
    @property
    def senders(self) -> Sequence[str]: ...


@dataclass(frozen=True, slots=True)
class User:
    username: str
    senders: SenderPolicy


class UserDirectory:
    def __init__(self, users: Sequence[UserEntry], store: SecretStore) -> None:
        self._settings = {u.username: u for u in users}
        self._users = {u.username: User(u.username, SenderPolicy(u.senders)) for u in users}
        self._store = store
        self._cache_key = os.urandom(32)
        self._verified: dict[str, bytes] = {}

    def knows(self, username: str) -> bool:
        return username in self._users

    async def authenticate(self, username: str, password: bytes, *, verify: bool = True) -> User | None:
        """The user these credentials belong to, or None. With `verify=False` (a throttled
        username) only credentials already verified pass, and no hash is computed."""
        cfg = self._settings.get(username)
        if cfg is None:
            if verify:
                await _verify(password, _DUMMY_HASH)
            return None
        if cfg.password is not None:
            current = self._store.get(cfg.password)
            if current is None:
                # Not the client's fault, and not final: the secret may load on the next
                # refresh. RFC 4954 §6: 454 4.7.0 Temporary authentication failure.
                raise SmtpError(
                    454,
                    "4.7.0",
                    "Temporary authentication failure",
                    reason=f"password secret of user {username} is not loaded: {self._store.error(cfg.password)}",
                    label="auth_unavailable",
                )
            ok = hmac.compare_digest(password, current.data.rstrip(b"\r\n"))
            return self._users[username] if ok else None
        tag = hmac.new(self._cache_key, username.encode() + b"\0" + password, hashlib.sha256).digest()
        cached = self._verified.get(username)
        if cached is not None and hmac.compare_digest(cached, tag):
            return self._users[username]
        assert cfg.password_hash is not None
        if verify and await _verify(password, cfg.password_hash):
            self._verified[username] = tag
            return self._users[username]
        return None


_executor: concurrent.futures.ThreadPoolExecutor | None = None
_waiting = 0


async def _verify(password: bytes, encoded: str) -> bool:
    global _executor, _waiting
    if _waiting >= _HASH_QUEUE:
        raise AuthBusy
    if _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(_HASH_THREADS, thread_name_prefix="scrypt")
    _waiting += 1
    try:
        HASH_VERIFICATIONS.inc()
        return await asyncio.get_running_loop().run_in_executor(_executor, verify_password, password, encoded)
    finally:
        _waiting -= 1
