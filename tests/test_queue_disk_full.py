"""A full disk under the spool: new mail gets 452 4.3.1, nothing already queued is harmed.

The spool lives on a 2 MiB tmpfs mounted in a private mount namespace (`unshare --mount`,
as root: `make test` runs as root inside tests/loopback-only), so the disk really fills.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# A process in its own mount namespace: the process tier.
pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent


def fill(tmp_path: Path, reserve: int) -> dict:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("needs root and unshare(1) to mount a small tmpfs in a private namespace")
    root = tmp_path / "spool"
    root.mkdir()
    script = (
        f"mount -t tmpfs -o size=2m tmpfs {root} && "
        f"exec {sys.executable} -m tests.support.disk_full_probe {root} {reserve}"
    )
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


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
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("needs root and unshare(1) to mount a small tmpfs in a private namespace")
    root = tmp_path / "spool"
    root.mkdir()
    script = (
        f"mount -t tmpfs -o size=2m tmpfs {root} && exec {sys.executable} -m tests.support.journal_full_probe {root}"
    )
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["torn"], "the probe did not manage to cut the mark short"
    assert result["vouched"]
