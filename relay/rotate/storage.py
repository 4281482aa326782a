"""Reading, writing and deleting the secrets a rotation owns: new private keys and the
key-set document. Writes go to file:// or aws-sm:// (the config allows only those for
key sets); reads go to any configured backend (an adopted static key may live in Vault).
"""

from __future__ import annotations

from collections.abc import Iterable

from relay.secrets.base import SecretBackend, SecretFetchError, SecretNotFoundError, SecretRef, SecretValue


class ConcurrentChangeError(SecretFetchError):
    """The document changed since this run read it: someone else is rotating."""


class RotationSecrets:
    def __init__(self, backends: Iterable[SecretBackend]) -> None:
        self._backends = {b.scheme: b for b in backends}

    def _backend(self, ref: SecretRef) -> SecretBackend:
        backend = self._backends.get(ref.scheme)
        if backend is None:
            raise SecretFetchError(f"{ref}: no {ref.scheme}:// backend is configured")
        return backend

    async def read(self, ref: str) -> SecretValue | None:
        """The current value, or None if no secret exists there (an outage raises)."""
        parsed = SecretRef.parse(ref)
        try:
            return await self._backend(parsed).fetch(parsed)
        except SecretNotFoundError:
            return None

    async def write(self, ref: str, data: bytes) -> str:
        """Store `data` as the current value (replacing any); returns the new version."""
        parsed = SecretRef.parse(ref)
        backend = self._backend(parsed)
        store = getattr(backend, "store", None)
        if store is None:
            raise SecretFetchError(f"{ref}: {parsed.scheme}:// references cannot be written")
        if parsed.scheme != "file":
            return str(await store(parsed, data))  # the VersionId readers will see
        try:
            await store(parsed, data, force=True)
        except OSError as exc:
            raise SecretFetchError(f"{ref}: cannot write ({exc.strerror or type(exc).__name__})") from None
        # A file's version is its inode, mtime and size: known only once written.
        value = await self.read(ref)
        return value.version if value is not None else ""

    async def write_if_unchanged(self, ref: str, data: bytes, expected_version: str | None) -> str:
        """Write the document unless it changed since it was read at `expected_version`
        (None: it did not exist). A narrow window remains between the check and the
        write; two rotations of one domain at once are a mistake this catches, not a
        lock."""
        current = await self.read(ref)
        current_version = current.version if current is not None else None
        if current_version != expected_version:
            raise ConcurrentChangeError(
                f"{ref}: the key set changed since this run read it (another rotation?); run again"
            )
        return await self.write(ref, data)

    async def delete(self, ref: str) -> bool:
        """Delete the secret (AWS: scheduled, recoverable for 7 days); False if absent."""
        parsed = SecretRef.parse(ref)
        delete = getattr(self._backend(parsed), "delete", None)
        if delete is None:
            raise SecretFetchError(f"{ref}: {parsed.scheme}:// references cannot be deleted")
        return bool(await delete(parsed))

    async def close(self) -> None:
        for backend in self._backends.values():
            await backend.close()
