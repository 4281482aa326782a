"""Commands sent together and their replies read in order (RFC 2920 PIPELINING), on
aiosmtplib's protocol, which reads one reply per command.

aiosmtplib's `SMTPProtocol.data_received` parses one reply per read into the protocol's
response waiter, and drops what arrives while that waiter holds a reply not yet picked up
(it protects the next command from unsolicited data). With two commands in flight, the
second reply can come in the same read as the first (it would stay in the buffer, parsed
by nobody) or in a read of its own before the first is picked up (it would be dropped).
For the length of one exchange the waiter is a `_Replies`: it takes each reply the protocol
parses, parses any further complete reply already in the buffer at once, and is done only
when every reply is in. Lost connections and malformed replies reach it as they reach
aiosmtplib's own waiter. After the exchange the protocol has a fresh waiter, as after any
command. No method of aiosmtplib is replaced.

Relies on `SMTPProtocol`'s private `_response_waiter`, `_response_pending`, `_buffer`,
`_command_lock` and `_read_response_from_buffer` (see `PROTOCOL_PRIVATE_MEMBERS`,
checked by tests/unit/test_pipelining.py against the installed aiosmtplib).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import cast

from aiosmtplib import SMTPReadTimeoutError, SMTPResponse, SMTPServerDisconnected
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX, SMTPProtocol

PROTOCOL_PRIVATE_MEMBERS = (
    "_response_waiter",
    "_response_pending",
    "_buffer",
    "_command_lock",
    "_read_response_from_buffer",
)


# Where relay.listen.patches (patch 6) keeps how far it has scanned the buffer for a reply's
# final line; it starts over when the buffer shrank, which a buffer emptied and filled again
# beyond that point does not show.
SCAN_STATE = "_relay_scan"


def discard_buffered(protocol: SMTPProtocol) -> None:
    """Drop what the protocol has buffered (unasked data: see `Pipelined.start`), and where
    a scan of it had got to."""
    del protocol._buffer[:]
    vars(protocol).pop(SCAN_STATE, None)


class Pipelined:
    """One exchange: `commands` (command lines without CRLF, checked as aiosmtplib checks a
    command's arguments) written at once by `start()`; `next()` is each reply in turn,
    awaited within `timeout`, raising aiosmtplib's errors as `SMTPProtocol.execute_command`
    does; `close()` ends the exchange, always (replies not taken are not read). After a
    timeout or a lost connection the caller closes the connection, as aiosmtplib's
    `SMTP.execute_command` does: replies left unread would answer later commands."""

    def __init__(self, protocol: SMTPProtocol, commands: Sequence[bytes], timeout: float | None) -> None:
        self._protocol = protocol
        self._commands = commands
        self._timeout = timeout
        self._replies: _Replies | None = None
        self._lock: asyncio.Lock | None = None
        self._taken = 0

    async def start(self) -> None:
        for command in self._commands:
            if COMMAND_INJECTION_REGEX.search(command):
                raise ValueError("Command arg contains a prohibited control character")
        protocol = self._protocol
        lock = protocol._command_lock
        if lock is None:
            raise SMTPServerDisconnected("Server not connected")
        await lock.acquire()
        self._lock = lock
        if protocol._response_waiter is None:  # lost meanwhile
            raise SMTPServerDisconnected("Connection lost")
        # No reply is due (the lock is held): what is buffered came unasked, in the same read
        # as an earlier reply (aiosmtplib drops only what arrives between commands), and
        # would be taken as MAIL's reply, every later one moved by one.
        discard_buffered(protocol)
        loop = asyncio.get_running_loop()
        self._replies = _Replies(protocol, [loop.create_future() for _ in self._commands])
        protocol._response_waiter = self._replies  # type: ignore[assignment]
        protocol._response_pending = True
        protocol.write(b"".join(command + b"\r\n" for command in self._commands))

    async def next(self) -> SMTPResponse:
        if self._replies is None or self._taken >= len(self._replies.futures):
            raise RuntimeError("no reply expected")
        reply = self._replies.futures[self._taken]
        self._taken += 1
        try:
            async with asyncio.timeout(self._timeout):
                return await reply
        except TimeoutError:
            raise SMTPReadTimeoutError("Timed out waiting for server response") from None

    def close(self) -> None:
        protocol = self._protocol
        replies, self._replies = self._replies, None
        if replies is not None:
            replies.close()
            if cast(object, protocol._response_waiter) is replies:
                protocol._response_pending = False
                # Every reply is in (or the connection is given up): anything after the last
                # one, in its read, came unasked and would answer the next command.
                discard_buffered(protocol)
                # As aiosmtplib's read_response leaves it: a fresh waiter, or none once lost.
                loop = asyncio.get_running_loop()
                protocol._response_waiter = None if protocol.transport is None else loop.create_future()
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()


class _Replies:
    """The protocol's response waiter during an exchange (the parts of a Future that
    `SMTPProtocol` uses): done once every expected reply is in."""

    __slots__ = ("protocol", "futures", "_next")

    def __init__(self, protocol: SMTPProtocol, futures: list[asyncio.Future[SMTPResponse]]) -> None:
        self.protocol = protocol
        self.futures = futures
        self._next = 0

    def done(self) -> bool:
        return self._next >= len(self.futures)

    def set_result(self, response: SMTPResponse) -> None:
        self._fill(response)
        # The next replies may be complete in the buffer already (the same read): taken now,
        # as no further read may come to parse them.
        while not self.done() and self.protocol._buffer:
            try:
                following = self.protocol._read_response_from_buffer()
            except Exception as exc:  # a malformed reply, as aiosmtplib's data_received
                self.set_exception(exc)
                return
            if following is None:
                return
            self._fill(following)

    def set_exception(self, exc: BaseException) -> None:
        while not self.done():
            self._fill(exc)

    def _fill(self, outcome: SMTPResponse | BaseException) -> None:
        future = self.futures[self._next]
        self._next += 1
        if future.done():  # cancelled: its wait timed out, the exchange is ending
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
            future.exception()  # retrieved: an exchange ended early leaves none unawaited
        else:
            future.set_result(outcome)

    def exception(self) -> BaseException | None:
        return None  # aiosmtplib marks its waiter's exception retrieved; done per future above

    def close(self) -> None:
        """The exchange is over (or abandoned): replies not in yet will never be read."""
        for future in self.futures[self._next :]:
            future.cancel()
        self._next = len(self.futures)
