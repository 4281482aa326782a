"""Spool mode through the relay: SMTP in, 250 once on disk, delivery to a real upstream.

In-loop tests (the relay in the test's event loop) for the behaviour; process tests for
what only a process shows: SIGTERM with deliveries under way and a restart on the same
spool, `--workers 2` sharing one spool, and `kill -9` under load.
"""

from __future__ import annotations

import email
import os
import random
import re
import signal
import smtplib
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.support.inloop import in_thread
from tests.support.procs import dead_port
from tests.support.smtp import message, submit
from tests.support.upstream import Upstream


def spool_queue(path: Path, **extra: object) -> dict[str, object]:
    return {"mode": "spool", "dir": str(path / "spool"), "retry": ["1s"], **extra}


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@in_thread
def test_spool_mode_answers_queued_and_delivers_signed(make_loop_relay, upstream, pki, tmp_path, dkim_keys):
    from tests.support.dkim import verify_all

    relay = make_loop_relay(upstream.port, queue=spool_queue(tmp_path))
    client = smtplib.SMTP("127.0.0.1", relay.port("submission"), timeout=20)
    with client:
        client.starttls(context=pki.client_context())
        client.login("app", "app-password")
        client.mail("app@example.com")
        client.rcpt("user@example.net")
        code, text = client.data(message(subject="spooled"))
    assert code == 250 and b"queued" in text
    upstream.wait_for(1)
    delivered = upstream.messages[0]
    assert verify_all(delivered.content, dkim_keys.dns()) == [True, True]
    line = relay.wait_log(lambda r: r.get("event") == "message")
    assert line["queued"] is True and line["upstream"] == "spool" and line["code"] == 250
    attempt = relay.wait_log(lambda r: r.get("msg") == "delivery attempt")
    assert attempt["id"] == line["id"] and attempt["result"] == "delivered"
    assert relay.metric("relay_queue_delivery_attempts_total", result="delivered") == 1


@in_thread
def test_upstream_down_mail_is_accepted_and_delivered_when_it_returns(make_loop_relay, pki, tmp_path):
    up = Upstream(tls="starttls", server_context=pki.server_context())  # not started: down
    relay = make_loop_relay(up.port, queue=spool_queue(tmp_path), wait_ready=False)
    assert submit(relay, pki, rcpts=("a@example.net", "b@example.net")) == {}  # 250 anyway
    relay.wait_log(lambda r: r.get("msg") == "delivery attempt" and r.get("result") == "deferred")
    up.start()
    try:
        up.wait_for(1, timeout=30)
        assert sorted(up.messages[0].rcpt_tos) == ["a@example.net", "b@example.net"]
    finally:
        up.stop()


@in_thread
def test_per_recipient_answers_and_a_signed_failure_report(make_loop_relay, upstream, pki, tmp_path, dkim_keys):
    from tests.support.dkim import verify_all

    upstream.behaviour.rcpt_replies = {"gone@example.net": "550 5.1.1 no such user"}
    # The report comes from MAILER-DAEMON@relay.example.com: signed with example.com's keys.
    relay = make_loop_relay(upstream.port, queue=spool_queue(tmp_path), hostname="relay.example.com")
    assert submit(relay, pki, rcpts=("ok@example.net", "gone@example.net")) == {}
    upstream.wait_for(2)
    original, report = upstream.messages
    assert original.rcpt_tos == ["ok@example.net"]
    assert report.mail_from in ("", "<>") and report.rcpt_tos == ["app@example.com"]
    parsed = email.message_from_bytes(report.content)
    assert parsed["Auto-Submitted"] == "auto-replied" and parsed.get_content_type() == "multipart/report"
    assert all(verify_all(report.content, dkim_keys.dns()))
    assert relay.metric("relay_queue_bounces_total") == 1


@in_thread
def test_readyz_fails_when_the_spool_cannot_be_written(make_loop_relay, upstream, tmp_path):
    relay = make_loop_relay(upstream.port, queue=spool_queue(tmp_path))
    status, body = relay.http_json("/readyz")
    assert status == 200 and body["checks"]["spool"] == "ok"
    (tmp_path / "spool" / "entries").rename(tmp_path / "spool" / "moved")  # e.g. the volume went away
    status, body = relay.http_json("/readyz")
    assert status == 503 and "spool" in body["checks"]["spool"]


@in_thread
def test_readyz_stays_ready_in_spool_mode_while_the_upstream_is_down(make_loop_relay, pki, tmp_path):
    """The spool takes mail while the upstream is away; /readyz used to fail on the upstream
    probe, so a load balancer took every spool replica out during exactly that outage."""
    relay = make_loop_relay(dead_port(), queue=spool_queue(tmp_path))
    wait_for(lambda: "not probed" not in relay.http_json("/readyz")[1].get("detail", {}).get("upstream", "not probed"))
    status, body = relay.http_json("/readyz")
    assert status == 200 and body["checks"]["upstream"] == "ok"
    assert "refused" in body["detail"]["upstream"].lower() or "connect" in body["detail"]["upstream"].lower()
    assert submit(relay, pki) == {}  # and it takes mail
    assert relay.metric("relay_ready") == 1


async def test_healthz_answers_while_a_large_spool_is_opened(make_loop_relay, upstream, tmp_path, monkeypatch):
    """The scan of a large backlog at start ran before the health endpoint existed: a 60 s
    startupProbe killed the pod at every start. Now /healthz answers during the scan and
    /readyz says why it is not ready."""
    import asyncio
    import threading

    from relay.queue.store import Spool

    release = threading.Event()
    real_open = Spool.open

    def slow_open(self):
        release.wait(30)  # a scan of 100k entries
        real_open(self)

    monkeypatch.setattr(Spool, "open", slow_open)
    relay = make_loop_relay(upstream.port, queue=spool_queue(tmp_path), start=False)
    starting = asyncio.create_task(relay.astart())
    try:
        for _ in range(500):
            if relay.relay is not None and relay.relay.health.sockets():
                break
            await asyncio.sleep(0.02)
        assert (await asyncio.to_thread(relay.http, "/healthz"))[0] == 200
        status, body = await asyncio.to_thread(relay.http_json, "/readyz")
        assert status == 503 and "opening" in body["checks"]["spool"]
    finally:
        release.set()
        await asyncio.wait_for(starting, 30)
    status, body = await asyncio.to_thread(relay.http_json, "/readyz")
    assert status == 200


@in_thread
def test_full_spool_refuses_new_mail_with_452_and_keeps_what_it_holds(make_loop_relay, pki, tmp_path):
    up = Upstream(tls="starttls", server_context=pki.server_context())  # down: mail stays queued
    relay = make_loop_relay(up.port, queue=spool_queue(tmp_path, max_bytes="3KB"), wait_ready=False)
    assert submit(relay, pki) == {}  # ~2.5 KB signed: fits
    with pytest.raises((smtplib.SMTPRecipientsRefused, smtplib.SMTPDataError)) as refused:
        submit(relay, pki)
    error = refused.value
    code, text = (
        error.recipients["user@example.net"]
        if isinstance(error, smtplib.SMTPRecipientsRefused)
        else (error.smtp_code, error.smtp_error)
    )
    assert code == 452 and text.startswith(b"4.3.1")
    up.start()  # what was queued is unharmed and goes out
    try:
        up.wait_for(1, timeout=30)
    finally:
        up.stop()


@in_thread
def test_queue_list_and_show_name_the_listener_and_the_user(make_loop_relay, pki, tmp_path):
    """Before, `relay queue show` said null for both and `list --json` had neither: the entry
    was built from the envelope, which carried neither. Who sent a stuck message is what an
    operator looks for; the password never goes with the username."""
    from relay.queue import admin
    from relay.queue.store import Spool
    from tests.support.config import APP_PASSWORD, loopback_bind

    up = Upstream(tls="starttls", server_context=pki.server_context())  # down: mail stays queued
    relay = make_loop_relay(up.port, queue=spool_queue(tmp_path, retry=["1h"]), start=False)
    relay.config["listeners"].append({"name": "sidecar", "bind": loopback_bind(), "tls": "none", "auth": "none"})
    relay.start(wait_ready=False)
    assert submit(relay, pki, rcpts=("a@example.net",)) == {}  # STARTTLS, AUTH as "app"
    assert submit(relay, pki, listener="submissions", rcpts=("b@example.net",)) == {}
    with smtplib.SMTP("127.0.0.1", relay.port("sidecar"), timeout=20) as client:
        assert client.sendmail("app@example.com", ["c@example.net"], message(subject="sidecar")) == {}
    spool = Spool(tmp_path / "spool", journal=False)  # as `relay queue` opens it

    def listed() -> dict[str, dict]:
        return {e["recipients"][0]["address"]: e for e in admin.list_entries(spool)}

    wait_for(lambda: len(listed()) == 3, what="three entries")
    who = {rcpt: (e["listener"], e["user"]) for rcpt, e in listed().items()}
    assert who == {
        "a@example.net": ("submission", "app"),
        "b@example.net": ("submissions", "app"),
        "c@example.net": ("sidecar", None),
    }
    shown = admin.show(spool, listed()["a@example.net"]["id"])
    assert (shown["listener"], shown["user"]) == ("submission", "app")
    assert APP_PASSWORD.encode() not in b"".join(p.read_bytes() for p in (tmp_path / "spool").rglob("*") if p.is_file())


# -- process-level ------------------------------------------------------------------------------
def send_many(
    relay, pki, subjects: list[str], *, threads: int = 4, outcomes: dict[str, str] | None = None
) -> dict[str, str]:
    """Send one message per subject from `threads` clients; returns subject → outcome
    (filled in as the replies come, in `outcomes` when given)."""
    outcomes = {} if outcomes is None else outcomes
    lock = threading.Lock()
    queue = list(subjects)

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                subject = queue.pop()
            try:
                submit(relay, pki, data=message(subject=subject))
                outcome = "250"
            except (smtplib.SMTPException, OSError) as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            with lock:
                outcomes[subject] = outcome

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return outcomes


def subjects_at(upstream: Upstream) -> Counter[str]:
    with upstream.lock:
        found = [re.search(rb"Subject: (\S+)", m.content) for m in upstream.messages]
    return Counter(m.group(1).decode() for m in found if m)


def test_sigterm_lets_deliveries_finish_and_a_restart_resumes_the_rest(make_relay, pki, tmp_path):
    up = Upstream(tls="starttls", server_context=pki.server_context()).start()
    try:
        up.behaviour.data_delay = 1.5  # deliveries under way when SIGTERM comes
        relay = make_relay(up.port, queue=spool_queue(tmp_path))
        assert set(send_many(relay, pki, ["busy1", "busy2", "busy3"]).values()) == {"250"}
        relay.wait_log(lambda r: r.get("event") == "message", timeout=10)
        assert relay.stop() == 0
        assert sorted(subjects_at(up)) == ["busy1", "busy2", "busy3"]  # finished within drain_timeout

        up.behaviour.data_delay = 0.0
        up.behaviour.data_reply = "451 4.3.0 not now"  # these stay queued
        relay.start()
        assert set(send_many(relay, pki, ["later1", "later2"]).values()) == {"250"}
        relay.wait_log(lambda r: r.get("msg") == "delivery attempt" and r.get("result") == "deferred")
        assert relay.stop() == 0
        entries = [p for p in (tmp_path / "spool" / "entries").iterdir() if not p.name.endswith(".state")]
        assert len(entries) == 2

        up.behaviour.data_reply = None
        relay.start()  # resumes from the spool
        wait_for(lambda: {"later1", "later2"} <= set(subjects_at(up)), what="the queued messages")
    finally:
        up.stop()


def test_workers_share_one_spool_and_deliver_each_message_once(make_relay, pki, tmp_path):
    with Upstream(tls="starttls", server_context=pki.server_context()) as up:
        relay = make_relay(up.port, queue=spool_queue(tmp_path), start=False)
        relay.args = ["--workers", "2"]
        relay.start()
        subjects = [f"w{i}" for i in range(40)]
        assert set(send_many(relay, pki, subjects, threads=8).values()) == {"250"}
        wait_for(lambda: set(subjects) <= set(subjects_at(up)), what="every message")
        time.sleep(1.0)  # a scan or two of both workers: nothing more may go out
        assert max(subjects_at(up).values()) == 1


def test_kill_9_under_load_loses_no_acknowledged_message(make_relay, pki, tmp_path):
    """`kill -9` at random moments while clients send, then a restart on the same spool,
    several times (bounded): every message that got its 250 reaches the upstream."""
    rng = random.Random(os.environ.get("RELAY_CRASH_SEED", "13"))
    rounds, per_round = 5, 60
    acknowledged: list[str] = []
    with Upstream(tls="starttls", server_context=pki.server_context()) as up:
        relay = make_relay(up.port, queue=spool_queue(tmp_path))
        for n in range(rounds):
            subjects = [f"r{n}m{i}" for i in range(per_round)]
            outcomes: dict[str, str] = {}
            sender = threading.Thread(
                target=send_many, args=(relay, pki, subjects), kwargs={"threads": 8, "outcomes": outcomes}
            )
            sender.start()
            # Kill at a random moment once the relay is acknowledging (a session's TLS and
            # AUTH take a while on a busy machine).
            wait_for(lambda: "250" in outcomes.values() or not sender.is_alive(), what="a first 250")
            time.sleep(rng.uniform(0.0, 1.0))
            relay.proc.send_signal(signal.SIGKILL)
            sender.join(timeout=120)
            acknowledged += [s for s, outcome in outcomes.items() if outcome == "250"]
            relay.__exit__(None, None, None)
            relay.start()
        wait_for(lambda: set(acknowledged) <= set(subjects_at(up)), timeout=90, what="every acknowledged message")
        counts = subjects_at(up)
        duplicates = sum(n - 1 for n in counts.values() if n > 1)
        print(
            f"\nkill -9 through relay: {rounds} kills, {len(acknowledged)} acknowledged, "
            f"{sum(counts.values())} delivered, {duplicates} duplicates ({duplicates / max(1, len(counts)):.2%})"
        )
        assert acknowledged
        assert not list((tmp_path / "spool" / "corrupt").iterdir())


@in_thread
def test_a_fifo_or_a_symlink_in_the_spool_neither_hangs_the_start_nor_stops_delivery(
    make_loop_relay, upstream, pki, tmp_path
):
    """Before, `Spool.open()` opened a FIFO named like an entry and waited for a writer for
    ever: the relay never got ready, nothing was taken or delivered."""
    entries = tmp_path / "spool" / "entries"
    entries.mkdir(parents=True)
    os.mkfifo(entries / "fifo0000")
    (tmp_path / "elsewhere").write_bytes(b"not an entry")
    os.symlink(tmp_path / "elsewhere", entries / "link0000")
    relay = make_loop_relay(upstream.port, queue=spool_queue(tmp_path))
    assert submit(relay, pki) == {}
    upstream.wait_for(1)
    wait_for(lambda: relay.metric("relay_queue_unreadable_messages") == 2, what="both counted as unreadable")
    logged = {
        e.get("id"): e.get("reason", "")
        for e in relay.logs()
        if e.get("msg") == "spool entry unreadable; skipped, tried again at the next scan"
    }
    assert "not a regular file" in logged["fifo0000"] and "symbolic link" in logged["link0000"]
    assert (entries / "fifo0000").exists() and (entries / "link0000").is_symlink()  # left alone
