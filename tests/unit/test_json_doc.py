"""docs/json.md and the JSON the commands print agree: every key the code emits is
documented with its JSON type, and every documented key is emitted.

The keys come from real output, never from a list written here: `relay check --json` from
the outputs tests/test_posture.py keeps in tests/data/check/ and from `CheckReport.to_json`
over a report of real parts (the keys that only OAuth upstreams and shared limits bring);
`relay dkim status --json` from `status_command` over a key set half-way through a rotation
(the rotation tests' own setup); `relay queue list --json` and `relay queue show` from the
commands themselves over a spool the library filled, with a damaged entry."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay import cli
from relay.config.load import load_settings
from relay.posture.assess import KeySpec, assess_domain
from relay.posture.egress import Egress
from relay.posture.levels import OK
from relay.posture.report import CheckReport, LimitsCheck, TokenCheck, UpstreamCheck
from relay.queue.entry import FAILED, QueueEntry, RecipientState
from relay.queue.store import Spool
from relay.rotate.command import status_command
from relay.sign.keys import load_signing_key
from tests.support.clock import DAY
from tests.unit.test_rotate import World, Zone, write_key

REPO = Path(__file__).parents[2]
DOC = REPO / "docs" / "json.md"
DATA = REPO / "tests" / "data"
CHECK = "relay check --json"
DKIM_STATUS = "relay dkim status --json"
QUEUE_LIST = "relay queue list --json"
QUEUE_SHOW = "relay queue show ID"

_TYPES = {"string", "integer", "number", "boolean", "null", "array", "object"}
_PATH = re.compile(r"^[a-z0-9_]+(?:\[\])?(?:\.[a-z0-9_]+(?:\[\])?)*$")


# -- the document ---------------------------------------------------------------------------


def documented() -> dict[str, dict[str, set[str]]]:
    """Section ("relay check --json") → key path → the JSON types its row names.

    A `### a.b[]` heading inside a section puts the rows below it under that path."""
    sections: dict[str, dict[str, set[str]]] = {}
    keys: dict[str, set[str]] | None = None
    prefix = ""
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            keys = sections.setdefault(title, {}) if title.startswith("relay ") else None
            prefix = ""
        elif line.startswith("### "):
            heading = line[4:].strip()
            prefix = heading + "." if _PATH.match(heading) else ""
        elif keys is not None and line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
            path = prefix + cells[0].strip("`")
            assert _PATH.match(path), f"docs/json.md: not a key path: {path!r}"
            assert path not in keys, f"docs/json.md: {path} is listed twice under {title!r}"
            keys[path] = set(re.findall(r"[a-z]+", cells[1])) & _TYPES
    return sections


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}[type(value)]


def emitted(documents: Iterable[Any], *, top_array: bool = False) -> dict[str, set[str]]:
    """Key path → the JSON types seen there, over every document (objects inside arrays
    are `key[]`; with `top_array`, each element of a top-level array is a document)."""
    found: dict[str, set[str]] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                inner = f"{path}.{key}" if path else key
                found.setdefault(inner, set()).add(_json_type(item))
                walk(item, inner)
        elif isinstance(value, list):
            for item in value:
                walk(item, path + "[]")

    for document in documents:
        for item in document if top_array else [document]:
            walk(item, "")
    return found


def assert_documented(section: str, seen: dict[str, set[str]], *, also: dict[str, set[str]] | None = None) -> None:
    """Every emitted key is in the section (or in `also`, a section it includes), with its
    types; every key of the section is emitted."""
    docs = documented()
    assert section in docs, f"docs/json.md has no section '## {section}'"
    rows, known = docs[section], {**(also or {}), **docs[section]}
    assert seen, "no output to compare"
    undocumented = sorted(set(seen) - set(known))
    assert not undocumented, f"emitted by `{section}` but not in docs/json.md: {undocumented}"
    never = sorted(set(rows) - set(seen))
    assert not never, f"in docs/json.md under `{section}` but never emitted: {never}"
    wrong = {
        path: (sorted(known[path]), sorted(types))
        for path, types in seen.items()
        if not all(t in known[path] or (t == "integer" and "number" in known[path]) for t in types)
    }
    assert not wrong, f"`{section}`: documented types vs emitted types: {wrong}"


# -- relay check --json ----------------------------------------------------------------------


async def check_report() -> dict[str, Any]:
    """A report with every part a check can have: an OAuth upstream's token and the shared
    limits' Redis too, which the saved outputs do not have."""
    pem = (DATA / "dns" / "keys" / "ed25519.pem").read_bytes()
    key = load_signing_key(pem, domain="example.com", selector="ed1", algorithm="ed25519-sha256")
    zone = Zone()  # the DNS service is the seam, as in the rotation tests
    zone.records.update(
        {
            "example.com": ["v=spf1 ip4:192.0.2.0/24 -all"],
            "ed1._domainkey.example.com": [key.txt_value()],
            "_dmarc.example.com": ["v=DMARC1; p=reject; rua=mailto:dmarc@example.com"],
        }
    )
    spec = KeySpec("example.com", "ed1", "ed25519-sha256", key)
    domain = await assess_domain(zone, "example.com", [spec], ["192.0.2.10"])
    report = CheckReport(
        upstream=UpstreamCheck("smarthost", True, "reachable", "upstream.test ESMTP", ("tls: none",)),
        egress=Egress(("192.0.2.10",), "config"),
        egress_level=OK,
        domains=[domain],
        tokens=[TokenCheck("smarthost", "microsoft", "https://login.test/token", False, "timeout: x", "timeout")],
        limits=LimitsCheck("redis", "redis://127.0.0.1:6379/0", True, "the limit script runs"),
    )
    # Through text, as the command prints it: a value JSON cannot carry fails here.
    return json.loads(json.dumps(report.to_json(), sort_keys=True))


def test_relay_check_json_is_documented():
    saved = [json.loads(path.read_text()) for path in sorted((DATA / "check").glob("*.json"))]
    assert len(saved) >= 3
    assert_documented(CHECK, emitted([*saved, asyncio.run(check_report())]))


# -- relay dkim status --json ------------------------------------------------------------------


def test_relay_dkim_status_json_is_documented(tmp_path):
    # example.com: a key set half-way through a rotation (the rotation tests' World);
    # example.net: a static key; example.org: a key set whose document is not written yet.
    world = World(tmp_path)
    asyncio.run(world.run())
    net_key = write_key(tmp_path / "net.key")
    config = {
        "listeners": [{"name": "plain", "bind": "127.0.0.1:2525", "tls": "none", "auth": "none"}],
        "upstream": {"host": "127.0.0.1", "port": 2526, "tls": "none"},
        "dkim": {
            "keys": [
                *(k.model_dump() for k in world.static),
                {"domain": "example.net", "selector": "s1", "key": net_key},
            ],
            "key_sets": [
                world.config.model_dump(),
                {
                    "domain": "example.org",
                    "key_set": f"file://{tmp_path}/example.org.key-set.json",
                    "key": f"file://{tmp_path}/{{domain}}.{{selector}}.key",
                },
            ],
        },
        "data_dir": str(tmp_path),
    }
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    out: list[str] = []
    now = world.clock.now() + 3 * DAY
    code = asyncio.run(status_command(load_settings(path), as_json=True, out=out.append, now=now))
    assert code == cli.EXIT_OK
    (document,) = (json.loads(text) for text in out)
    assert {d["source"] for d in document["domains"]} == {"key_set", "static", "seed"}
    assert document["domains"][0]["rotation"] is not None
    assert_documented(DKIM_STATUS, emitted([document]))


# -- relay queue list --json, relay queue show -------------------------------------------------

MESSAGE = b"From: app@example.com\r\nTo: a@example.net\r\nSubject: inspect me\r\n\r\nbody\r\n"


@pytest.fixture
def spool_config(tmp_path) -> Path:
    """A spool with a deferred entry, a dead letter (with a failure report) and a damaged
    entry, and a config naming it."""
    config = {
        "listeners": [{"name": "plain", "bind": "127.0.0.1:2525", "tls": "none", "auth": "none"}],
        "upstream": {"host": "127.0.0.1", "port": 2526, "tls": "none"},
        "queue": {"mode": "spool", "dir": str(tmp_path / "spool")},
    }
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    spool = Spool(tmp_path / "spool")
    spool.open()

    async def fill() -> None:
        now = time.time()
        waiting = QueueEntry(
            id="waiting1",
            mail_from="app@example.com",
            recipients=[
                RecipientState("a@example.net", next_attempt=now + 600, attempts=1, last_reply="451 4.2.0 busy"),
                RecipientState("b@example.net", status="delivered", attempts=1, last_reply="250 2.0.0 ok"),
            ],
            created=now - 120,
            ret="HDRS",
            envid="e1",
            listener="submission",
            user="app",
        )
        dead = QueueEntry(
            id="dead1",
            mail_from="app@example.com",
            recipients=[RecipientState("c@example.net", status=FAILED, attempts=1, last_reply="550 5.1.1 no")],
            created=now - 60,
            finished=now,
            dsn="queued",
        )
        damaged = QueueEntry(id="damaged1", mail_from="", recipients=[RecipientState("d@example.net")], created=now)
        for entry in (waiting, dead, damaged):
            (await spool.put(entry, MESSAGE)).release()
        await spool.close()

    asyncio.run(fill())
    with open(spool.path("damaged1"), "r+b") as fh:
        fh.truncate(40)
    return path


def run_command(capsys, *argv: str) -> Any:
    """The command as `relay` runs it (relay.cli.main), its stdout read as JSON."""
    capsys.readouterr()
    code = cli.main(list(argv))
    out = capsys.readouterr().out
    assert code == cli.EXIT_OK, out
    return json.loads(out)


def test_relay_queue_list_json_is_documented(spool_config, capsys):
    entries = run_command(capsys, "queue", "list", "--json", "-c", str(spool_config))
    assert {e["state"] for e in entries} == {"deferred", "dead", "damaged"}
    assert_documented(QUEUE_LIST, emitted([entries], top_array=True))


def test_relay_queue_show_is_documented(spool_config, capsys):
    shown = [
        run_command(capsys, "queue", "show", entry_id, "-c", str(spool_config)) for entry_id in ("waiting1", "dead1")
    ]
    # `show` prints a list entry (documented under `relay queue list --json`) plus its own keys.
    assert_documented(QUEUE_SHOW, emitted(shown), also=documented()[QUEUE_LIST])


# -- every command that prints JSON has its section ---------------------------------------------


def _commands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> Iterable[tuple[str, ...]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*words, name))
    if any("--json" in action.option_strings for action in parser._actions):
        yield (*words, "--json")


def test_every_json_option_has_a_section():
    sections = documented()
    commands = [" ".join(("relay", *words)) for words in _commands(cli._parser())]
    assert CHECK in commands and QUEUE_LIST in commands
    assert [command for command in commands if command not in sections] == []
    # `relay queue show` prints JSON without being asked (there is no table).
    assert QUEUE_SHOW in sections


def test_the_examples_are_valid_json():
    blocks = re.findall(r"```json\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 4
    for block in blocks:
        json.loads(block)
