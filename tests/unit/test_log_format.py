"""The JSON line's text is what it was before its fast path: the same fields in the same
order, encoded as `json.dumps(fields, default=str, ensure_ascii=False)`; and the message
line written without the caller search is the line `Logger.info` writes."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator

import pytest

from relay.observe import messages
from relay.observe.logs import _STANDARD, JsonFormatter

FIELDS: dict[str, object] = {
    "event": "message",
    "id": "0123456789abcdef",
    "client": "127.0.0.1",
    "user": "app",
    "from_domain": "exämple.com",
    "recipients": 2,
    "dkim": ["example.com/s1"],
    "failovers": None,
    "queued": False,
    "duration_ms": 3.2,
    "odd": {1, 2},  # not JSON: str()
}


def reference_line(record: logging.LogRecord) -> str:
    """The formatter as it was: every attribute not standard nor private, in order."""
    out = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(record.created))) + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    for key, value in vars(record).items():
        if key not in _STANDARD and not key.startswith("_"):
            out[key] = value
    return json.dumps(out, default=str, ensure_ascii=False)


def record(extra: dict[str, object], msg: str = "relayed %s", args: tuple[object, ...] = ("x",)) -> logging.LogRecord:
    return logging.getLogger("relay.test").makeRecord(
        "relay.test", logging.INFO, __file__, 1, msg, args, None, extra=extra
    )


@pytest.mark.parametrize(
    "extra",
    [FIELDS, {}, {"_private": 1, "b": 2}, {"ts": "overridden", "level": "also"}, dict(reversed(list(FIELDS.items())))],
)
def test_the_line_is_the_reference_line(extra: dict[str, object]) -> None:
    formatter = JsonFormatter()
    for _ in range(2):  # the second time through the cached field names
        line = record(extra)
        assert formatter.format(line) == reference_line(line)


def test_a_filter_that_adds_an_attribute_shows_in_the_line() -> None:
    line = record(FIELDS)
    JsonFormatter().format(line)
    line.added_later = "yes"
    assert JsonFormatter().format(line) == reference_line(line)
    assert '"added_later": "yes"' in JsonFormatter().format(line)


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("relay.message")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_the_message_line_is_the_loggers_line(captured: io.StringIO) -> None:
    messages.message_log.info("relayed", extra=FIELDS)
    messages._message_line("relayed", FIELDS)
    by_logger, direct = (json.loads(line) for line in captured.getvalue().splitlines())
    del by_logger["ts"], direct["ts"]
    assert list(direct.items()) == list(by_logger.items())


def test_the_message_line_follows_the_level(captured: io.StringIO) -> None:
    logging.getLogger("relay.message").setLevel(logging.WARNING)
    messages._message_line("relayed", FIELDS)
    assert captured.getvalue() == ""
