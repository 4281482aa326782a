"""Logging: one JSON object per line (or readable text), fields passed as `extra`.

aiosmtpd logs every command line, AUTH credentials included, at INFO on `mail.log`; that
logger is held at WARNING whatever the configured level, so no credential reaches a log.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
# One encoder for every line: json.dumps() with options builds a new one per call.
_ENCODE = json.JSONEncoder(default=str, ensure_ascii=False).encode


def _extra_keys(keys: tuple[str, ...]) -> tuple[str, ...]:
    """The `extra` fields among a record's attributes, in order."""
    return tuple(key for key in keys if key not in _STANDARD and not key.startswith("_"))


# A record's attribute names, mostly the same few tuples (one per kind of line): the
# filtering is done once per tuple. Bounded: an unseen tuple past the limit is filtered anew.
_EXTRA_KEYS: dict[tuple[str, ...], tuple[str, ...]] = {}
_EXTRA_KEYS_LIMIT = 512


class JsonFormatter(logging.Formatter):
    # The timestamp up to the second, made once per second: strftime per line was most of
    # the cost of the one line per message after the JSON encoding.
    _second = -1
    _stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        out = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        attributes = vars(record)
        names = tuple(attributes)
        extra = _EXTRA_KEYS.get(names)
        if extra is None:
            extra = _extra_keys(names)
            if len(_EXTRA_KEYS) < _EXTRA_KEYS_LIMIT:
                _EXTRA_KEYS[names] = extra
        for key in extra:
            out[key] = attributes[key]
        if record.exc_info and record.exc_info[0] is not None:
            out["exception"] = self.formatException(record.exc_info)
        return _ENCODE(out)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        extras = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_"))
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extras:
            line += f" {extras}"
        if record.exc_info and record.exc_info[0] is not None:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx2/httpcore2 (token requests): relay.oauth logs each fetch and failure itself.
    noisy_loggers = ("mail.log", "aiosmtplib", "asyncio", "botocore", "aiobotocore", "urllib3", "aiohttp.access")
    for noisy in (*noisy_loggers, "httpx2", "httpcore2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
