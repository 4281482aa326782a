"""relay.deliver.pipelining on aiosmtplib's own SMTPProtocol, fed as a transport feeds it:
every reply of an exchange is read, in order, however the replies are cut into reads, and
the protocol is left as after any command. The transport is a stand-in that records what
is written (the one stage under test); tests/test_upstream_pipelining.py runs the same over
real sockets."""

from __future__ import annotations

import asyncio
import inspect

import aiosmtplib
import pytest
from aiosmtplib.protocol import SMTPProtocol

from relay.deliver import pipelining
from relay.deliver.pipelining import Pipelined
from relay.listen import patches


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


async def _connected() -> tuple[SMTPProtocol, _Transport]:
    patches.apply()  # as the relay runs: patch 6 parses replies
    protocol = SMTPProtocol(loop=asyncio.get_running_loop())
    transport = _Transport()
    protocol.connection_made(transport)
    protocol.data_received(b"220 up ESMTP\r\n")
    await protocol.read_response(timeout=5)  # the greeting
    return protocol, transport


COMMANDS = [b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.net> NOTIFY=NEVER"]
REPLIES = b"250 2.1.0 Ok\r\n550-5.1.1 no\r\n550 5.1.1 such user\r\n"
EXPECTED = [(250, "2.1.0 Ok"), (550, "5.1.1 no\n5.1.1 such user")]


def _cuts(data: bytes) -> list[list[bytes]]:
    """`data` as one read, as two reads at every position, and a byte per read."""
    return [[data]] + [[data[:i], data[i:]] for i in range(1, len(data))] + [[bytes([b]) for b in data]]


@pytest.mark.parametrize("reads", _cuts(REPLIES))
async def test_every_reply_is_read_in_order_however_the_reads_cut_them(reads: list[bytes]) -> None:
    """Including both replies in one read (aiosmtplib alone leaves the second in its buffer
    unparsed) and the second arriving before the first is picked up (dropped otherwise)."""
    protocol, transport = await _connected()
    exchange = Pipelined(protocol, COMMANDS, timeout=5)
    await exchange.start()
    for data in reads:  # all before the exchange reads a reply: the hardest order
        protocol.data_received(data)
    try:
        replies = [await exchange.next(), await exchange.next()]
    finally:
        exchange.close()
    assert [(r.code, r.message) for r in replies] == EXPECTED
    assert transport.written[-1] == b"".join(c + b"\r\n" for c in COMMANDS)  # one write


@pytest.mark.parametrize("split", [0, 14, 20, len(REPLIES)])
async def test_replies_that_arrive_while_the_exchange_waits(split: int) -> None:
    protocol, _ = await _connected()
    loop = asyncio.get_running_loop()
    exchange = Pipelined(protocol, COMMANDS, timeout=5)
    await exchange.start()
    first = loop.create_task(exchange.next())
    await asyncio.sleep(0)
    protocol.data_received(REPLIES[:split] or REPLIES)
    if split:
        loop.call_soon(protocol.data_received, REPLIES[split:])
    try:
        replies = [await first, await exchange.next()]
    finally:
        exchange.close()
    assert [(r.code, r.message) for r in replies] == EXPECTED


async def test_the_protocol_reads_the_next_command_as_before() -> None:
    protocol, _ = await _connected()
    waiter = protocol._response_waiter
    exchange = Pipelined(protocol, COMMANDS, timeout=5)
    await exchange.start()
    protocol.data_received(REPLIES)
    await exchange.next()
    await exchange.next()
    exchange.close()
    assert protocol._response_waiter is not waiter and not protocol._response_waiter.done()
    assert not protocol._response_pending and not protocol._command_lock.locked()
    protocol.data_received(b"250 unsolicited\r\n")  # between commands: dropped, as before
    command = asyncio.get_running_loop().create_task(protocol.execute_command(b"RSET", timeout=5))
    await asyncio.sleep(0)
    protocol.data_received(b"250 2.0.0 reset\r\n")
    assert (await command).message == "2.0.0 reset"


async def test_a_reply_not_read_is_not_paired_with_a_later_command() -> None:
    """An exchange left after its first reply (the caller closes such a connection) leaves
    no half-read state: the next reply goes to the next command's waiter."""
    protocol, _ = await _connected()
    exchange = Pipelined(protocol, COMMANDS, timeout=5)
    await exchange.start()
    protocol.data_received(b"250 ok\r\n")
    await exchange.next()
    exchange.close()
    assert not protocol._command_lock.locked() and not protocol._response_waiter.done()


async def test_a_lost_connection_fails_the_replies_not_in() -> None:
    protocol, _ = await _connected()
    exchange = Pipelined(protocol, COMMANDS, timeout=5)
    await exchange.start()
    protocol.data_received(b"250 ok\r\n")
    protocol.connection_lost(None)
    try:
        assert (await exchange.next()).code == 250
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await exchange.next()
    finally:
        exchange.close()
    assert protocol._response_waiter is None  # as aiosmtplib leaves a lost connection


async def test_eof_fails_the_replies_not_in() -> None:
    protocol, _ = await _connected()
    exchange = Pipelined(protocol, COMMANDS, timeout=5)
    await exchange.start()
    protocol.eof_received()
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await exchange.next()
    exchange.close()


async def test_a_malformed_reply_is_aiosmtplibs_error() -> None:
    protocol, _ = await _connected()
    exchange = Pipelined(protocol, COMMANDS, timeout=5)
    await exchange.start()
    protocol.data_received(b"250 ok\r\nxyz garbage\r\n")
    try:
        assert (await exchange.next()).code == 250
        with pytest.raises(aiosmtplib.SMTPResponseException, match="Malformed"):
            await exchange.next()
    finally:
        exchange.close()


async def test_a_reply_not_in_time_is_a_read_timeout_and_later_data_is_harmless() -> None:
    protocol, _ = await _connected()
    exchange = Pipelined(protocol, COMMANDS, timeout=0)
    await exchange.start()
    with pytest.raises(aiosmtplib.SMTPReadTimeoutError):
        await exchange.next()
    protocol.data_received(REPLIES)  # late: no error inside the protocol's callback
    exchange.close()


async def test_a_command_with_a_line_break_is_refused_as_aiosmtplib_refuses_it() -> None:
    protocol, transport = await _connected()
    with pytest.raises(ValueError):
        await Pipelined(protocol, [b"MAIL FROM:<a@b>", b"RCPT TO:<a@b>\r\nDATA"], 5).start()
    assert transport.written == [] and not protocol._command_lock.locked()


def test_the_private_members_it_uses_exist() -> None:
    source = inspect.getsource(SMTPProtocol)
    for name in pipelining.PROTOCOL_PRIVATE_MEMBERS:
        assert f"self.{name} = " in source or callable(getattr(SMTPProtocol, name, None)), name


async def test_replies_after_an_unasked_one_are_their_commands_own() -> None:
    """Data in the same read as an exchange's last reply came unasked: it is dropped, not
    taken as the next command's reply (nor is anything left before the next exchange)."""
    protocol, _ = await _connected()
    exchange = Pipelined(protocol, COMMANDS, timeout=5)
    await exchange.start()
    protocol.data_received(REPLIES + b"250 2.0.0 Unasked\r\n250-partial")
    replies = [await exchange.next(), await exchange.next()]
    exchange.close()
    assert [(r.code, r.message) for r in replies] == EXPECTED
    command = asyncio.get_running_loop().create_task(protocol.execute_command(b"RSET", timeout=5))
    await asyncio.sleep(0)
    protocol.data_received(b"250 2.0.0 reset\r\n")
    assert (await command).message == "2.0.0 reset"


async def test_a_discarded_partial_reply_leaves_no_scan_behind() -> None:
    """Patch 6 resumes its scan where it stopped unless the buffer shrank: a buffer emptied
    and then filled to the same length again would be scanned from past its end, and a
    complete reply never seen."""
    protocol, _ = await _connected()
    protocol._buffer.extend(b"250-part\r\n")
    assert protocol._read_response_from_buffer() is None
    pipelining.discard_buffered(protocol)
    protocol._buffer.extend(b"250 Okay\r\n")
    response = protocol._read_response_from_buffer()
    assert response is not None and (response.code, response.message) == (250, "Okay")
