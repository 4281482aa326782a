"""The key ring: every DKIM key by signing domain, kept current from the store.

Keys come from static `dkim.keys` entries and from key-set documents (`dkim.key_sets`,
see `relay.rotate`): a document lists a domain's keys and which of them sign. When the
store has a new value of a document, the ring holds the keys it lists (fetching new
references at once), and signs with its active ones; every change of a domain's signing
set is logged. A domain's signing set never becomes empty because of a document: if none
of its active keys is loaded yet, the previous set stays (and that is logged as an error).

A rotated key replaces the old one atomically (a new tuple per domain); a refresh that
yields unusable key material keeps the last good key and says why. A domain is *ready*
once each of its signing selectors has had a valid key at least once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol

from prometheus_client import Counter, Gauge

from relay.cancel import cancel_and_wait
from relay.secrets.base import SecretValue
from relay.secrets.store import SecretStore
from relay.sign.key_sets import HeldKey, KeySetConfig, KeySources, SigningSets, StaticKey
from relay.sign.keys import KeyMaterialError, SigningKey, load_signing_key

log = logging.getLogger("relay.dkim")

KEY_LOAD_FAILURES = Counter(
    "relay_dkim_key_load_failures_total",
    "DKIM key material fetched but unusable (bad format, too short, wrong algorithm).",
    ["domain", "selector"],
)
KEY_AGE = Gauge(
    "relay_dkim_key_age_seconds",
    "Seconds since the signing key was made (keys of a dkim.key_sets document).",
    ["domain", "selector"],
    multiprocess_mode="livemax",
)
KEY_MAX_AGE = Gauge(
    "relay_dkim_key_max_age_seconds",
    "dkim.rotation.max_key_age for each key-set domain: the age past which a key is due for rotation.",
    ["domain"],
    multiprocess_mode="livemax",
)


class RotationLimits(Protocol):
    @property
    def max_key_age(self) -> float: ...


class DkimKeys(KeySources, Protocol):
    """The `dkim` section as the key ring reads it (relay.config.schema.DkimSettings)."""

    @property
    def keys(self) -> Sequence[StaticKey]: ...
    @property
    def key_sets(self) -> Sequence[KeySetConfig]: ...
    @property
    def allow_weak_rsa(self) -> bool: ...
    @property
    def rotation(self) -> RotationLimits: ...


class KeyRing:
    def __init__(self, settings: DkimKeys, store: SecretStore) -> None:
        self._settings = settings
        self._store = store
        self._sets = SigningSets(settings)
        self._static_refs = {k.key for k in settings.keys}
        self._keys: dict[tuple[str, str], SigningKey] = {}
        self._problems: dict[tuple[str, str], str] = {}
        self._failed: dict[tuple[str, str], tuple[str, int]] = {}  # the last unusable value, by key
        self._by_domain: dict[str, tuple[SigningKey, ...]] = {}
        self._by_ref: dict[str, list[HeldKey]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._own: set[tuple[str, str]] = set()
        self._sync(initial=True)
        for key_set in settings.key_sets:
            KEY_MAX_AGE.labels(key_set.domain).set(settings.rotation.max_key_age)

    @property
    def refs(self) -> list[str]:
        """Every reference the ring needs: key-set documents and every key they list."""
        return list(dict.fromkeys([*self._sets.documents, *self._by_ref]))

    def attach(self) -> None:
        self._store.subscribe(self.on_secret)
        # Values that changed between building the ring and now (a reload awaits in
        # between) would otherwise be missed until they change again.
        self._sync()

    def detach(self) -> None:
        """Stop following the store (a reload's old ring). The key fetches it started are
        cancelled; `close()` waits for their end."""
        self._store.unsubscribe(self.on_secret)
        for task in self._tasks:
            task.cancel()

    async def close(self) -> None:
        """Detached, and its key fetches ended: a fetch may let one cancellation go by
        (relay.cancel), and one still running when the loop closes is destroyed pending."""
        self.detach()
        await cancel_and_wait(self._tasks)

    async def fetch_missing(self) -> None:
        """Fetch what the store does not hold yet: the documents, then the keys they list;
        then load them (also without `attach`, as `relay check` does)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)  # fetches under way
        await self._store.ensure(self._sets.documents)
        self._sync()
        await self._store.ensure(self.refs)
        self._sync()

    def owns(self, domain: str, selector: str) -> bool:
        """Whether `d=domain; s=selector` is one of the relay's own keys (held or not)."""
        return (domain, selector) in self._own

    def _sync(self, initial: bool = False) -> None:
        """Take what the store holds now: documents first, then the keys they list."""
        for ref in self._sets.documents:
            value = self._store.get(ref)
            if value is not None:
                self._sets.on_document(ref, value)
        self._index()
        self._rebuild(initial=initial)

    def on_secret(self, ref: str, value: SecretValue) -> None:
        if ref in self._sets.documents:
            if self._sets.on_document(ref, value):
                self._index()
                self._rebuild()
                self._fetch_soon()
            return
        if ref in self._by_ref and self._load(ref, value):
            self._rebuild()

    def keys_for(self, domain: str) -> tuple[SigningKey, ...]:
        return self._by_domain.get(domain, ())

    def signs_for(self, domain: str) -> bool:
        return domain in self._sets.domains

    @property
    def domains(self) -> list[str]:
        return self._sets.domains

    def signing_entries(self) -> list[HeldKey]:
        """The keys meant to sign now (loaded or not), in signing order per domain."""
        return [e for e in self._sets.entries() if self._sets.signs(e.domain, e.selector)]

    def never_loaded(self) -> dict[str, str]:
        """`domain/selector` → why, for signing selectors that never had a valid key."""
        out = {}
        for entry in self.signing_entries():
            ident = (entry.domain, entry.selector)
            if ident not in self._keys:
                out[f"{entry.domain}/{entry.selector}"] = self._problems.get(ident, "not loaded yet")
        for key_set in self._settings.key_sets:
            domain = key_set.domain
            if self._sets.document(domain) is None and not any(e.domain == domain for e in self.signing_entries()):
                out[f"{domain}/*"] = f"key set {key_set.key_set}: {self._store.error(key_set.key_set) or 'not loaded'}"
        return out

    def update_ages(self) -> None:
        """Set `relay_dkim_key_age_seconds` for the signing keys of key sets."""
        now = datetime.fromtimestamp(time.time(), UTC)
        ages = self._sets.ages(now)
        for (domain, selector), age in ages.items():
            KEY_AGE.labels(domain, selector).set(round(age))
        key_set_domains = {k.domain for k in self._settings.key_sets}
        for labels in list(getattr(KEY_AGE, "_metrics", {})):
            if labels not in ages and labels[0] in key_set_domains:
                # NaN first: under multiprocess metrics the last value outlives remove(),
                # and a retired key must not stay "too old" for the alert.
                KEY_AGE.labels(*labels).set(float("nan"))
                KEY_AGE.remove(*labels)

    # -- loading ---------------------------------------------------------------------------

    def _index(self) -> None:
        """Map every reference to the entries that use it; load what the store holds."""
        by_ref: dict[str, list[HeldKey]] = {}
        # One reference may hold the key of several selectors/domains (the same key
        # published under two names), so a reference maps to every entry that uses it.
        for entry in self._sets.entries():
            by_ref.setdefault(entry.key, []).append(entry)
        # Refs no entry uses any more: keys a document dropped (retired and removed), and
        # static entries its document superseded.
        gone = (set(self._by_ref) | self._static_refs) - set(by_ref)
        self._by_ref = by_ref
        wanted = {(e.domain, e.selector) for cfgs in by_ref.values() for e in cfgs}
        self._own = wanted | {(k.domain, k.selector) for k in self._settings.keys}
        for ident in [i for i in self._keys if i not in wanted]:
            del self._keys[ident]
        for ident in [i for i in self._problems if i not in wanted]:
            del self._problems[ident]
            self._failed.pop(ident, None)
        for ref, cfgs in by_ref.items():
            value = self._store.get(ref)
            if value is None:
                for cfg in cfgs:
                    if (cfg.domain, cfg.selector) not in self._keys:
                        self._problems[(cfg.domain, cfg.selector)] = self._store.error(ref) or "not loaded"
            else:
                self._load(ref, value)
        for ref in gone:
            self._store.forget(ref)  # stop fetching it (it may be deleted soon)

    def _fetch_soon(self) -> None:
        missing = [r for r in self._by_ref if self._store.get(r) is None]
        if not missing:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._store.ensure(missing))
        except RuntimeError:  # no loop (a command building the ring): the caller fetches
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _load(self, ref: str, value: SecretValue) -> bool:
        changed = False
        for cfg in self._by_ref[ref]:
            changed |= self._load_one(ref, cfg, value)
        return changed

    def _load_one(self, ref: str, cfg: HeldKey, value: SecretValue) -> bool:
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
            # The ring re-reads what the store holds whenever it re-indexes (start, attach,
            # a key-set change): the same unusable value is one failure, logged once.
            failure = (ref, hash(value.data))
            if self._failed.get(ident) == failure:
                return False
            self._failed[ident] = failure
            KEY_LOAD_FAILURES.labels(cfg.domain, cfg.selector).inc()
            consequence = "keeping the previous key" if ident in self._keys else "domain cannot be signed"
            log.error(
                "DKIM key unusable; %s",
                consequence,
                extra={"domain": cfg.domain, "selector": cfg.selector, "secret": ref, "reason": str(exc)},
            )
            return False
        old = self._keys.get(ident)
        self._problems.pop(ident, None)
        self._failed.pop(ident, None)
        if old is not None and old.public_b64 == key.public_b64:
            return False  # a new version of the same key
        self._keys[ident] = key
        if old is not None:
            log.info("DKIM key rotated", extra={"domain": cfg.domain, "selector": cfg.selector})
        return True

    def _rebuild(self, initial: bool = False) -> None:
        by_domain: dict[str, list[SigningKey]] = {}
        # Config (and document) order decides signature order on the message.
        for entry in self.signing_entries():
            key = self._keys.get((entry.domain, entry.selector))
            if key is not None:
                by_domain.setdefault(entry.domain, []).append(key)
        new = {d: tuple(ks) for d, ks in by_domain.items()}
        for domain, previous in self._by_domain.items():
            if domain not in new and self._sets.document(domain) is not None:
                wanted = [e.selector for e in self.signing_entries() if e.domain == domain]
                log.error(
                    "DKIM signing set would be empty (keys not loaded yet); keeping the previous one",
                    extra={"domain": domain, "selectors": [k.selector for k in previous], "wanted": wanted},
                )
                new[domain] = previous
        for domain in sorted(set(new) | set(self._by_domain)):
            before = [k.selector for k in self._by_domain.get(domain, ())]
            after = [k.selector for k in new.get(domain, ())]
            if initial and after:
                log.info("DKIM signing set", extra={"domain": domain, "selectors": after})
            elif before != after:
                log.info("DKIM signing set changed", extra={"domain": domain, "selectors": after, "previous": before})
        self._by_domain = new
        self.update_ages()
