"""`relay queue list|show|retry|delete|requeue` as a process, on a spool the library filled."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
import yaml

from relay.queue.entry import FAILED, QueueEntry, RecipientState
from relay.queue.store import Spool

# `relay queue` as a process: the process tier.
pytestmark = pytest.mark.e2e

MESSAGE = b"From: app@example.com\r\nTo: a@example.net\r\nSubject: inspect me\r\n\r\nbody\r\n"


@pytest.fixture
def spool_config(tmp_path):
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
                RecipientState("a@example.net", next_attempt=now + 600, attempts=1, last_reply="451 4.2.0 busy")
            ],
            created=now - 120,
            since=now - 120,
        )
        dead = QueueEntry(
            id="dead1",
            mail_from="app@example.com",
            recipients=[
                RecipientState("b@example.net", status=FAILED, attempts=1, last_reply="550 5.1.1 no such user")
            ],
            created=now - 60,
            since=now - 60,
            finished=now,
            dsn="queued",
        )
        for entry in (waiting, dead):
            (await spool.put(entry, MESSAGE)).release()
        await spool.close()

    asyncio.run(fill())
    return path, spool


def relay_queue(config, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "relay", "queue", *args, "-c", str(config)], capture_output=True, text=True, timeout=60
    )


def test_list_show_retry_requeue_delete(spool_config):
    config, spool = spool_config
    listed = relay_queue(config, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    entries = {e["id"]: e for e in json.loads(listed.stdout)}
    assert entries["waiting1"]["state"] == "deferred" and entries["dead1"]["state"] == "dead"
    assert entries["waiting1"]["recipients"][0]["last_reply"] == "451 4.2.0 busy"
    human = relay_queue(config, "list")
    assert "waiting1" in human.stdout and "550 5.1.1 no such user" in human.stdout

    shown = relay_queue(config, "show", "waiting1")
    assert shown.returncode == 0
    assert ["Subject", "inspect me"] in json.loads(shown.stdout)["headers"]

    assert relay_queue(config, "retry", "waiting1").returncode == 0
    assert spool.read_meta("waiting1").recipients[0].next_attempt == 0.0
    assert relay_queue(config, "retry", "dead1").returncode == 1  # nothing waiting there
    assert relay_queue(config, "retry", "--all").returncode == 0

    assert relay_queue(config, "requeue", "waiting1").returncode == 1  # not a dead letter
    assert relay_queue(config, "requeue", "dead1").returncode == 0
    back = spool.read_meta("dead1")
    assert back.recipients[0].status == "pending" and back.recipients[0].attempts == 0 and not back.finished

    assert relay_queue(config, "delete", "dead1").returncode == 0
    assert not spool.path("dead1").exists()
    gone = relay_queue(config, "show", "dead1")
    assert gone.returncode == 1 and "no such entry" in gone.stderr


def test_bad_ids_and_missing_spool(spool_config, tmp_path):
    config, _ = spool_config
    bad = relay_queue(config, "show", "../../etc/passwd")
    assert bad.returncode == 1 and "not a queue id" in bad.stderr
    other = tmp_path / "other.yaml"
    settings = yaml.safe_load(config.read_text())
    settings["queue"]["dir"] = str(tmp_path / "nowhere")
    other.write_text(yaml.safe_dump(settings))
    missing = relay_queue(other, "list")
    assert missing.returncode == 1 and "no spool" in missing.stderr


def test_changes_are_refused_for_another_user_than_the_spools_owner(spool_config, tmp_path):
    """`sudo relay queue retry` wrote a root-owned 0600 state file the relay (User=relay)
    could not read: its delivery loop died and it could not start again. Now a change is
    refused unless made as the spool's owner; reading is fine."""
    import os

    config, spool = spool_config
    for path in [spool.root, *spool.root.rglob("*")]:
        os.chown(path, 65534, 65534)  # the relay's user; this test runs as root
    refused = relay_queue(config, "retry", "waiting1")
    assert refused.returncode == 1 and "run this as that user" in refused.stderr
    assert not spool.state_path("waiting1").exists()
    assert relay_queue(config, "delete", "waiting1").returncode == 1 and spool.path("waiting1").exists()
    assert relay_queue(config, "list").returncode == 0


def test_queue_without_a_subcommand_shows_its_own_help(spool_config):
    config, _ = spool_config
    bare = subprocess.run([sys.executable, "-m", "relay", "queue"], capture_output=True, text=True, timeout=60)
    assert bare.returncode == 2
    assert "requeue" in bare.stderr and "serve" not in bare.stderr


def test_list_shows_damaged_entries_and_removes_nothing(spool_config):
    import os

    config, spool = spool_config
    with open(spool.path("waiting1"), "r+b") as fh:
        fh.truncate(40)
    leftover = spool.entries / ".tmp-dead1.state-0001"
    leftover.write_bytes(b"x")
    old = time.time() - 3600
    os.utime(leftover, (old, old))
    listed = relay_queue(config, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    entries = {e["id"]: e for e in json.loads(listed.stdout)}
    assert entries["waiting1"]["state"] == "damaged" and entries["dead1"]["state"] == "dead"
    assert leftover.exists() and spool.path("waiting1").exists()


def test_list_and_show_name_files_that_are_not_entries_and_never_block_on_them(spool_config, tmp_path):
    """A FIFO or a symbolic link where an entry should be (a stray `mkfifo`, a copy made with
    `cp -s`, a restore gone wrong): before, `list` opened the FIFO and waited for a writer
    for ever, and followed the link to whatever it named."""
    import os

    config, spool = spool_config
    os.mkfifo(spool.entries / "fifo1")
    outside = tmp_path / "outside"
    outside.write_bytes(spool.path("waiting1").read_bytes())
    os.symlink(outside, spool.entries / "link1")
    listed = relay_queue(config, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    entries = {e["id"]: e for e in json.loads(listed.stdout)}
    assert entries["waiting1"]["state"] == "deferred" and entries["dead1"]["state"] == "dead"
    assert entries["fifo1"]["state"] == "unreadable" and "not a regular file" in entries["fifo1"]["problem"]
    assert entries["link1"]["state"] == "unreadable" and "symbolic link" in entries["link1"]["problem"]
    text = relay_queue(config, "list")
    assert text.returncode == 0 and "symbolic link" in text.stdout and "not a regular file" in text.stdout
    shown = relay_queue(config, "show", "fifo1")
    assert shown.returncode == 1 and "not a regular file" in shown.stderr
    retried = relay_queue(config, "retry", "link1")
    assert retried.returncode == 1 and "symbolic link" in retried.stderr
    assert (spool.entries / "fifo1").exists() and (spool.entries / "link1").is_symlink()  # left alone


def test_another_user_is_told_whose_spool_it_is_not_shown_a_traceback():
    """The relay makes its spool directories mode 0700: `relay queue list` as another user
    cannot read them. Before, a PermissionError traceback; now a sentence naming the path
    and the user to run as, exit 1."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.fail("needs root and setpriv(1) to run the command as another user")
    with tempfile.TemporaryDirectory(dir="/tmp") as top:  # not under pytest's 0700 tmp dirs
        os.chmod(top, 0o755)
        root = Path(top) / "spool"
        Spool(root).open()
        config = Path(top) / "relay.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "listeners": [{"name": "plain", "bind": "127.0.0.1:2525", "tls": "none", "auth": "none"}],
                    "upstream": {"host": "127.0.0.1", "port": 2526, "tls": "none"},
                    "queue": {"mode": "spool", "dir": str(root)},
                }
            )
        )
        os.chmod(config, 0o644)
        for args in (("list",), ("show", "abc123")):
            done = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
                + [sys.executable, "-m", "relay", "queue", *args, "-c", str(config)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 1, done.stderr
            assert "Traceback" not in done.stderr
            assert "Permission denied" in done.stderr and str(root) in done.stderr
            assert "sudo -u root relay queue" in done.stderr


def test_list_and_show_say_when_an_entry_is_shown_from_its_initial_state(spool_config):
    """A damaged `.state` file (zero length after a crash of the disk, say) is quarantined by
    the relay's next attempt; until then `list` and `show` fell back to the state embedded in
    the entry without a word: a dead letter showed as waiting, delivered recipients as not."""
    config, spool = spool_config
    spool.state_path("dead1").write_bytes(b"")
    listed = relay_queue(config, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    entry = {e["id"]: e for e in json.loads(listed.stdout)}["dead1"]
    assert "state file" in (entry.get("problem") or "")
    shown = relay_queue(config, "show", "dead1")
    assert shown.returncode == 0 and "state file" in (json.loads(shown.stdout).get("problem") or "")
    text = relay_queue(config, "list")
    assert "state file" in text.stdout
    assert spool.state_path("dead1").exists()  # the command only reads
