"""The spool library on its own: format, group commit, locks, accounting, quarantine."""

from __future__ import annotations

import asyncio
import contextlib
import email
import fcntl
import json
import logging
import os
import random
import time
import zlib

import pytest

from relay.errors import SmtpError
from relay.queue import admin
from relay.queue.commit import GroupCommitter
from relay.queue.dsn import build_dsn, reportable
from relay.queue.entry import (
    ENTRY_MAGIC,
    FAILED,
    CorruptEntry,
    QueueEntry,
    RecipientState,
    decode_entry,
    decode_state,
    encode_entry,
    encode_state,
)
from relay.queue.schedule import RetryPolicy
from relay.queue.store import Spool

MESSAGE = b"From: app@example.com\r\nTo: a@example.net\r\nSubject: hi\r\n\r\nbody\r\n"


def make_entry(entry_id: str = "e1", *, mail_from: str = "app@example.com", rcpts=("a@example.net",)) -> QueueEntry:
    now = time.time()
    return QueueEntry(
        id=entry_id, mail_from=mail_from, recipients=[RecipientState(r) for r in rcpts], created=now, since=now
    )


@pytest.fixture
def spool(tmp_path):
    s = Spool(tmp_path / "spool")
    s.open()
    return s


# -- format -------------------------------------------------------------------------------
def test_entry_round_trip_keeps_envelope_and_message():
    entry = make_entry(mail_from="")
    entry.recipients[0].notify, entry.recipients[0].orcpt = "FAILURE,DELAY", "rfc822;a@example.net"
    entry.ret, entry.envid = "HDRS", "env-1"
    back, message = decode_entry(encode_entry(entry, MESSAGE))
    assert message == MESSAGE
    assert back == entry


@pytest.mark.parametrize("damage", ["truncate", "flip", "extend", "header"])
def test_damaged_entry_is_detected(damage):
    data = bytearray(encode_entry(make_entry(), MESSAGE))
    if damage == "truncate":
        data = data[:-7]
    elif damage == "flip":
        data[-5] ^= 0x20
    elif damage == "extend":
        data += b"x"
    else:
        data[:7] = b"XXXXXXX"
    with pytest.raises(CorruptEntry):
        decode_entry(bytes(data))


@pytest.mark.parametrize("written_by", ["no such keys", "empty values"])
async def test_an_entry_from_before_listener_and_user_were_recorded_shows_nulls(spool, written_by):
    """Entries spooled before the listener and the user were recorded (the keys absent, or
    "" and null as the dataclass defaults wrote them) stay readable: both show as null."""
    meta = make_entry("old1").meta()
    if written_by == "no such keys":
        del meta["listener"], meta["user"]
    else:
        meta["listener"], meta["user"] = "", None
    body = json.dumps(meta).encode()
    first = b"%s %d %d %08x\n" % (ENTRY_MAGIC, len(body), len(MESSAGE), zlib.crc32(MESSAGE, zlib.crc32(body)))
    spool.path("old1").write_bytes(first + body + MESSAGE)
    shown = admin.show(spool, "old1")
    assert (shown["listener"], shown["user"]) == (None, None)
    [listed] = admin.list_entries(spool)
    assert (listed["id"], listed["listener"], listed["user"]) == ("old1", None, None)
    await spool.close()


def test_max_age_counts_from_creation_unless_requeued():
    entry = QueueEntry(id="x", mail_from="a@b.test", recipients=[], created=1000.0)
    assert entry.since == 1000.0  # a new entry is not born expired


def test_state_file_round_trip_and_torn_state():
    entry = make_entry(rcpts=("a@x.test", "b@x.test"))
    entry.recipients[1].status = FAILED
    state = decode_state(encode_state(entry))
    copy = make_entry(rcpts=())
    copy.apply_state(state)
    assert copy.recipients == entry.recipients
    with pytest.raises(CorruptEntry):
        decode_state(encode_state(entry)[:-3])


# -- schedule -----------------------------------------------------------------------------
def test_retry_steps_jitter_and_last_step_repeats():
    policy = RetryPolicy([60, 300, 900], max_age=86400)
    rng = random.Random(1)
    for attempts, step in ((1, 60), (2, 300), (3, 900), (4, 900), (40, 900)):
        delays = [policy.delay(attempts, rng) for _ in range(200)]
        assert all(step * 0.9 <= d <= step * 1.1 for d in delays)
        assert len({round(d, 3) for d in delays}) > 1  # jittered, not fixed


def test_retry_never_scheduled_past_max_age():
    policy = RetryPolicy([3600], max_age=100)
    assert policy.next_attempt(now=1050, attempts=1, since=1000) == 1100
    assert policy.expired(1100, 1000) and not policy.expired(1099, 1000)


# -- group commit -------------------------------------------------------------------------
async def test_concurrent_writes_share_directory_fsyncs(tmp_path):
    committer = GroupCommitter()
    await asyncio.gather(*(committer.write(tmp_path / f"m{i}", b"x" * 100) for i in range(50)))
    assert committer.writes == 50
    assert committer.batches < 50
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"m{i}" for i in range(50))
    await committer.close()


async def test_one_sync_per_write_without_grouping(tmp_path):
    committer = GroupCommitter(group=False)
    await asyncio.gather(*(committer.write(tmp_path / f"m{i}", b"x") for i in range(10)))
    assert (committer.batches, committer.writes) == (10, 10)
    await committer.close()


async def test_failed_write_fails_only_its_writer(tmp_path):
    committer = GroupCommitter()
    missing = tmp_path / "no-such-dir" / "m"
    results = await asyncio.gather(
        committer.write(tmp_path / "ok", b"1"), committer.write(missing, b"2"), return_exceptions=True
    )
    assert results[0] is None and isinstance(results[1], OSError)
    assert (tmp_path / "ok").read_bytes() == b"1"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    await committer.close()


# -- the spool ----------------------------------------------------------------------------
async def test_put_returns_a_held_lock_and_the_entry_reads_back(spool):
    held = await spool.put(make_entry("abc"), MESSAGE)
    assert spool.lock("abc") is None  # held: nobody else gets it
    fd = os.open(spool.path("abc"), os.O_RDONLY)
    with pytest.raises(BlockingIOError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)
    entry, message = spool.read(held)
    assert message == MESSAGE and entry.id == "abc" and entry.owner
    held.release()
    again = spool.lock("abc")
    assert again is not None
    again.release()
    await spool.close()


async def test_lock_after_removal_sees_the_entry_gone(spool):
    held = await spool.put(make_entry("gone"), MESSAGE)
    fd = os.open(spool.path("gone"), os.O_RDONLY)  # opened before the removal, like a racing worker
    spool.remove(held)
    held.release()
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the old inode can be locked...
    os.close(fd)
    assert spool.lock("gone") is None  # ...but lock() checks the name still points at it
    await spool.close()


async def test_state_changes_are_one_rename_and_reload(spool):
    held = await spool.put(make_entry("s1", rcpts=("a@x.test", "b@x.test")), MESSAGE)
    entry, _ = spool.read(held)
    entry.recipients[0].status = "delivered"
    prepared = await spool.prepare(held, entry)
    assert spool.read_meta("s1").recipients[0].status == "pending"  # not yet in place
    prepared.commit()
    assert spool.read_meta("s1").recipients[0].status == "delivered"
    held.release()
    await spool.close()


async def test_full_spool_refuses_with_452_and_keeps_what_is_queued(tmp_path):
    spool = Spool(tmp_path / "spool", max_bytes=2500)
    spool.open()
    (await spool.put(make_entry("first"), MESSAGE * 20)).release()
    with pytest.raises(SmtpError) as refused:
        await spool.put(make_entry("second"), MESSAGE * 20)
    assert (refused.value.code, refused.value.reply.enhanced) == (452, "4.3.1")
    assert decode_entry(spool.path("first").read_bytes())[1] == MESSAGE * 20
    assert not spool.path("second").exists()
    assert spool.problem() is None or "max_bytes" in spool.problem()
    await spool.close()


async def test_truncated_entry_is_quarantined_with_a_log_line(spool, caplog):
    (await spool.put(make_entry("torn"), MESSAGE)).release()
    (await spool.put(make_entry("fine"), MESSAGE)).release()
    with open(spool.path("torn"), "r+b") as fh:
        fh.truncate(os.path.getsize(spool.path("torn")) - 10)
    result = spool.scan({})
    assert result.corrupt == ["torn"] and set(result.entries) == {"fine"}
    with caplog.at_level(logging.ERROR, logger="relay.queue"):
        spool.quarantine("torn", "length check failed")
    assert (spool.corrupt / "torn").exists() and not spool.path("torn").exists()
    assert any(getattr(r, "id", None) == "torn" for r in caplog.records)
    await spool.close()


async def test_scan_removes_orphan_state_and_old_tmp_files(spool):
    held = await spool.put(make_entry("o1"), MESSAGE)
    entry, _ = spool.read(held)
    await spool.save(held, entry)
    os.unlink(spool.path("o1"))  # a crash between the two unlinks of a finished entry
    held.release()
    stale = spool.entries / ".tmp-x-1234"
    stale.write_bytes(b"half")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert spool.scan({}).entries == {}
    assert list(spool.entries.iterdir()) == []
    await spool.close()


def test_files_that_are_not_spool_files_are_reported_never_opened_blocking(tmp_path):
    """A FIFO named like an entry, a state file or a journal segment, and a symbolic link:
    before, the scan (and so `Spool.open()`, the relay's start) waited for a FIFO's writer
    for ever. Run in a thread, bounded, so that the old code fails instead of hanging."""
    import threading

    root = tmp_path / "spool"
    Spool(root).open()
    asyncio.run(_put_and_close(Spool(root), make_entry("good1")))
    os.mkfifo(root / "entries" / "good1.state")
    os.mkfifo(root / "entries" / "fifo1")
    os.mkfifo(root / "journal" / "stray-1-1.log")
    (tmp_path / "target").write_bytes(b"x")
    os.symlink(tmp_path / "target", root / "entries" / "link1")
    (root / "entries" / "dir1").mkdir()
    outcome: list = []

    def scan() -> None:
        spool = Spool(root)
        spool.open()
        outcome.append(spool.opened_scan)

    thread = threading.Thread(target=scan, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():  # free the thread before failing
        for fifo in ("entries/fifo1", "journal/stray-1-1.log", "entries/good1.state"):
            with contextlib.suppress(OSError):
                os.close(os.open(root / fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("the scan blocked on a FIFO")
    result = outcome[0]
    assert result.entries == {}
    assert sorted(result.unreadable) == ["dir1", "fifo1", "good1", "link1"]
    assert "symbolic link" in result.problems["link1"]
    assert "FIFO" in result.problems["fifo1"] and "FIFO" in result.problems["good1"]
    assert "directory" in result.problems["dir1"]
    assert (root / "entries" / "link1").is_symlink() and (root / "journal" / "stray-1-1.log").exists()


async def _put_and_close(spool: Spool, entry: QueueEntry) -> None:
    spool.open()
    (await spool.put(entry, MESSAGE)).release()
    await spool.close()


async def test_a_journal_directory_removed_under_a_running_spool_refuses_new_mail(spool):
    """`journal/` removed while the relay runs (a clean-up script, an operator): the open
    segment has no name any more, so what is appended to it would not outlive a power loss,
    and no new segment can be opened, so no checkpoint ever makes the entries durable on
    their own. Before, every message still got its 250 and /readyz stayed ready."""
    import shutil

    (await spool.put(make_entry("before1"), MESSAGE)).release()
    shutil.rmtree(spool.journal_dir)
    with pytest.raises(SmtpError) as refused:
        await spool.put(make_entry("after1"), MESSAGE)
    assert refused.value.temporary
    assert not spool.path("after1").exists()  # not acknowledged, so not to be delivered
    assert "journal" in (spool.problem() or "")
    spool.journal_dir.mkdir()  # put back: new mail is taken again, without a restart
    (await spool.put(make_entry("after2"), MESSAGE)).release()
    assert spool.problem() is None
    await spool.close()


async def test_readiness_reports_a_spool_that_is_gone(spool):
    assert spool.problem() is None
    spool.entries.rename(spool.root / "elsewhere")  # e.g. the volume is not mounted
    assert "spool" in spool.problem()
    with pytest.raises(SmtpError) as refused:
        await spool.put(make_entry("x"), MESSAGE)
    assert refused.value.temporary


# -- reports ------------------------------------------------------------------------------
def test_dsn_is_an_rfc3464_report_to_the_sender():
    entry = make_entry(rcpts=("bad@example.net", "quiet@example.net", "ok@example.net"))
    entry.envid = "ENV42"
    bad, quiet, ok = entry.recipients
    bad.status, bad.last_reply, bad.orcpt = FAILED, "550 5.1.1 no such user", "rfc822;Bad@example.net"
    quiet.status, quiet.notify = FAILED, "NEVER"
    ok.status = "delivered"
    failed = reportable(entry)
    assert failed == [bad]
    report = build_dsn(entry, failed, MESSAGE, hostname="relay.example.com", now=time.time())
    msg = email.message_from_bytes(report)
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["To"] == "<app@example.com>"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    human, status, returned = msg.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    text = report.decode()
    assert "Final-Recipient: rfc822; bad@example.net" in text
    assert "Original-Recipient: rfc822;Bad@example.net" in text
    assert "Status: 5.1.1" in text and "Action: failed" in text
    assert "Original-Envelope-Id: ENV42" in text
    assert "quiet@example.net" not in status.as_string()
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"\r\nbody\r\n" not in report  # headers only unless RET=FULL


def test_never_a_report_for_a_null_sender():
    entry = make_entry(mail_from="")
    entry.recipients[0].status = FAILED
    assert reportable(entry) == []


# -- the journal (group commit of new entries) ----------------------------------------------
async def test_journal_shares_syncs_between_concurrent_puts(spool):
    locks = await asyncio.gather(*(spool.put(make_entry(f"j{i}"), MESSAGE) for i in range(40)))
    for held in locks:
        held.release()
    assert spool.journal.writes == 40 and spool.journal.batches < 40
    await spool.close()
    assert list(spool.journal_dir.glob("*.log")) == []  # a clean stop leaves nothing to replay


def crash(spool: Spool) -> None:
    """What a process's death does to its journal: the segment's and the kept entry locks
    go, no retirement."""
    os.close(spool.journal._fd)
    spool.journal._fd = -1
    kept = getattr(spool.journal, "_kept", {})
    for fd in kept.values():
        os.close(fd)
    kept.clear()


async def test_journal_replay_after_a_crash_restores_lost_entries_only(tmp_path, monkeypatch):
    from relay.queue import journal as journal_mod

    crashed = Spool(tmp_path / "spool")
    crashed.open()
    crashed.journal.checkpoint_interval = 3600  # no checkpoint may retire the segment here
    for name in ("lost", "torn", "intact", "delivered"):
        (await crashed.put(make_entry(name), MESSAGE)).release()
    held = crashed.lock("delivered")
    crashed.remove(held)
    held.release()
    await crashed.put(make_entry("last"), MESSAGE)  # syncs the completion mark with it
    # A power loss: the entry files were never written back, or only partly; the process
    # is gone (its journal lock with it), and the machine came back with another boot id.
    os.unlink(crashed.path("lost"))
    with open(crashed.path("torn"), "r+b") as fh:
        fh.truncate(20)
    crash(crashed)
    monkeypatch.setattr(journal_mod, "boot_id", lambda: "after-the-reboot")

    restarted = Spool(tmp_path / "spool")
    restarted.open()  # the scan replays the orphaned segment
    result = restarted.scan({})
    assert set(result.entries) == {"lost", "torn", "intact", "last"}
    assert result.corrupt == []
    for name in ("lost", "torn"):
        assert restarted.read_message(name) == MESSAGE
    assert not restarted.path("delivered").exists()
    assert list(restarted.journal_dir.glob("*.log")) == []
    await restarted.close()


def test_torn_journal_tail_is_ignored():
    from relay.queue.journal import DONE, PUT, encode_record, read_records

    blob = encode_record(PUT, "a", b"one") + encode_record(DONE, "a") + encode_record(PUT, "b", b"two")
    assert [(k, i) for k, i, _ in read_records(blob)] == [(PUT, "a"), (DONE, "a"), (PUT, "b")]
    assert [i for _, i, _ in read_records(blob[:-1])] == ["a", "a"]


async def test_live_journal_is_never_replayed_by_another_worker(tmp_path):
    first = Spool(tmp_path / "spool")
    first.open()
    (await first.put(make_entry("mine"), MESSAGE)).release()
    second = Spool(tmp_path / "spool")
    second.open()
    second.scan({})
    assert len(list(first.journal_dir.glob("*.log"))) == 1  # still there, still locked
    await first.close()
    await second.close()


async def test_replay_after_kill_never_resurrects_delivered_entries(tmp_path):
    """Regression: the first batch of a journal was not tracked by its segment, so its
    completion marks were never written and a replay after `kill -9` delivered it again."""
    killed = Spool(tmp_path / "spool")
    killed.open()
    killed.journal.checkpoint_interval = 3600
    locks = await asyncio.gather(*(killed.put(make_entry(f"k{i}"), MESSAGE) for i in range(5)))
    for held in locks:
        killed.remove(held)  # delivered
        held.release()
    crash(killed)  # kill -9: no retirement, the segment stays

    restarted = Spool(tmp_path / "spool")
    restarted.open()
    assert restarted.scan({}).entries == {}
    await restarted.close()


def test_reports_are_signed_with_the_hostname_domain_key(dkim_keys):
    import dkim

    from relay.queue.dsn import report_signer
    from relay.sign.dkim import DkimSigner
    from relay.sign.keys import load_signing_key

    key = load_signing_key(dkim_keys.rsa_path.read_bytes(), domain="example.com", selector="s1", algorithm="rsa-sha256")
    signer = DkimSigner(["from", "to", "subject", "date", "message-id", "auto-submitted"], [])
    sign = report_signer(lambda d: [key] if d == "example.com" else [], signer, "relay.mail.example.com")
    entry = make_entry()
    entry.recipients[0].status, entry.recipients[0].last_reply = FAILED, "550 5.1.1 gone"
    report = build_dsn(entry, entry.failed, MESSAGE, hostname="relay.mail.example.com", now=time.time())
    signed = sign(report)
    assert signed.startswith(b"DKIM-Signature:") and b"d=example.com" in signed
    assert dkim.verify(signed, dnsfunc=dkim_keys.dns())
    unsigned = report_signer(lambda d: [], signer, "relay.other.test")(report)
    assert unsigned == report


# -- review fixes: each test failed on the code before its fix ------------------------------
async def test_failed_rotation_keeps_the_old_segment_and_its_entries(tmp_path, monkeypatch):
    """A new segment that cannot be opened (EMFILE) changes nothing: the current segment
    takes the next batch, and when a rotation works, it is retired with every entry it
    vouched for fsynced (before: the acknowledged entry was never fsynced, its segment
    deleted, and the next writer hung)."""
    from relay.queue import journal as journal_mod

    spool = Spool(tmp_path / "spool")
    spool.open()
    j = spool.journal
    j.checkpoint_interval = 3600
    fsynced = []
    real_fsync_entry = journal_mod.fsync_entry
    monkeypatch.setattr(journal_mod, "fsync_entry", lambda p: (fsynced.append(p.name), real_fsync_entry(p)))
    (await spool.put(make_entry("e1"), MESSAGE)).release()  # acknowledged; in segment 1
    first_segment = j._segment
    j.checkpoint_interval = 0.0  # the next batch retires segment 1
    real_open = j._open_segment
    calls = {"n": 0}

    def flaky(seq):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(24, "Too many open files")
        return real_open(seq)

    monkeypatch.setattr(j, "_open_segment", flaky)
    (await asyncio.wait_for(spool.put(make_entry("e2"), MESSAGE), 10)).release()  # not left hanging
    (await spool.put(make_entry("e3"), MESSAGE)).release()  # this rotation works
    await asyncio.gather(*j._retiring, return_exceptions=True)
    assert not first_segment.exists()
    assert {"e1", "e2"} <= set(fsynced)
    await spool.close()


async def test_no_segment_at_all_refuses_the_batch_instead_of_hanging(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "spool")
    spool.open()

    def broken(seq):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool.journal, "_open_segment", broken)
    with pytest.raises(SmtpError) as refused:
        await asyncio.wait_for(spool.put(make_entry("n1"), MESSAGE), 10)
    assert refused.value.reply.code == 452 and not spool.path("n1").exists()
    monkeypatch.undo()
    (await spool.put(make_entry("n2"), MESSAGE)).release()  # the next put opens one
    await spool.close()


async def test_failed_directory_sync_of_a_state_write_keeps_the_new_state(tmp_path, monkeypatch):
    """Before: the new state file (the only one, the rename had replaced the old) was
    unlinked, and the entry fell back to its initial state: delivered recipients again."""
    from relay.queue import commit as commit_mod
    from relay.queue.entry import DELIVERED

    spool = Spool(tmp_path / "spool")
    spool.open()
    (await spool.put(make_entry("u1", rcpts=("done@x.test", "later@x.test")), MESSAGE)).release()
    await spool.close()
    spool = Spool(tmp_path / "spool")  # a fresh process: no lock kept by the writer
    spool.open()
    held = spool.lock("u1")
    e, _ = spool.read(held)
    e.recipients[0].status = DELIVERED
    await spool.save(held, e)
    e.recipients[1].attempts = 1
    real = commit_mod.fsync_directory

    def eio(d):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(commit_mod, "fsync_directory", eio)
    with pytest.raises(OSError):
        await spool.save(held, e)
    monkeypatch.setattr(commit_mod, "fsync_directory", real)
    held.release()
    state = spool.read_meta("u1")
    assert state.recipients[0].status == DELIVERED and state.recipients[1].attempts == 1
    await spool.close()


async def test_a_cancelled_save_keeps_the_lock_until_its_write_is_done(tmp_path, monkeypatch):
    """Before: the lock was released at the cancellation while the write went on, and the
    stale state landed over the operator's `retry` made meanwhile."""
    from relay.queue import admin
    from relay.queue import commit as commit_mod

    spool = Spool(tmp_path / "spool", journal=False)
    spool.open()
    (await spool.put(make_entry("s1"), MESSAGE)).release()
    real = commit_mod._rename_and_sync

    def slow(ready, dirty):
        time.sleep(0.5)  # a slow fsync (EFS, a saturated disk)
        return real(ready, dirty)

    monkeypatch.setattr(commit_mod, "_rename_and_sync", slow)

    async def worker_attempt():
        with spool.lock("s1") as held:
            e, _ = spool.read(held)
            e.recipients[0].next_attempt = time.time() + 3600
            e.recipients[0].last_reply = "451 worker"
            await spool.save(held, e)

    task = asyncio.create_task(worker_attempt())
    await asyncio.sleep(0.1)
    task.cancel()  # the drain timeout
    with pytest.raises(asyncio.CancelledError):
        await task
    cli = Spool(tmp_path / "spool", journal=False)
    assert await asyncio.to_thread(admin.retry, cli, "s1", wait=0) == 1  # the lock is free only now
    await spool.committer.flush()
    after = cli.read_meta("s1").recipients[0]
    assert after.next_attempt == 0.0  # the operator's retry stands
    await spool.close()


async def test_max_rate_is_shared_by_the_workers(tmp_path, monkeypatch):
    """Two workers build their targets from one config: together they get `max_rate`, not
    twice it (before: one bucket per process)."""
    from relay.config.schema import Settings
    from relay.secrets.local import EnvBackend, FileBackend
    from relay.secrets.store import SecretStore
    from relay.wiring import build_target

    settings = Settings(
        hostname="relay.test",
        listeners=[{"name": "plain", "bind": "127.0.0.1:2525", "tls": "none", "auth": "none"}],
        upstream={"host": "127.0.0.1", "port": 2, "tls": "none", "name": "ses", "max_rate": "14/s"},
        queue={"mode": "spool", "dir": str(tmp_path / "spool")},
    )
    slept = []

    async def no_sleep(d):
        slept.append(d)

    monkeypatch.setattr("relay.queue.pacing.asyncio.sleep", no_sleep)
    targets = [
        build_target(settings.upstream[0], settings, SecretStore([FileBackend(), EnvBackend()], 300), None)
        for _ in range(2)
    ]
    for t in targets:
        for _ in range(14):
            await t.bucket.take()
    assert len(slept) >= 13  # the second worker's 14 waited for the shared burst to refill
    assert sum(slept) > 0.9
    for t in targets:
        await t.close()


@pytest.mark.parametrize(
    "damaged",
    [(-1e300, 1.0), (float("nan"), float("nan")), (-1e12, 1e300), (float("-inf"), 0.0)],
    ids=["huge-debt", "nan", "debt-and-future-stamp", "minus-infinity"],
)
def test_a_damaged_shared_pacing_state_is_reset_not_obeyed(tmp_path, damaged):
    """The shared `max_rate` state is 16 bytes in the spool directory, kept across restarts.
    Damaged at rest into an absurd debt, it made every delivery to that upstream wait for
    ages (for ever, restart or not)."""
    import math
    import struct

    from relay.queue.pacing import SharedTokenBucket

    path = tmp_path / "pacing" / "up"
    path.parent.mkdir()
    path.write_bytes(struct.pack("<dd", *damaged))
    bucket = SharedTokenBucket(path, rate=14.0)
    wait = bucket._reserve(1.0)
    assert math.isfinite(wait) and wait <= 1.0
    tokens, _stamp = struct.unpack("<dd", path.read_bytes())
    assert math.isfinite(tokens)
    bucket.close()


async def test_an_entry_with_an_unreadable_state_is_skipped_not_fatal(spool, monkeypatch, caplog):
    """Before: any error but CorruptEntry in a scan (EACCES from a root-owned state file, a
    field written by a newer version) stopped the scan, the delivery loop and `open()`."""
    for name in ("good", "bad"):
        (await spool.put(make_entry(name), MESSAGE)).release()
    real = Spool.read_meta

    def read_meta(self, entry_id):
        if entry_id == "bad":
            raise PermissionError(13, "Permission denied", str(self.state_path(entry_id)))
        return real(self, entry_id)

    monkeypatch.setattr(Spool, "read_meta", read_meta)
    other = Spool(spool.root)
    with caplog.at_level(logging.ERROR, logger="relay.queue"):
        other.open()
    result = other.opened_scan
    assert set(result.entries) == {"good"} and result.unreadable == ["bad"]
    assert any(getattr(r, "id", None) == "bad" and "Permission denied" in r.reason for r in caplog.records)
    await other.close()
    await spool.close()


def test_fields_of_a_newer_version_are_ignored():
    entry = make_entry("n1")
    state = entry.state()
    state["recipients"][0]["dsn_sent"] = False  # a field this version does not know
    entry.apply_state(state)
    meta = entry.meta()
    meta["priority"] = 3
    meta["recipients"][0]["dsn_sent"] = False
    assert QueueEntry.from_meta(meta).recipients[0].address == "a@example.net"


async def test_a_damaged_state_file_is_quarantined_alone(spool):
    """Before: the whole entry went to quarantine (never delivered) for a torn `.state`."""
    (await spool.put(make_entry("t1", rcpts=("a@example.net", "b@example.net")), MESSAGE)).release()
    await spool.close()
    spool = Spool(spool.root)
    spool.open()
    with spool.lock("t1") as held:
        e, _ = spool.read(held)
        e.recipients[0].attempts = 2
        await spool.save(held, e)
    with open(spool.state_path("t1"), "r+b") as fh:
        fh.truncate(10)
    assert spool.scan({}).corrupt == []  # the scan goes on from the initial state
    with spool.lock("t1") as held:
        entry, message = spool.read(held)
    assert message == MESSAGE and [r.attempts for r in entry.recipients] == [0, 0]
    assert not spool.state_path("t1").exists() and (spool.corrupt / "t1.state").exists()
    await spool.close()


async def test_a_live_segment_keeps_its_entries_locked_until_it_is_retired(tmp_path):
    """While the writer's segment vouches for an entry, nobody else can remove it (so a
    replay never finds it "missing" because someone else delivered or deleted it)."""
    writer = Spool(tmp_path / "spool")
    writer.open()
    writer.journal.checkpoint_interval = 3600
    (await writer.put(make_entry("k1"), MESSAGE)).release()
    other = Spool(tmp_path / "spool")
    other.open()
    assert other.lock("k1") is None  # kept by the writer's journal
    with writer.lock("k1") as held:  # the writer's own runner takes it back
        assert held.id == "k1"
    assert other.lock("k1") is None  # and gives it back to the journal
    writer.journal.checkpoint_interval = 0.0
    (await writer.put(make_entry("k2"), MESSAGE)).release()  # rotates: segment 1 retires
    await asyncio.gather(*writer.journal._retiring, return_exceptions=True)
    held = other.lock("k1")
    assert held is not None
    held.release()
    await other.close()
    await writer.close()


async def test_replay_after_a_kill_does_not_restore_what_someone_removed(tmp_path):
    """The same boot: a missing file was removed (a kill keeps the page cache), not lost."""
    killed = Spool(tmp_path / "spool")
    killed.open()
    killed.journal.checkpoint_interval = 3600
    (await killed.put(make_entry("x1"), MESSAGE)).release()
    (await killed.put(make_entry("x2"), MESSAGE)).release()
    crash(killed)
    os.unlink(killed.path("x1"))  # delivered by another worker (it could lock it now)
    restarted = Spool(tmp_path / "spool")
    restarted.open()
    assert set(restarted.scan({}).entries) == {"x2"}
    await restarted.close()


async def test_a_listing_waits_for_a_replay_under_way(tmp_path):
    """Another worker replaying a dead segment (after a reboot: missing files restored)
    holds the replay lock: no listing, so no delivery from one, meanwhile (before: the
    second worker delivered what the first then restored: every message twice)."""
    spool = Spool(tmp_path / "spool")
    spool.open()
    fd = os.open(spool.journal_dir / "replay.lock", os.O_RDONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the replayer
    listing = asyncio.ensure_future(asyncio.to_thread(spool.scan, {}))
    await asyncio.sleep(0.3)
    assert not listing.done()
    os.close(fd)
    await asyncio.wait_for(listing, 10)
    await spool.close()


def test_dsn_declares_8bit_content_and_utf8_addresses():
    entry = make_entry("u8", rcpts=("josé@exämple.net",))
    entry.smtputf8 = True
    entry.recipients[0].status = FAILED
    entry.recipients[0].last_reply = "550 5.1.1 nö such user"
    message = "From: app@example.com\r\nSubject: Grüße\r\n\r\nbody\r\n".encode()
    report = build_dsn(entry, entry.failed, message, hostname="relay.example.com", now=time.time())
    assert b"Final-Recipient: utf-8; jos\xc3\xa9@ex\xc3\xa4mple.net" in report
    assert b"Content-Type: message/global-delivery-status\r\nContent-Transfer-Encoding: 8bit" in report
    assert b"Content-Type: message/global-headers\r\nContent-Transfer-Encoding: 8bit" in report
    from relay.queue.dsn import report_envelope

    assert report_envelope(report, entry.mail_from) == (True, False)


def test_dsn_returns_a_large_message_as_its_header_only():
    entry = make_entry("big")
    entry.ret = "FULL"
    entry.recipients[0].status = FAILED
    message = b"From: app@example.com\r\nSubject: big\r\n\r\n" + b"x" * 100_000 + b"\r\n"
    report = build_dsn(entry, entry.failed, message, hostname="relay.example.com", now=time.time())
    assert b"Content-Type: text/rfc822-headers" in report and len(report) < 10_000


def test_a_recipient_due_now_is_shown_due_now_not_in_1970():
    from relay.queue import admin

    entry = make_entry(rcpts=("a@example.net", "b@example.net"))
    entry.recipients[0].next_attempt = 0.0  # "now", as `relay queue retry` leaves it
    entry.recipients[1].next_attempt = entry.created + 600
    now = entry.created + 5
    info = admin.describe(entry, now)
    due_now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    assert [r["next_attempt"] for r in info["recipients"]] == [
        due_now,
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.created + 600)),
    ]
    assert info["next_attempt"] == due_now


def test_a_state_or_metadata_nested_thousands_deep_is_corrupt_not_a_crash():
    """json.loads recurses: arrays nested thousands deep raised RecursionError, which the
    spool's scan did not take for a damaged file."""
    import zlib

    from relay.queue.entry import ENTRY_MAGIC, STATE_MAGIC, CorruptEntry, CorruptState, decode_entry, decode_state

    nested = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(CorruptState, match="bad state: RecursionError"):
        decode_state(b"%s %d %08x\n" % (STATE_MAGIC, len(nested), zlib.crc32(nested)) + nested)
    entry = b"%s %d %d %08x\n" % (ENTRY_MAGIC, len(nested), 0, zlib.crc32(nested)) + nested
    with pytest.raises(CorruptEntry, match="bad metadata: RecursionError"):
        decode_entry(entry)


async def test_a_replay_meeting_a_fifo_where_its_entry_was_goes_on(tmp_path):
    """A dead writer's segment vouches for an entry whose file has become a FIFO: before,
    the replay raised, so every scan (and the start) failed on that one name."""
    killed = Spool(tmp_path / "spool")
    killed.open()
    killed.journal.checkpoint_interval = 3600
    (await killed.put(make_entry("f1"), MESSAGE)).release()
    (await killed.put(make_entry("f2"), MESSAGE)).release()
    crash(killed)
    os.unlink(killed.path("f1"))
    os.mkfifo(killed.path("f1"))
    restarted = Spool(tmp_path / "spool")
    restarted.open()  # no exception
    result = restarted.opened_scan
    assert set(result.entries) == {"f2"} and result.unreadable == ["f1"]
    assert list(restarted.journal_dir.glob("*.log")) == []  # the dead segment was replayed
    await restarted.close()
