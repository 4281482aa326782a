"""The relaxed-body fast path gives exactly dkimpy's result, for bodies that take it and
for bodies that do not."""

import pytest
from dkim.canonicalization import Relaxed

from relay.sign.dkim import relaxed_body

BODIES = [
    b"",
    b"\r\n",
    b"\r\n\r\n",
    b"one line\r\n",
    b"one line",
    b"trailing \r\n",
    b"tab\there\r\n",
    b"double  space\r\n",
    b"end\r\n\r\n\r\n",
    b" lead\r\n",
    b"a\r\n \r\n",
    b"x" * 5000 + b"\r\n",
    b"last line no crlf ",
    b"mixed \t \r\nnext\r\n\r\n",
]


@pytest.mark.parametrize("body", BODIES)
def test_fast_path_matches_dkimpy(body):
    assert relaxed_body(body) == Relaxed.canonicalize_body(body)
