"""Every refusal relay itself can send (a literal code and enhanced code in relay/) is in
README's "What each reply means" table. Replies passed through from an upstream carry the
upstream's codes and are the table's last row."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).parents[2]
_REPLY_TEXT = re.compile(r"^([45]\d\d) ([45]\.\d{1,3}\.\d{1,3})\b")
_TABLE_CODE = re.compile(r"^(?:(\d{3}) )?([245]\.\d{1,3}\.\d{1,3})\b")


def replies_in_code() -> dict[tuple[int, str], str]:
    """(code, enhanced) → where, for every 4xx/5xx relay builds from literals."""
    found: dict[tuple[int, str], str] = {}
    for path in sorted((REPO / "relay").rglob("*.py")):
        where = str(path.relative_to(REPO))
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("SmtpError", "Reply"):
                args = node.args[:2]
                if len(args) == 2 and all(isinstance(a, ast.Constant) for a in args):
                    code, enhanced = args[0].value, args[1].value  # type: ignore[attr-defined]
                    if isinstance(code, int) and code >= 400:
                        found.setdefault((code, enhanced), f"{where}:{node.lineno}")
            # The edge writes some replies as text (aiosmtpd's own, reworded, and raw bytes).
            elif path.parent.name == "listen" and isinstance(node, ast.Constant):
                value = node.value.decode() if isinstance(node.value, bytes) else node.value
                if isinstance(value, str) and (match := _REPLY_TEXT.match(value)):
                    found.setdefault((int(match.group(1)), match.group(2)), f"{where}:{node.lineno}")
    return found


def replies_in_readme() -> set[tuple[int, str]]:
    text = (REPO / "README.md").read_text()
    table = text.split("## What each reply means", 1)[1].split("\n## ", 1)[0]
    found = set()
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        code = None
        for token in re.findall(r"`([^`]+)`", row):
            match = _TABLE_CODE.match(token)
            if match:
                code = int(match.group(1)) if match.group(1) else code
                if code is not None:
                    found.add((code, match.group(2)))
    return found


def test_every_reply_relay_sends_is_in_the_readme_table():
    documented = replies_in_readme()
    assert (554, "5.7.1") in documented  # the parser reads the table
    missing = {reply: where for reply, where in replies_in_code().items() if reply not in documented}
    assert not missing, "replies missing from README's table:\n" + "\n".join(
        f"  {code} {enhanced} ({where})" for (code, enhanced), where in sorted(missing.items())
    )
