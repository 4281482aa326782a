"""A full disk under the spool: new mail gets 452 4.3.1, nothing already queued is harmed.

The spool lives on a 2 MiB tmpfs mounted in a private mount namespace (`unshare --mount`,
as root: `make test` runs as root inside tests/loopback-only), so the disk really fills.
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

# A process in its own mount namespace: the process tier.
pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent


def probe(tmp_path: Path, module: str, *args: object) -> dict:
    """Run `python -m tests.support.<module> SPOOL ARGS...` on a 2 MiB tmpfs mounted in a
    private mount namespace; the probe's last stdout line is its JSON result."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("needs root and unshare(1) to mount a small tmpfs in a private namespace")
    root = tmp_path / "spool"
    root.mkdir()
    words = " ".join(str(a) for a in args)
    script = f"mount -t tmpfs -o size=2m tmpfs {root} && exec {sys.executable} -m tests.support.{module} {root} {words}"
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def fill(tmp_path: Path, reserve: int) -> dict:
    return probe(tmp_path, "disk_full_probe", reserve)


def test_disk_full_refuses_new_mail_and_keeps_the_queue(tmp_path):
    result = fill(tmp_path, reserve=0)  # no reserve: the writes themselves hit ENOSPC
    assert result["accepted"] > 5
    assert result["refusal"] == {"code": 452, "enhanced": "4.3.1", "label": "spool_full"}
    assert result["intact"] and result["corrupt"] == []


def test_reserve_refuses_before_the_disk_is_full(tmp_path):
    result = fill(tmp_path, reserve=512 * 1024)
    assert result["refusal"] == {"code": 452, "enhanced": "4.3.1", "label": "spool_full"}
    assert result["state_update"] == "ok"  # the reserve left room for queued entries' state
    assert result["intact"]


def test_a_completion_mark_cut_short_by_a_full_disk_does_not_hide_later_entries(tmp_path):
    """A delivered entry's completion mark is appended to the journal segment at once; on a
    full disk the write may be cut short (a torn record). A replay reads a segment up to its
    first torn record, so before, every entry acknowledged later into that segment was
    invisible to it: after a power loss, lost. Now a torn mark starts a new segment."""
    result = probe(tmp_path, "journal_full_probe")
    assert result["torn"], "the probe did not manage to cut the mark short"
    assert result["vouched"]


def test_relay_queue_retry_on_a_full_disk_says_so_and_leaves_nothing(tmp_path):
    """`relay queue retry` when the spool's disk is full: before, an OSError traceback and a
    partial `.tmp-*` state file left in the spool; now one line, exit 1, nothing left."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("needs root and unshare(1) to mount a small tmpfs in a private namespace")
    root = tmp_path / "spool"
    root.mkdir()
    config = tmp_path / "relay.yaml"
    config.write_text(
        json.dumps(
            {
                "listeners": [{"name": "plain", "bind": "127.0.0.1:2525", "tls": "none", "auth": "none"}],
                "upstream": {"host": "127.0.0.1", "port": 2526, "tls": "none"},
                "queue": {"mode": "spool", "dir": str(root)},
            }
        )
    )
    fill = (
        "import asyncio, os, time\n"
        "from pathlib import Path\n"
        "from relay.queue.entry import QueueEntry, RecipientState\n"
        "from relay.queue.store import Spool\n"
        "async def main():\n"
        f"    spool = Spool(Path({str(root)!r}), reserve_bytes=0)\n"
        "    spool.open()\n"
        "    entry = QueueEntry(id='waiting1', mail_from='app@example.com',\n"
        "        recipients=[RecipientState('a@example.net', next_attempt=time.time() + 600, attempts=1)],\n"
        "        created=time.time())\n"
        "    (await spool.put(entry, b'Subject: x\\r\\n\\r\\nbody\\r\\n')).release()\n"
        "    await spool.close()\n"
        "    fd = os.open(spool.root / 'filler', os.O_WRONLY | os.O_CREAT, 0o600)\n"
        "    try:\n"
        "        while os.write(fd, bytes(4096)):\n"
        "            pass\n"
        "    except OSError:\n"
        "        pass\n"
        "asyncio.run(main())\n"
    )
    script = (
        f'mount -t tmpfs -o size=1m tmpfs {root} && {sys.executable} -c "$0" && '
        f'{{ {sys.executable} -m relay queue retry waiting1 -c {config}; echo "rc=$?"; }} && '
        f"ls -A {root}/entries"
    )
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, fill],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rc=1" in done.stdout
    assert "Traceback" not in done.stderr and "No space left on device" in done.stderr
    left = done.stdout.split("rc=1", 1)[1].split()
    assert left == ["waiting1"]  # the entry, untouched; no partial state file


PREFILL = (
    "import asyncio, sys, time\n"
    "from pathlib import Path\n"
    "from relay.queue.entry import QueueEntry, RecipientState\n"
    "from relay.queue.store import Spool\n"
    "async def main():\n"
    "    spool = Spool(Path(sys.argv[1]))\n"
    "    spool.open()\n"
    "    entry = QueueEntry(id='queued1', mail_from='app@example.com',\n"
    "        recipients=[RecipientState('a@example.net')], created=time.time())\n"
    "    message = b'From: app@example.com\\r\\nTo: a@example.net\\r\\nSubject: queued1\\r\\n\\r\\nbody\\r\\n'\n"
    "    (await spool.put(entry, message)).release()\n"
    "    await spool.close()\n"
    "asyncio.run(main())\n"
)


def test_a_spool_read_only_at_start_delivers_what_it_holds_once_and_takes_nothing_new(make_relay, pki, tmp_path):
    """The spool's volume comes up read-only (ext4's errors=remount-ro after an I/O error):
    relay starts, /readyz fails naming the spool, new mail gets 452 4.3.1, and what is queued
    goes out once. Before, the removal after the upstream's 250 failed and the message went
    out again at every retry, once a minute."""
    from tests.support.smtp import submit
    from tests.support.upstream import Upstream

    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("needs root and unshare(1) to mount a small tmpfs in a private namespace")
    root = tmp_path / "spool"
    root.mkdir()
    with Upstream(tls="starttls", server_context=pki.server_context()) as up:
        relay = make_relay(up.port, queue={"mode": "spool", "dir": str(root), "retry": ["1s"]}, start=False)
        relay.command = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f'mount -t tmpfs -o size=24m tmpfs "{root}" && "$0" -c "$PREFILL" "{root}" && '
            f'mount -o remount,ro "{root}" && exec "$0" -m relay "$@"',
            sys.executable,
        ]
        relay.env["PREFILL"] = PREFILL
        relay.start(wait_ready=False)
        up.wait_for(1)
        status, body = relay.http_json("/readyz")
        assert status == 503 and "not writable" in json.dumps(body), body
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            submit(relay, pki)
        assert refused.value.recipients["user@example.net"][0] == 452
        # Several retry steps (1 s) and the backoff after the failed removal go by; the
        # message is not sent again.
        relay.wait_log(lambda e: "could not record" in e.get("msg", ""), timeout=30)
        time.sleep(3)
        assert len(up.messages) == 1 and b"Subject: queued1" in up.messages[0].content
        logged = [e.get("msg") for e in relay.logs()]
        assert "spool cannot be written; delivery attempt put off" in logged
        assert "delivery attempt failed unexpectedly; will retry" not in logged  # no traceback
