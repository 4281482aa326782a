"""`relay dkim rotate` end to end, with every part real but the clock of the later runs:
two running relays (replicas) reading the key set from moto's Secrets Manager, the TXT
records UPSERTed into moto's Route 53 and served by NSD, and mail sent through the relays
the whole time, each message verified at once under what DNS serves at that moment.

The first run is the real command in a process, killed while it waits for DNS (a crash
between steps); the next runs go on in-process with an injected clock, so a week of
overlap and a week of grace pass in a call.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import boto3
import dns.message
import dns.query
import dns.rdatatype
import pytest
import yaml

from relay.config.load import load_settings
from relay.rotate.command import rotate_command, status_command
from relay.sign.keys import generate_private_key, load_signing_key, private_key_pem
from relay.sign.keyset import KeySet
from tests.support.aws import AWS_ENV, REGION, moto_server
from tests.support.clock import StepClock
from tests.support.dkim import verify_all
from tests.support.route53_dns import Route53Zone
from tests.support.smtp import connect, message

S1_REF = "aws-sm://relay/dkim/example.com/s1"
KEY_SET_ID = "relay/dkim/example.com/key-set"
pytestmark = [pytest.mark.e2e, pytest.mark.binaries]  # relay processes, moto server, nsd


def quoted(value: str) -> str:
    return " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))


class Sender(threading.Thread):
    """Sends a message every few tenths of a second, alternately through each relay, and
    verifies each as soon as the upstream has it, against NSD as it is then. Bounded:
    at most `limit` messages."""

    def __init__(self, relays, pki, upstream, zone, limit: int = 600) -> None:
        super().__init__(daemon=True)
        self.relays, self.pki, self.upstream, self.zone, self.limit = relays, pki, upstream, zone, limit
        self.results: list[tuple[int, tuple[str, ...], list[bool]]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def lookup(self, name: bytes, timeout: int = 5) -> bytes | None:
        query = dns.message.make_query(name.decode(), dns.rdatatype.TXT)
        reply, _ = dns.query.udp_with_fallback(query, self.zone.host, port=self.zone.port, timeout=10)
        values = [b"".join(r.strings) for rrset in reply.answer for r in rrset]
        return values[0] if values else None

    def run(self) -> None:
        for n in range(self.limit):
            if self.stop.is_set():
                return
            relay = self.relays[n % len(self.relays)]
            try:
                client = connect(relay, self.pki)
                client.sendmail("app@example.com", ["u@example.net"], message(subject=f"m{n}"))
                client.quit()
                content = self.upstream.wait_for(n + 1)[n].content
            except Exception as exc:  # recorded, and the test fails on it
                self.errors.append(f"message {n}: {exc!r}")
                return
            selectors = tuple(re.findall(rb"\bs=([A-Za-z0-9-]+);", content))
            verified = verify_all(content, self.lookup)
            with self.lock:
                self.results.append((n, tuple(s.decode() for s in selectors), verified))
            time.sleep(0.1)

    def sent(self) -> int:
        with self.lock:
            return len(self.results)

    def wait_more(self, count: int = 2, timeout: float = 30) -> None:
        """Until `count` more messages went through (each relay at least once)."""
        target = self.sent() + count
        deadline = time.monotonic() + timeout
        while self.sent() < target:
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, "the sender is stuck"
            time.sleep(0.05)


@pytest.fixture
def world(make_relay, upstream, pki, tmp_path, monkeypatch):
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    with moto_server(tmp_path / "moto.log") as (endpoint, _):
        with Route53Zone(endpoint, "example.com", tmp_path) as zone:
            sm = boto3.client(
                "secretsmanager",
                endpoint_url=endpoint,
                region_name=REGION,
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
            )
            pem = private_key_pem(generate_private_key("rsa-sha256"))
            sm.create_secret(Name=S1_REF.removeprefix("aws-sm://"), SecretString=pem.decode())
            s1 = load_signing_key(pem, domain="example.com", selector="s1", algorithm="rsa-sha256").txt_value()
            zone.route53.change_resource_record_sets(
                HostedZoneId=zone.zone_id,
                ChangeBatch={
                    "Changes": [
                        {
                            "Action": "UPSERT",
                            "ResourceRecordSet": {
                                "Name": "s1._domainkey.example.com.",
                                "Type": "TXT",
                                "TTL": 300,
                                "ResourceRecords": [{"Value": quoted(s1)}],
                            },
                        }
                    ]
                },
            )
            zone.sync()
            relays = []
            for _ in range(2):
                relay = make_relay(upstream.port, start=False, env=dict(AWS_ENV))
                relay.config["dkim"] = {
                    "keys": [{"domain": "example.com", "selector": "s1", "key": S1_REF}],
                    "key_sets": [
                        {
                            "domain": "example.com",
                            "key_set": f"aws-sm://{KEY_SET_ID}",
                            "key": "aws-sm://relay/dkim/{domain}/{selector}",
                            "publish": f"route53:{zone.zone_id}",
                        }
                    ],
                    "rotation": {
                        "dns_wait": "2m",
                        "dns_poll": "1s",
                        "record_ttl": 300,
                        "route53": {"endpoint_url": endpoint, "region": REGION},
                    },
                }
                relay.config["secrets"] = {"refresh": "1s", "aws": {"region": REGION, "endpoint_url": endpoint}}
                # NSD answers: the timeout is a loaded machine's margin (a lookup timed out is one more poll).
                relay.config["dns"] = {"nameservers": [zone.host], "port": zone.port, "timeout": "10s", "attempts": 1}
                relay.start()
                relays.append(relay)
            config_path = tmp_path / "rotate.yaml"
            config_path.write_text(yaml.safe_dump(relays[0].config))
            yield {"zone": zone, "sm": sm, "relays": relays, "config": config_path}


def document(sm) -> KeySet:
    return KeySet.from_bytes(sm.get_secret_value(SecretId=KEY_SET_ID)["SecretString"].encode(), "example.com")


def converged(relays, selectors: list[str]) -> None:
    """Every replica logs the signing set (bounded wait: refresh is 1s)."""
    for relay in relays:
        relay.wait_log(
            lambda e: (
                e.get("msg") in ("DKIM signing set changed", "DKIM signing set") and e.get("selectors") == selectors
            ),
            timeout=20,
        )


def test_rotation_end_to_end_with_two_replicas_and_mail_throughout(world, pki, upstream):
    zone, sm, relays, config_path = world["zone"], world["sm"], world["relays"], world["config"]
    sender = Sender(relays, pki, upstream, zone)
    sender.start()
    try:
        sender.wait_more(4)
        assert all(sel == ("s1",) for _, sel, _ in sender.results)

        # 1. The command itself, killed while it waits for DNS (Route 53 has the record,
        #    NSD does not serve it yet).
        cli = subprocess.Popen(
            [sys.executable, "-m", "relay", "dkim", "rotate", "-c", str(config_path), "-d", "example.com"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**AWS_ENV, "PATH": "/usr/bin:/bin"},
        )
        output = []
        deadline = time.monotonic() + 60
        while not any("waiting for" in line for line in output):
            assert time.monotonic() < deadline and cli.poll() is None, "".join(output)
            output.append(cli.stdout.readline())
        cli.kill()
        cli.wait(10)
        cli.stdout.close()
        doc = document(sm)
        new = doc.rotation.new
        new_name = f"{new}._domainkey.example.com"
        assert doc.rotation.step == "confirm" and doc.entry(new).state == "pending"
        assert zone.txt(new_name) is not None
        converged(relays, ["s1"])
        sender.wait_more(2)

        settings = load_settings(config_path)
        lines: list[str] = []
        clock = StepClock(datetime.now(UTC).replace(microsecond=0))

        def rotate() -> int:
            return asyncio.run(
                rotate_command(settings, domain="example.com", clock=clock, out=lines.append, err=lines.append)
            )

        # 2. DNS serves a wrong record at the new name: no switch.
        other = private_key_pem(generate_private_key("rsa-sha256"))
        wrong = load_signing_key(other, domain="example.com", selector="x", algorithm="rsa-sha256").txt_value()
        zone.override(new_name, [quoted(wrong)])
        assert rotate() == 1
        assert f"not switching to {new}" in lines[-1] and "is not the relay's key" in lines[-1]
        assert document(sm).entry(new).state == "pending"
        sender.wait_more(2)

        # 3. DNS serves nothing there, then (after two polls) the record from Route 53.
        zone.override(new_name, [])
        pending_seen = []

        def meanwhile():
            pending_seen.append(document(sm).entry(new).state)
            if clock.sleeps == 2:
                zone.clear_overrides()

        clock.on_sleep, clock.sleeps = meanwhile, 0
        assert rotate() == 0, lines
        clock.on_sleep = None
        assert pending_seen == ["pending", "pending"]
        assert any(f"continuing the rotation to {new}" in line for line in lines)
        converged(relays, ["s1", new])
        sender.wait_more(4)

        # 4. A week later the old key stops signing; a week after that it is removed.
        clock.t += timedelta(days=7, minutes=1)
        assert rotate() == 0, lines
        converged(relays, [new])
        sender.wait_more(4)
        clock.t += timedelta(days=7, minutes=1)
        assert rotate() == 0, lines
        assert "rotation complete; signing with " + new in lines[-1]
        assert zone.txt("s1._domainkey.example.com") is None
        zone.sync()  # DNS catches up: s1 is gone
        assert "DeletedDate" in sm.describe_secret(SecretId=S1_REF.removeprefix("aws-sm://"))
        sender.wait_more(4)
    finally:
        sender.stop.set()
        sender.join(30)
    assert not sender.errors, sender.errors
    failures = [(n, sel, ok) for n, sel, ok in sender.results if not all(ok) or not ok]
    assert not failures, failures
    seen = {sel for _, sel, _ in sender.results}
    assert {("s1",), ("s1", new), (new,)} <= seen, seen

    # The replicas stop fetching the removed key's secret, and export the new key's age.
    for relay in relays:
        deadline = time.monotonic() + 20
        while f'relay_secret_age_seconds{{secret="{S1_REF}"}}' in relay.scrape():
            assert time.monotonic() < deadline, "the removed key is still fetched"
            time.sleep(0.2)
        assert relay.metric("relay_dkim_key_max_age_seconds", domain="example.com") == 180 * 86400
        assert f'relay_dkim_key_age_seconds{{domain="example.com",selector="{new}"}}' in relay.scrape()

    out: list[str] = []
    assert asyncio.run(status_command(settings, as_json=True, out=out.append)) == 0
    (domain,) = json.loads(out[0])["domains"]
    assert [(k["selector"], k["state"]) for k in domain["keys"]] == [(new, "active")]
    assert domain["rotation"] is None
