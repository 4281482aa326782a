"""The From fast path (relay.message._PLAIN_FROM) against the full parse it stands in for
(email.utils.getaddresses): wherever the fast path matches, the full parse finds exactly
the same one address; and the Received date made once per second is the standard
library's text for that second."""

from __future__ import annotations

import datetime
import email.utils
import time

import hypothesis.strategies as st
import pytest
from hypothesis import example, given, settings

from relay.errors import SmtpError
from relay.message import _PLAIN_FROM, Message, _parsed_addresses
from relay.pipeline import _DateOfSecond

# Characters that matter to RFC 5322 address syntax, and plain ones.
_TRICKY = " \t.@<>\"(),;:\\[]_+-!#$%&'*/=?^`{|}~aZ09é"
_PLAIN = st.text(alphabet="aZ09", min_size=1, max_size=4)


def _mostly_plain(tricky: str) -> st.SearchStrategy[str]:
    """Plain words, now and then one with characters that matter."""
    around = st.text(alphabet="aZ09", max_size=2)
    return st.one_of(_PLAIN, _PLAIN, st.builds(lambda a, c, b: a + c + b, around, st.sampled_from(tricky), around))


def _from_value() -> st.SearchStrategy[str]:
    """Values near the fast path's shapes: plain forms with tricky characters mixed in."""
    local = st.lists(_mostly_plain('_+-.é"!#'), min_size=1, max_size=3).map(".".join)
    domain = st.lists(_mostly_plain("-.é[]_"), min_size=1, max_size=3).map(".".join)
    address = st.builds(lambda lo, sep, do: f"{lo}{sep}{do}", local, st.sampled_from(["@", "@", "@", "@@", ""]), domain)
    name = st.lists(_mostly_plain(_TRICKY), max_size=3).map(" ".join)
    shaped = st.one_of(
        address,
        address.map(lambda a: f"<{a}>"),
        st.builds(lambda n, a: f"{n}<{a}>", name, address),
        st.builds(lambda n, a: f"{n} <{a}>", name, address),
        st.builds(lambda n, a, t: f"{n} <{a}>{t}", name, address, st.text(alphabet=_TRICKY, max_size=3)),
    )
    return st.one_of(shaped, st.text(alphabet=_TRICKY, max_size=30))


@settings(max_examples=3000, deadline=None)
@given(_from_value())
@example("Alice Example <alice@example.com>")
@example("alice@example.com")
@example("<alice@example.com>")
@example("Alice<a.b@c.d>")
@example("a.@b")
@example("a..b@c")
@example("a@b..c")
@example("A B  <a@b>")
@example("x,y <a@b>")
@example("a( b <c@d>")
@example("a@b.")
def test_the_fast_path_finds_what_the_full_parse_finds(value: str) -> None:
    plain = _PLAIN_FROM.fullmatch(value)
    if plain is not None:
        assert _parsed_addresses(value) == [plain.group(1) or plain.group(2)]


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("Alice Example <alice@Example.COM>", "alice@Example.COM"),
        ("bob.smith+tag@mail.example.org", "bob.smith+tag@mail.example.org"),
        ("<x@y>", "x@y"),
        ('"Smith, Bob" <bob@example.org>', "bob@example.org"),  # the full parse
        ("Bob (work) <bob@example.org>", "bob@example.org"),
    ],
)
def test_from_domain_of_common_shapes(value: str, address: str) -> None:
    message = Message.parse(f"From: {value}\r\nSubject: x\r\n\r\nbody\r\n".encode())
    assert message.from_domain() == (address, address.rpartition("@")[2].lower())


@pytest.mark.parametrize("value", ["a@b, c@d", "Alice <a@b> <c@d>", "nobody", "<>"])
def test_from_without_exactly_one_address_is_refused(value: str) -> None:
    message = Message.parse(f"From: {value}\r\n\r\nbody\r\n".encode())
    with pytest.raises(SmtpError) as refused:
        message.from_domain()
    assert refused.value.label == "bad_from"


def _offset_changes(year: int) -> list[int]:
    """The seconds at which the local UTC offset changes during `year` (daylight saving)."""
    start = int(datetime.datetime(year, 1, 1, tzinfo=datetime.UTC).timestamp())
    changes = []
    for hour in range(start, start + 366 * 86400, 3600):
        if time.localtime(hour).tm_gmtoff != time.localtime(hour + 3600).tm_gmtoff:
            low, high = hour, hour + 3600  # the offset changes in (low, high]
            while high - low > 1:
                middle = (low + high) // 2
                if time.localtime(middle).tm_gmtoff == time.localtime(low).tm_gmtoff:
                    low = middle
                else:
                    high = middle
            changes.append(high)
    return changes


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "America/St_Johns", "Australia/Lord_Howe"])
def test_received_date_is_the_standard_librarys_text(zone: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        if zone != "UTC":
            assert len(_offset_changes(2026)) == 2
        date = _DateOfSecond()
        seconds = [int(time.time())]
        for change in _offset_changes(2026):
            seconds += range(change - 3, change + 4)
        for second in seconds:
            moment = datetime.datetime.fromtimestamp(second, datetime.UTC)
            assert date(second) == email.utils.format_datetime(email.utils.localtime(moment))
    finally:
        monkeypatch.undo()
        time.tzset()
