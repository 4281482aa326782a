"""The spool's delivery loop against a real upstream listener on loopback.

In-process: the runner and its spool run in the test's event loop, the upstream is
aiosmtpd in its own thread, and SMTP goes over real sockets. Several `QueueRunner`s on one
spool directory behave like `--workers N` (flock conflicts between open files, not only
between processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import json
import logging
import os
import shutil
import subprocess
import threading
import time
import zlib

import pytest

from relay.config.schema import Settings, UpstreamSettings
from relay.queue import admin
from relay.queue.entry import DELIVERED, FAILED, PENDING, STATE_MAGIC, QueueEntry, RecipientState
from relay.queue.pacing import PacedTarget
from relay.queue.runner import QueueRunner, queue_id
from relay.queue.schedule import RetryPolicy
from relay.queue.store import Spool
from relay.route.router import Router
from relay.secrets.local import EnvBackend, FileBackend
from relay.secrets.store import SecretStore
from relay.wiring import build_target
from tests.support.cancel import LateCancel
from tests.support.upstream import Upstream

MESSAGE = (
    b"From: app@example.com\r\nTo: someone@example.net\r\nSubject: queued\r\n"
    b"Message-ID: <m1@example.com>\r\n\r\nhello from the spool\r\n"
)


@pytest.fixture
def upstream():
    with Upstream() as up:
        yield up


def make_delivery(upstream: Upstream, *, max_rate: float | None = None):
    settings = Settings(
        hostname="relay.test",
        listeners=[{"name": "plain", "bind": "127.0.0.1:2525", "tls": "none", "auth": "none"}],
        upstream={"host": "127.0.0.1", "port": upstream.port, "tls": "none", "name": "up"},
    )
    up: UpstreamSettings = settings.upstream[0]
    delivery = build_target(up, settings, SecretStore([FileBackend(), EnvBackend()], 300), None)
    return PacedTarget(delivery, max_rate) if max_rate else delivery


class Harness:
    def __init__(self, root, upstream: Upstream, *, steps=(0.2,), max_age=60.0, bounce="dsn", max_rate=None):
        self.closed = False
        self.spool = Spool(root)
        self.spool.open()
        self.delivery = make_delivery(upstream, max_rate=max_rate)
        router = Router(self.delivery)
        self.runner = QueueRunner(
            self.spool,
            lambda: router,
            RetryPolicy(list(steps), max_age=max_age, jitter=0.0),
            hostname="relay.test",
            bounce=bounce,
            scan_interval=0.2,
        )

    async def put(self, rcpts, *, mail_from="app@example.com", message=MESSAGE, submit=True, **fields) -> str:
        now = time.time()
        entry = QueueEntry(
            id=queue_id(),
            mail_from=mail_from,
            recipients=[RecipientState(r) for r in rcpts],
            created=now,
            **fields,
        )
        held = await self.spool.put(entry, message)
        if submit:
            self.runner.submit(held, entry, message)
        else:
            held.release()
        return entry.id

    async def close(self):
        if self.closed:
            return
        self.closed = True
        await self.runner.stop(5)
        await self.delivery.close()
        await self.spool.close()


@pytest.fixture
async def harness(tmp_path, upstream):
    """Makes harnesses on one spool directory, and closes them all, even after a failure."""
    made: list[Harness] = []

    def make(**kwargs) -> Harness:
        made.append(Harness(tmp_path / "spool", upstream, **kwargs))
        return made[-1]

    yield make
    for h in made:
        await h.close()


async def eventually(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def state_of(spool: Spool, entry_id: str) -> QueueEntry | None:
    try:
        return spool.read_meta(entry_id)
    except FileNotFoundError:
        return None


async def test_spooled_messages_reach_the_upstream_and_leave_the_spool(harness, upstream):
    h = harness()
    h.runner.start()
    ids = [await h.put([f"r{i}@example.net"]) for i in range(5)]
    await eventually(lambda: len(upstream.messages) == 5, what="5 deliveries")
    await eventually(lambda: all(state_of(h.spool, i) is None for i in ids), what="empty spool")
    assert sorted(m.rcpt_tos[0] for m in upstream.messages) == [f"r{i}@example.net" for i in range(5)]
    assert all(m.content.replace(b"\r\n", b"\n") == MESSAGE.replace(b"\r\n", b"\n") for m in upstream.messages)
    await h.close()


async def test_entries_left_on_disk_are_delivered_after_a_restart(harness, upstream):
    h = harness()
    ids = [await h.put(["late@example.net"], submit=False) for _ in range(3)]
    h.runner.start()  # the scan finds them
    await eventually(lambda: len(upstream.messages) == 3, what="deliveries from the scan")
    # The upstream holds the message a moment before the relay reads its 250.
    await eventually(lambda: all(state_of(h.spool, i) is None for i in ids), what="empty spool")
    await h.close()


async def test_an_upstream_taking_one_recipient_per_transaction_gets_them_all_in_one_attempt(harness, upstream, caplog):
    """452 4.5.3 after each first recipient: three transactions in one attempt. The second
    used to fail ("delivery attempt failed unexpectedly") — the first one's commit had
    replaced the entry's recipients, and the leftovers were the old objects — and the rest
    waited for a retry a minute later."""
    upstream.behaviour.max_recipients = 1
    h = harness(steps=(60.0,))
    rcpts = ["a@example.net", "b@example.net", "c@example.net"]
    entry_id = await h.put(rcpts)
    h.runner.start()
    await eventually(lambda: len(upstream.messages) == 3, what="three transactions")
    assert [m.rcpt_tos for m in upstream.messages] == [[r] for r in rcpts]
    await eventually(lambda: state_of(h.spool, entry_id) is None, what="the entry done")
    assert "delivery attempt failed unexpectedly" not in caplog.text


async def test_per_recipient_outcomes_retry_and_report(harness, upstream):
    upstream.behaviour.rcpt_replies = {
        "later@example.net": "451 4.2.0 mailbox busy",
        "never@example.net": "550 5.1.1 no such user",
    }
    h = harness(steps=(0.3,))
    entry_id = await h.put(["ok@example.net", "later@example.net", "never@example.net"], envid="E-1")
    h.runner.start()
    await eventually(lambda: len(upstream.messages) == 1, what="first delivery")
    assert upstream.messages[0].rcpt_tos == ["ok@example.net"]
    entry = state_of(h.spool, entry_id)
    status = {r.address: r.status for r in entry.recipients}
    assert status == {"ok@example.net": DELIVERED, "later@example.net": PENDING, "never@example.net": FAILED}
    later = entry.recipients[1]
    assert later.attempts == 1 and later.last_reply.startswith("451 4.2.0") and later.next_attempt > 0

    upstream.behaviour.rcpt_replies = {"never@example.net": "550 5.1.1 no such user"}
    # The retry delivers `later` alone; the entry is then final with one failure: a dead
    # letter, and a report goes to the sender with the null reverse-path.
    await eventually(lambda: len(upstream.messages) == 3, what="retry and report")
    retried, report = upstream.messages[1], upstream.messages[2]
    assert retried.rcpt_tos == ["later@example.net"] and retried.mail_from == "app@example.com"
    assert report.mail_from in ("", "<>") and report.rcpt_tos == ["app@example.com"]
    dsn = email.message_from_bytes(report.content)
    assert dsn["Auto-Submitted"] == "auto-replied" and dsn.get_content_type() == "multipart/report"
    assert b"Final-Recipient: rfc822; never@example.net" in report.content
    assert b"Original-Envelope-Id: E-1" in report.content
    assert b"later@example.net" not in dsn.get_payload()[1].as_bytes()
    dead = state_of(h.spool, entry_id)
    assert dead.done and dead.failed and dead.dsn == "queued" and dead.finished
    listed = {item["id"]: item for item in admin.list_entries(h.spool)}
    assert listed[entry_id]["state"] == "dead"
    await h.close()


async def test_max_age_fails_what_is_left_and_a_bounce_is_never_bounced(harness, upstream):
    # The upstream defers the recipient and refuses the sender's address, so the report
    # itself fails: it must end as a dead letter without a report of its own.
    upstream.behaviour.rcpt_replies = {
        "slow@example.net": "451 4.4.1 try again later",
        "app@example.com": "550 5.1.1 sender mailbox gone",
    }
    h = harness(steps=(0.2,), max_age=1.0)
    entry_id = await h.put(["slow@example.net"])
    h.runner.start()
    await eventually(lambda: (e := state_of(h.spool, entry_id)) is not None and e.done, what="expiry")
    entry = state_of(h.spool, entry_id)
    assert entry.recipients[0].status == FAILED and entry.recipients[0].attempts >= 2
    assert entry.recipients[0].last_reply.startswith("451 4.4.1")
    await eventually(lambda: entry_id in {i["id"] for i in admin.list_entries(h.spool)}, what="listing")

    def reports():
        return [i for i in admin.list_entries(h.spool) if i["from"] == ""]

    await eventually(lambda: reports() and reports()[0]["state"] == "dead", what="the report failing")
    await asyncio.sleep(0.5)  # a few more scans: nothing new may appear
    assert len(reports()) == 1 and reports()[0]["report"] in (None, "none")
    assert upstream.messages == []
    await h.close()


async def test_bounce_drop_keeps_the_dead_letter_and_sends_nothing(harness, upstream):
    upstream.behaviour.rcpt_replies = {"never@example.net": "550 5.1.1 no such user"}
    h = harness(bounce="drop")
    entry_id = await h.put(["never@example.net"])
    h.runner.start()
    await eventually(lambda: (e := state_of(h.spool, entry_id)) is not None and e.done, what="final failure")
    await asyncio.sleep(0.5)
    assert upstream.messages == [] and state_of(h.spool, entry_id).dsn == "none"
    assert [i["id"] for i in admin.list_entries(h.spool)] == [entry_id]
    await h.close()


async def test_requeue_a_dead_letter(harness, upstream):
    upstream.behaviour.rcpt_replies = {"moved@example.net": "550 5.1.1 no such user"}
    h = harness(bounce="drop")
    entry_id = await h.put(["moved@example.net"])
    h.runner.start()
    await eventually(lambda: (e := state_of(h.spool, entry_id)) is not None and e.done, what="dead letter")
    upstream.behaviour.rcpt_replies = {}
    assert await asyncio.to_thread(admin.requeue, h.spool, entry_id) == 1
    await eventually(lambda: len(upstream.messages) == 1, what="delivery after requeue")
    await eventually(lambda: state_of(h.spool, entry_id) is None, what="entry removed")
    await h.close()


async def test_a_truncated_entry_is_quarantined_and_the_rest_delivered(harness, upstream):
    h = harness()
    torn = await h.put(["torn@example.net"], submit=False)
    good = await h.put(["good@example.net"], submit=False)
    with open(h.spool.path(torn), "r+b") as fh:
        fh.truncate(os.path.getsize(h.spool.path(torn)) // 2)
    h.runner.start()
    await eventually(lambda: len(upstream.messages) == 1, what="the intact entry")
    await eventually(lambda: (h.spool.corrupt / torn).exists(), what="quarantine")
    assert upstream.messages[0].rcpt_tos == ["good@example.net"]
    await eventually(lambda: state_of(h.spool, good) is None, what="the intact entry removed")
    await h.close()


async def test_paced_upstream_still_delivers_everything(harness, upstream):
    h = harness(max_rate=20.0)
    h.runner.start()
    for i in range(10):
        await h.put([f"p{i}@example.net", f"q{i}@example.net"])
    await eventually(lambda: len(upstream.messages) == 10, what="paced deliveries")
    await h.close()


async def test_workers_sharing_a_spool_deliver_each_entry_once(harness, upstream):
    upstream.behaviour.data_delay = 0.05
    workers = [harness() for _ in range(3)]
    ids = [await workers[0].put([f"w{i}@example.net"], submit=False) for i in range(30)]
    for w in workers:
        w.runner.start()
    await eventually(lambda: len(upstream.messages) >= 30, what="all deliveries")
    await eventually(lambda: all(state_of(workers[0].spool, i) is None for i in ids), what="empty spool")
    await asyncio.sleep(0.5)
    rcpts = [m.rcpt_tos[0] for m in upstream.messages]
    assert sorted(rcpts) == sorted(f"w{i}@example.net" for i in range(30))  # no duplicates
    for w in workers:
        await w.close()


async def test_operator_commands_racing_a_delivery_never_double_deliver(harness, upstream):
    """`relay queue retry|delete|requeue` hammering entries while a worker delivers them.
    Each entry has a recipient the upstream accepts and one it defers for a while, so
    entries live through several attempts with some recipients already delivered: a state
    written from a stale read would send those again. Each recipient must reach the
    upstream at most once, and exactly once unless its entry was deleted."""
    tiers = ("fast", "mid", "late", "slow")  # accepted one tier after the other
    upstream.behaviour.data_delay = 0.02
    upstream.behaviour.rcpt_replies = {f"{t}{i}@example.net": "451 4.2.0 busy" for t in tiers[1:] for i in range(8)}
    h = harness(steps=(0.1,))
    ids = [await h.put([f"{t}{i}@example.net" for t in tiers], submit=False) for i in range(8)]
    deleted: set[str] = set()
    stop = threading.Event()
    errors: list[BaseException] = []
    done_ops = []
    # The operator is another process in real life: its own Spool object on the same
    # directory. Its state writes are slowed down (a slow disk) to widen any window in
    # which a write from a stale read could land.
    operator_spool = Spool(h.spool.root)
    save = operator_spool.save_sync

    def slow_save(*args, **kwargs):
        time.sleep(0.05)
        save(*args, **kwargs)

    operator_spool.save_sync = slow_save

    def operator():
        n = 0
        while not stop.is_set():
            entry_id = ids[n % len(ids)]
            n += 1
            try:
                if n % 29 == 0:
                    admin.delete(operator_spool, entry_id, wait=0.5)
                    deleted.add(entry_id)
                elif n % 3 == 0:
                    admin.requeue(operator_spool, entry_id, wait=0.5)
                else:
                    admin.retry(operator_spool, entry_id, wait=0.5)
                done_ops.append(n)
            except admin.QueueCommandError:
                pass
            except BaseException as exc:  # anything else is a bug
                errors.append(exc)
                return

    thread = threading.Thread(target=operator)
    h.runner.start()
    thread.start()
    try:
        for tier in tiers[1:]:
            await asyncio.sleep(1.0)
            upstream.behaviour.rcpt_replies = {
                address: reply
                for address, reply in upstream.behaviour.rcpt_replies.items()
                if not address.startswith(tier)
            }
        await eventually(lambda: all(state_of(h.spool, i) is None for i in ids), timeout=40, what="queue empty")
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert done_ops  # the operator did act
    delivered = [rcpt for m in upstream.messages for rcpt in m.rcpt_tos]
    assert len(delivered) == len(set(delivered)), "a recipient got the message twice"
    expected = {f"{t}{i}@example.net" for i, entry_id in enumerate(ids) if entry_id not in deleted for t in tiers}
    assert expected <= set(delivered)
    await h.close()


async def test_spool_delivery_stands_in_for_the_upstream_transaction(harness, upstream):
    """The pipeline's view of spool mode: the delivery contract, ending in a synced entry."""
    from relay.deliver.base import Envelope
    from relay.errors import SmtpError
    from relay.queue.spooled import SpoolTarget

    h = harness()
    h.runner.start()
    spooled = SpoolTarget(h.spool, h.runner, lambda: Router(h.delivery))
    tx = await spooled.begin(Envelope("app@example.com"), "one@example.net")
    assert (await tx.add_recipient("one@example.net")).code == 250
    assert (await tx.add_recipient("two@example.net")).code == 250
    reply = await tx.send(MESSAGE)
    assert reply.code == 250 and tx.queued_id in reply.text
    await eventually(lambda: len(upstream.messages) == 1, what="delivery of the queued message")
    assert sorted(upstream.messages[0].rcpt_tos) == ["one@example.net", "two@example.net"]

    h.spool.max_bytes = 0  # full: refused at the first RCPT, before the client sends DATA
    with pytest.raises(SmtpError) as full:
        await spooled.begin(Envelope("app@example.com"), "one@example.net")
    assert (full.value.code, full.value.reply.enhanced) == (452, "4.3.1")


# -- review fixes: each test failed on the code before its fix ------------------------------
async def test_a_loop_error_is_logged_and_the_loop_goes_on(harness, upstream, caplog):
    """Before: an exception in a scan ended the delivery loop silently (no log, deferred
    mail never retried, `stop()` re-raised it)."""
    upstream.behaviour.rcpt_replies = {"later@example.net": "451 4.2.0 busy"}
    h = harness(steps=(0.3,))
    h.runner.error_backoff = 0.2
    h.runner.start()
    deferred = await h.put(["later@example.net"])
    await eventually(
        lambda: (e := state_of(h.spool, deferred)) is not None and e.recipients[0].attempts == 1, what="deferred"
    )
    real = h.spool.scan
    failures = {"n": 0}

    def broken(cache, **kw):
        if failures["n"] < 2:
            failures["n"] += 1
            raise OSError(5, "Input/output error")
        return real(cache, **kw)

    h.spool.scan = broken
    upstream.behaviour.rcpt_replies = {}
    with caplog.at_level(logging.ERROR, logger="relay.queue"):
        await eventually(lambda: len(upstream.messages) == 1, what="the deferred message retried")
    assert failures["n"] == 2 and not h.runner._main.done()
    assert any(r.getMessage() == "spool delivery loop error; going on" for r in caplog.records)
    await h.close()  # and the drain does not raise


async def test_an_unknown_state_field_does_not_stop_delivery(harness, upstream):
    """A state file written by a newer version (a rollback): the entry is delivered."""
    h = harness(steps=(0.3,))
    other = await h.put(["x@example.net"], submit=False)
    await eventually(lambda: not getattr(h.spool.journal, "_kept", {}), what="checkpoint")
    with h.spool.lock(other) as held:
        e, _ = h.spool.read(held)
    st = e.state()
    st["recipients"][0]["dsn_sent"] = False
    body = json.dumps(st).encode()
    h.spool.state_path(other).write_bytes(b"%s %d %08x\n" % (STATE_MAGIC, len(body), zlib.crc32(body)) + body)
    Spool(h.spool.root).open()  # a restart works too
    h.runner.start()
    await eventually(lambda: len(upstream.messages) == 1, what="delivery")
    assert not h.runner._main.done()


async def test_the_sweep_keeps_a_dead_letter_the_operator_just_requeued(harness, upstream):
    """Before: the sweep removed on the strength of the scan's summary, so a requeue made
    between the scan and the sweep was deleted without a trace."""
    upstream.behaviour.rcpt_replies = {"gone@example.net": "550 5.1.1 no such user"}
    h = harness(bounce="drop")
    h.runner.dead_letter_age = 0.2
    entry_id = await h.put(["gone@example.net"])
    await eventually(lambda: (e := state_of(h.spool, entry_id)) is not None and e.done, what="dead")
    await asyncio.sleep(0.3)
    h.runner._last_sweep = time.monotonic()
    await h.runner._scan()  # the summaries come from here
    upstream.behaviour.rcpt_replies = {}
    cli = Spool(h.spool.root, journal=False)
    assert await asyncio.to_thread(admin.requeue, cli, entry_id, wait=5) == 1
    h.runner._sweep_dead(time.time())  # the sweep right after that scan
    assert state_of(h.spool, entry_id) is not None and not state_of(h.spool, entry_id).done
    h.runner.start()
    await eventually(lambda: len(upstream.messages) == 1, what="the requeued message delivered")


async def test_a_report_that_cannot_be_queued_waits_for_its_retry_step(harness, upstream, monkeypatch):
    """Before: every scan rebuilt, signed and logged the report of every dead letter while
    the spool was full (the in-memory backoff was overridden by the scan)."""
    from relay.queue import runner as runner_mod

    built = []
    real = runner_mod.build_dsn
    monkeypatch.setattr(runner_mod, "build_dsn", lambda *a, **kw: (built.append(1), real(*a, **kw))[1])
    upstream.behaviour.rcpt_replies = {"never@example.net": "550 5.1.1 no such user"}
    h = harness(steps=(60.0,))
    entry_id = await h.put(["never@example.net"], submit=False)
    h.spool.max_bytes = 1  # full from now on
    h.runner.start()
    await eventually(lambda: (e := state_of(h.spool, entry_id)) is not None and e.dsn == "pending", what="dead")
    await asyncio.sleep(2.5)  # about 12 scans at 0.2 s
    assert state_of(h.spool, entry_id).dsn == "pending"
    assert built == []  # the room is checked before the report is built and signed


async def test_the_last_try_happens_at_the_deadline_and_counts_as_failed(harness, upstream):
    """Before: expiry was checked before the attempt, so the try at the deadline never
    happened, and `max_age` failures were not counted in attempts_total{result="failed"}."""
    from prometheus_client import REGISTRY

    upstream.behaviour.rcpt_replies = {"slow@example.net": "451 4.4.1 later"}

    def failed_count():
        return (
            REGISTRY.get_sample_value("relay_queue_delivery_attempts_total", {"upstream": "up", "result": "failed"})
            or 0
        )

    before = failed_count()
    h = harness(steps=(10.0,), max_age=1.0, bounce="drop")
    entry_id = await h.put(["slow@example.net"])
    h.runner.start()
    await eventually(lambda: (e := state_of(h.spool, entry_id)) is not None and e.done, what="expiry")
    r = state_of(h.spool, entry_id).recipients[0]
    assert r.status == FAILED and r.attempts == 2 and upstream.mail_commands == 2
    assert failed_count() == before + 1


async def test_a_long_transaction_keeps_its_prepared_state(harness, upstream):
    """A prepared state older than the tmp-file age, under a transaction still running:
    before, any scan (even `relay queue list`) deleted it and the message went out twice."""
    upstream.behaviour.rcpt_replies = {"no@example.net": "550 5.1.1 no such user"}
    upstream.behaviour.data_delay = 1.5
    h = harness(steps=(0.3,), bounce="drop")
    h.runner.start()
    entry_id = await h.put(["ok@example.net", "no@example.net"])
    found = []

    def prepared():
        found[:] = list(h.spool.entries.glob(f".tmp-{entry_id}.state-*"))
        return bool(found)

    await eventually(prepared, what="prepared state")
    old = time.time() - 700  # the transaction has lasted 11+ minutes
    os.utime(found[0], (old, old))
    admin.list_entries(Spool(h.spool.root, journal=False))  # `relay queue list` meanwhile
    await asyncio.to_thread(Spool(h.spool.root).scan, {})  # another worker's scan
    await eventually(lambda: (e := state_of(h.spool, entry_id)) is not None and e.done, what="final")
    await asyncio.sleep(1)
    assert [m.rcpt_tos for m in upstream.messages] == [["ok@example.net"]]


async def test_a_torn_state_file_does_not_quarantine_the_message(harness, upstream):
    upstream.behaviour.rcpt_replies = {"later@example.net": "451 4.2.0 busy"}
    h = harness(steps=(0.3,))
    entry_id = await h.put(["later@example.net"])
    h.runner.start()
    await eventually(lambda: h.spool.state_path(entry_id).exists(), what="state file")
    with open(h.spool.state_path(entry_id), "r+b") as fh:
        fh.truncate(10)
    upstream.behaviour.rcpt_replies = {}
    await eventually(lambda: len(upstream.messages) == 1, what="delivery from the initial state")
    assert not (h.spool.corrupt / entry_id).exists()


async def test_a_busy_pool_does_not_spend_attempts(tmp_path, upstream):
    """More deliveries than pool connections: the relay's own 451 4.4.5 (no free connection)
    is not an attempt. Before: 12 of 16 messages got a deferred attempt and a retry step."""
    from relay.queue.runner import BUSY_RETRY

    settings = Settings(
        hostname="relay.test",
        listeners=[{"name": "plain", "bind": "127.0.0.1:2525", "tls": "none", "auth": "none"}],
        upstream={
            "host": "127.0.0.1",
            "port": upstream.port,
            "tls": "none",
            "name": "up",
            "pool": {"max_connections": 2, "acquire_timeout": "1s"},
        },
    )
    delivery = build_target(settings.upstream[0], settings, SecretStore([FileBackend(), EnvBackend()], 300), None)
    upstream.behaviour.data_delay = 0.6
    spool = Spool(tmp_path / "spool")
    spool.open()
    router = Router(delivery)
    runner = QueueRunner(spool, lambda: router, RetryPolicy([60.0], max_age=3600, jitter=0.0), hostname="relay.test")
    for i in range(16):
        e = QueueEntry(
            id=f"p{i:02d}", mail_from="a@example.com", recipients=[RecipientState(f"r{i}@x.test")], created=time.time()
        )
        (await spool.put(e, MESSAGE)).release()
    runner.start()
    try:
        await eventually(lambda: len(upstream.messages) == 16, timeout=60 + 4 * BUSY_RETRY, what="all 16 delivered")
    finally:
        await runner.stop(1)
        await delivery.close()
        await spool.close()
    assert sorted(m.rcpt_tos[0] for m in upstream.messages) == sorted(f"r{i}@x.test" for i in range(16))


async def test_deliveries_under_way_stay_within_a_byte_budget(harness, upstream):
    """Before: up to 64 whole messages in memory at once, whatever their size."""
    upstream.behaviour.data_delay = 0.3
    h = harness()
    big = MESSAGE + (b"x" * 76 + b"\r\n") * 1300  # 100 KB
    h.runner.delivery_bytes = 9 * len(big)  # two at a time (each counts four times)
    for _ in range(8):
        await h.put(["big@example.net"], message=big, submit=False)
    most = 0

    async def watch():
        nonlocal most
        while True:
            most = max(most, h.runner._reading)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    h.runner.start()
    await eventually(lambda: len(upstream.messages) == 8, timeout=60, what="all 8 delivered")
    watcher.cancel()
    assert 0 < most <= h.runner.delivery_bytes


async def test_the_first_scan_reuses_what_open_read(tmp_path, upstream, monkeypatch):
    """A backlog found at start is read once (by `Spool.open()`), not a second time by the
    delivery loop's first scan."""
    first = Spool(tmp_path / "spool")
    first.open()
    for i in range(5):
        e = QueueEntry(
            id=f"b{i}", mail_from="a@example.com", recipients=[RecipientState("r@x.test")], created=time.time()
        )
        e.recipients[0].next_attempt = time.time() + 3600  # not due: nothing is delivered
        (await first.put(e, MESSAGE)).release()
    await first.close()
    h = Harness(tmp_path / "spool", upstream)
    reads = []
    real = Spool.read_meta
    monkeypatch.setattr(Spool, "read_meta", lambda self, i: (reads.append(i), real(self, i))[1])
    h.runner.start()
    await eventually(lambda: h.runner._last_scan > 0, what="the first scan")
    assert reads == [] and len(h.runner._summaries) == 5
    await h.close()


async def test_a_stop_ends_a_delivery_that_lets_its_first_cancellation_go_by(harness, upstream):
    """Python 3.11's wait_for (aiosmtplib reads every reply with it) can let a cancellation
    go by: the delivery goes on. Before, the stop that cancelled it once waited for ever."""
    upstream.behaviour.data_delay = 30  # a real delivery is under way at the stop
    h = harness()
    h.runner.start()
    entry_id = await h.put(["slow@example.net"])
    await eventually(lambda: h.runner.inflight == 1, what="a delivery under way")
    late = LateCancel()
    h.runner._inflight["goes-on"] = asyncio.create_task(late.run())
    await asyncio.sleep(0.1)
    stopping = asyncio.create_task(h.runner.stop(0.1))
    done, _ = await asyncio.wait({stopping}, timeout=60)  # bounded: before the fix, for ever
    assert done, "the stop is still waiting for the delivery"
    assert late.cancellations == 2
    assert state_of(h.spool, entry_id) is not None  # not delivered: still spooled, for the next start
    assert upstream.messages == []


class SteppedClock:
    """The wall clock (`time.time`) moved by an operator or a bad NTP step, for this process
    only; `time.monotonic` goes on undisturbed, as it does on a real machine."""

    def __init__(self, monkeypatch) -> None:
        self.offset = 0.0
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + self.offset)

    def step(self, seconds: float) -> None:
        self.offset += seconds


async def test_a_clock_stepped_back_does_not_stall_the_delivery_loop(harness, upstream, monkeypatch):
    """Before, the loop compared the wall clock with its last scan: stepped back five hours,
    it scanned again only five hours later, so an entry another worker accepted (or a
    restart left, or `relay queue retry` woke) waited that long."""
    clock = SteppedClock(monkeypatch)
    h = harness()
    h.runner.start()
    await h.put(["first@example.net"])
    await eventually(lambda: len(upstream.messages) == 1, what="a delivery before the step")
    clock.step(-5 * 3600)
    await asyncio.sleep(0.5)  # the loop runs on with the clock stepped back
    other = await h.put(["second@example.net"], submit=False)  # only a scan finds it
    await eventually(lambda: len(upstream.messages) == 2, what="a delivery found by a scan after the step")
    assert upstream.messages[1].rcpt_tos == ["second@example.net"]
    await eventually(lambda: state_of(h.spool, other) is None, what="the entry removed")


async def test_a_recipient_deferred_before_the_clock_stepped_back_is_retried(harness, upstream, monkeypatch):
    """A retry is never scheduled further off than the longest retry step; one that is, was
    scheduled by a clock since stepped back, and is due now rather than hours late."""
    clock = SteppedClock(monkeypatch)
    upstream.behaviour.rcpt_replies = {"later@example.net": "451 4.2.0 mailbox busy"}
    h = harness(steps=(1.0,))
    entry_id = await h.put(["later@example.net"])
    h.runner.start()
    await eventually(lambda: (e := state_of(h.spool, entry_id)) and e.recipients[0].attempts == 1, what="deferred")
    clock.step(-5 * 3600)
    upstream.behaviour.rcpt_replies = {}
    await eventually(lambda: len(upstream.messages) == 1, what="the retry after the step")
    await eventually(lambda: state_of(h.spool, entry_id) is None, what="the entry removed")


async def test_relay_queue_retry_after_the_clock_stepped_back_wakes_the_loop(harness, upstream, monkeypatch):
    """`relay queue retry` touches the kick file; the loop took only a newer kick than the
    last for one, and after a step back every kick is older."""
    upstream.behaviour.rcpt_replies = {"later@example.net": "451 4.2.0 mailbox busy"}
    h = harness(steps=(3600.0,))
    h.runner.scan_interval = 3600.0  # only a kick makes the loop look at the spool
    entry_id = await h.put(["later@example.net"])
    h.runner.start()
    await eventually(lambda: (e := state_of(h.spool, entry_id)) and e.recipients[0].attempts == 1, what="deferred")
    kick = h.spool.root / "kick"
    assert await asyncio.to_thread(admin.retry, h.spool, entry_id) == 1
    await eventually(lambda: state_of(h.spool, entry_id).recipients[0].attempts == 2, what="the first retry")
    upstream.behaviour.rcpt_replies = {}
    # The clock stepped back an hour since: the next `relay queue retry` touches the kick file
    # with an older time than the one the loop took.
    assert await asyncio.to_thread(admin.retry, h.spool, entry_id) == 1
    stamp = kick.stat().st_mtime - 3600
    os.utime(kick, (stamp, stamp))
    await eventually(lambda: len(upstream.messages) == 1, what="the retry after the step")


async def test_retry_all_does_not_wait_for_deliveries_under_way(harness, upstream):
    """`relay queue retry --all` while the upstream hangs: before, it waited for the lock of
    every entry being delivered (up to 30 s each, and a hung upstream holds it until its
    timeouts), then called each a failure ("being delivered right now") and exited 1,
    though those entries were due already. Only the waiting ones are its business."""
    upstream.behaviour.data_delay = 120  # each delivery under way holds its entry's lock
    upstream.behaviour.rcpt_replies = {"later@example.net": "451 4.2.0 busy"}
    h = harness(steps=(3600.0,))
    h.runner.start()
    deferred = await h.put(["later@example.net"])
    await eventually(lambda: (e := state_of(h.spool, deferred)) and e.recipients[0].attempts == 1, what="deferred")
    hung = [await h.put([f"hung{i}@example.net"]) for i in range(3)]
    await eventually(lambda: h.runner.inflight == 3, what="three deliveries under way")
    operator = Spool(h.spool.root, journal=False)
    done, problems = await asyncio.wait_for(asyncio.to_thread(admin.retry_all, operator), timeout=150)
    assert problems == []
    assert done == 4  # every entry with a recipient waiting is due now
    assert state_of(h.spool, deferred).recipients[0].next_attempt == 0.0
    assert all(state_of(h.spool, i) is not None for i in hung)


@contextlib.contextmanager
def unchangeable(directory):
    """Nothing in `directory` can be created, renamed or removed, even by root (chattr +i):
    what a spool remounted read-only (ext4's errors=remount-ro) or failing with EIO does to
    the delivery loop's records."""
    if os.geteuid() != 0 or not shutil.which("chattr"):
        pytest.fail("needs root and chattr(1)")
    subprocess.run(["chattr", "+i", str(directory)], check=True, timeout=30)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True, timeout=30)


async def test_a_delivery_the_spool_cannot_record_is_not_sent_again(harness, upstream, monkeypatch):
    """After the upstream's 250 the entry's removal failed (the spool had become read-only):
    before, the attempt counted as failed unexpectedly and the message went out again at
    every retry, once a minute, for as long as the spool stayed so."""
    from relay.queue import runner as runner_module

    monkeypatch.setattr(runner_module, "ERROR_RETRY", 0.3)  # 60 s in production
    upstream.behaviour.rcpt_replies = {"later@example.net": "451 4.2.0 busy"}
    h = harness(steps=(0.3,))
    entry_id = await h.put(["later@example.net"])
    h.runner.start()
    await eventually(lambda: (e := state_of(h.spool, entry_id)) and e.recipients[0].attempts == 1, what="deferred")
    with unchangeable(h.spool.entries):
        upstream.behaviour.rcpt_replies = {}
        await eventually(lambda: len(upstream.messages) == 1, what="the delivery")
        await asyncio.sleep(3)  # ten retry steps: nothing more may go out
        assert len(upstream.messages) == 1
        assert state_of(h.spool, entry_id) is not None  # not recorded: the spool could not
    # Writable again: the delivery is recorded (the entry removed), still not sent again.
    await eventually(lambda: state_of(h.spool, entry_id) is None, what="the entry removed")
    assert len(upstream.messages) == 1


async def test_a_damaged_entry_that_cannot_be_moved_does_not_stop_the_others(harness, upstream, monkeypatch):
    """The quarantine of a damaged entry failed (a read-only spool): before, the error ended
    the scan before anything was scheduled, at every scan, so no entry was delivered."""
    from relay.queue import runner as runner_module

    monkeypatch.setattr(runner_module, "ERROR_RETRY", 0.3)  # 60 s in production
    h = harness()
    torn = await h.put(["torn@example.net"], submit=False)
    good = await h.put(["good@example.net"], submit=False)
    with open(h.spool.path(torn), "r+b") as fh:
        fh.truncate(os.path.getsize(h.spool.path(torn)) // 2)
    with unchangeable(h.spool.entries):
        h.runner.start()
        await eventually(lambda: len(upstream.messages) == 1, what="the intact entry delivered")
        assert upstream.messages[0].rcpt_tos == ["good@example.net"]
    await eventually(lambda: state_of(h.spool, good) is None, what="its delivery recorded once writable")
    await eventually(lambda: not h.spool.path(torn).exists(), what="the damaged one quarantined")
    assert len(upstream.messages) == 1
