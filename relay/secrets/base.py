"""Secret references and the backend contract.

A secret reference names where a secret lives, never the secret itself:
`file:///path`, `env://NAME`, `aws-sm://SECRET_ID[#json_field]`, `vault://MOUNT/PATH#field`.
References are safe to log; `SecretValue` is not, and its repr says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import unquote

SCHEMES = ("file", "env", "aws-sm", "vault")


@dataclass(frozen=True, slots=True)
class SecretRef:
    scheme: str
    location: str
    field: str | None = None

    @classmethod
    def parse(cls, text: str) -> SecretRef:
        """Parse a reference; raises ValueError with a message safe to show (no value)."""
        scheme, sep, rest = text.partition("://")
        if not sep or scheme not in SCHEMES:
            raise ValueError(
                "must be a secret reference: file:///path, env://NAME, "
                "aws-sm://SECRET_ID[#field] or vault://MOUNT/PATH#field"
            )
        location, _, fragment = rest.partition("#")
        location = unquote(location)
        if scheme == "file":
            if not location.startswith("/"):
                raise ValueError("file:// reference needs an absolute path (file:///run/secrets/x)")
        elif not location:
            raise ValueError(f"{scheme}:// reference names nothing")
        if scheme == "env" and fragment:
            raise ValueError("env:// reference takes no #field")
        if scheme == "vault" and (not fragment or "/" not in location):
            raise ValueError("vault:// reference needs MOUNT/PATH#field")
        return cls(scheme, location, fragment or None)

    def __str__(self) -> str:
        suffix = f"#{self.field}" if self.field else ""
        return f"{self.scheme}://{self.location}{suffix}"


@dataclass(frozen=True, slots=True)
class SecretValue:
    """The bytes of a secret and an opaque version (mtime, VersionId, KV version)."""

    data: bytes = field(repr=False)
    version: str = ""

    def __repr__(self) -> str:
        return f"SecretValue(<redacted {len(self.data)} bytes>, version={self.version!r})"

    def text(self) -> str:
        # Bytes that are not UTF-8 (a binary file, a variable set from one) become U+FFFD:
        # the login fails as a wrong password would, where it is used; `relay config
        # validate` names the key.
        return self.data.decode("utf-8", "replace").strip()


class SecretFetchError(Exception):
    """A secret could not be fetched. The message names the reference and the cause, never
    any secret material (tokens, values)."""


class SecretNotFoundError(SecretFetchError):
    """The backend answered: no secret exists at this reference (as opposed to an outage)."""


class SecretBackend(Protocol):
    """One secrets backend, serving one reference scheme.

    `fetch` returns the current value of a reference or raises `SecretFetchError`. It must
    not block the event loop (run blocking SDK calls in a thread). `close` releases clients.
    """

    scheme: str

    async def fetch(self, ref: SecretRef) -> SecretValue: ...

    async def close(self) -> None: ...
