"""The rotation of one domain's key set, one resumable step at a time.

    rotation = Rotation(key_set_settings, rotation_settings, secrets=..., publishers=...,
                        dns=..., clock=SystemClock(), say=print, static_keys=[...])
    outcome = await rotation.advance()     # as far as it can go now
    steps = await rotation.plan()           # the dry run: what remains, and when

`advance` starts a rotation when none is in progress (unless `start=False`), then runs
steps until one must wait: for DNS (it asks every `dns_poll` for up to `dns_wait`), or
for a date (the end of the overlap or of the grace period), which a later run reaches.
Each step's result is written to the key-set document before the next step begins, so a
run that stops anywhere is continued by the next. The steps and their safety rules are
described in `relay.rotate`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from relay.config.schema import DkimKeySetSettings, DkimKeySettings, DkimRotationSettings
from relay.dns.resolver import DnsService
from relay.posture.dkim_record import DkimRecordCheck, check_dkim_record
from relay.rotate.clock import Clock, SystemClock
from relay.rotate.publish import PublishError, RecordPublisher
from relay.rotate.storage import RotationSecrets
from relay.secrets.base import SecretFetchError
from relay.sign.keys import KeyMaterialError, SigningKey, generate_private_key, load_signing_key, private_key_pem
from relay.sign.keyset import KeyEntry, KeySet, KeySetError, RotationState

Say = Callable[[str], None]
PublisherFactory = Callable[[str], RecordPublisher]


class RotationError(Exception):
    """A step could not be done; the message is safe to show and says what to do."""


@dataclass(frozen=True)
class Outcome:
    """How a run ended. `done`: the rotation is complete; `waiting`: the next step is due
    at `next_at`; `idle`: nothing to do (`start=False` and no rotation in progress);
    `blocked`: a safety rule stopped it (DNS does not serve the new key); `failed`: an
    error (secrets backend, DNS API, a changed document). The last two exit non-zero."""

    status: Literal["done", "waiting", "idle", "blocked", "failed"]
    message: str
    next_at: datetime | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("done", "waiting", "idle")


@dataclass(frozen=True)
class PlannedStep:
    when: datetime | None  # None: at once, or on a condition that `when_text` names
    when_text: str
    action: str


class Rotation:
    def __init__(
        self,
        key_set: DkimKeySetSettings,
        settings: DkimRotationSettings,
        *,
        secrets: RotationSecrets,
        publishers: PublisherFactory,
        dns: DnsService,
        clock: Clock | None = None,
        say: Say = print,
        static_keys: Sequence[DkimKeySettings] = (),
        protected_refs: Collection[str] = (),
        allow_weak_rsa: bool = False,
        resolver: str = "the configured resolver",
    ) -> None:
        """`dns` must not cache (every question reaches the resolver). `static_keys` are
        the domain's `dkim.keys` entries (the seed of a new document); `protected_refs`
        are references the config uses elsewhere, never deleted. `resolver` names the
        resolver in messages."""
        self.config = key_set
        self.settings = settings
        self.domain = key_set.domain
        self.secrets = secrets
        self.publishers = publishers
        self.dns = dns
        self.clock = clock or SystemClock()
        self.say = say
        self.static_keys = [k for k in static_keys if k.domain == key_set.domain]
        self.protected_refs = set(protected_refs)
        self.allow_weak_rsa = allow_weak_rsa
        self.resolver = resolver
        self._version: str | None = None  # of the document as last read or written

    # -- the run ---------------------------------------------------------------------------

    async def advance(self, *, start: bool = True) -> Outcome:
        try:
            keyset = await self._load()
            if keyset.rotation is None:
                if not start:
                    return Outcome("idle", f"{self.domain}: no rotation in progress")
                keyset = await self._start(keyset)
            else:
                self._note_recorded_choices(keyset)
            while keyset.rotation is not None:
                step = keyset.rotation.step
                if step == "generate":
                    keyset = await self._generate(keyset)
                elif step == "publish":
                    keyset = await self._publish(keyset)
                else:
                    handler = {"confirm": self._confirm, "overlap": self._end_overlap, "grace": self._retire}[step]
                    keyset, stop = await handler(keyset)
                    if stop is not None:
                        return stop
            signing = ", ".join(k.selector for k in keyset.signing())
            return Outcome("done", f"{self.domain}: rotation complete; signing with {signing}")
        except (RotationError, KeySetError, SecretFetchError, PublishError, KeyMaterialError) as exc:
            return Outcome("failed", f"{self.domain}: {exc}")

    async def plan(self) -> list[PlannedStep]:
        """The remaining steps if `advance` ran now, without changing anything."""
        keyset = await self._load()
        steps: list[PlannedStep] = []
        if self._version is None and self.static_keys:
            adopted = ", ".join(k.selector for k in self.static_keys)
            steps.append(
                PlannedStep(None, "now", f"write the key set {self.config.key_set}, adopting {adopted} from dkim.keys")
            )
        return steps + remaining_steps(keyset, self.config, self.settings, self.clock.now(), resolver=self.resolver)

    # -- the document ----------------------------------------------------------------------

    async def _load(self) -> KeySet:
        value = await self.secrets.read(self.config.key_set)
        if value is None:
            self._version = None
            return await self._seed()
        self._version = value.version
        try:
            return KeySet.from_bytes(value.data, self.domain)
        except KeySetError as exc:
            raise RotationError(f"{self.config.key_set} is not a usable key set ({exc}); not touching it") from None

    async def _seed(self) -> KeySet:
        """The document as it starts: the domain's static keys, adopted as active."""
        now = self.clock.now()
        entries = []
        for cfg in self.static_keys:
            entry = KeyEntry(
                selector=cfg.selector,
                key=cfg.key,
                algorithm=cfg.algorithm,
                state="active",
                created=now,
                active_since=now,
                adopted=True,
            )
            try:
                key = await self._load_key(entry)
            except (RotationError, SecretFetchError, KeyMaterialError) as exc:
                raise RotationError(f"cannot adopt the current key {cfg.selector} from dkim.keys: {exc}") from None
            entries.append(entry.model_copy(update={"record": key.txt_value()}))
        return KeySet(domain=self.domain, keys=tuple(entries))

    async def _save(self, keyset: KeySet) -> KeySet:
        self._version = await self.secrets.write_if_unchanged(self.config.key_set, keyset.to_bytes(), self._version)
        return keyset

    def _note_recorded_choices(self, keyset: KeySet) -> None:
        rotation = keyset.rotation
        assert rotation is not None
        new = keyset.entry(rotation.new)
        recorded = {"publish": rotation.publish, "overlap": _duration(rotation.overlap), "algorithm": new.algorithm}
        asked = {
            "publish": self.config.publish,
            "overlap": _duration(self.settings.overlap),
            "algorithm": self.config.algorithm,
        }
        changed = [f"{k} {recorded[k]} (not {asked[k]})" for k in recorded if recorded[k] != asked[k]]
        self.say(
            f"{self.domain}: continuing the rotation to {rotation.new} started {_when(rotation.started)}"
            + (f", with its recorded {', '.join(changed)}" if changed else "")
        )

    # -- steps -----------------------------------------------------------------------------

    async def _start(self, keyset: KeySet) -> KeySet:
        now = self.clock.now()
        selector = new_selector(self.config, keyset, now, {k.selector for k in self.static_keys})
        entry = KeyEntry(
            selector=selector,
            key=self.config.key.format(domain=self.domain, selector=selector),
            algorithm=self.config.algorithm,
            state="pending",
            created=now,
        )
        old = tuple(k.selector for k in keyset.signing())
        rotation = RotationState(
            new=selector,
            old=old,
            step="generate",
            publish=self.config.publish,
            overlap=self.settings.overlap,
            grace=self.settings.grace,
            started=now,
        )
        keyset = keyset.model_copy(update={"keys": (*keyset.keys, entry), "rotation": rotation})
        await self._save(keyset)
        self.say(f"{self.domain}: rotating {', '.join(old) or '(no key yet)'} → {selector}")
        return keyset

    async def _generate(self, keyset: KeySet) -> KeySet:
        entry = self._new(keyset)
        bits = self.config.bits
        # Not yet published anywhere: a rerun after a crash may replace it.
        pem = private_key_pem(generate_private_key(entry.algorithm, bits))
        key = load_signing_key(pem, domain=self.domain, selector=entry.selector, algorithm=entry.algorithm)
        await self.secrets.write(entry.key, pem)
        size = f", {key.bits} bits" if key.key_type == "rsa" else ""
        self.say(f"{self.domain}: generated {entry.selector} ({entry.algorithm}{size}), stored at {entry.key}")
        keyset = keyset.with_key(entry.selector, record=key.txt_value())
        return await self._save(keyset.with_rotation(self._step(keyset, "publish")))

    async def _publish(self, keyset: KeySet) -> KeySet:
        entry = self._new(keyset)
        rotation = keyset.rotation
        assert rotation is not None and entry.record is not None
        publisher = self.publishers(rotation.publish)
        try:
            await publisher.upsert(entry.name(self.domain), entry.record, self.settings.record_ttl)
        finally:
            await publisher.close()
        if rotation.publish != "print":
            self.say(f"{self.domain}: published TXT {entry.name(self.domain)} ({rotation.publish})")
        now = self.clock.now()
        keyset = keyset.with_key(entry.selector, published=rotation.publish)
        return await self._save(
            keyset.with_rotation(rotation.model_copy(update={"step": "confirm", "published_at": now}))
        )

    async def _confirm(self, keyset: KeySet) -> tuple[KeySet, Outcome | None]:
        entry = self._new(keyset)
        key = await self._load_key(entry)
        deadline = self.clock.now() + timedelta(seconds=self.settings.dns_wait)
        last_reason = None
        while True:
            check = await self._check(entry, key)
            if check.status == "match":
                break
            reason = _reason(check)
            if reason != last_reason:
                self.say(f"{self.domain}: waiting for {self.resolver} to serve {entry.name(self.domain)}: {reason}")
                last_reason = reason
            if self.clock.now() + timedelta(seconds=self.settings.dns_poll) > deadline:
                return keyset, Outcome(
                    "blocked",
                    (
                        f"{self.domain}: not switching to {entry.selector}: {self.resolver} does not serve a "
                        f"matching record ({reason}); {entry.selector} does not sign; run again to keep waiting"
                    ),
                )
            await self.clock.sleep(self.settings.dns_poll)
        now = self.clock.now()
        rotation = keyset.rotation
        assert rotation is not None
        keyset = keyset.with_key(entry.selector, state="active", active_since=now)
        if rotation.old:
            keyset = await self._save(keyset.with_rotation(self._step(keyset, "overlap")))
            both = ", ".join((*rotation.old, entry.selector))
            self.say(
                f"{self.domain}: DNS serves {entry.selector}; signing with {both} (replicas follow within "
                f"secrets.refresh); {', '.join(rotation.old)} stops signing after "
                f"{_when(now + timedelta(seconds=rotation.overlap))}"
            )
            return keyset, None
        keyset = await self._save(keyset.with_rotation(None))
        self.say(f"{self.domain}: DNS serves {entry.selector}; signing with it")
        return keyset, None

    async def _end_overlap(self, keyset: KeySet) -> tuple[KeySet, Outcome | None]:
        rotation = keyset.rotation
        assert rotation is not None
        entry = self._new(keyset)
        assert entry.active_since is not None
        due = entry.active_since + timedelta(seconds=rotation.overlap)
        old = ", ".join(rotation.old)
        if self.clock.now() < due:
            return keyset, Outcome(
                "waiting",
                (
                    f"{self.domain}: {old} and {entry.selector} both sign until {_when(due)}; run again after that "
                    f"to stop signing with {old}"
                ),
                due,
            )
        problem = await self._new_key_not_served(entry)
        if problem:
            return keyset, Outcome("blocked", (f"{self.domain}: not retiring {old}: {problem}; both keys keep signing"))
        now = self.clock.now()
        for selector in rotation.old:
            keyset = keyset.with_key(selector, state="retired", retired_since=now)
        keyset = await self._save(keyset.with_rotation(self._step(keyset, "grace")))
        self.say(
            f"{self.domain}: stopped signing with {old}; signing with {entry.selector} (replicas follow "
            f"within secrets.refresh); {old} removed after {_when(now + timedelta(seconds=rotation.grace))}"
        )
        return keyset, None

    async def _retire(self, keyset: KeySet) -> tuple[KeySet, Outcome | None]:
        rotation = keyset.rotation
        assert rotation is not None
        entry = self._new(keyset)
        retired = [keyset.entry(s) for s in rotation.old]
        due = _grace_end(retired, rotation)
        old = ", ".join(rotation.old)
        if self.clock.now() < due:
            return keyset, Outcome(
                "waiting",
                (
                    f"{self.domain}: {old} no longer signs; its record and secret stay until {_when(due)}; run again "
                    "after that to remove them"
                ),
                due,
            )
        problem = await self._new_key_not_served(entry)
        if problem:
            return keyset, Outcome(
                "blocked",
                (f"{self.domain}: not removing {old}: {problem}; the old record may be the only one DNS serves"),
            )
        remaining = {k.key for k in keyset.keys if k.selector not in rotation.old}
        for old_entry in retired:
            if old_entry.record:
                publisher = self.publishers(old_entry.published or rotation.publish)
                try:
                    self.say(f"{self.domain}: " + await publisher.remove(old_entry.name(self.domain), old_entry.record))
                finally:
                    await publisher.close()
            if old_entry.key in self.protected_refs or old_entry.key in remaining:
                self.say(f"{self.domain}: kept secret {old_entry.key}: the config uses it elsewhere")
            elif await self.secrets.delete(old_entry.key):
                self.say(f"{self.domain}: deleted secret {old_entry.key}")
        keyset = keyset.without_keys(set(rotation.old), self.clock.now()).with_rotation(None)
        return await self._save(keyset), None

    # -- helpers ---------------------------------------------------------------------------

    def _new(self, keyset: KeySet) -> KeyEntry:
        assert keyset.rotation is not None
        return keyset.entry(keyset.rotation.new)

    @staticmethod
    def _step(keyset: KeySet, step: str) -> RotationState:
        assert keyset.rotation is not None
        return keyset.rotation.model_copy(update={"step": step})

    async def _load_key(self, entry: KeyEntry) -> SigningKey:
        value = await self.secrets.read(entry.key)
        if value is None:
            raise RotationError(f"the key of {entry.selector} is gone from {entry.key}")
        key = load_signing_key(
            value.data,
            domain=self.domain,
            selector=entry.selector,
            algorithm=entry.algorithm,
            allow_weak_rsa=self.allow_weak_rsa,
        )
        if entry.record is not None and key.txt_value() != entry.record:
            raise RotationError(
                f"{entry.key} no longer holds the key rotation made for {entry.selector} "
                "(changed by someone else); not going on"
            )
        return key

    async def _check(self, entry: KeyEntry, key: SigningKey) -> DkimRecordCheck:
        return await check_dkim_record(
            self.dns, domain=self.domain, selector=entry.selector, algorithm=entry.algorithm, key=key
        )

    async def _new_key_not_served(self, entry: KeyEntry) -> str | None:
        """None if DNS serves the new key's record; else why not (checked right before an
        irreversible step)."""
        check = await self._check(entry, await self._load_key(entry))
        if check.status == "match":
            return None
        return f"{self.resolver} does not serve the new key {entry.selector} any more ({_reason(check)})"


def new_selector(config: DkimKeySetSettings, keyset: KeySet, now: datetime, taken: Collection[str] = ()) -> str:
    """The dated selector for a rotation starting `now`; never one used before (a name
    once removed may still be cached with the old key)."""
    base = config.selector.format(date=now.strftime("%Y%m%d"))
    used = keyset.used_selectors() | set(taken)
    selector, n = base, 1
    while selector in used:
        n += 1
        selector = f"{base}-{n}"
    return selector


def remaining_steps(
    keyset: KeySet,
    config: DkimKeySetSettings,
    settings: DkimRotationSettings,
    now: datetime,
    *,
    resolver: str = "the configured resolver",
) -> list[PlannedStep]:
    """What a rotation still has to do, and when; the dry run and `relay dkim status`."""
    domain = keyset.domain
    rotation = keyset.rotation
    steps: list[PlannedStep] = []
    if rotation is None:
        selector = new_selector(config, keyset, now)
        old = tuple(k.selector for k in keyset.signing())
        ref = config.key.format(domain=domain, selector=selector)
        new = KeyEntry(selector=selector, key=ref, algorithm=config.algorithm, state="pending", created=now)
        publish, overlap, grace, step = config.publish, settings.overlap, settings.grace, "generate"
        size = f", {config.bits} bits" if config.algorithm == "rsa-sha256" else ""
        steps.append(PlannedStep(None, "now", f"generate {selector} ({config.algorithm}{size}), store it at {ref}"))
    else:
        new, old = keyset.entry(rotation.new), rotation.old
        publish, overlap, grace, step = rotation.publish, rotation.overlap, rotation.grace, rotation.step
    name = new.name(domain)
    if step in ("generate", "publish"):
        where = "in Route 53 zone " + publish.removeprefix("route53:") if publish != "print" else "by hand (printed)"
        steps.append(PlannedStep(None, "now", f"publish TXT {name} {where}"))
    if step in ("generate", "publish", "confirm"):
        wait = _duration(settings.dns_wait)
        then = f"sign with {', '.join((*old, new.selector))}" if old else f"sign with {new.selector}"
        steps.append(
            PlannedStep(
                None,
                "once DNS serves it",
                f"wait until {resolver} serves a record matching {new.selector} (up to {wait} per run), then {then}",
            )
        )
    if not old:
        return steps
    old_text = ", ".join(old)
    if step in ("generate", "publish", "confirm"):
        steps.append(PlannedStep(None, f"DNS + {_duration(overlap)}", f"stop signing with {old_text}"))
        steps.append(PlannedStep(None, f"DNS + {_duration(overlap + grace)}", f"remove TXT and secret of {old_text}"))
        return steps
    assert rotation is not None
    if step == "overlap":
        assert new.active_since is not None
        stop_at = new.active_since + timedelta(seconds=overlap)
        steps.append(
            PlannedStep(stop_at, _when(stop_at), f"stop signing with {old_text} (if DNS still serves {new.selector})")
        )
        remove_at = max(stop_at, now) + timedelta(seconds=grace)
    else:
        remove_at = _grace_end([keyset.entry(s) for s in old], rotation)
    steps.append(
        PlannedStep(
            remove_at, _when(remove_at), f"remove TXT and secret of {old_text} (if DNS still serves {new.selector})"
        )
    )
    return steps


def _grace_end(retired: Sequence[KeyEntry], rotation: RotationState) -> datetime:
    stopped = max(e.retired_since for e in retired if e.retired_since is not None)
    return stopped + timedelta(seconds=rotation.grace)


def _reason(check: DkimRecordCheck) -> str:
    return check.problem or check.status


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
