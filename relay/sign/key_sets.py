"""The running relay's side of key sets: which keys to hold and which to sign with.

    sets = SigningSets(settings.dkim)
    sets.documents                      # key-set references: fetched like any secret
    if sets.on_document(ref, value):    # the store has a new value of a document
        ...                             # entries changed: load new keys, rebuild
    sets.entries()                      # every key to hold: static ones, and every key of
                                        # each document (pending and retired included)
    sets.signs(domain, selector)        # whether that key signs now

Keys are held from the moment a document lists them as pending, so when rotation makes
a key active every replica already has it: the switch costs no extra fetch. Static
`dkim.keys` entries of a key-set domain are its seed: they count until the domain's
document has been read once, and never after. A document that cannot be used (bad
JSON, wrong domain) is logged and ignored: the last good one stays in force.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from relay.secrets.base import SecretValue
from relay.sign.keyset import KeySet, KeySetError

log = logging.getLogger("relay.dkim")


class StaticKey(Protocol):
    """A `dkim.keys[]` entry (relay.config.schema.DkimKeySettings)."""

    @property
    def domain(self) -> str: ...
    @property
    def selector(self) -> str: ...
    @property
    def key(self) -> str: ...  # a secret reference
    @property
    def algorithm(self) -> str: ...


class KeySetConfig(Protocol):
    """A `dkim.key_sets[]` entry (relay.config.schema.DkimKeySetSettings)."""

    @property
    def domain(self) -> str: ...
    @property
    def key_set(self) -> str: ...


class KeySources(Protocol):
    """Where a relay's DKIM keys are configured (relay.config.schema.DkimSettings)."""

    @property
    def keys(self) -> Sequence[StaticKey]: ...
    @property
    def key_sets(self) -> Sequence[KeySetConfig]: ...


@dataclass(frozen=True, slots=True)
class HeldKey:
    """A key to hold: a static entry or a key of a document."""

    domain: str
    selector: str
    key: str
    algorithm: str


class SigningSets:
    def __init__(self, settings: KeySources) -> None:
        self._static = list(settings.keys)
        self._by_ref = {ks.key_set: ks for ks in settings.key_sets}
        self._documents: dict[str, KeySet] = {}  # by domain, the last good one

    @property
    def documents(self) -> list[str]:
        return list(self._by_ref)

    @property
    def domains(self) -> list[str]:
        return sorted({k.domain for k in self._static} | {ks.domain for ks in self._by_ref.values()})

    def on_document(self, ref: str, value: SecretValue) -> bool:
        """Take a new value of a key-set document; True if the keys to hold or to sign
        with changed."""
        config = self._by_ref.get(ref)
        if config is None:
            return False
        try:
            document = KeySet.from_bytes(value.data, config.domain)
        except KeySetError as exc:
            kept = "keeping the last good one" if config.domain in self._documents else "dkim.keys entries sign"
            log.error(
                "DKIM key set unusable; %s", kept, extra={"domain": config.domain, "secret": ref, "reason": str(exc)}
            )
            return False
        previous = self._documents.get(config.domain)
        self._documents[config.domain] = document
        return previous is None or _view(previous) != _view(document)

    def document(self, domain: str) -> KeySet | None:
        return self._documents.get(domain)

    def entries(self) -> list[HeldKey]:
        """Every key to hold, in signing order within each domain."""
        out = [
            HeldKey(k.domain, k.selector, k.key, k.algorithm) for k in self._static if k.domain not in self._documents
        ]
        for domain, document in self._documents.items():
            out += [HeldKey(domain, e.selector, e.key, e.algorithm) for e in document.keys]
        return out

    def signs(self, domain: str, selector: str) -> bool:
        document = self._documents.get(domain)
        if document is None:
            return any(k.domain == domain and k.selector == selector for k in self._static)
        return any(e.selector == selector for e in document.signing())

    def ages(self, now: datetime) -> dict[tuple[str, str], float]:
        """Seconds since each signing key of a key set was made (unknown for static keys)."""
        return {
            (domain, e.selector): (now - e.created).total_seconds()
            for domain, document in self._documents.items()
            for e in document.signing()
        }


def _view(document: KeySet) -> list[tuple[str, str, str, str]]:
    return [(e.selector, e.key, e.algorithm, e.state) for e in document.keys]
