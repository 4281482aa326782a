"""The user directory: SMTP AUTH credentials and each user's allowed senders.

Password hashes are scrypt (≈50 ms of CPU), so verification runs in a worker thread, never
on the event loop, and a successful verification is remembered (as an HMAC under a
per-process key, never the password) so a busy application does not pay scrypt on every
connection. A password given as a secret reference is compared in constant time with the
store's current value, so rotating it needs no reload.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from relay.auth.passwords import hash_password, verify_password
from relay.errors import SmtpError
from relay.policy.senders import SenderPolicy
from relay.secrets.store import SecretStore

# Verified against when the username is unknown, so that unknown users cost the same time
# as known ones (no username discovery by timing).
_DUMMY_HASH = hash_password(os.urandom(16).hex())


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

    async def authenticate(self, username: str, password: bytes) -> User | None:
        cfg = self._settings.get(username)
        if cfg is None:
            await asyncio.to_thread(verify_password, password, _DUMMY_HASH)
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
        if await asyncio.to_thread(verify_password, password, cfg.password_hash):
            self._verified[username] = tag
            return self._users[username]
        return None
