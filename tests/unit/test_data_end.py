"""The edge's DATA reader as a unit (`RelaySMTP._read_data`): where the message ends
(CRLF.CRLF, RFC 5321 §4.1.1.4) however the bytes arrive, what comes after it stays for the
command loop (RFC 2920 pipelining), the size limit, and the work it does per block read,
not per line. The reader is a real asyncio StreamReader fed piece by piece; the session
around it is a stub with the attributes the method uses."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from relay.listen.budget import DataBudget
from relay.listen.smtp import RelaySMTP

NEXT = b"MAIL FROM:<a@example.com>\r\n"  # a pipelined command after the end of data

CONTENTS = {
    "empty": b"",
    "one empty line": b"\r\n",
    "one line": b"a\r\n",
    "stuffed dot": b"..\r\n",
    "dot lines": b"..\r\nx.\r\n...\r\n",  # stuffed: ".", "x.", ".."
    "end look-alikes": b"a\n.\nb\r.\r\nc\r\n",
    "headers and body": b"From: a@example.com\r\n\r\nHi.\r\n",
    "over one block": b"x" * 70_000 + b"\r\n.." + b"y" * 70_000 + b"\r\n",
}


def session(limit: int = 0) -> SimpleNamespace:
    state = SimpleNamespace(
        _reader=asyncio.StreamReader(limit=64 * 1024),
        data_size_limit=limit,
        _budget=DataBudget(1 << 30),
        _over_budget=False,
        _budget_held=0,
        resets=0,
    )

    def reset_timeout(duration: float | None = None) -> None:
        state.resets += 1

    state._reset_timeout = reset_timeout
    return state


async def read_data(state: SimpleNamespace, pieces: list[bytes]) -> tuple[bytes | None, int]:
    async def feed() -> None:
        for piece in pieces:
            state._reader.feed_data(piece)
            await asyncio.sleep(0)  # the reader takes each piece as its own read

    feeding = asyncio.create_task(feed())
    result = await RelaySMTP._read_data(state)  # type: ignore[arg-type]
    await feeding
    return result


async def rest(state: SimpleNamespace) -> bytes:
    state._reader.feed_eof()
    return await state._reader.read()


def splits(wire: bytes) -> list[list[bytes]]:
    """The wire whole, cut once at every place near the end of data, and byte by byte."""
    end = len(wire) - len(NEXT)
    cuts = [[wire]] + [[wire[:i], wire[i:]] for i in range(max(1, end - 8), len(wire))]
    if len(wire) < 200:
        cuts.append([wire[i : i + 1] for i in range(len(wire))])
    return cuts


@pytest.mark.parametrize("content", list(CONTENTS.values()), ids=list(CONTENTS))
async def test_the_message_ends_at_crlf_dot_crlf_however_it_arrives(content):
    wire = content + b".\r\n" + NEXT
    for pieces in splits(wire):
        state = session()
        assert await read_data(state, pieces) == (content, len(content)), [len(p) for p in pieces]
        assert await rest(state) == NEXT  # left for aiosmtpd's command loop


async def test_over_the_limit_the_rest_is_still_read_and_the_size_told():
    content = b"z" * 99 + b"\r\n"
    state = session(limit=100)
    assert await read_data(state, [content + b".\r\n" + NEXT]) == (None, 101)
    assert await rest(state) == NEXT
    state = session(limit=101)
    assert await read_data(state, [content[:50], content[50:] + b".\r\n" + NEXT]) == (content, 101)


async def test_work_is_per_block_read_not_per_line_ending_in_a_dot():
    # 100,000 lines of "..": reading up to each ".\r\n" took one round (and one timer reset)
    # per line, a Python round per 4 bytes.
    content = b"..\r\n" * 100_000
    wire = content + b".\r\n" + NEXT
    state = session()
    blocks = [wire[i : i + 65536] for i in range(0, len(wire), 65536)]
    assert await read_data(state, blocks) == (content, len(content))
    assert state.resets <= len(blocks)
    assert await rest(state) == NEXT
