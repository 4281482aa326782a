"""Signals around a stop, from outside as a user sends them: one that comes while a relay
that stopped cleanly exits changes nothing (exit 0), and a terminal's Ctrl-C on
`relay serve --workers N` drains like one SIGTERM (a second Ctrl-C exits at once)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tests.support.hold_points import HoldPoints
from tests.support.smtp import connect, message

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_signal_while_a_stopped_relay_exits_changes_nothing(make_relay, upstream, tmp_path, loop):
    """Held in the interpreter's exit, after the event loop has closed. asyncio's loop puts
    the signals' default actions back when it closes: before, a SIGHUP there killed the
    process (status 129 from a shell) although its stop was done. (uvloop leaves its handler
    in place; the interpreter's finalization then puts the default back, too late to hold.)"""
    hold = HoldPoints(tmp_path / "hold", at_exit=True, not_installed=("uvloop",) if loop == "asyncio" else ())
    relay = make_relay(upstream.port, start=False, env=hold.env)
    relay.start()
    relay.signal(signal.SIGTERM)
    hold.wait_held("exit", relay.proc)
    assert any(e.get("msg") == "stopped" for e in relay.logs())
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        relay.signal(sig)
    hold.release("exit")
    assert relay.proc.wait(60) == 0, relay.log_text()[-3000:]


@pytest.fixture
def two_workers_in_a_transaction(make_relay, upstream, pki):
    """`relay serve --workers 2` with one message at the upstream, whose reply is held:
    (relay, gate, outcome of the client's sendmail)."""
    gate = threading.Event()
    upstream.behaviour.data_gate = gate
    relay = make_relay(upstream.port, start=False)
    # Bounds, not waits: the drain ends with the transaction, released by the test.
    relay.config["drain_timeout"] = "120s"
    relay.config["upstream"]["command_timeout"] = "120s"
    relay.args = ["--workers", "2"]
    relay.start()
    client = connect(relay, pki)
    outcome: dict = {}

    def send() -> None:
        try:
            outcome["refused"] = client.sendmail("app@example.com", ["u@example.net"], message(subject="ctrl-c"))
        except Exception as exc:  # the test reads it
            outcome["error"] = exc

    sender = threading.Thread(target=send)
    sender.start()
    _wait(lambda: "DATA" in upstream.commands, relay, "the message to reach the upstream")
    yield relay, gate, outcome, sender
    gate.set()
    sender.join(30)


def test_ctrl_c_with_workers_drains_like_one_sigterm(two_workers_in_a_transaction, upstream):
    """A terminal's Ctrl-C: SIGINT to every process of the group (the supervisor and each
    worker), and the supervisor passes it on as SIGTERM. Before, each worker counted two
    stop signals and exited at once (1): the client lost its transaction, no 250."""
    relay, gate, outcome, sender = two_workers_in_a_transaction
    os.killpg(relay.proc.pid, signal.SIGINT)
    _wait(lambda: len(_lines(relay, "draining")) == 2, relay, "both workers to drain")
    assert relay.proc.poll() is None
    gate.set()
    sender.join(60)
    assert outcome == {"refused": {}}  # 250: delivered
    assert relay.proc.wait(60) == 0, relay.log_text()[-3000:]
    assert len(upstream.messages) == 1
    assert not _lines(relay, "second stop signal: exiting now")


def test_a_second_ctrl_c_with_workers_exits_at_once(two_workers_in_a_transaction):
    relay, gate, outcome, sender = two_workers_in_a_transaction
    os.killpg(relay.proc.pid, signal.SIGINT)
    _wait(lambda: len(_lines(relay, "draining")) == 2, relay, "both workers to drain")
    os.killpg(relay.proc.pid, signal.SIGINT)  # the transaction is still held at the upstream
    assert relay.proc.wait(60) == 1
    assert _lines(relay, "second stop signal: exiting now")


def _lines(relay, msg: str) -> list[dict]:
    return [e for e in relay.logs() if e.get("msg") == msg]


def _wait(condition, relay, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert relay.proc.poll() is None, f"relay exited with {relay.proc.returncode} waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout}s:\n{relay.log_text()[-3000:]}"
        time.sleep(0.05)
