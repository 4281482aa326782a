"""A signal that reaches `relay serve` while it starts, before its event loop's handlers are
in place (relay.startup_signals): SIGHUP is a reload once started, SIGTERM a clean stop; the
process never dies of either (their default action), single or with --workers.

The relay is held in its start by a Vault that does not answer until released: its DKIM key
is a vault:// reference, fetched in Relay.start before the handlers are installed.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support.held_vault import HeldVault
from tests.support.hold_points import HoldPoints
from tests.support.smtp import connect, message

WORKERS = pytest.mark.parametrize("workers", [1, 2], ids=["single", "workers"])


@pytest.fixture
def held_relay(make_relay, upstream, dkim_keys):
    """A relay process whose start waits on a held Vault: (relay, vault)."""
    with HeldVault({"relay/dkim": {"key": dkim_keys.rsa_path.read_text()}}) as vault:
        relay = make_relay(upstream.port, start=False, env=vault.env)
        relay.config["secrets"] = {"vault": vault.config()}
        relay.config["dkim"]["keys"][0]["key"] = "vault://secret/relay/dkim#key"
        yield relay, vault


@WORKERS
def test_sighup_while_starting_reloads_once_started(held_relay, upstream, pki, workers):
    relay, vault = held_relay
    relay.args = ["--workers", str(workers)] if workers > 1 else []
    relay.launch()
    vault.wait_held(workers)  # every relay process is inside its start
    relay.config["clients"]["max_recipients"] = 3  # the config changes after it was read
    relay.write_config()
    relay.signal(signal.SIGHUP)  # before the fix: its default action killed the process
    vault.release()
    relay.wait_started()
    _wait_for_lines(relay, "metrics and health listening", workers)
    assert "exited with" not in relay.log_text()  # no worker died and was restarted
    reloads = _wait_for_lines(relay, "configuration reloaded", workers)
    assert [line["config"]["clients"]["max_recipients"] for line in reloads] == [3] * workers
    connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message())
    assert len(upstream.wait_for(1)) == 1


@WORKERS
def test_sigterm_while_starting_stops_cleanly_once_started(held_relay, workers):
    relay, vault = held_relay
    relay.args = ["--workers", str(workers)] if workers > 1 else []
    relay.launch()
    vault.wait_held(workers)
    relay.signal(signal.SIGTERM)  # before the fix: killed by it (the supervisor then exits 1)
    vault.release()
    assert relay.proc.wait(60) == 0
    assert len(_lines(relay, "stop requested while starting")) == workers
    assert len(_lines(relay, "stopped")) == workers


# How relay is started: the console script (the image's ENTRYPOINT, systemd's ExecStart, the
# Terraform task's command, `make run`) and `python -m relay` (the other tests').
ENTRIES = pytest.mark.parametrize(
    "command",
    [[str(Path(sys.executable).parent / "relay")], [sys.executable, "-m", "relay"]],
    ids=["console-script", "python-m"],
)


@ENTRIES
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM], ids=["SIGHUP", "SIGTERM"])
def test_a_signal_while_the_command_line_is_imported_does_not_kill_relay(
    make_relay, upstream, pki, tmp_path, command, sig
):
    """The process is held just before `relay.cli` (and what it loads: asyncio, ssl, the
    queue commands...) is imported: a tenth of a second and more of every start. Before, the
    start-up handlers were installed only after that import, and either signal killed it."""
    hold = HoldPoints(tmp_path / "hold", at_import="relay.cli")
    relay = make_relay(upstream.port, start=False, env=hold.env)
    relay.command = command
    relay.launch()
    hold.wait_held("import", relay.proc)
    relay.signal(sig)  # before the fix: the signal's default action, the process died of it
    hold.release("import")
    if sig == signal.SIGTERM:
        assert relay.proc.wait(60) == 0, relay.log_text()[-3000:]
        assert len(_lines(relay, "stop requested while starting")) == 1
        return
    # A SIGHUP before the config is read asks for nothing the start does not do anyway.
    relay.wait_started()
    connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message())
    assert len(upstream.wait_for(1)) == 1
    assert relay.stop() == 0


def test_supervisor_stopped_before_it_forks_starts_no_worker(tmp_path):
    """A stop that reaches `relay serve --workers N` before its workers are forked: the
    supervisor exits 0 and starts none."""
    started = tmp_path / "started"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from relay import startup_signals
        from relay.supervisor import supervise

        def worker(index: int) -> int:
            open({str(started)!r}, "a").write(f"{{index}}\\n")
            return 0

        startup_signals.hold()  # as `relay serve` does first
        os.kill(os.getpid(), signal.SIGTERM)  # while the supervisor is being prepared
        sys.exit(supervise(2, worker))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not started.exists()


def _lines(relay, msg: str) -> list[dict]:
    return [e for e in relay.logs() if e.get("msg") == msg]


def _wait_for_lines(relay, msg: str, count: int, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(lines := _lines(relay, msg)) < count:
        assert relay.proc.poll() is None, f"relay exited with {relay.proc.returncode}:\n{relay.log_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{len(lines)} of {count} {msg!r} lines:\n{relay.log_text()[-3000:]}"
        time.sleep(0.1)
    return lines
