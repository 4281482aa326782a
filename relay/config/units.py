"""Human units in the config: sizes (`25MiB`), durations (`5m`), binds (`host:port`)."""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Annotated, NamedTuple

from pydantic import BeforeValidator, PlainSerializer

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "ki": 1024,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mi": 1024**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gi": 1024**3,
    "gib": 1024**3,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_FACTORS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(value: object) -> int:
    """`25MiB` → 26214400. Plain integers are bytes; KB/MB are decimal, KiB/MiB binary."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 25MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("size must not be negative")
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"expected a size like 25MiB or 10MB, got {value!r}")
    number, unit = match.groups()
    return int(float(number) * _SIZE_FACTORS[(unit or "").lower()])


def parse_duration(value: object) -> float:
    """`5m` → 300.0, `1h30m` → 5400.0, `500ms` → 0.5; a bare number is seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s or 5m")
    if isinstance(value, int | float):
        if not math.isfinite(value):  # YAML's .inf and .nan
            raise ValueError("expected a duration like 30s or 5m")
        if value < 0:
            raise ValueError("duration must not be negative")
        return float(value)
    text = str(value).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"expected a duration like 30s, 5m or 1h30m, got {value!r}")
    return sum(float(n) * _DURATION_FACTORS[u] for n, u in parts)


def parse_rate(value: object) -> float:
    """`14/s` → 14.0 per second, `600/m` → 10.0, `3600/h` → 1.0, `100/5m`, `50000/d`: the
    grammar of `limits.*.rate`; a bare number is per second."""
    from relay.limits.rules import split_rate  # one grammar for every rate in the config

    if isinstance(value, bool):
        raise ValueError("expected a rate like 14/s")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value <= 0:  # YAML's .inf and .nan too
            raise ValueError("rate must be a positive number, like 14/s")
        return float(value)
    parts = split_rate(str(value))
    if parts is None:
        raise ValueError(f"expected a rate like 14/s, 600/m or 3600/h, got {value!r}")
    count, seconds = parts
    if float(count) <= 0 or seconds <= 0:
        raise ValueError("rate must be positive")
    return float(count) / seconds


class HostPort(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_hostport(value: object) -> HostPort:
    """`0.0.0.0:587`, `[::]:587`, `localhost:2525`."""
    if isinstance(value, HostPort):
        return value
    text = str(value).strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or ":" in host and not text.startswith("["):
        raise ValueError(f"expected host:port (IPv6 as [::1]:587), got {value!r}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"port must be 1-65535, got {port!r}")
    return HostPort(host, int(port))


Size = Annotated[int, BeforeValidator(parse_size)]
Duration = Annotated[float, BeforeValidator(parse_duration)]
Rate = Annotated[float, BeforeValidator(parse_rate)]  # per second
Bind = Annotated[HostPort, BeforeValidator(parse_hostport), PlainSerializer(str)]
