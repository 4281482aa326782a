"""The development target: each signed message is written as an `.eml` file.

Used by the embedded dev default. A message is acknowledged only after its file is on
disk (written to a temporary name, fsynced, renamed, directory fsynced), the same
durability promise a queue would make.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from relay.deliver.base import NO_DSN, DsnRequest, Envelope
from relay.errors import Reply, SmtpError
from relay.message import WireMessage


class OutboxTransaction:
    def __init__(self, outbox: Path, envelope: Envelope) -> None:
        self.upstream = "outbox"
        self._outbox = outbox
        self._envelope = envelope
        self._recipients: list[str] = []

    @property
    def carries_dsn(self) -> bool:
        # The dev outbox is the end of the line and sends no notices of its own.
        return True

    async def add_recipient(self, address: str, dsn: DsnRequest = NO_DSN) -> Reply:
        self._recipients.append(address)
        return Reply(250, "2.1.5", "OK")

    async def send(self, message: WireMessage) -> Reply:
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.urandom(4).hex()}.eml"
        # RFC 5321 §4.4: Return-Path records the envelope sender at final delivery.
        head = f"Return-Path: <{self._envelope.mail_from}>\r\nX-Envelope-To: {', '.join(self._recipients)}\r\n"
        try:
            await asyncio.to_thread(_write_durably, self._outbox / name, [head.encode("utf-8"), *message.pieces])
        except OSError as exc:
            raise SmtpError(
                451,
                "4.3.0",
                "Could not store the message, try again",
                reason=f"outbox write failed: {exc.strerror or exc}",
                label="outbox_error",
            ) from None
        return Reply(250, "2.0.0", f"Ok: written to outbox as {name}")

    async def abort(self) -> None:
        return None


class OutboxTarget:
    def __init__(self, outbox: Path) -> None:
        self.name = "outbox"
        self.outbox = outbox

    def describe(self) -> str:
        return f"outbox {self.outbox}"

    async def begin(self, envelope: Envelope, recipient: str, dsn: DsnRequest | None = None) -> OutboxTransaction:
        return OutboxTransaction(self.outbox, envelope)

    async def probe(self) -> str:
        if not os.access(self.outbox, os.W_OK):
            raise SmtpError(
                451, "4.3.0", "Outbox not writable", reason=f"{self.outbox} not writable", label="outbox_error"
            )
        return ""

    async def close(self) -> None:
        return None


def _write_durably(path: Path, pieces: list[bytes | memoryview]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    with os.fdopen(fd, "wb") as fh:
        for piece in pieces:
            fh.write(piece)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
