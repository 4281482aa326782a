"""The key-set document: one domain's signing keys and the state of its rotation.

Stored as JSON at the key set's secret reference; written only by `relay dkim rotate`,
read by every replica. Version 1:

    {
      "version": 1,
      "domain": "example.com",
      "keys": [
        {"selector": "s20260301", "key": "aws-sm://relay/dkim/example.com/s20260301",
         "algorithm": "rsa-sha256", "state": "active",
         "created": "2026-03-01T09:00:00Z", "active_since": "2026-03-01T09:20:00Z",
         "retired_since": null, "record": "v=DKIM1; k=rsa; p=MIIB...",
         "published": "route53:Z0123456789ABC", "adopted": false}
      ],
      "rotation": null | {"new": "s20260901", "old": ["s20260301"], "step": "confirm",
                          "publish": "route53:Z0123456789ABC", "overlap": 604800,
                          "grace": 604800, "started": "...", "published_at": "..."},
      "history": [{"selector": "s20250901", "removed": "2026-03-15T09:00:00Z"}]
    }

`state` is pending | active | retired; `step` is the next thing the rotation does:
generate | publish | confirm | overlap | grace (see `relay.rotate`). `record` is the TXT
value published for the key (public). Times are UTC. Unknown members are ignored, so an
older relay reads a newer document.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from relay.secrets.base import SecretRef

VERSION: Literal[1] = 1
SELECTOR_SYNTAX = r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?"  # RFC 6376 §3.1: dot-separated labels
HISTORY_LIMIT = 50
KeyState = Literal["pending", "active", "retired"]
Step = Literal["generate", "publish", "confirm", "overlap", "grace"]


class KeySetError(ValueError):
    """The document is not a usable key set; the message is safe to show."""


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("times must carry a timezone (UTC, ...Z)")
    return value.astimezone(UTC)


def _ref(value: str) -> str:
    SecretRef.parse(value)
    return value


UtcTime = Annotated[datetime, AfterValidator(_utc)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class KeyEntry(_Model):
    selector: str = Field(pattern=f"^{SELECTOR_SYNTAX}$")
    key: Annotated[str, AfterValidator(_ref)]
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"
    state: KeyState
    created: UtcTime
    active_since: UtcTime | None = None
    retired_since: UtcTime | None = None
    record: str | None = None
    published: str | None = None
    adopted: bool = False

    def name(self, domain: str) -> str:
        return f"{self.selector}._domainkey.{domain}"


class RotationState(_Model):
    new: str
    old: tuple[str, ...] = ()
    step: Step
    publish: str
    overlap: float = Field(ge=0)
    grace: float = Field(ge=0)
    started: UtcTime
    published_at: UtcTime | None = None


class Removed(_Model):
    selector: str
    removed: UtcTime


class KeySet(_Model):
    version: Literal[1] = VERSION
    domain: str
    keys: tuple[KeyEntry, ...] = ()
    rotation: RotationState | None = None
    history: tuple[Removed, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> KeySet:
        selectors = [k.selector for k in self.keys]
        for selector in selectors:
            if selectors.count(selector) > 1:
                raise ValueError(f"selector {selector!r} appears twice")
        rotation = self.rotation
        if rotation is None:
            if any(k.state != "active" for k in self.keys):
                raise ValueError("pending or retired keys without a rotation in progress")
            return self
        for selector in (rotation.new, *rotation.old):
            if selector not in selectors:
                raise ValueError(f"the rotation names selector {selector!r}, which is not in keys")
        return self

    # -- reading ---------------------------------------------------------------------------

    @classmethod
    def from_bytes(cls, data: bytes, domain: str) -> KeySet:
        try:
            raw = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
            raise KeySetError("not JSON") from None
        if not isinstance(raw, dict):
            raise KeySetError("not a JSON object")
        if raw.get("version") != VERSION:
            raise KeySetError(f"version {repr(raw.get('version'))[:40]}; this relay reads version {VERSION}")
        try:
            keyset = cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            message = first["msg"].removeprefix("Value error, ")
            raise KeySetError(f"{where}: {message}" if where else message) from None
        if keyset.domain != domain:
            raise KeySetError(f"the document is for {keyset.domain}, not {domain}")
        return keyset

    def signing(self) -> tuple[KeyEntry, ...]:
        """The keys that sign, in document order (which is signature order)."""
        return tuple(k for k in self.keys if k.state == "active")

    def entry(self, selector: str) -> KeyEntry:
        for key in self.keys:
            if key.selector == selector:
                return key
        raise KeySetError(f"no selector {selector!r} in the key set")

    def used_selectors(self) -> set[str]:
        return {k.selector for k in self.keys} | {h.selector for h in self.history}

    # -- writing ---------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        return (json.dumps(self.model_dump(mode="json"), indent=2) + "\n").encode("utf-8")

    def with_key(self, selector: str, **changes: object) -> KeySet:
        keys = tuple(k.model_copy(update=changes) if k.selector == selector else k for k in self.keys)
        return self.model_copy(update={"keys": keys})

    def with_rotation(self, rotation: RotationState | None) -> KeySet:
        return self.model_copy(update={"rotation": rotation})

    def without_keys(self, selectors: set[str], when: datetime) -> KeySet:
        """Drop `selectors`, remembering them in `history` so none is ever reused."""
        removed = tuple(Removed(selector=s, removed=when) for s in sorted(selectors))
        history = (self.history + removed)[-HISTORY_LIMIT:]
        keys = tuple(k for k in self.keys if k.selector not in selectors)
        return self.model_copy(update={"keys": keys, "history": history})
