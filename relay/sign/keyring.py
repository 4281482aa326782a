"""The key ring: every configured DKIM key by signing domain, kept current from the store.

A rotated key replaces the old one atomically (a new tuple per domain); a refresh that
yields unusable key material keeps the last good key and says why. A domain is *ready*
once each of its selectors has had a valid key at least once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from prometheus_client import Counter

from relay.secrets.base import SecretValue
from relay.secrets.store import SecretStore
from relay.sign.keys import KeyMaterialError, SigningKey, load_signing_key

log = logging.getLogger("relay.dkim")

KEY_LOAD_FAILURES = Counter(
    "relay_dkim_key_load_failures_total",
    "DKIM key material fetched but unusable (bad format, too short, wrong algorithm).",
    ["domain", "selector"],
)


class KeyEntry(Protocol):
    """One configured key (`dkim.keys[]`, relay.config.schema.DkimKeySettings)."""

    @property
    def domain(self) -> str: ...
    @property
    def selector(self) -> str: ...
    @property
    def key(self) -> str: ...  # a secret reference
    @property
    def algorithm(self) -> str: ...


class DkimKeys(Protocol):
    """The `dkim` section as the key ring reads it (relay.config.schema.DkimSettings)."""

    @property
    def keys(self) -> Sequence[KeyEntry]: ...
    @property
    def allow_weak_rsa(self) -> bool: ...


class KeyRing:
    def __init__(self, settings: DkimKeys, store: SecretStore) -> None:
        self._settings = settings
        self._store = store
        # One reference may hold the key of several selectors/domains (the same key
        # published under two names), so a reference maps to every entry that uses it.
        self._by_ref: dict[str, list[KeyEntry]] = {}
        for cfg in settings.keys:
            self._by_ref.setdefault(cfg.key, []).append(cfg)
        self._keys: dict[tuple[str, str], SigningKey] = {}
        self._problems: dict[tuple[str, str], str] = {}
        self._by_domain: dict[str, tuple[SigningKey, ...]] = {}
        for ref, cfgs in self._by_ref.items():
            value = store.get(ref)
            if value is None:
                for cfg in cfgs:
                    self._problems[(cfg.domain, cfg.selector)] = store.error(ref) or "not loaded"
            else:
                self._load(ref, value)
        self._rebuild()

    def attach(self) -> None:
        self._store.subscribe(self.on_secret)

    def detach(self) -> None:
        self._store.unsubscribe(self.on_secret)

    def on_secret(self, ref: str, value: SecretValue) -> None:
        if ref in self._by_ref and self._load(ref, value):
            self._rebuild()

    def keys_for(self, domain: str) -> tuple[SigningKey, ...]:
        return self._by_domain.get(domain, ())

    def signs_for(self, domain: str) -> bool:
        return any(k.domain == domain for k in self._settings.keys)

    @property
    def domains(self) -> list[str]:
        return sorted({k.domain for k in self._settings.keys})

    def never_loaded(self) -> dict[str, str]:
        """`domain/selector` → why, for selectors that never had a valid key."""
        return {f"{d}/{s}": why for (d, s), why in self._problems.items() if (d, s) not in self._keys}

    def _load(self, ref: str, value: SecretValue) -> bool:
        changed = False
        for cfg in self._by_ref[ref]:
            changed |= self._load_one(ref, cfg, value)
        return changed

    def _load_one(self, ref: str, cfg: KeyEntry, value: SecretValue) -> bool:
        ident = (cfg.domain, cfg.selector)
        try:
            key = load_signing_key(
                value.data,
                domain=cfg.domain,
                selector=cfg.selector,
                algorithm=cfg.algorithm,
                allow_weak_rsa=self._settings.allow_weak_rsa,
            )
        except KeyMaterialError as exc:
            self._problems[ident] = str(exc)
            KEY_LOAD_FAILURES.labels(cfg.domain, cfg.selector).inc()
            consequence = "keeping the previous key" if ident in self._keys else "domain cannot be signed"
            log.error(
                "DKIM key unusable; %s",
                consequence,
                extra={"domain": cfg.domain, "selector": cfg.selector, "secret": ref, "reason": str(exc)},
            )
            return False
        old = self._keys.get(ident)
        self._keys[ident] = key
        self._problems.pop(ident, None)
        if old is not None and old.public_b64 != key.public_b64:
            log.info("DKIM key rotated", extra={"domain": cfg.domain, "selector": cfg.selector})
        return True

    def _rebuild(self) -> None:
        by_domain: dict[str, list[SigningKey]] = {}
        # Config order decides signature order on the message.
        for cfg in self._settings.keys:
            key = self._keys.get((cfg.domain, cfg.selector))
            if key is not None:
                by_domain.setdefault(cfg.domain, []).append(key)
        self._by_domain = {d: tuple(ks) for d, ks in by_domain.items()}
