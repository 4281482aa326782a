"""What `relay queue` does: list, show, retry, delete and requeue entries, safely while the
relay runs.

Each change takes the entry's lock first (waiting for a delivery under way to finish), so
an operator and a worker never act on one entry at once; after the change the workers are
woken through the spool's kick file. Nothing here talks to the running relay otherwise.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from typing import Any

from relay.queue.entry import FAILED, PENDING, CorruptEntry, QueueEntry
from relay.queue.store import EntryLock, Spool, instance_name

LOCK_WAIT = 30.0


class QueueCommandError(Exception):
    """An operator's request that cannot be done; the message says why."""


class _Gone(QueueCommandError):
    """The entry left the queue, or has nothing left to wait for, since it was listed."""


def entry_state(entry: QueueEntry, now: float) -> str:
    if entry.done:
        return "dead" if entry.failed else "delivered"
    due = entry.next_due()
    return "active" if due is not None and due <= now else "deferred"


def describe(entry: QueueEntry, now: float) -> dict[str, Any]:
    due = entry.next_due()
    return {
        "id": entry.id,
        "state": entry_state(entry, now),
        "created": _iso(entry.created),
        "age_seconds": round(now - entry.created, 1),
        "from": entry.mail_from,
        "size": entry.size,
        "recipients": [
            {
                "address": r.address,
                "status": r.status,
                "attempts": r.attempts,
                # 0 means "now" (a new entry, or after `relay queue retry`): never 1970.
                "next_attempt": _iso(max(r.next_attempt, now)) if r.status == PENDING else None,
                "last_reply": r.last_reply or None,
                "upstream": r.upstream or None,
            }
            for r in entry.recipients
        ],
        "next_attempt": _iso(max(due, now)) if due is not None else None,
        "finished": _iso(entry.finished) if entry.finished else None,
        "report": entry.dsn or None,
        "owner": entry.owner or None,
        # Who sent it: the listener and the authenticated username ("dsn" for the relay's
        # own reports); null in entries spooled before they were recorded.
        "listener": entry.listener or None,
        "user": entry.user,
    }


def list_entries(spool: Spool) -> list[dict[str, Any]]:
    """Every entry, damaged and unreadable ones included (state `damaged`/`unreadable`, so
    an operator sees them before a worker quarantines them). Reads only: nothing removed."""
    now = time.time()
    out = []
    result = spool.scan({}, tidy=False)
    for entry_id in sorted(result.entries):
        try:
            entry, state_problem = spool.read_meta_checked(entry_id)
        except FileNotFoundError:
            continue
        except Exception as exc:  # noqa: BLE001 - changed since the scan: shown as it is now
            problem = f"{type(exc).__name__}: {exc}"
            out.append(_problem(spool, entry_id, "damaged" if isinstance(exc, CorruptEntry) else "unreadable", problem))
            continue
        out.append(_with_state_problem(describe(entry, now), state_problem))
    for state, ids in (("damaged", result.corrupt), ("unreadable", result.unreadable)):
        for entry_id in ids:
            out.append(_problem(spool, entry_id, state, result.problems.get(entry_id)))
    out.sort(key=lambda item: item["created"])
    return out


def _problem(spool: Spool, entry_id: str, state: str, problem: str | None) -> dict[str, Any]:
    try:
        stat = os.lstat(spool.path(entry_id))
        created, size = stat.st_mtime, stat.st_size
    except OSError:
        created, size = time.time(), 0
    return {
        "id": entry_id,
        "state": state,
        "created": _iso(created),
        "age_seconds": round(time.time() - created, 1),
        "from": "?",
        "size": size,
        "recipients": [],
        "next_attempt": None,
        "finished": None,
        "report": None,
        "owner": None,
        "listener": None,
        "user": None,
        "problem": problem,
    }


def _with_state_problem(info: dict[str, Any], state_problem: str | None) -> dict[str, Any]:
    if state_problem is not None:
        # The relay quarantines the state file at the entry's next attempt; until then an
        # operator must know that what is shown is the entry's initial state.
        info["problem"] = f"state file damaged ({state_problem}): shown from the entry's initial state"
    return info


def show(spool: Spool, entry_id: str) -> dict[str, Any]:
    entry, state_problem = _read(spool, entry_id)
    info = _with_state_problem(describe(entry, time.time()), state_problem)
    info["envelope"] = {k: v for k, v in asdict(entry).items() if k in ("ret", "envid", "body_8bit", "smtputf8")}
    try:
        message = spool.read_message(entry_id)
    except CorruptEntry as exc:
        raise QueueCommandError(f"{entry_id}: damaged ({exc})") from None
    headers = BytesHeaderParser(policy=default_policy).parsebytes(message)
    info["headers"] = [(name, str(value)) for name, value in headers.items() if name.lower() != "dkim-signature"]
    return info


def retry(spool: Spool, entry_id: str, *, wait: float = LOCK_WAIT) -> int:
    """Make the entry's pending recipients due now. Returns how many."""
    with _lock(spool, entry_id, wait) as held:
        entry, _ = _read_held(spool, held)
        pending = entry.pending
        if not pending:
            raise _Gone(f"{entry_id} has no recipient waiting (state: {entry_state(entry, time.time())})")
        for r in pending:
            r.next_attempt = 0.0
        spool.save_sync(held, entry, owner=f"relay queue retry ({instance_name()})")
    spool.kick()
    return len(pending)


def retry_all(spool: Spool, *, wait: float = LOCK_WAIT) -> tuple[int, list[str]]:
    """Make every waiting recipient due now. Returns how many entries are due now, and
    what could not be done."""
    done, busy = 0, []
    now = time.time()
    for entry_id, summary in spool.scan({}, tidy=False).entries.items():
        if summary.due is None:
            continue
        if summary.due <= now:
            # Due already: being delivered, or about to be. Nothing to change, and a
            # delivery holds the entry's lock as long as its upstream takes (a hung one:
            # until its timeouts), which the command would wait for, entry after entry.
            done += 1
            continue
        try:
            retry(spool, entry_id, wait=wait)
            done += 1
        except _Gone:
            continue  # delivered (or finished) since the listing: nothing left to retry
        except QueueCommandError as exc:
            busy.append(str(exc))
    spool.kick()  # the entries due already too: now, not after an in-memory backoff
    return done, busy


def delete(spool: Spool, entry_id: str, *, wait: float = LOCK_WAIT) -> None:
    with _lock(spool, entry_id, wait) as held:
        spool.remove(held)  # durable at once: no event loop here


def requeue(spool: Spool, entry_id: str, *, wait: float = LOCK_WAIT) -> int:
    """Give a dead letter's failed recipients a fresh start (attempts, `max_age`)."""
    with _lock(spool, entry_id, wait) as held:
        entry, _ = _read_held(spool, held)
        if not (entry.done and entry.failed):
            raise QueueCommandError(
                f"{entry_id} is not a dead letter (state: {entry_state(entry, time.time())}); use retry"
            )
        failed = [r for r in entry.recipients if r.status == FAILED]
        now = time.time()
        for r in failed:
            r.status, r.attempts, r.next_attempt = PENDING, 0, 0.0
        entry.since, entry.finished, entry.dsn = now, 0.0, ""
        spool.save_sync(held, entry, owner=f"relay queue requeue ({instance_name()})")
    spool.kick()
    return len(failed)


class _lock:
    def __init__(self, spool: Spool, entry_id: str, wait: float) -> None:
        if not os.path.lexists(spool.path(entry_id)):
            raise QueueCommandError(f"{entry_id}: no such entry in the queue")
        try:
            held = spool.lock(entry_id, wait=wait)
        except OSError as exc:  # a symbolic link, a FIFO, no permission: named, not a traceback
            raise QueueCommandError(f"{entry_id}: unreadable ({exc.strerror or exc})") from None
        if held is None:
            if os.path.exists(spool.path(entry_id)):
                raise QueueCommandError(f"{entry_id} is being delivered right now; try again")
            raise _Gone(f"{entry_id} left the queue meanwhile (delivered or removed)")
        self.held = held

    def __enter__(self) -> EntryLock:
        return self.held

    def __exit__(self, *exc: object) -> None:
        self.held.release()


def _read(spool: Spool, entry_id: str) -> tuple[QueueEntry, str | None]:
    try:
        return spool.read_meta_checked(entry_id)
    except FileNotFoundError:
        raise QueueCommandError(f"{entry_id}: no such entry in the queue") from None
    except CorruptEntry as exc:
        raise QueueCommandError(f"{entry_id}: damaged ({exc})") from None
    except OSError as exc:
        raise QueueCommandError(f"{entry_id}: unreadable ({exc.strerror or exc})") from None


def _read_held(spool: Spool, held: EntryLock) -> tuple[QueueEntry, bytes]:
    try:
        return spool.read(held)
    except CorruptEntry as exc:
        raise QueueCommandError(f"{held.id}: damaged ({exc})") from None


def _iso(stamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))
