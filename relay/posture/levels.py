"""How bad a posture finding is: ok (✓), warn (!) or fail (✗). A warning never fails a check."""

from __future__ import annotations

from collections.abc import Iterable

OK, WARN, FAIL = "ok", "warn", "fail"
MARKS = {OK: "✓", WARN: "!", FAIL: "✗"}
_RANK = {OK: 0, WARN: 1, FAIL: 2}


def worst(levels: Iterable[str]) -> str:
    return max(levels, key=_RANK.__getitem__, default=OK)
