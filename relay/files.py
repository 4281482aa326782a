"""Opening a file whose path someone else controls (the config, a `file://` secret, the
spool's own files) so that what stands at the path cannot hold the reader: a FIFO without a
writer would block the open for ever, a device such as /dev/zero would be read without end,
and in the spool a symbolic link would lead outside it."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from stat import S_ISDIR, S_ISFIFO, S_ISREG


class NotARegularFile(OSError):
    """What stands at the path instead of a regular file; `kind` says what ("a FIFO", "a
    directory", "a special file", "a symbolic link")."""

    def __init__(self, path: str | Path, kind: str) -> None:
        code = errno.ELOOP if kind == "a symbolic link" else errno.EISDIR if kind == "a directory" else errno.EINVAL
        super().__init__(code, f"not a regular file ({kind})", str(path))
        self.kind = kind


def open_regular(path: str | Path, *, fifo: bool = False, follow_symlinks: bool = True) -> int:
    """A blocking descriptor for reading the regular file at `path` (or a FIFO, if `fifo`),
    opened without blocking; NotARegularFile for anything else, other OSErrors as they come."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise NotARegularFile(path, "a symbolic link") from None
        raise
    mode = os.fstat(fd).st_mode
    if not (S_ISREG(mode) or (fifo and S_ISFIFO(mode))):
        os.close(fd)
        kind = "a FIFO" if S_ISFIFO(mode) else "a directory" if S_ISDIR(mode) else "a special file"
        raise NotARegularFile(path, kind)
    os.set_blocking(fd, True)
    return fd


def read_at_most(fd: int, limit: int) -> bytes:
    """Up to `limit` + 1 bytes of `fd`, which is closed: more than `limit` means too large."""
    with os.fdopen(fd, "rb") as fh:
        return fh.read(limit + 1)
