"""The spool library on its own: format, group commit, locks, accounting, quarantine."""

from __future__ import annotations

import asyncio
import email
import fcntl
import logging
import os
import random
import time

import pytest

from relay.errors import SmtpError
from relay.queue.commit import GroupCommitter
from relay.queue.dsn import build_dsn, reportable
from relay.queue.entry import (
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
    assert list(spool.journal_dir.iterdir()) == []  # a clean stop leaves nothing to replay


async def test_journal_replay_after_a_crash_restores_lost_entries_only(tmp_path):
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
    # is gone (its journal lock with it).
    os.unlink(crashed.path("lost"))
    with open(crashed.path("torn"), "r+b") as fh:
        fh.truncate(20)
    os.close(crashed.journal._fd)
    crashed.journal._fd = -1

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
    os.close(killed.journal._fd)  # kill -9: no retirement, the segment stays
    killed.journal._fd = -1

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
