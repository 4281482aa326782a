"""The rotation state machine, step by step, with an injected clock.

Real parts: the key-set document and the keys live in files through the real FileBackend;
the record check is the one `relay check` uses. The fakes are the seam's other side: a
zone (the DNS service rotation asks) and a publisher writing into it, so a test decides
what DNS serves and when.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest

from relay.config.schema import DkimKeySetSettings, DkimKeySettings, DkimRotationSettings
from relay.dns.resolver import DnsAnswer, DnsTemporaryError
from relay.rotate.rotation import Rotation
from relay.rotate.status import domain_status, render, to_json
from relay.rotate.storage import RotationSecrets
from relay.secrets.local import FileBackend
from relay.sign.keys import generate_private_key, load_signing_key, private_key_pem
from relay.sign.keyset import KeySet, KeySetError
from tests.support.clock import DAY, T0, StepClock


class Zone:
    """What the resolver serves: name → TXT values (character-strings already joined)."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.timeout = False
        self.queries = 0

    async def resolve(self, name: str, rdtype: str) -> DnsAnswer:
        self.queries += 1
        if self.timeout:
            raise DnsTemporaryError(f"{rdtype} {name}: timed out")
        values = self.records.get(name.rstrip("."), [])
        return DnsAnswer(tuple(v.encode() for v in values), nxdomain=not values, ttl=0)


class ZonePublisher:
    """Publishes into a Zone at once, or (visible=False) into `waiting` until the test
    lets it through: a DNS that serves the new record only after a delay."""

    def __init__(self, zone: Zone, target: str = "route53:ZTEST", visible: bool = True, fail: bool = False) -> None:
        self.zone, self.target, self.visible, self.fail = zone, target, visible, fail
        self.waiting: dict[str, list[str]] = {}
        self.removed: list[str] = []

    async def upsert(self, name: str, value: str, ttl: int) -> None:
        if self.fail:
            raise ConnectionResetError("the process died here")
        (self.zone.records if self.visible else self.waiting)[name] = [value]

    def release(self) -> None:
        self.zone.records.update(self.waiting)
        self.waiting.clear()

    async def remove(self, name: str, value: str) -> str:
        if value in self.zone.records.get(name, []):
            self.zone.records[name].remove(value)
            self.removed.append(name)
            return f"removed {name}"
        return f"kept {name}"

    async def close(self) -> None:
        pass


def write_key(path: Path, algorithm: str = "rsa-sha256") -> str:
    path.write_bytes(private_key_pem(generate_private_key(algorithm)))
    os.chmod(path, 0o600)
    return f"file://{path}"


def txt_of(ref: str, selector: str, algorithm: str = "rsa-sha256") -> str:
    pem = Path(ref.removeprefix("file://")).read_bytes()
    return load_signing_key(pem, domain="example.com", selector=selector, algorithm=algorithm).txt_value()


class World:
    """One domain with a static key s1 (published), a key set in files, a zone, a clock."""

    def __init__(self, tmp_path: Path, *, publish: str = "route53:ZTEST", static: bool = True, **rotation) -> None:
        self.dir = tmp_path
        self.zone = Zone()
        self.clock = StepClock()
        self.lines: list[str] = []
        self.static = []
        if static:
            ref = write_key(tmp_path / "s1.key")
            self.static = [DkimKeySettings(domain="example.com", selector="s1", key=ref)]
            self.zone.records["s1._domainkey.example.com"] = [txt_of(ref, "s1")]
        self.config = DkimKeySetSettings(
            domain="example.com",
            key_set=f"file://{tmp_path}/key-set.json",
            key=f"file://{tmp_path}/{{domain}}.{{selector}}.key",
            publish=publish,
        )
        self.settings = DkimRotationSettings(**{"dns_wait": "5m", "dns_poll": "30s", **rotation})
        self.publisher = ZonePublisher(self.zone, publish)
        self.backend = FileBackend()

    def rotation(self, **overrides) -> Rotation:
        config = self.config.model_copy(update=overrides)
        return Rotation(
            config,
            self.settings,
            secrets=RotationSecrets([self.backend]),
            publishers=lambda target: self.publisher,
            dns=self.zone,
            clock=self.clock,
            say=self.lines.append,
            static_keys=self.static,
            resolver="127.0.0.1",
        )

    async def run(self, **kw):
        return await self.rotation().advance(**kw)

    def doc(self) -> KeySet:
        return KeySet.from_bytes((self.dir / "key-set.json").read_bytes(), "example.com")

    def states(self) -> dict[str, str]:
        return {k.selector: k.state for k in self.doc().keys}


async def test_a_rotation_from_a_static_key_to_the_end(tmp_path):
    w = World(tmp_path)
    outcome = await w.run()
    assert outcome.status == "waiting", outcome
    assert outcome.next_at == T0 + 7 * DAY
    doc = w.doc()
    assert w.states() == {"s1": "active", "s20261116": "active"}
    assert doc.entry("s1").adopted and doc.rotation.step == "overlap"
    new = doc.entry("s20261116")
    assert new.key == f"file://{tmp_path}/example.com.s20261116.key"
    assert oct((tmp_path / "example.com.s20261116.key").stat().st_mode & 0o777) == "0o600"
    assert w.zone.records["s20261116._domainkey.example.com"] == [txt_of(new.key, "s20261116")] == [new.record]
    assert "DNS serves s20261116; signing with s1, s20261116" in w.lines[-1]

    w.clock.t = T0 + 6 * DAY
    assert (await w.run()).status == "waiting"
    assert w.states() == {"s1": "active", "s20261116": "active"}

    w.clock.t = T0 + 7 * DAY
    outcome = await w.run()
    assert outcome.status == "waiting" and outcome.next_at == T0 + 14 * DAY
    assert w.states() == {"s1": "retired", "s20261116": "active"}
    assert [k.selector for k in w.doc().signing()] == ["s20261116"]
    assert (tmp_path / "s1.key").exists() and "s1._domainkey.example.com" in w.zone.records

    w.clock.t = T0 + 14 * DAY
    outcome = await w.run()
    assert outcome.status == "done", outcome
    doc = w.doc()
    assert w.states() == {"s20261116": "active"} and doc.rotation is None
    assert [h.selector for h in doc.history] == ["s1"]
    assert not (tmp_path / "s1.key").exists()
    assert w.zone.records["s1._domainkey.example.com"] == []
    assert (await w.run(start=False)).status == "idle"


async def test_the_switch_waits_until_dns_serves_the_new_record(tmp_path):
    w = World(tmp_path)
    w.publisher.visible = False
    seen = []

    def meanwhile():
        # Before DNS serves it, the new key must not be in the signing set.
        seen.append(w.states()["s20261116"])
        if w.clock.sleeps == 4:
            w.publisher.release()

    w.clock.on_sleep = meanwhile
    outcome = await w.run()
    assert seen == ["pending"] * 4
    assert outcome.status == "waiting"
    assert w.states()["s20261116"] == "active"
    assert w.doc().entry("s20261116").active_since == T0 + timedelta(seconds=4 * 30)
    assert any("no TXT record at s20261116._domainkey.example.com" in line for line in w.lines)


async def test_a_wrong_record_never_switches(tmp_path):
    w = World(tmp_path)
    other = private_key_pem(generate_private_key("rsa-sha256"))
    wrong = load_signing_key(other, domain="example.com", selector="x", algorithm="rsa-sha256").txt_value()

    async def upsert_wrong(name, value, ttl):
        w.zone.records[name] = [wrong]

    w.publisher.upsert = upsert_wrong
    outcome = await w.run()
    assert outcome.status == "blocked" and not outcome.ok
    assert "not switching to s20261116" in outcome.message
    assert "the published 2048-bit key is not the relay's key" in outcome.message
    assert w.states() == {"s1": "active", "s20261116": "pending"}
    assert w.doc().rotation.step == "confirm"
    # the poll stopped within dns_wait (5m at 30s)
    assert w.clock.t - T0 <= timedelta(minutes=5)

    # Fixed by hand; the next run goes on from where it stopped, with the same key.
    key_before = (tmp_path / "example.com.s20261116.key").read_bytes()
    w.zone.records["s20261116._domainkey.example.com"] = [w.doc().entry("s20261116").record]
    assert (await w.run()).status == "waiting"
    assert w.states() == {"s1": "active", "s20261116": "active"}
    assert (tmp_path / "example.com.s20261116.key").read_bytes() == key_before


@pytest.mark.parametrize("served", ["timeout", "two records", "revoked"])
async def test_no_switch_without_a_clear_match(tmp_path, served):
    w = World(tmp_path)
    name = "s20261116._domainkey.example.com"

    async def upsert(n, value, ttl):
        if served == "timeout":
            w.zone.timeout = True
        elif served == "two records":
            w.zone.records[n] = [value, "v=DKIM1; k=rsa; p="]
        else:
            w.zone.records[n] = ["v=DKIM1; k=rsa; p="]

    w.publisher.upsert = upsert
    outcome = await w.run()
    assert outcome.status == "blocked"
    reason = {
        "timeout": f"DNS lookup failed: TXT {name}: timed out",
        "two records": f"2 TXT records at {name}; verifiers use any one",
        "revoked": "the key is revoked (empty p=)",
    }[served]
    assert reason in outcome.message
    assert w.states()["s20261116"] == "pending"


async def test_a_crash_between_steps_is_resumed(tmp_path):
    w = World(tmp_path)
    w.publisher.fail = True
    with pytest.raises(ConnectionResetError):
        await w.run()  # died while publishing: the key is stored, the record is not
    assert w.doc().rotation.step == "publish"
    stored = (tmp_path / "example.com.s20261116.key").read_bytes()

    w.publisher.fail = False
    w.clock.t += timedelta(hours=3)
    outcome = await w.run()
    assert outcome.status == "waiting"
    doc = w.doc()
    assert [k.selector for k in doc.keys] == ["s1", "s20261116"]  # the same rotation, no second key
    assert (tmp_path / "example.com.s20261116.key").read_bytes() == stored
    assert doc.rotation.started == T0
    assert any("continuing the rotation to s20261116" in line for line in w.lines)


async def test_a_crash_before_the_document_records_the_key_makes_a_new_one(tmp_path):
    w = World(tmp_path)
    real_write = RotationSecrets.write_if_unchanged
    calls = []

    async def dies_on_second_document_write(self, ref, data, version):
        calls.append(ref)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is gone after storing the key
        return await real_write(self, ref, data, version)

    RotationSecrets.write_if_unchanged = dies_on_second_document_write
    try:
        with pytest.raises(KeyboardInterrupt):
            await w.run()
    finally:
        RotationSecrets.write_if_unchanged = real_write
    assert w.doc().rotation.step == "generate" and w.doc().entry("s20261116").record is None
    assert (await w.run()).status == "waiting"
    entry = w.doc().entry("s20261116")
    assert entry.record == txt_of(entry.key, "s20261116")  # the stored key is the published one


async def test_the_old_key_stays_while_the_new_record_is_gone(tmp_path):
    w = World(tmp_path)
    await w.run()
    new_name = "s20261116._domainkey.example.com"
    del w.zone.records[new_name]  # someone deleted it during the overlap
    w.clock.t = T0 + 8 * DAY
    outcome = await w.run()
    assert outcome.status == "blocked"
    assert "not retiring s1: 127.0.0.1 does not serve the new key s20261116 any more" in outcome.message
    assert w.states() == {"s1": "active", "s20261116": "active"}

    w.zone.records[new_name] = [w.doc().entry("s20261116").record]
    assert (await w.run()).status == "waiting"
    assert w.states()["s1"] == "retired"
    w.zone.timeout = True
    w.clock.t = T0 + 30 * DAY
    outcome = await w.run()
    assert outcome.status == "blocked" and "not removing s1" in outcome.message
    assert (tmp_path / "s1.key").exists() and w.zone.records["s1._domainkey.example.com"]
    assert w.states() == {"s1": "retired", "s20261116": "active"}


async def test_dry_run_says_what_and_when(tmp_path):
    w = World(tmp_path)
    steps = await w.rotation().plan()
    text = [f"{s.when_text}: {s.action}" for s in steps]
    assert text[0].startswith(f"now: write the key set file://{tmp_path}/key-set.json, adopting s1")
    assert (
        text[1]
        == f"now: generate s20261116 (rsa-sha256, 2048 bits), store it at file://{tmp_path}/example.com.s20261116.key"
    )
    assert text[2] == "now: publish TXT s20261116._domainkey.example.com in Route 53 zone ZTEST"
    assert text[3].startswith("once DNS serves it: wait until 127.0.0.1 serves a record matching s20261116 (up to 5m")
    assert text[4:] == ["DNS + 7d: stop signing with s1", "DNS + 14d: remove TXT and secret of s1"]
    assert not (tmp_path / "key-set.json").exists()  # a dry run changes nothing

    await w.run()
    w.clock.t = T0 + 2 * DAY
    steps = await w.rotation().plan()
    assert [(s.when, s.action) for s in steps] == [
        (T0 + 7 * DAY, "stop signing with s1 (if DNS still serves s20261116)"),
        (T0 + 14 * DAY, "remove TXT and secret of s1 (if DNS still serves s20261116)"),
    ]
    assert steps[0].when_text == "2026-11-23 09:00 UTC"


async def test_a_new_domain_needs_no_overlap(tmp_path):
    w = World(tmp_path, static=False)
    outcome = await w.run()
    assert outcome.status == "done"
    assert w.states() == {"s20261116": "active"} and w.doc().rotation is None


async def test_selectors_are_never_reused(tmp_path):
    w = World(tmp_path, static=False, overlap=0, grace=0)
    assert (await w.run()).status == "done"
    assert (await w.run()).status == "done"  # same day: a second rotation
    assert [k.selector for k in w.doc().keys] == ["s20261116-2"]
    assert (await w.run()).status == "done"
    assert [k.selector for k in w.doc().keys] == ["s20261116-3"]
    assert [h.selector for h in w.doc().history] == ["s20261116", "s20261116-2"]


async def test_a_document_changed_meanwhile_is_not_overwritten(tmp_path):
    w = World(tmp_path)
    await w.run()
    rotation = w.rotation()

    def someone_else_writes():
        data = json.loads((tmp_path / "key-set.json").read_text())
        data["keys"][0]["created"] = "2020-01-01T00:00:00Z"
        (tmp_path / "key-set.json").write_text(json.dumps(data))

    real_load = rotation._load

    async def load_then_someone_writes():
        keyset = await real_load()
        someone_else_writes()
        return keyset

    rotation._load = load_then_someone_writes
    w.clock.t = T0 + 7 * DAY
    outcome = await rotation.advance()
    assert outcome.status == "failed"
    assert "the key set changed since this run read it (another rotation?); run again" in outcome.message
    assert w.states() == {"s1": "active", "s20261116": "active"}  # the stranger's version stands
    assert w.doc().entry("s1").created.year == 2020


async def test_recorded_choices_win_on_resume(tmp_path):
    w = World(tmp_path)
    await w.run()
    rotation = w.rotation(publish="print")
    w.clock.t = T0 + DAY
    await rotation.advance()
    assert any("with its recorded publish route53:ZTEST (not print)" in line for line in w.lines)


def test_status_shows_states_ages_and_the_next_step(tmp_path):
    w = World(tmp_path)
    import asyncio

    asyncio.run(w.run())
    status = domain_status(
        "example.com", config=w.config, settings=w.settings, keyset=w.doc(), static_keys=w.static, now=T0 + 3 * DAY
    )
    text = render([status])
    assert "s1                   active   rsa-sha256              3d" in text
    assert "rotating s1 → s20261116: next step overlap" in text
    assert "next: 2026-11-23 09:00 UTC: stop signing with s1" in text
    data = to_json([status])["domains"][0]
    assert data["source"] == "key_set" and data["keys"][1]["age_seconds"] == 3 * 86400
    seed = domain_status("example.com", config=w.config, settings=w.settings, keyset=None, static_keys=w.static, now=T0)
    assert seed.source == "seed" and seed.keys[0].state == "static"


@pytest.mark.parametrize(
    "doc,problem",
    [
        ({"version": 2, "domain": "example.com"}, "version 2; this relay reads version 1"),
        ({"version": 1, "domain": "example.org"}, "the document is for example.org, not example.com"),
        (
            {
                "version": 1,
                "domain": "example.com",
                "keys": [{"selector": "a", "key": "file:///k", "state": "pending", "created": "2026-01-01T00:00:00Z"}],
            },
            "pending or retired keys without a rotation in progress",
        ),
        (
            {
                "version": 1,
                "domain": "example.com",
                "keys": [{"selector": "a b", "key": "file:///k", "state": "active", "created": "2026-01-01T00:00:00Z"}],
            },
            "keys.0.selector: String should match pattern",
        ),
        (
            {
                "version": 1,
                "domain": "example.com",
                "keys": [{"selector": "a", "key": "file:///k", "state": "active", "created": "2026-01-01T00:00:00"}],
            },
            "keys.0.created: times must carry a timezone",
        ),
    ],
)
def test_bad_documents_are_refused_with_the_reason(doc, problem):
    with pytest.raises(KeySetError) as err:
        KeySet.from_bytes(json.dumps(doc).encode(), "example.com")
    assert str(err.value).startswith(problem)


async def test_an_unwritable_key_location_fails_with_the_reason(tmp_path):
    w = World(tmp_path)
    w.config = w.config.model_copy(update={"key": f"file://{tmp_path}/missing-dir/{{selector}}.key"})
    outcome = await w.run()
    assert outcome.status == "failed"
    assert outcome.message == (
        f"example.com: file://{tmp_path}/missing-dir/s20261116.key: cannot write (No such file or directory)"
    )
    assert w.doc().rotation.step == "generate"  # a later run retries the step
