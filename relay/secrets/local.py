"""The local backends: mounted files (`file:///path`) and environment variables (`env://NAME`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import tempfile

from relay.files import NotARegularFile, open_regular, read_at_most
from relay.secrets.base import SecretFetchError, SecretNotFoundError, SecretRef, SecretValue

log = logging.getLogger("relay.secrets")

# A DKIM key, a password or a key-set document is a few KiB (AWS Secrets Manager takes 64 KiB
# at most); a larger file is the wrong file, and reading it every refresh would cost memory.
MAX_SECRET_FILE_SIZE = 1024 * 1024


class FileBackend:
    """Kubernetes/Docker mounted secrets. The version is the file's identity and mtime, so a
    symlink swap (how Kubernetes updates a mounted Secret) is seen as a change."""

    scheme = "file"

    def __init__(self) -> None:
        self._warned: set[str] = set()

    async def fetch(self, ref: SecretRef) -> SecretValue:
        return await asyncio.to_thread(self._read, ref)

    def _read(self, ref: SecretRef) -> SecretValue:
        path = ref.location
        try:
            # Not a FIFO (it waits for a writer) nor a device (/dev/zero is read without end).
            fd = open_regular(path)
            st = os.fstat(fd)
            data = read_at_most(fd, MAX_SECRET_FILE_SIZE)
        except FileNotFoundError:
            raise SecretNotFoundError(f"{ref}: cannot read (no such file)") from None
        except NotARegularFile:
            raise SecretFetchError(f"{ref}: cannot read (not a regular file)") from None
        except OSError as exc:
            raise SecretFetchError(f"{ref}: cannot read ({exc.strerror or type(exc).__name__})") from None
        if len(data) > MAX_SECRET_FILE_SIZE:
            raise SecretFetchError(f"{ref}: cannot read (larger than {MAX_SECRET_FILE_SIZE // 1024} KiB)")
        if st.st_mode & (stat.S_IRGRP | stat.S_IROTH) and path not in self._warned:
            self._warned.add(path)
            log.warning(
                "secret file is readable by group or others; restrict it to the relay's user "
                "(chmod 0600, or defaultMode: 0400 on the Kubernetes volume)",
                extra={"secret": str(ref), "mode": oct(st.st_mode & 0o777)},
            )
        if ref.field:
            data = _json_field(ref, data)
        return SecretValue(data, version=f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}")

    async def store(self, ref: SecretRef, data: bytes, *, force: bool = False) -> str:
        return await asyncio.to_thread(self._write, ref, data, force)

    def _write(self, ref: SecretRef, data: bytes, force: bool) -> str:
        path = ref.location
        if os.path.exists(path) and not force:
            raise SecretFetchError(f"{ref}: exists; pass --force to overwrite")
        # mkstemp: a new file of an unpredictable name, created with O_EXCL and mode 0600, so
        # nothing planted beside the key (a symlink at a guessable name) is followed.
        try:
            fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(path) or ".")
        except OSError as exc:
            raise SecretFetchError(f"{ref}: cannot write ({exc.strerror or type(exc).__name__})") from None
        try:
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):  # a full disk, a directory at the key's name
                raise SecretFetchError(f"{ref}: cannot write ({exc.strerror or type(exc).__name__})") from None
            raise
        return "file"

    async def delete(self, ref: SecretRef) -> bool:
        """Remove the file; False if it was already gone."""
        try:
            await asyncio.to_thread(os.unlink, ref.location)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise SecretFetchError(f"{ref}: cannot delete ({exc.strerror or type(exc).__name__})") from None
        return True

    async def close(self) -> None:
        return None


class EnvBackend:
    """A variable of the relay's environment; the version is the value's hash."""

    scheme = "env"

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        self._environ = environ if environ is not None else os.environ

    async def fetch(self, ref: SecretRef) -> SecretValue:
        value = self._environ.get(ref.location)
        if value is None:
            raise SecretFetchError(f"{ref}: variable is not set")
        # The variable's own bytes: os.environ holds undecodable ones as lone surrogates.
        data = value.encode("utf-8", "surrogateescape")
        return SecretValue(data, version=str(hash(data)))

    async def close(self) -> None:
        return None


def _json_field(ref: SecretRef, data: bytes) -> bytes:
    import json

    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        raise SecretFetchError(f"{ref}: #{ref.field} given but the content is not JSON") from None
    if not isinstance(obj, dict) or ref.field not in obj:
        raise SecretFetchError(f"{ref}: JSON has no field {ref.field!r}")
    value = obj[ref.field]
    return value.encode("utf-8") if isinstance(value, str) else json.dumps(value).encode("utf-8")
