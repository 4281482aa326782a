"""The delivery loop: spool entries out through the same upstream targets as passthrough.

One `QueueRunner` per process. It keeps a schedule of due entries (built by scanning the
spool, kept current by its own attempts), takes an entry's lock, re-reads its state, and
delivers the due recipients through the upstream transaction contract of
`relay.deliver.base` (begin → add_recipient → send | abort), to the target the router
picks for the envelope sender. Per recipient:

- the upstream's 2xx to DATA: delivered;
- 5xx at MAIL, RCPT or DATA: failed for good;
- 4xx, or a failure of the path (connect, TLS, proxy, timeout): deferred to the next step
  of the retry schedule (relay.queue.schedule); past `max_age`: failed;
- `452 4.5.3` at RCPT ("send these in another transaction", as MX delivery answers for a
  second domain, RFC 5321 §4.5.3.1.10): another transaction in the same attempt.

Before DATA the state "these recipients delivered" is prepared and synced; after the 250 it
is put in place with one rename (or the entry removed with one unlink when nothing is left),
so a crash repeats a delivery only if it falls in that window (at-least-once, never lost).

When every recipient has a final answer and some failed, the entry stays as a dead letter
for `dead_letter_age`, and with `bounce: dsn` a report (relay.queue.dsn) is queued to the
sender. The state records "report owed" before the report is queued and "queued" after,
so a crash in between is caught up on, not lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import heapq
import logging
import math
import os
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from prometheus_client import Counter, Gauge

from relay.cancel import cancel_and_wait
from relay.deliver.base import DsnRequest, Envelope, UpstreamTarget
from relay.deliver.dsn import relayed_report
from relay.errors import Reply, SmtpError
from relay.message import WireMessage
from relay.observe import messages
from relay.queue.dsn import build_dsn, report_envelope, reportable
from relay.queue.entry import DELIVERED, FAILED, PENDING, CorruptEntry, QueueEntry, RecipientState
from relay.queue.schedule import RetryPolicy
from relay.queue.store import EntryLock, EntrySummary, PreparedChange, Spool

log = logging.getLogger("relay.queue")

ATTEMPTS = Counter(
    "relay_queue_delivery_attempts_total",
    "Upstream transactions made for spooled messages, by upstream and result (delivered, deferred, failed).",
    ["upstream", "result"],
)
BOUNCES = Counter(
    "relay_queue_bounces_total",
    "Spooled messages that failed for good for at least one recipient (a DSN was queued, "
    "or with bounce: drop only logged).",
)
MESSAGES = Gauge(
    "relay_queue_messages",
    "Messages in the spool: active (due or being delivered), deferred "
    "(waiting for a retry), dead (failed, kept for inspection).",
    ["state"],
    multiprocess_mode="livemax",
)
BYTES = Gauge("relay_queue_bytes", "Bytes the spool holds on disk.", multiprocess_mode="livemax")
OLDEST = Gauge(
    "relay_queue_oldest_age_seconds",
    "Age of the oldest message still waiting for delivery.",
    multiprocess_mode="livemax",
)

MAX_BYTES = Gauge(
    "relay_queue_max_bytes",
    "queue.max_bytes: the spool size at which new mail gets 452 4.3.1.",
    multiprocess_mode="livemax",
)

UNREADABLE = Gauge(
    "relay_queue_unreadable_messages",
    "Spool entries the last scan could not read (permissions, I/O errors; the log names "
    "each): skipped, not quarantined, tried again at every scan.",
    multiprocess_mode="livemax",
)
LOOP_ERRORS = Counter(
    "relay_queue_loop_errors_total",
    "Unexpected errors in the spool's delivery loop (a scan or an entry that could not be "
    "read); the loop goes on, the log says what.",
)

SCAN_INTERVAL = 10.0
# An entry of a domain whose limit another entry is trying is woken by the outcome; it
# asks again after this only if none comes (that attempt could not read its entry).
PACED_PROBE_WAIT = 60.0
KICK_POLL = 1.0
DUE_SLACK = 0.5  # recipients due this soon go along with the ones due now
DEAD_SWEEP_INTERVAL = 300.0
LOOP_ERROR_BACKOFF = 5.0  # after an unexpected error in the loop, before the next scan
ERROR_RETRY = 60.0  # an entry whose attempt failed unexpectedly waits at least this long
BUSY_RETRY = 5.0  # no free upstream connection: not an attempt, tried again this soon
# Bytes of messages held in memory by deliveries under way. One larger message is let
# through alone. Each message counts COPIES times its size: measured with 8 MiB messages,
# a delivery holds the file's bytes, the decoded message and the copies made to send it.
DELIVERY_BYTES = 128 * 1024 * 1024
COPIES = 4
INLINE_READ_MAX = 256 * 1024
REPORT_SIZE_GUESS = 8192  # a failure report with the returned header, for the room check
# The delivery loop counts as stuck when it has not finished a scan for this long.
STUCK_AFTER = 300.0
# Refusals made by the relay itself before the upstream saw the transaction: no attempt.
NOT_ATTEMPTED = frozenset({"upstream_busy", "shutting_down"})
# A spool that cannot take a state change: full, over quota, read-only.
SPOOL_UNWRITABLE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


class RouteSource(Protocol):
    def target_for(self, mail_from: str) -> UpstreamTarget: ...


class DeliveryPacer(Protocol):
    """The upstream-side sending limits (relay.limits.Limiter): count a delivery attempt
    against its From domain, or say in how many seconds it fits. Never a refusal: the
    message was acknowledged, so a limit can only defer it. What was counted comes back as
    plain data, kept in the entry's state until a delivery settles it."""

    async def pace_delivery(
        self, from_domain: str | None, recipients: int, *, counted: bool
    ) -> dict[str, Any] | None | float: ...

    async def give_back_delivery(self, from_domain: str | None, counted: dict[str, Any]) -> None: ...


def queue_id() -> str:
    return os.urandom(8).hex()


class QueueRunner:
    def __init__(
        self,
        spool: Spool,
        router: Callable[[], RouteSource],
        policy: RetryPolicy,
        *,
        hostname: str,
        bounce: str = "dsn",
        dead_letter_age: float = 14 * 86400.0,
        sign_report: Callable[[bytes], bytes] | None = None,
        pacer: Callable[[], DeliveryPacer | None] | None = None,
        concurrency: int = 64,
        scan_interval: float = SCAN_INTERVAL,
        rng: random.Random | None = None,
    ) -> None:
        self.spool = spool
        self.router = router
        self.policy = policy
        self.hostname = hostname
        self.bounce = bounce
        self.dead_letter_age = dead_letter_age
        self.sign_report = sign_report
        self.pacer = pacer
        self.concurrency = concurrency
        self.scan_interval = scan_interval
        self.rng = rng or random.Random()
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}
        self._summaries: dict[str, EntrySummary] = {}
        # Deferrals by a sending limit live here, not in the entry's state (they are not
        # attempts): the scan, which schedules from the state, must not undo them.
        self._paced: dict[str, tuple[str, float]] = {}  # entry id -> (From domain, not before)
        self._domain_gates: dict[str, float] = {}  # From domain -> over its limit until then
        self._probing: dict[str, str] = {}  # From domain -> the one entry trying its gate
        self._waiting: dict[str, set[str]] = {}  # From domain -> entries waiting for that try
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._main: asyncio.Task[None] | None = None
        # Not before these times (in memory only): a report that could not be queued, an
        # attempt that failed unexpectedly. A scan reschedules from disk, never earlier.
        self._backoff: dict[str, float] = {}
        # Recipients (by position) this process delivered but could not record in the
        # spool (read-only, I/O errors): never sent again by it while the spool stays so.
        self._unrecorded: dict[str, set[int]] = {}
        self._unreadable = 0
        self.delivery_bytes = DELIVERY_BYTES
        self.error_backoff = LOOP_ERROR_BACKOFF
        self._reading = 0  # bytes of messages held by deliveries under way
        # The loop's own intervals run on the monotonic clock: a wall clock stepped back
        # must not stop the scans (nor one stepped forward make /readyz call the loop stuck).
        self._last_scan = -math.inf
        self._loop_alive = time.monotonic()
        self._last_kick = 0.0
        self._last_sweep = -math.inf
        if spool.max_bytes is not None:
            MAX_BYTES.set(spool.max_bytes)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        opened = self.spool.opened_scan
        if opened is not None and not self._summaries:
            # The scan `Spool.open()` made: the first scan of the loop reads only what
            # changed since, not every entry again.
            self._summaries = dict(opened.entries)
        self._loop_alive = time.monotonic()
        self._main = asyncio.create_task(self._run(), name="queue-runner")

    def problem(self) -> str | None:
        """Why the delivery loop is not working (for /readyz), or None."""
        if self._main is None or self._stopping:
            return None
        if self._main.done():
            return "spool delivery loop stopped"
        stuck = time.monotonic() - self._loop_alive
        if stuck > max(STUCK_AFTER, 3 * self.scan_interval):
            return f"spool delivery loop has not completed a scan for {stuck:.0f}s"
        return None

    async def stop(self, timeout: float) -> None:
        """Stop taking new attempts; let the ones under way finish within `timeout`, then
        cancel the rest (their entries stay on disk, in their last committed state)."""
        self._stopping = True
        self._wake.set()
        if self._main is not None:
            await cancel_and_wait({self._main})
            if self._main.done() and not self._main.cancelled() and self._main.exception():
                # Logged where it happened too; the drain goes on.
                log.error("spool delivery loop had stopped", exc_info=self._main.exception())
        tasks = list(self._inflight.values())
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
            if pending:
                log.warning(
                    "deliveries still under way at the end of the drain; left in the spool",
                    extra={"count": len(pending)},
                )
                await cancel_and_wait(pending)
        await self.spool.committer.flush()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def submit(self, held: EntryLock, entry: QueueEntry, message: bytes) -> None:
        """Deliver a freshly spooled entry now, keeping the lock taken when it was written.
        When the runner is busy (or stopping), the lock is let go (to the journal while it
        vouches for the entry) and the schedule has it."""
        size = COPIES * len(message)
        if (
            self._stopping
            or len(self._inflight) >= self.concurrency
            or entry.id in self._inflight
            or not self._fits(size)
        ):
            held.release()
            self._schedule(entry.id, time.time())
            return
        self._reading += size
        self._launch(entry.id, self._attempt_held(held, entry, message, size))

    def _fits(self, size: int) -> bool:
        # One message larger than the budget goes alone, rather than never.
        return self._reading == 0 or self._reading + size <= self.delivery_bytes

    # -- the schedule ---------------------------------------------------------------------
    def _schedule(self, entry_id: str, when: float) -> None:
        # In-memory backoff, and a sending limit's deferral: both outlast the scans.
        when = max(when, self._backoff.get(entry_id, 0.0), self._not_before(entry_id))
        if self._due.get(entry_id) == when:
            return
        self._due[entry_id] = when
        heapq.heappush(self._heap, (when, entry_id))
        self._wake.set()

    def _launch(self, entry_id: str, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work, name=f"deliver-{entry_id}")
        self._inflight[entry_id] = task
        task.add_done_callback(lambda _t: self._finished(entry_id))

    def _finished(self, entry_id: str) -> None:
        self._inflight.pop(entry_id, None)
        self._wake.set()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self._step()
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception:
                # One bad file, an I/O error: never the end of delivery. Logged, counted,
                # and the loop goes on after a pause (/readyz says so if it stays stuck).
                LOOP_ERRORS.inc()
                log.exception("spool delivery loop error; going on", extra={"retry_in_s": self.error_backoff})
                self._last_scan = time.monotonic() - self.scan_interval + self.error_backoff
                await asyncio.sleep(self.error_backoff)

    async def _step(self) -> None:
        kicked = self.spool.kicked_at()
        # Any change of the kick file's time is a kick: after the wall clock stepped back,
        # `relay queue retry` touches it with an older time than the last one.
        if time.monotonic() - self._last_scan >= self.scan_interval or kicked != self._last_kick:
            if kicked != self._last_kick:
                self._backoff.clear()  # an operator's retry: now, not after a backoff
            self._last_kick = kicked
            await self._scan()
        self._loop_alive = time.monotonic()
        self._dispatch(time.time())
        wait = min(KICK_POLL, max(0.0, self._last_scan + self.scan_interval - time.monotonic()))
        if self._heap and len(self._inflight) < self.concurrency:
            wait = min(wait, max(0.0, self._heap[0][0] - time.time()))
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=wait)

    def _dispatch(self, now: float) -> None:
        while (
            self._heap
            and self._heap[0][0] <= now
            and len(self._inflight) < self.concurrency
            and self._reading < self.delivery_bytes
        ):
            when, entry_id = heapq.heappop(self._heap)
            if self._due.get(entry_id) != when:
                continue  # superseded
            del self._due[entry_id]
            if entry_id in self._inflight:
                continue
            wait_until = self._not_before(entry_id)  # its domain's gate may have moved on
            if wait_until <= now:
                wait_until = self._paced_until(entry_id, now) or 0.0
            if wait_until > now:
                self._schedule(entry_id, wait_until)
                continue
            self._launch(entry_id, self._attempt(entry_id))

    def _not_before(self, entry_id: str) -> float:
        """When an entry a sending limit deferred may be read again: its own deferral, or
        its From domain's gate (none of the domain's entries is read and counted while the
        limit is known to be reached)."""
        paced = self._paced.get(entry_id)
        if paced is None:
            return 0.0
        domain, not_before = paced
        return max(not_before, self._domain_gates.get(domain, 0.0))

    def _paced_until(self, entry_id: str, now: float) -> float | None:
        """When the gate of a deferred entry's domain opens, one entry tries it and the
        others wait for its outcome (else each would be read and counted to learn the
        same); None: this one may go now."""
        paced = self._paced.get(entry_id)
        if paced is None:
            return None
        domain = paced[0]
        trying = self._probing.get(domain)
        if trying is not None and trying != entry_id and trying in self._inflight:
            self._waiting.setdefault(domain, set()).add(entry_id)
            return now + PACED_PROBE_WAIT  # woken by the outcome; this only if none comes
        self._probing[domain] = entry_id
        return None

    def _defer_paced(self, entry_id: str, domain: str, until: float) -> None:
        self._paced[entry_id] = (domain, until)
        self._domain_gates[domain] = until
        self._schedule(entry_id, until)
        self._tried(entry_id, domain)

    def _passed_pacing(self, entry_id: str, domain: str) -> None:
        self._paced.pop(entry_id, None)
        self._domain_gates.pop(domain, None)
        self._tried(entry_id, domain)

    def _tried(self, entry_id: str, domain: str) -> None:
        """The entry trying its domain's gate has its outcome: the waiting ones go now, or
        at the new gate."""
        if self._probing.get(domain) == entry_id:
            del self._probing[domain]
        now = time.time()
        for waiting in self._waiting.pop(domain, ()):
            self._schedule(waiting, now)

    async def _scan(self) -> None:
        started = time.time()
        scanned = time.monotonic()
        result = await asyncio.to_thread(self.spool.scan, dict(self._summaries))
        self._last_scan = time.monotonic()
        self._summaries = result.entries
        self._unreadable = len(result.unreadable)
        for gone in self._paced.keys() - result.entries.keys():
            del self._paced[gone]  # delivered or removed elsewhere
        for gone in self._unrecorded.keys() - result.entries.keys():
            del self._unrecorded[gone]
        for entry_id in result.corrupt:
            held = self.spool.lock(entry_id)
            if held is not None:
                with held:
                    why = self.spool.damaged(held)
                    if why:
                        self.spool.quarantine(entry_id, why)
        for entry_id in [
            i
            for i, until in self._backoff.items()
            if until <= started or i not in result.entries or until > started + ERROR_RETRY + self.policy.longest_wait()
        ]:
            del self._backoff[entry_id]  # over, gone, or set before the clock stepped back
        for entry_id, summary in result.entries.items():
            if entry_id in self._inflight:
                continue
            due = started if summary.dsn_pending else summary.due
            if due is not None and self.policy.beyond_schedule(due, started):
                due = started  # scheduled before the wall clock stepped back
            if due is not None:
                self._schedule(entry_id, due)  # not before an in-memory backoff
        if scanned - self._last_sweep >= DEAD_SWEEP_INTERVAL:
            self._last_sweep = scanned
            self._sweep_dead(started)
        self._publish(started)

    def _publish(self, now: float) -> None:
        active = deferred = dead = 0
        oldest = None
        for summary in self._summaries.values():
            if summary.dead:
                dead += 1
                continue
            if summary.due is None:
                continue
            paced = self._paced.get(summary.id)
            if summary.id in self._inflight or (summary.due <= now and (paced is None or paced[1] <= now)):
                active += 1
            else:
                deferred += 1
            oldest = summary.created if oldest is None else min(oldest, summary.created)
        MESSAGES.labels("active").set(active)
        MESSAGES.labels("deferred").set(deferred)
        MESSAGES.labels("dead").set(dead)
        UNREADABLE.set(self._unreadable)
        BYTES.set(self.spool.used_bytes)
        OLDEST.set(max(0.0, now - oldest) if oldest is not None else 0.0)

    def _sweep_dead(self, now: float) -> None:
        for summary in list(self._summaries.values()):
            if summary.dead and summary.finished and now - summary.finished > self.dead_letter_age:
                held = self.spool.lock(summary.id)
                if held is None:
                    continue
                with held:
                    # The summary is from the scan: an operator may have requeued the entry
                    # since. Removed only if it still is an expired dead letter, owing nothing.
                    try:
                        entry = self.spool.read_meta(summary.id)  # the envelope and state only
                    except (OSError, CorruptEntry):
                        continue
                    if not (entry.done and entry.failed and entry.finished) or entry.dsn == "pending":
                        continue
                    if now - entry.finished <= self.dead_letter_age:
                        continue
                    self.spool.remove(held)
                log.info("dead letter expired and removed", extra={"id": summary.id})

    # -- one attempt ------------------------------------------------------------------------
    async def _attempt(self, entry_id: str) -> None:
        try:
            held = self.spool.lock(entry_id)
        except OSError as exc:  # replaced by a FIFO or a link since the scan; no permission
            log.error("spool entry unreadable; will retry", extra={"id": entry_id, "reason": str(exc)})
            self._back_off(entry_id, time.time() + ERROR_RETRY)
            return
        if held is None:
            return  # gone, or another worker holds it: its state will come with the next scan
        with held:
            try:
                size = COPIES * os.fstat(held.fd).st_size
            except OSError:
                size = 0
            if not self._fits(size):
                # The memory budget of deliveries under way is spent: after the next one ends.
                self._schedule(entry_id, time.time() + DUE_SLACK)
                return
            self._reading += size
            try:
                try:
                    if size > COPIES * INLINE_READ_MAX:
                        entry, message = await asyncio.to_thread(self.spool.read, held)  # CRC off the loop
                    else:
                        entry, message = self.spool.read(held)
                except CorruptEntry as exc:
                    self.spool.quarantine(entry_id, str(exc))
                    return
                except FileNotFoundError:
                    return
                except Exception as exc:  # noqa: BLE001 - permissions, I/O error: this entry only
                    LOOP_ERRORS.inc()
                    log.error(
                        "spool entry unreadable; will retry",
                        extra={"id": entry_id, "reason": f"{type(exc).__name__}: {exc}"},
                    )
                    self._back_off(entry_id, time.time() + ERROR_RETRY)
                    return
                await self._deliver(held, entry, message)
            finally:
                self._reading -= size

    async def _attempt_held(self, held: EntryLock, entry: QueueEntry, message: bytes, size: int) -> None:
        try:
            with held:
                await self._deliver(held, entry, message)
        finally:
            self._reading -= size

    def _apply_unrecorded(self, entry: QueueEntry) -> bool:
        """Mark the recipients this process delivered but could not record as delivered;
        True if there were any still pending on disk."""
        now = time.time()
        changed = False
        for i in self._unrecorded.get(entry.id, ()):
            if i < len(entry.recipients) and entry.recipients[i].status == PENDING:
                r = entry.recipients[i]
                self._set(r, DELIVERED, "250 delivered", r.upstream, now)
                changed = True
        return changed

    def _back_off(self, entry_id: str, until: float) -> None:
        self._backoff[entry_id] = until
        self._schedule(entry_id, until)

    async def _deliver(self, held: EntryLock, entry: QueueEntry, message: bytes) -> None:
        try:
            await self._deliver_due(held, entry, message)
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:
            # Whatever went wrong, the entry stays in its last committed state and is
            # tried again later; a delivery task must never take the runner down.
            retry_in = max(ERROR_RETRY, self.policy.delay(1, self.rng))
            if isinstance(exc, OSError) and exc.errno in SPOOL_UNWRITABLE:
                # Expected while the disk is full or the volume read-only: one line per
                # attempt, not a traceback.
                log.error(
                    "spool cannot be written; delivery attempt put off",
                    extra={"id": entry.id, "reason": f"{exc.strerror}: {exc.filename}", "retry_in_s": round(retry_in)},
                )
            else:
                log.exception("delivery attempt failed unexpectedly; will retry", extra={"id": entry.id})
            self._back_off(entry.id, time.time() + retry_in)

    async def _deliver_due(self, held: EntryLock, entry: QueueEntry, message: bytes) -> None:
        if self._apply_unrecorded(entry) and entry.done:
            await self._settle(held, entry, message, time.time())
            return
        if entry.dsn == "pending":
            await self._report(held, entry, message)
            return
        if entry.done:
            return
        now = time.time()
        deadline = self.policy.deadline(entry.since)
        if now >= deadline and all(r.last_attempt >= deadline for r in entry.pending):
            # Each pending recipient has had its try at the deadline (the schedule never
            # goes past it) and is still pending: e.g. deferred by a sending limit since.
            for r in entry.pending:
                r.status = FAILED
                r.last_reply = r.last_reply or "451 4.4.7 Delivery time expired"
            ATTEMPTS.labels(entry.pending[0].upstream if entry.pending else "", "failed").inc()
            log.warning("max_age reached; remaining recipients failed", extra={"id": entry.id})
            await self._settle(held, entry, message, now)
            return
        due_at = [
            i
            for i, r in enumerate(entry.recipients)
            if r.status == PENDING
            and (r.next_attempt <= now + DUE_SLACK or self.policy.beyond_schedule(r.next_attempt, now))
        ]
        due = [entry.recipients[i] for i in due_at]
        pacer = self.pacer() if self.pacer is not None and due else None
        domain = None
        counted = None
        if pacer is not None:
            domain = entry.from_domain or _author_domain(message)
            if entry.limits_unsettled is not None:
                # Counted by an attempt that was cut short (a crash, a stop) before any
                # delivery settled it: given back before this attempt counts.
                await pacer.give_back_delivery(domain, entry.limits_unsettled)
                entry.limits_unsettled = None
                await self.spool.save(held, entry)
            # Once per message however many attempts it takes: an attempt that delivers to
            # some recipients keeps the message's count, the next counts only its recipients.
            paced = await pacer.pace_delivery(domain, len(due), counted=entry.limits_counted)
            if isinstance(paced, float):
                # Over a limit of its From domain (the upstream's side): not an attempt, not
                # a failure; the entry waits until it fits.
                log.info("delivery deferred by a sending limit", extra={"id": entry.id, "wait_s": round(paced)})
                self._defer_paced(entry.id, (domain or "").lower(), now + paced)
                return
            self._passed_pacing(entry.id, (domain or "").lower())
            if paced is not None:
                # On disk before the upstream sees the message: a restart in between must
                # neither count it again nor forget that it is counted.
                counted = paced
                entry.limits_unsettled = counted
                try:
                    await self.spool.save(held, entry)
                except Exception:
                    # Not on disk (a cancellation lets the write finish first: see Spool.save),
                    # so nothing would give it back later.
                    await pacer.give_back_delivery(domain, counted)
                    raise
        if due:
            # Routes go by the envelope sender, so one target carries every recipient; a
            # target that takes them in several transactions says so with 452 4.5.3.
            target = self.router().target_for(entry.mail_from)
            recipients = due
            while recipients:
                positions = {id(r): i for i, r in enumerate(entry.recipients)}
                try:
                    leftover = await self._transact(held, entry, target, recipients, message)
                except _Postponed:
                    self._back_off(entry.id, time.time() + BUSY_RETRY * (1 + self.rng.random()))
                    break
                # A partial delivery's commit replaced the entry's recipients (`_copy_state`):
                # the leftovers are taken from the entry again, by position.
                leftover = [entry.recipients[positions[id(r)]] for r in leftover]
                if len(leftover) == len(recipients):
                    # No progress at all: not a split but a refusal; retry later.
                    self._record(entry, leftover, Reply(452, "4.5.3", "recipient refused"), target.name)
                    break
                recipients = leftover
        unused = None
        if counted is not None:
            # What no delivery used comes back: everything when nothing went out, else the
            # recipients that were not delivered. Saved first (a crash in between leaves
            # the count taken: over, never twice given back).
            # By position: a partial delivery's commit replaces the entry's recipient
            # objects (`_copy_state`), so `due`'s own may be stale.
            delivered = sum(1 for i in due_at if entry.recipients[i].status == DELIVERED)
            if delivered:
                entry.limits_counted = True
            unused = _unused_count(counted, delivered)
            entry.limits_unsettled = None
        await self._settle(held, entry, message, now)
        if unused is not None and pacer is not None:
            await pacer.give_back_delivery(domain, unused)

    async def _transact(
        self,
        held: EntryLock,
        entry: QueueEntry,
        delivery: UpstreamTarget,
        recipients: list[RecipientState],
        message: bytes,
    ) -> list[RecipientState]:
        """One upstream transaction for `recipients`; returns those to send in another."""
        envelope = Envelope(
            entry.mail_from,
            body_8bit=entry.body_8bit,
            smtputf8=entry.smtputf8,
            ret=entry.ret,
            envid=entry.envid,
            auth=entry.extra.get("auth"),
        )
        upstream = delivery.name
        started = time.perf_counter()
        first = recipients[0]
        try:
            # With the first recipient's DSN request, a target whose upstream offers
            # PIPELINING sends that RCPT with MAIL (RFC 2920); its reply, or a failure of
            # the path after MAIL, comes from the first add_recipient below, as it would
            # one command at a time: every outcome below is the same.
            tx = await delivery.begin(envelope, first.address, _dsn_request(first))
        except SmtpError as exc:
            if exc.label in NOT_ATTEMPTED:
                # The relay's own pool had no free connection (or is being replaced): the
                # upstream never saw this, so no attempt is spent and no retry step taken.
                log.info(
                    "delivery postponed; no free upstream connection",
                    extra={"id": entry.id, "upstream": upstream, "reason": exc.reason, "retry_in_s": BUSY_RETRY},
                )
                raise _Postponed from None
            self._record(entry, recipients, exc.reply, upstream, reason=exc.reason, started=started)
            return []
        upstream = tx.upstream
        accepted: list[RecipientState] = []
        leftover: list[RecipientState] = []
        answered: set[int] = set()
        prepared: PreparedChange | None = None
        try:
            for r in recipients:
                reply = await tx.add_recipient(r.address, _dsn_request(r))
                if reply.positive:
                    accepted.append(r)
                elif reply.code == 452 and reply.enhanced == "4.5.3":
                    leftover.append(r)
                else:
                    self._record(entry, [r], reply, upstream)
                answered.add(id(r))
            if not accepted:
                await tx.abort()
                return leftover
            if len(accepted) == len(entry.pending) and not entry.failed:
                # The common case: this transaction finishes the entry, and its record is
                # the removal of the entry (no state to prepare, nothing to copy).
                after = None
                prepared = self.spool.prepare_removal(held)
            else:
                after = self._with_delivered(entry, accepted, upstream)
                prepared = await self.spool.prepare(held, after)
            reply = await tx.send(WireMessage([message]))
        except SmtpError as exc:
            if prepared is not None:
                prepared.discard()
            await tx.abort()
            unanswered = accepted + [r for r in recipients if id(r) not in answered]
            self._record(entry, unanswered, exc.reply, upstream, reason=exc.reason, started=started)
            return []
        except BaseException:
            if prepared is not None:
                prepared.discard()
            with contextlib.suppress(Exception):
                await asyncio.shield(tx.abort())
            raise
        if reply.positive:
            try:
                prepared.commit()  # the one syscall between the upstream's 250 and the spool
            except OSError as exc:
                # The upstream has the message; the spool cannot say so (remounted read-only,
                # EIO). Kept in memory, so that this process does not send it again at every
                # retry while the spool stays so; recorded by the entry's next attempt.
                with contextlib.suppress(OSError):
                    prepared.discard()
                positions = {id(r): i for i, r in enumerate(entry.recipients)}
                self._unrecorded.setdefault(entry.id, set()).update(positions[id(r)] for r in accepted)
                log.error(
                    "delivered, but the spool could not record it; not sent again by this process",
                    extra={"id": entry.id, "reason": f"{exc.strerror or exc}"},
                )
            if after is not None:
                _copy_state(after, entry)
            else:
                now = time.time()
                for r in accepted:
                    self._set(r, DELIVERED, str(reply), upstream, now)
            self._log_attempt(entry, accepted, upstream, "delivered", reply, started)
            ATTEMPTS.labels(upstream, "delivered").inc()
            if not tx.carries_dsn:
                await self._relayed_notice(entry, accepted, reply, message)
        else:
            prepared.discard()
            self._record(entry, accepted, reply, upstream, started=started)
        return leftover

    # -- outcomes -----------------------------------------------------------------------------
    def _with_delivered(self, entry: QueueEntry, accepted: list[RecipientState], upstream: str) -> QueueEntry:
        after = copy.deepcopy(entry)
        addresses = {id(r): i for i, r in enumerate(entry.recipients)}
        now = time.time()
        for r in accepted:
            self._set(after.recipients[addresses[id(r)]], DELIVERED, "250 delivered", upstream, now)
        if after.limits_unsettled is not None:
            # Committed with the delivery: the message is counted for good, and only what
            # the delivered recipients did not use is still to be given back.
            after.limits_counted = True
            after.limits_unsettled = _unused_count(after.limits_unsettled, len(accepted))
        self._finalize(after, now)
        return after

    def _record(
        self,
        entry: QueueEntry,
        recipients: list[RecipientState],
        reply: Reply,
        upstream: str,
        *,
        reason: str | None = None,
        started: float | None = None,
    ) -> None:
        if not recipients:
            return
        now = time.time()
        text = str(reply)
        expired = 0
        for r in recipients:
            if reply.positive:
                self._set(r, DELIVERED, text, upstream, now)
            elif reply.temporary:
                self._set(r, "pending", text, upstream, now)
                r.next_attempt = self.policy.next_attempt(now, r.attempts, entry.since, self.rng)
                if r.next_attempt <= now:
                    r.status = FAILED  # the deadline has come: this was the last try
                    expired += 1
            else:
                self._set(r, FAILED, text, upstream, now)
        if reply.positive:
            result = "delivered"
        elif reply.temporary and expired < len(recipients):
            result = "deferred"
        else:
            result = "failed"  # refused for good, or deferred at the `max_age` deadline
        ATTEMPTS.labels(upstream, result).inc()
        self._log_attempt(entry, recipients, upstream, result, reply, started, reason)

    @staticmethod
    def _set(r: RecipientState, status: str, reply: str, upstream: str, now: float) -> None:
        if status != "pending" or r.status == "pending":
            r.attempts += 1
        r.status = status
        r.last_reply = reply
        r.last_attempt = now
        r.upstream = upstream

    def _finalize(self, entry: QueueEntry, now: float) -> None:
        """Mark a finished entry: a dead letter when some recipient failed, with a report owed."""
        if not entry.done or not entry.failed or entry.finished:
            return
        entry.finished = now
        entry.dsn = "pending" if self.bounce == "dsn" and reportable(entry) else "none"

    async def _settle(self, held: EntryLock, entry: QueueEntry, message: bytes, started: float) -> None:
        """Write what this attempt changed, and schedule what is left."""
        now = time.time()
        if entry.done and not entry.failed:
            if self.spool.path(entry.id).exists():
                self.spool.remove(held)
            return
        self._finalize(entry, now)
        await self.spool.save(held, entry)
        if entry.done:
            if entry.finished >= started:  # it became a dead letter in this attempt
                BOUNCES.inc()
                log.warning(
                    "message failed for good; kept as a dead letter",
                    extra={
                        "id": entry.id,
                        "failed": len(entry.failed),  # how many, not who: no addresses in the log
                        "report": "dsn" if entry.dsn == "pending" else "none",
                    },
                )
            if entry.dsn == "pending":
                await self._report(held, entry, message)
            return
        due = entry.next_due()
        if due is not None:
            self._schedule(entry.id, due)

    async def _report(self, held: EntryLock, entry: QueueEntry, message: bytes) -> None:
        """Queue the RFC 3464 report for a dead letter, then record that it was queued."""
        failed = reportable(entry)
        if not failed:
            entry.dsn = "none"
            await self.spool.save(held, entry)
            return
        now = time.time()
        try:
            # Before the report is built and signed (RSA): not every scan while the spool is full.
            self.spool.check_room(REPORT_SIZE_GUESS)
        except SmtpError as exc:
            log.error(
                "could not queue the failure report; will try again", extra={"id": entry.id, "reason": exc.reason}
            )
            self._back_off(entry.id, now + self.policy.steps[0])
            return
        report = build_dsn(entry, failed, message, hostname=self.hostname, now=now)
        if self.sign_report is not None:
            report = self.sign_report(report)
        dsn = self._report_entry(entry, report, now, extra={"report_for": entry.id})
        try:
            dsn_lock = await self.spool.put(dsn, report)
        except SmtpError as exc:
            log.error(
                "could not queue the failure report; will try again", extra={"id": entry.id, "reason": exc.reason}
            )
            self._back_off(entry.id, now + self.policy.steps[0])
            return
        entry.dsn = "queued"
        await self.spool.save(held, entry)
        log.info(
            "failure report queued",
            extra={"id": entry.id, "dsn_id": dsn.id, "to_domain": entry.mail_from.rpartition("@")[2]},
        )
        self.submit(dsn_lock, dsn, report)

    def _report_entry(self, entry: QueueEntry, report: bytes, now: float, *, extra: dict[str, str]) -> QueueEntry:
        """The entry that carries one of relay's own reports about `entry` to its sender: the
        null reverse-path (RFC 3461 §6.1), 8BITMIME/SMTPUTF8 as the report and the address need."""
        body_8bit, smtputf8 = report_envelope(report, entry.mail_from)
        return QueueEntry(
            id=queue_id(),
            mail_from="",
            recipients=[RecipientState(entry.mail_from)],
            created=now,
            since=now,
            body_8bit=body_8bit,
            smtputf8=smtputf8,
            listener="dsn",
            from_domain=self.hostname,
            extra=extra,
        )

    async def _relayed_notice(
        self, entry: QueueEntry, accepted: list[RecipientState], reply: Reply, message: bytes
    ) -> None:
        """RFC 3461 §5.2.2: the upstream took the message but offers no DSN, so the
        recipients that asked for SUCCESS get a "relayed" notice (relay.deliver.dsn), queued
        like a failure report. Best effort: a crash before it is queued loses the notice,
        never the delivery."""
        wanted = [(r.address, request) for r in accepted if (request := _dsn_request(r)).notifies("SUCCESS")]
        if not wanted or not entry.mail_from:
            return
        now = time.time()
        end = message.find(b"\r\n\r\n")
        report = relayed_report(
            reporting_mta=self.hostname,
            sender=entry.mail_from,
            domain=self.hostname,
            recipients=wanted,
            envid=entry.envid,
            arrival=entry.created,
            upstream_reply=str(reply),
            header=message if end == -1 else message[: end + 2],
        )
        if self.sign_report is not None:
            report = self.sign_report(report)
        notice = self._report_entry(entry, report, now, extra={"relayed_for": entry.id})
        try:
            notice_lock = await self.spool.put(notice, report)
        except SmtpError as exc:
            messages.relayed_notice(entry.id, None, exc.reason)
            return
        log.info("relayed notice queued", extra={"id": entry.id, "dsn_id": notice.id})
        messages.DSN_RELAYED_NOTICES.labels("queued").inc()
        self.submit(notice_lock, notice, report)

    # -- logging ----------------------------------------------------------------------------
    def _log_attempt(
        self,
        entry: QueueEntry,
        recipients: list[RecipientState],
        upstream: str,
        result: str,
        reply: Reply,
        started: float | None,
        reason: str | None = None,
    ) -> None:
        fields = {
            "id": entry.id,
            "upstream": upstream,
            "result": result,
            "recipients": len(recipients),
            "attempt": max(r.attempts for r in recipients),
            "reply": reply.code,
            "reply_text": str(reply),
        }
        if reason and reason != reply.text:
            fields["reason"] = reason
        if started is not None:
            fields["duration_ms"] = round((time.perf_counter() - started) * 1000, 1)
        if result == "deferred":
            fields["next_attempt_in_s"] = round(min(r.next_attempt for r in recipients) - time.time(), 1)
        log.info("delivery attempt", extra=fields)


class _Postponed(Exception):
    """The relay itself had no upstream connection to offer: the attempt did not happen."""


def _dsn_request(r: RecipientState) -> DsnRequest:
    """A recipient's DSN request as the client gave it (RFC 3461 §4.1 NOTIFY, §4.2 ORCPT)."""
    return DsnRequest(r.notify, r.orcpt)


def _unused_count(counted: dict[str, Any], delivered: int) -> dict[str, Any] | None:
    """The part of a delivery's count that `delivered` recipients did not use (None: all
    used). One delivered recipient uses the message's count and its own."""
    if not delivered:
        return counted
    recipients = max(0, int(counted.get("recipients", 0)) - delivered)
    return {**counted, "messages": 0, "recipients": recipients} if recipients else None


def _copy_state(source: QueueEntry, target: QueueEntry) -> None:
    target.apply_state(source.state())


def _author_domain(message: bytes) -> str | None:
    """The header-From domain of a spooled (signed) message, for its sending limits."""
    from relay.message import Message

    try:
        return Message.parse(message).from_domain()[1]
    except SmtpError:
        return None
