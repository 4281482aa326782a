"""WireMessage.header_isascii: the header section of a message in pieces, found in place."""

from __future__ import annotations

import pytest

from relay.message import Message, WireMessage


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"Subject: hi\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n", True),  # 8-bit body only
        (b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nhi\r\n", False),
        (b"Subject: hi\r\nX: \xc3\xa9\r\n\r\n", False),
        (b"Subject: hi\r\n\r\n", True),
    ],
)
def test_the_header_section_alone_decides(raw, expected):
    message = Message.parse(raw)
    assert message.wire(b"DKIM-Signature: v=1\r\n").header_isascii() is expected
    assert Message.parse(raw).wire().header_isascii() is expected
    assert WireMessage([raw]).header_isascii() is expected  # a spooled message: one piece
