"""The package installs from its sources alone and runs from that install.

The image itself is built and run in tests/test_image.py (minutes); this checks in seconds that
the sources the Dockerfile copies (`pyproject.toml`, `README.md`, `relay/`) install into a
clean virtualenv and give a working `relay` command: the embedded dev default starts, takes a
message and signs it. Dependencies come from the test environment (the tests run without
network), the relay package itself is built and installed from the copied sources only.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import dkim
import pytest

from tests.support.procs import wait_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).parent.parent


def test_clean_install_runs_the_dev_default(tmp_path):
    context = tmp_path / "context"  # what the Dockerfile COPYs
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, context / name)
    shutil.copytree(REPO / "relay", context / "relay", ignore=shutil.ignore_patterns("__pycache__"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # Dependencies from the test environment; its own .pth files (the editable relay) are
    # not processed from there, so `relay` can only come from the new install.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # pip of the test environment, installing into the new venv (`--python`): it never
    # touches the test environment's own packages.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            str(context),
        ],
        check=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        cwd=tmp_path,
    )
    python, relay = venv / "bin" / "python", venv / "bin" / "relay"
    where = subprocess.run(
        [python, "-c", "import relay; print(relay.__file__)"], capture_output=True, text=True, check=True, cwd=tmp_path
    ).stdout.strip()
    assert where.startswith(str(venv)), f"relay imported from {where}, not from the clean install"
    assert subprocess.run([relay, "--version"], capture_output=True, text=True).stdout.startswith("relay ")

    dev = tmp_path / "dev"
    env = {**os.environ, "RELAY_DEV_DIR": str(dev)}
    env.pop("RELAY_CONFIG", None)
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([relay, "serve"], stdout=log, stderr=log, env=env, cwd=tmp_path)
    try:
        wait_port("127.0.0.1", 2525, 20, proc=proc)
        wait_port("127.0.0.1", 9464, 20, proc=proc)
        with smtplib.SMTP("127.0.0.1", 2525, timeout=20) as client:
            client.sendmail(
                "app@example.test",
                ["someone@example.net"],
                b"From: app@example.test\r\nTo: someone@example.net\r\nSubject: hi\r\n\r\nhello\r\n",
            )
        deadline = time.monotonic() + 10
        while not list((dev / "outbox").glob("*.eml")) and time.monotonic() < deadline:
            time.sleep(0.1)
        [eml] = list((dev / "outbox").glob("*.eml"))
        txt = (dev / "dev.example.test.txt").read_text()
        value = "".join(re.findall(r'"([^"]*)"', txt)).encode()  # the record's strings, joined
        assert dkim.verify(eml.read_bytes(), dnsfunc=lambda name, timeout=5: value)
        banner = (tmp_path / "serve.log").read_text()
        assert "embedded dev default" in banner and "swaks --server 127.0.0.1:2525" in banner
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
