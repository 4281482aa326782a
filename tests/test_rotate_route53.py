"""Rotation against real parts: Secrets Manager and Route 53 in moto's server, the zone
served over DNS by NSD, the relay's own resolver asking NSD. Only the clock is injected
(a week passes in a call).
"""

from __future__ import annotations

from datetime import timedelta

import boto3
import dns.message
import dns.query
import dns.rdatatype
import pytest

from relay.config.schema import DkimKeySetSettings, DkimKeySettings, DkimRotationSettings
from relay.dns.resolver import DnsResolver
from relay.rotate.publish import Route53Publisher, publisher_for
from relay.rotate.rotation import Rotation
from relay.rotate.storage import RotationSecrets
from relay.secrets.aws import AwsSecretsBackend
from relay.sign.keys import generate_private_key, load_signing_key, private_key_pem
from relay.sign.keyset import KeySet
from tests.support.aws import AWS_ENV, REGION, moto_server
from tests.support.clock import DAY, T0, StepClock
from tests.support.route53_dns import Route53Zone

KEY_SET = "aws-sm://relay/dkim/example.com/key-set"
pytestmark = pytest.mark.binaries  # moto server, nsd


@pytest.fixture
def aws(monkeypatch, tmp_path):
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    with moto_server(tmp_path / "moto.log") as (endpoint, _):
        with Route53Zone(endpoint, "example.com", tmp_path) as zone:
            yield endpoint, zone


class Setup:
    def __init__(self, endpoint: str, zone: Route53Zone, bits: int = 2048) -> None:
        self.zone = zone
        self.sm = boto3.client(
            "secretsmanager",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        pem = private_key_pem(generate_private_key("rsa-sha256"))
        self.sm.create_secret(Name="relay/dkim/example.com/s1", SecretString=pem.decode())
        self.s1_record = load_signing_key(pem, domain="example.com", selector="s1", algorithm="rsa-sha256").txt_value()
        self.static = [DkimKeySettings(domain="example.com", selector="s1", key="aws-sm://relay/dkim/example.com/s1")]
        self.config = DkimKeySetSettings(
            domain="example.com",
            key_set=KEY_SET,
            key="aws-sm://relay/dkim/{domain}/{selector}",
            publish=f"route53:{zone.zone_id}",
            bits=bits,
        )
        self.settings = DkimRotationSettings(
            dns_wait="10m", dns_poll="1m", route53={"endpoint_url": endpoint, "region": REGION}
        )
        self.clock = StepClock()
        self.lines: list[str] = []
        self.backend = AwsSecretsBackend(region=REGION, endpoint_url=endpoint)
        # NSD answers every lookup: the timeout is only a loaded machine's margin (a lookup
        # timed out would be one more poll, and a 4096-bit record goes UDP, TC, then TCP).
        self.resolver = DnsResolver([zone.host], port=zone.port, timeout=10, attempts=1, cache=False)

    async def publish_s1(self) -> None:
        publisher = Route53Publisher(self.zone.zone_id, endpoint_url=self.settings.route53.endpoint_url)
        await publisher.upsert("s1._domainkey.example.com", self.s1_record, 300)
        await publisher.close()
        self.zone.sync()

    def rotation(self) -> Rotation:
        return Rotation(
            self.config,
            self.settings,
            secrets=RotationSecrets([self.backend]),
            publishers=lambda target: publisher_for(target, self.settings, self.lines.append),
            dns=self.resolver,
            clock=self.clock,
            say=self.lines.append,
            static_keys=self.static,
            resolver=f"{self.zone.host}:{self.zone.port}",
        )

    def doc(self) -> KeySet:
        return KeySet.from_bytes(
            self.sm.get_secret_value(SecretId=KEY_SET.removeprefix("aws-sm://"))["SecretString"].encode(), "example.com"
        )

    def served(self, name: str) -> list[list[bytes]]:
        """The TXT records NSD serves at `name`, each as its character-strings."""
        # A 4096-bit key's record does not fit 512 bytes of UDP: TC, then TCP (RFC 7766).
        reply, _ = dns.query.udp_with_fallback(
            dns.message.make_query(name, dns.rdatatype.TXT), self.zone.host, port=self.zone.port, timeout=10
        )
        return [list(r.strings) for rrset in reply.answer for r in rrset]


@pytest.mark.parametrize("bits", [2048, 4096])
async def test_route53_rotation_served_by_a_real_dns_server(aws, bits):
    endpoint, zone = aws
    s = Setup(endpoint, zone, bits=bits)
    await s.publish_s1()
    new, name = "s20261116", "s20261116._domainkey.example.com"

    def meanwhile():
        # Route 53 has the record; DNS does not serve it yet: no switch.
        assert s.doc().entry(new).state == "pending"
        assert zone.txt(name) is not None and s.served(name) == []
        if s.clock.sleeps == 2:
            zone.sync()

    s.clock.on_sleep = meanwhile
    outcome = await s.rotation().advance()
    assert outcome.status == "waiting", (outcome, s.lines)
    assert s.clock.sleeps == 2
    doc = s.doc()
    assert [(k.selector, k.state) for k in doc.keys] == [("s1", "active"), (new, "active")]
    # One record of several character-strings, each at most 255 bytes, joined = the value.
    (strings,) = s.served(name)
    assert len(strings) > 1 and all(len(x) <= 255 for x in strings)
    assert b"".join(strings).decode() == doc.entry(new).record
    stored = s.sm.get_secret_value(SecretId=f"relay/dkim/example.com/{new}")["SecretString"].encode()
    assert (
        load_signing_key(stored, domain="example.com", selector=new, algorithm="rsa-sha256").txt_value()
        == doc.entry(new).record
    )

    s.clock.on_sleep = None
    s.clock.t = T0 + 7 * DAY + timedelta(hours=1)
    assert (await s.rotation().advance()).status == "waiting"
    assert [k.selector for k in s.doc().signing()] == [new]

    s.clock.t = T0 + 15 * DAY
    outcome = await s.rotation().advance()
    assert outcome.status == "done", (outcome, s.lines)
    assert zone.txt("s1._domainkey.example.com") is None  # DELETEd in Route 53
    zone.sync()
    assert s.served("s1._domainkey.example.com") == []
    assert s.served(name)  # the new one stays
    described = s.sm.describe_secret(SecretId="relay/dkim/example.com/s1")
    assert "DeletedDate" in described  # scheduled for deletion, recoverable
    assert [k.selector for k in s.doc().keys] == [new]
    await s.backend.close()


async def test_a_wrong_record_in_dns_blocks_the_switch(aws):
    endpoint, zone = aws
    s = Setup(endpoint, zone)
    await s.publish_s1()
    name = "s20261116._domainkey.example.com"
    # DNS serves another key at the new name, whatever Route 53 holds.
    other = private_key_pem(generate_private_key("rsa-sha256"))
    wrong = load_signing_key(other, domain="example.com", selector="x", algorithm="rsa-sha256").txt_value()
    zone.overrides[name] = [" ".join(f'"{wrong[i : i + 255]}"' for i in range(0, len(wrong), 255))]
    s.clock.on_sleep = zone.sync
    outcome = await s.rotation().advance()
    assert outcome.status == "blocked"
    assert "not switching to s20261116" in outcome.message
    assert "the published 2048-bit key is not the relay's key" in outcome.message
    assert [(k.selector, k.state) for k in s.doc().keys] == [("s1", "active"), ("s20261116", "pending")]

    zone.clear_overrides()  # DNS catches up with Route 53
    outcome = await s.rotation().advance()
    assert outcome.status == "waiting", outcome
    assert s.doc().entry("s20261116").state == "active"
    await s.backend.close()


async def test_removal_keeps_a_record_someone_else_changed(aws):
    endpoint, zone = aws
    s = Setup(endpoint, zone)
    publisher = Route53Publisher(zone.zone_id, endpoint_url=endpoint)
    name = "old._domainkey.example.com"
    await publisher.upsert(name, "v=DKIM1; k=rsa; p=AAAA", 300)
    message = await publisher.remove(name, "v=DKIM1; k=rsa; p=BBBB")
    assert "kept the TXT record" in message and zone.txt(name) == ['"v=DKIM1; k=rsa; p=AAAA"']
    message = await publisher.remove(name, "v=DKIM1; k=rsa; p=AAAA")
    assert message.startswith("removed") and zone.txt(name) is None
    assert "already removed" in await publisher.remove(name, "v=DKIM1; k=rsa; p=AAAA")
    await publisher.close()
    # The document was never written: this test touched DNS only.
    with pytest.raises(s.sm.exceptions.ResourceNotFoundException):
        s.sm.get_secret_value(SecretId=KEY_SET.removeprefix("aws-sm://"))
