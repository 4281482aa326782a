"""DNS posture: egress IP discovery, DKIM records, DMARC, SPF for the egress IP, `relay check`
and the serve-time monitor.

DNS is real: NSD serves tests/data/dns/*.zone on loopback (see each zone file's header for its
cases), and a black-hole port stands for a resolver that times out. The upstream is a real
SMTP listener, the proxy a real microsocks, the IP echo service a real HTTP server. Only the
monitor's gate tests use a fake DnsService, to script outages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from relay.config.load import settings_from_mapping
from relay.config.schema import Settings, SpfSettings
from relay.dns.resolver import DnsAnswer, DnsResolver, DnsTemporaryError
from relay.errors import SmtpError
from relay.posture.dkim_record import check_dkim_record
from relay.posture.dmarc import aligned, check_dmarc, organizational_domain
from relay.posture.egress import (
    EchoError,
    accept_also,
    addresses_in_banner,
    discover_egress,
    fetch_echo_ip,
)
from relay.posture.monitor import PostureMonitor
from relay.posture.spf_posture import check_spf, with_terms
from relay.proxy import dialer_for
from relay.secrets.local import FileBackend
from relay.secrets.store import SecretStore
from relay.sign.keyring import KeyRing
from relay.sign.keys import load_signing_key
from relay.wiring import build_target
from tests.support.dns import black_hole, dns_server
from tests.support.procs import dead_port, free_port, require_binary, running
from tests.support.upstream import Upstream

DATA = Path(__file__).parent / "data"
ZONES = DATA / "dns"
KEYS = ZONES / "keys"
EXPECTED = DATA / "check"
EGRESS = "192.0.2.10"
LOOP = "127.0.0.1"
PROXY_EGRESS = "127.0.0.2"  # microsocks binds its outgoing connections here
RSA_PUBLIC = load_signing_key(
    (KEYS / "rsa2048.pem").read_bytes(), domain="x", selector="x", algorithm="rsa-sha256"
).public_b64


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nameserver(tmp_path_factory) -> Iterator[tuple[str, int]]:
    with dns_server(ZONES, tmp_path_factory.mktemp("nsd")) as address:
        yield address


@pytest.fixture(scope="module")
def dead_nameserver() -> Iterator[tuple[str, int]]:
    with black_hole() as address:
        yield address


@pytest.fixture
def resolver(nameserver) -> DnsResolver:
    host, port = nameserver
    return DnsResolver([host], port=port, timeout=10, attempts=1)  # NSD answers: a loaded machine's margin


@pytest.fixture
def dead_resolver(dead_nameserver) -> DnsResolver:
    host, port = dead_nameserver
    return DnsResolver([host], port=port, timeout=0.3, attempts=1)


@pytest.fixture
def key_files(tmp_path) -> dict[str, Path]:
    """The committed test keys, copied with mode 0600 (git does not keep modes)."""
    out = {}
    for name in ("rsa2048.pem", "ed25519.pem"):
        target = tmp_path / "keys" / name
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(KEYS / name, target)
        os.chmod(target, 0o600)
        out[name] = target
    return out


def signing_key(domain: str, selector: str, algorithm: str = "rsa-sha256"):
    name = "ed25519.pem" if algorithm == "ed25519-sha256" else "rsa2048.pem"
    return load_signing_key((KEYS / name).read_bytes(), domain=domain, selector=selector, algorithm=algorithm)


def make_settings(tmp_path: Path, **overrides) -> Settings:
    config = {
        "hostname": "relay.test",
        "listeners": [{"name": "submission", "bind": "127.0.0.1:2587", "tls": "none", "auth": "none"}],
        "upstream": {
            "name": "smarthost",
            "host": LOOP,
            "port": dead_port(),
            "tls": "none",
            "connect_timeout": "3s",
            "command_timeout": "3s",
        },
        "data_dir": str(tmp_path),
        **overrides,
    }
    return settings_from_mapping(config)


# -- DKIM records --------------------------------------------------------------------------

DKIM_CASES = [
    # domain, selector, algorithm, status, level, dns k=, dns bits, t=y
    ("example.com", "s1", "rsa-sha256", "match", "ok", "rsa", 2048, False),
    ("example.com", "ed1", "ed25519-sha256", "match", "ok", "ed25519", 256, False),
    ("example.com", "pkcs1", "rsa-sha256", "match", "ok", "rsa", 2048, False),  # k= absent: rsa
    ("mail.example.com", "s1", "rsa-sha256", "match", "warn", "rsa", 2048, True),
    ("example.net", "s1", "rsa-sha256", "mismatch", "fail", "rsa", 1024, False),
    ("example.org", "s1", "rsa-sha256", "revoked", "fail", "rsa", None, False),
    ("lookups.example.org", "s1", "rsa-sha256", "missing", "fail", None, None, False),
    ("multi.example.org", "s1", "rsa-sha256", "multiple", "fail", None, None, False),
    ("kx.example.org", "s1", "rsa-sha256", "mismatch", "fail", "ed25519", 256, False),
    ("plusall.example.org", "s1", "rsa-sha256", "invalid", "fail", None, None, False),
]


@pytest.mark.parametrize(
    ("domain", "selector", "algorithm", "status", "level", "key_type", "bits", "test_mode"),
    DKIM_CASES,
    ids=[f"{c[0]}/{c[1]}-{c[3]}" for c in DKIM_CASES],
)
async def test_dkim_record(resolver, domain, selector, algorithm, status, level, key_type, bits, test_mode):
    key = signing_key(domain, selector, algorithm)
    check = await check_dkim_record(resolver, domain=domain, selector=selector, algorithm=algorithm, key=key)
    assert (check.status, check.level) == (status, level), check.problem
    assert (check.dns_key_type, check.dns_key_bits, check.test_mode) == (key_type, bits, test_mode)
    assert check.expected == key.txt_value()
    if level == "ok":
        assert check.remediation is None
    else:
        assert f'{selector}._domainkey.{domain} TXT "{key.txt_value()}"' in check.remediation


async def test_dkim_problems_say_what_is_wrong(resolver):
    async def problem(domain, algorithm="rsa-sha256"):
        key = signing_key(domain, "s1", algorithm)
        return (await check_dkim_record(resolver, domain=domain, selector="s1", algorithm=algorithm, key=key)).problem

    assert await problem("example.net") == "the published 1024-bit key is not the relay's key"
    assert await problem("kx.example.org") == "k=ed25519 does not fit the rsa-sha256 key"
    assert await problem("plusall.example.org") == "h=sha1 excludes sha256, which the relay signs with"
    assert await problem("example.org") == "the key is revoked (empty p=)"
    assert await problem("multi.example.org") == (
        "2 TXT records at s1._domainkey.multi.example.org; verifiers use any one"
    )


async def test_dkim_mismatch_remediation_is_the_exact_record(resolver):
    key = signing_key("example.net", "s1")
    check = await check_dkim_record(resolver, domain="example.net", selector="s1", algorithm="rsa-sha256", key=key)
    assert check.remediation == f'publish s1._domainkey.example.net TXT "v=DKIM1; k=rsa; p={RSA_PUBLIC}"'


async def test_dkim_key_not_loaded(resolver):
    check = await check_dkim_record(
        resolver,
        domain="example.com",
        selector="s1",
        algorithm="rsa-sha256",
        key=None,
        key_problem="file:///k.pem: cannot read",
    )
    assert check.status == "unavailable"
    assert check.level == "fail"
    assert "cannot read" in check.problem
    assert check.dns_key_bits == 2048  # the published record is still described


async def test_dkim_dns_timeout_is_temperror(dead_resolver):
    check = await check_dkim_record(
        dead_resolver, domain="example.com", selector="s1", algorithm="rsa-sha256", key=signing_key("example.com", "s1")
    )
    assert check.status == "temperror"
    assert check.level == "fail"
    assert "timed out" in check.problem


# -- DMARC ---------------------------------------------------------------------------------

DMARC_CASES = [
    # domain, status, level, found at, applied policy, p, sp, adkim, rua
    (
        "example.com",
        "ok",
        "ok",
        "_dmarc.example.com",
        "reject",
        "reject",
        "quarantine",
        "s",
        ("mailto:dmarc@example.com",),
    ),
    # No record of its own: the organizational domain's, whose sp= applies to subdomains.
    (
        "mail.example.com",
        "ok",
        "ok",
        "_dmarc.example.com",
        "quarantine",
        "reject",
        "quarantine",
        "s",
        ("mailto:dmarc@example.com",),
    ),
    ("example.net", "missing", "warn", None, "missing", None, None, "r", ()),
    ("example.org", "ok", "warn", "_dmarc.example.org", "none", "none", None, "r", ()),
    # No sp=: p= applies to subdomains too.
    ("lookups.example.org", "ok", "warn", "_dmarc.example.org", "none", "none", None, "r", ()),
    ("multi.example.org", "multiple", "fail", "_dmarc.multi.example.org", "missing", None, None, "r", ()),
    (
        "kx.example.org",
        "invalid",
        "warn",
        "_dmarc.kx.example.org",
        "none",
        "block",
        None,
        "r",
        ("mailto:reports@example.org",),
    ),
]


@pytest.mark.parametrize(
    ("domain", "status", "level", "found_at", "applied", "p", "sp", "adkim", "rua"),
    DMARC_CASES,
    ids=[c[0] for c in DMARC_CASES],
)
async def test_dmarc(resolver, domain, status, level, found_at, applied, p, sp, adkim, rua):
    check = await check_dmarc(resolver, domain)
    assert (check.status, check.level, check.found_at) == (status, level, found_at), check.problem
    assert (check.applied_policy, check.policy, check.subdomain_policy) == (applied, p, sp)
    assert (check.adkim, check.rua) == (adkim, rua)
    assert check.dkim_aligned and check.spf_aligned  # d= and MAIL FROM are the From domain


async def test_dmarc_alignment_texts(resolver):
    sub = await check_dmarc(resolver, "mail.example.com")
    assert sub.organizational_domain == "example.com"
    assert sub.dkim_alignment == "DKIM d=mail.example.com aligns with From mail.example.com (strict, adkim=s)"
    assert sub.spf_alignment == (
        "SPF aligned if MAIL FROM uses mail.example.com or any domain under example.com (aspf=r)"
    )
    assert sub.remediation is None


async def test_dmarc_alignment_is_computed_not_assumed(resolver):
    # adkim=s at example.com: a signature with d=example.com does not align with a From
    # at mail.example.com, and a bounce domain elsewhere cannot align SPF.
    check = await check_dmarc(
        resolver, "mail.example.com", dkim_domain="example.com", envelope_domain="bounce.example.net"
    )
    assert not check.dkim_aligned
    assert not check.spf_aligned
    assert check.level == "fail"
    assert check.spf_alignment.startswith("SPF cannot align")


async def test_dmarc_remediations(resolver):
    missing = await check_dmarc(resolver, "example.net")
    assert missing.remediation == 'publish _dmarc.example.net TXT "v=DMARC1; p=none; rua=mailto:dmarc@example.net"'
    no_rua = await check_dmarc(resolver, "example.org")
    assert no_rua.remediation == "add rua=mailto:dmarc@example.org to _dmarc.example.org to receive aggregate reports"
    invalid = await check_dmarc(resolver, "kx.example.org")
    assert invalid.problem == "p=block is not none, quarantine or reject; taken as p=none (rua= present)"


async def test_dmarc_dns_timeout(dead_resolver):
    check = await check_dmarc(dead_resolver, "example.com")
    assert (check.status, check.level) == ("temperror", "fail")


@pytest.mark.parametrize(
    ("domain", "org"),
    [
        ("example.com", "example.com"),
        ("a.b.mail.example.com", "example.com"),
        ("a.b.example.co.uk", "example.co.uk"),
        ("mail.example.test", "example.test"),  # .test is not in the PSL: the default rule "*"
        ("test", "test"),
    ],
)
def test_organizational_domain(domain, org):
    assert organizational_domain(domain) == org


def test_alignment_modes():
    assert aligned("mail.example.com", "example.com", "r")
    assert not aligned("mail.example.com", "example.com", "s")
    assert aligned("Example.COM", "example.com.", "s")
    assert aligned("a.example.co.uk", "b.example.co.uk", "r")
    assert not aligned("example.co.uk", "other.co.uk", "r")


# -- SPF posture ---------------------------------------------------------------------------

SPF_CASES = [
    # domain, status, level, lookups, remediation
    ("example.com", "pass", "ok", 0, None),
    ("mail.example.com", "pass", "ok", 3, None),  # include → include → a
    (
        "example.net",
        "fail",
        "fail",
        0,
        'add ip4:192.0.2.10: example.net TXT "v=spf1 ip4:198.51.100.0/24 ip4:192.0.2.10 -all"',
    ),
    (
        "example.org",
        "softfail",
        "fail",
        0,
        'add ip4:192.0.2.10: example.org TXT "v=spf1 ip4:198.51.100.7 ip4:192.0.2.10 ~all"',
    ),
    (
        "lookups.example.org",
        "permerror",
        "fail",
        11,
        "cut the record to at most 10 DNS lookups (now 11): replace include:/a/mx terms with ip4:/ip6:",
    ),
    ("multi.example.org", "permerror", "fail", 0, "merge the 2 SPF records of multi.example.org into one"),
    (
        "plusall.example.org",
        "pass",
        "warn",
        0,
        "end the SPF record of plusall.example.org with -all or ~all instead of +all",
    ),
    ("ns1.example.com", "none", "fail", 0, 'publish ns1.example.com TXT "v=spf1 ip4:192.0.2.10 ~all"'),
]


@pytest.mark.parametrize(
    ("domain", "status", "level", "lookups", "remediation"), SPF_CASES, ids=[c[0] for c in SPF_CASES]
)
async def test_spf_posture(resolver, domain, status, level, lookups, remediation):
    spf = await check_spf(resolver, domain, [EGRESS])
    assert (spf.status, spf.level, spf.record.lookups) == (status, level, lookups), spf.summary
    assert spf.remediation == remediation


async def test_spf_ipv6_egress_and_several_ips(resolver):
    spf = await check_spf(resolver, "example.com", [EGRESS, "2001:db8::10"])
    assert [v.result.result for v in spf.egress] == ["pass", "fail"]
    assert spf.status == "fail"
    assert spf.remediation == ('add ip6:2001:db8::10: example.com TXT "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::10 -all"')


async def test_spf_without_egress_ip_is_unchecked(resolver):
    spf = await check_spf(resolver, "example.com", [])
    assert (spf.status, spf.level) == ("unchecked", "warn")
    assert "spf.egress_ip" in spf.remediation


async def test_spf_dns_timeout(dead_resolver):
    spf = await check_spf(dead_resolver, "example.com", [EGRESS])
    assert (spf.status, spf.level, spf.definite) == ("temperror", "fail", False)
    assert spf.remediation.startswith("the DNS lookup failed")


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ("v=spf1 -all", "v=spf1 ip4:192.0.2.10 -all"),
        ("v=spf1 mx ~ALL", "v=spf1 mx ip4:192.0.2.10 ~ALL"),
        ("v=spf1 include:x.example redirect=y.example", "v=spf1 include:x.example redirect=y.example ip4:192.0.2.10"),
    ],
)
def test_with_terms(record, expected):
    assert with_terms(record, "ip4:192.0.2.10") == expected


# -- egress IP discovery -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("mx.google.com at your service, [203.0.113.9]", ["203.0.113.9"]),
        ("mx.example Hello relay.test [IPv6:2001:db8::9]", ["2001:db8::9"]),
        ("220 mx.example ESMTP\nmx.example Hello [10.0.0.5]\nSIZE 1000", []),  # private: says nothing
        ("Hello [127.0.0.1] and [198.51.100.4] and [198.51.100.4]", ["198.51.100.4"]),
        ("Hello [999.1.1.1] [not-an-ip] 203.0.113.5", []),  # unbracketed addresses do not count
    ],
)
def test_addresses_in_banner(text, found):
    assert (
        addresses_in_banner(text, accept_also("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"))
        == found
    )


def test_public_unicast_filter_is_the_default():
    assert addresses_in_banner("[8.8.8.8] [203.0.113.9] [127.0.0.1] [10.1.2.3] [100.64.0.1] [224.0.0.1]") == ["8.8.8.8"]


async def test_egress_from_config_does_not_probe():
    async def probe():
        raise AssertionError("must not be called")

    egress = await discover_egress(SpfSettings(egress_ip=[EGRESS, "2001:db8::10"]), probe=probe, dialer=None)
    assert (egress.ips, egress.source, egress.problem) == ((EGRESS, "2001:db8::10"), "config", None)


async def test_egress_from_upstream_ehlo(tmp_path):
    hostname = "mx.test at your service, [203.0.113.9]"
    with Upstream(tls="none", hostname=hostname) as up:
        settings = make_settings(tmp_path, upstream={"host": LOOP, "port": up.port, "tls": "none"})
        store = SecretStore([], 60)
        delivery = build_target(settings.upstream[0], settings, store)
        try:
            auto = SpfSettings(egress_ip="auto")
            found = await discover_egress(auto, probe=delivery.probe, dialer=None, accept=accept_also("203.0.113.0/24"))
            # 203.0.113.0/24 is documentation space: the default filter refuses it.
            refused = await discover_egress(auto, probe=delivery.probe, dialer=None)
        finally:
            await delivery.close()
    assert (found.ips, found.source) == (("203.0.113.9",), "upstream")
    assert refused.ips == ()
    assert refused.problem == (
        "the upstream's greeting and EHLO reply name no public address; no spf.ip_echo_url configured; "
        "set spf.egress_ip to the public address(es) mail leaves from"
    )


async def test_egress_when_upstream_is_down(tmp_path):
    settings = make_settings(tmp_path)  # nothing listens on its port
    delivery = build_target(settings.upstream[0], settings, SecretStore([], 60))
    try:
        egress = await discover_egress(SpfSettings(egress_ip="auto"), probe=delivery.probe, dialer=None)
    finally:
        await delivery.close()
    assert egress.ips == ()
    assert egress.problem.startswith("upstream probe failed (connect to 127.0.0.1:")


# An IP echo service: answers GET /ip with the address it sees the client at.


@dataclass
class EchoServer:
    port: int
    peers: list[str] = field(default_factory=list)
    requests: list[bytes] = field(default_factory=list)
    mode: str = "plain"  # plain | chunked | close | status500 | garbage


@contextlib.asynccontextmanager
async def echo_server(tls: ssl.SSLContext | None = None):
    state = EchoServer(0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        state.peers.append(peer)
        head = await reader.readuntil(b"\r\n\r\n")
        state.requests.append(head)
        body = f"{peer}\n".encode()
        if state.mode == "chunked":
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                + f"{len(body):x}\r\n".encode()
                + body
                + b"\r\n0\r\n\r\n"
            )
        elif state.mode == "close":
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body)
        elif state.mode == "status500":
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
        elif state.mode == "garbage":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhello world!")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, LOOP, 0, ssl=tls)
    state.port = server.sockets[0].getsockname()[1]
    async with server:
        yield state


@pytest.fixture(scope="module")
def socks_proxy(tmp_path_factory) -> Iterator[str]:
    """microsocks with user/password, sending its outgoing connections from 127.0.0.2."""
    port = free_port()
    argv = [
        require_binary("microsocks"),
        "-i",
        LOOP,
        "-p",
        str(port),
        "-u",
        "relay",
        "-P",
        "proxy-secret",
        "-b",
        PROXY_EGRESS,
    ]
    with running(argv, ready=(LOOP, port), log_path=tmp_path_factory.mktemp("socks") / "microsocks.log"):
        yield f"socks5://relay@{LOOP}:{port}"


async def test_egress_from_ip_echo_url_through_the_proxy(tmp_path, socks_proxy):
    dialer = dialer_for(socks_proxy, password="proxy-secret", connect_timeout=5, handshake_timeout=5)
    with Upstream(tls="none", hostname="upstream.test") as up:  # says nothing about the client
        settings = make_settings(tmp_path, upstream={"host": LOOP, "port": up.port, "tls": "none"})
        delivery = build_target(settings.upstream[0], settings, SecretStore([], 60))
        async with echo_server() as echo:
            spf = SpfSettings(egress_ip="auto", ip_echo_url=f"http://{LOOP}:{echo.port}/ip")
            try:
                egress = await discover_egress(
                    spf, probe=delivery.probe, dialer=dialer, accept=accept_also("127.0.0.0/8")
                )
            finally:
                await delivery.close()
    # The echo service saw the proxy's outgoing address: the request went through the proxy.
    assert echo.peers == [PROXY_EGRESS]
    assert (egress.ips, egress.source) == ((PROXY_EGRESS,), "ip_echo_url")
    head = echo.requests[0].decode()
    assert head.startswith("GET /ip HTTP/1.1\r\n")
    assert f"Host: {LOOP}:{echo.port}\r\n" in head
    assert "proxy-secret" not in head


async def test_ip_echo_over_https_through_the_proxy(pki, socks_proxy):
    dialer = dialer_for(socks_proxy, password="proxy-secret")
    async with echo_server(tls=pki.server_context()) as echo:
        ip = await fetch_echo_ip(f"https://localhost:{echo.port}/", dialer, tls_context=pki.client_context())
        assert ip == PROXY_EGRESS
        # The certificate is checked for the echo host's name (SNI), not for the proxy's.
        with pytest.raises(EchoError, match="TLS failed"):
            await fetch_echo_ip(f"https://localhost:{echo.port}/", dialer)  # system CAs only


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("chunked", LOOP),
        ("close", LOOP),
        ("status500", EchoError("HTTP 500 Internal Server Error")),
        ("garbage", EchoError("the body is not an IP address ('hello world!')")),
    ],
)
async def test_ip_echo_responses(mode, expected):
    dialer = dialer_for(None, connect_timeout=5)
    async with echo_server() as echo:
        echo.mode = mode
        url = f"http://{LOOP}:{echo.port}/"
        if isinstance(expected, EchoError):
            with pytest.raises(EchoError) as info:
                await fetch_echo_ip(url, dialer)
            assert str(info.value) == f"http://{LOOP}:{echo.port}: {expected}"
        else:
            assert await fetch_echo_ip(url, dialer) == expected


async def test_ip_echo_private_answer_is_not_an_egress_ip():
    async with echo_server() as echo:
        spf = SpfSettings(egress_ip="auto", ip_echo_url=f"http://{LOOP}:{echo.port}/")
        egress = await discover_egress(spf, probe=None, dialer=dialer_for(None))
    assert egress.ips == ()
    assert egress.problem.startswith("spf.ip_echo_url answered 127.0.0.1, not a public address")


async def test_ip_echo_unreachable_says_where_without_credentials():
    dialer = dialer_for(None, connect_timeout=2)
    with pytest.raises(EchoError) as info:
        await fetch_echo_ip(f"http://user:pw-secret@{LOOP}:{dead_port()}/ip", dialer)
    assert str(info.value).startswith(f"http://{LOOP}:")
    assert "pw-secret" not in str(info.value)


# -- relay check ---------------------------------------------------------------------------


def check_config(
    tmp_path: Path,
    nameserver: tuple[str, int],
    key_files: dict[str, Path],
    keys: list[tuple[str, str, str]],
    upstream: dict,
    *,
    dns_timeout: str = "10s",
    **overrides,
) -> Path:
    key_entries = []
    for domain, selector, algorithm in keys:
        # One file per key: the key ring loads each secret reference for one key only.
        source = key_files["ed25519.pem" if algorithm.startswith("ed") else "rsa2048.pem"]
        path = source.with_name(f"{domain}.{selector}.pem")
        shutil.copyfile(source, path)
        os.chmod(path, 0o600)
        key_entries.append({"domain": domain, "selector": selector, "algorithm": algorithm, "key": f"file://{path}"})
    host, port = nameserver
    config = {
        "hostname": "relay.test",
        "listeners": [{"name": "submission", "bind": "127.0.0.1:2587", "tls": "none", "auth": "none"}],
        "dkim": {"keys": key_entries},
        # Generous: the servers answer, and a loaded machine must not turn that into a timeout.
        "upstream": {"name": "smarthost", "connect_timeout": "30s", "command_timeout": "30s", **upstream},
        "dns": {"nameservers": [host], "port": port, "timeout": dns_timeout, "attempts": 1},
        "spf": {"egress_ip": [EGRESS]},
        "data_dir": str(tmp_path),
        **overrides,
    }
    path = tmp_path / "relay.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def run_check_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "check", "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=Path(__file__).parent.parent,
    )


def normalized(output: str, ports: list[int]) -> dict:
    for port in ports:
        output = re.sub(rf"\b{port}\b", "<port>", output)
    doc = json.loads(output)
    if doc["upstream"]["greeting"]:
        assert doc["upstream"]["greeting"].startswith("upstream.test ")
        doc["upstream"]["greeting"] = "<greeting>"
    return doc


CHECK_CASES = {
    # name: (DKIM keys, upstream kind, DNS, exit code)
    "pass": ([("example.com", "s1", "rsa-sha256"), ("example.com", "ed1", "ed25519-sha256")], "starttls", "nsd", 0),
    "problems": (
        [
            ("mail.example.com", "s1", "rsa-sha256"),
            ("example.net", "s1", "rsa-sha256"),
            ("example.org", "s1", "rsa-sha256"),
            ("lookups.example.org", "s1", "rsa-sha256"),
        ],
        "plain",
        "nsd",
        1,
    ),
    "dns-timeout": ([("example.com", "s1", "rsa-sha256")], "down", "black-hole", 1),
}


@pytest.mark.parametrize("case", list(CHECK_CASES))
@pytest.mark.e2e
def test_relay_check_json(case, tmp_path, nameserver, dead_nameserver, key_files, pki):
    keys, upstream_kind, dns_kind, exit_code = CHECK_CASES[case]
    dns_address = nameserver if dns_kind == "nsd" else dead_nameserver
    with contextlib.ExitStack() as stack:
        if upstream_kind == "starttls":
            up = stack.enter_context(Upstream(tls="starttls", server_context=pki.server_context()))
            # Resolved through dns.nameservers, i.e. the zone upstream.test on the test server.
            upstream = {"host": "upstream.test", "port": up.port, "tls": "starttls", "ca_file": str(pki.ca_file)}
        elif upstream_kind == "plain":
            up = stack.enter_context(Upstream(tls="none"))
            upstream = {"host": LOOP, "port": up.port, "tls": "none"}
        else:
            upstream = {"host": LOOP, "port": dead_port(), "tls": "starttls"}
        # Only the black hole times out: its wait is kept short.
        dns_timeout = "10s" if dns_kind == "nsd" else "2s"
        config = check_config(tmp_path, dns_address, key_files, keys, upstream, dns_timeout=dns_timeout)
        result = run_check_cli(config, "--json")
    assert result.returncode == exit_code, result.stderr
    got = normalized(result.stdout, [upstream["port"], dns_address[1]])
    expected_file = EXPECTED / f"{case}.json"
    if os.environ.get("RELAY_UPDATE_EXPECTED"):
        expected_file.write_text(json.dumps(got, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    assert got == json.loads(expected_file.read_text())
    assert got["ok"] is (exit_code == 0)


@pytest.mark.e2e
def test_relay_check_table(tmp_path, nameserver, key_files):
    with Upstream(tls="none") as up:
        config = check_config(
            tmp_path,
            nameserver,
            key_files,
            [("example.com", "s1", "rsa-sha256"), ("example.net", "s1", "rsa-sha256")],
            {"host": LOOP, "port": up.port, "tls": "none"},
        )
        result = run_check_cli(config)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "relay check: 2 failed, 2 warnings"
    assert f"  ! upstream   smarthost: reachable: 127.0.0.1:{up.port} (none)" in result.stdout
    assert "  ✓ egress IP  192.0.2.10 (from spf.egress_ip)" in lines
    assert "example.com  ✓" in lines and "example.net  ✗" in lines
    assert "  ✗ SPF        fail for 192.0.2.10; 0/10 DNS lookups" in lines
    assert (
        '               → add ip4:192.0.2.10: example.net TXT "v=spf1 ip4:198.51.100.0/24 ip4:192.0.2.10 -all"'
    ) in lines
    assert f'               → publish s1._domainkey.example.net TXT "v=DKIM1; k=rsa; p={RSA_PUBLIC}"' in lines
    assert '               → publish _dmarc.example.net TXT "v=DMARC1; p=none; rua=mailto:dmarc@example.net"' in lines


@pytest.mark.e2e
def test_relay_check_bad_config_exits_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("listeners: []\nupstream: {host: x}\nspf: {egress_ip: not-an-ip}\n")
    result = run_check_cli(path, "--json")
    assert result.returncode == 2
    assert "spf.egress_ip" in result.stderr
    assert result.stdout == ""


@pytest.mark.e2e
def test_relay_check_refuse_without_egress_ip_fails(tmp_path, nameserver, key_files):
    with Upstream(tls="none", hostname="upstream.test") as up:
        config = check_config(
            tmp_path,
            nameserver,
            key_files,
            [("example.com", "s1", "rsa-sha256")],
            {"host": LOOP, "port": up.port, "tls": "none"},
            spf={"egress_ip": "auto", "on_fail": "refuse"},
        )
        result = run_check_cli(config, "--json")
    assert result.returncode == 1, result.stderr
    doc = json.loads(result.stdout)
    assert doc["egress"]["level"] == "fail"
    assert doc["egress"]["ips"] == [] and doc["egress"]["source"] is None
    assert doc["domains"][0]["spf"]["status"] == "unchecked"


# -- the monitor (SendGate) ----------------------------------------------------------------


class FakeDns:
    """TXT records by name; `down` makes every lookup a timeout; `broken` raises a bug."""

    def __init__(self, txt: dict[str, list[str]]) -> None:
        self.txt = txt
        self.down = False
        self.broken = False

    async def resolve(self, name: str, rdtype: str) -> DnsAnswer:
        if self.broken:
            raise RuntimeError("bug")
        if self.down:
            raise DnsTemporaryError(f"{rdtype} {name}: timed out")
        name = name.lower().rstrip(".")
        if rdtype == "TXT" and name in self.txt:
            return DnsAnswer(tuple(t.encode() for t in self.txt[name]))
        return DnsAnswer((), nxdomain=name not in self.txt)


def posture_zone(domain: str, spf: str = "v=spf1 ip4:192.0.2.0/24 -all") -> dict[str, list[str]]:
    return {
        domain: [spf],
        f"s1._domainkey.{domain}": [f"v=DKIM1; k=rsa; p={RSA_PUBLIC}"],
        f"_dmarc.{domain}": ["v=DMARC1; p=reject; rua=mailto:dmarc@" + domain],
    }


async def make_monitor(
    tmp_path, key_files, domain: str, dns: FakeDns, on_fail: str = "refuse", delivery=None, previous=None, **spf
) -> PostureMonitor:
    settings = make_settings(
        tmp_path,
        upstream={"name": "smarthost", "host": LOOP, "port": 2525, "tls": "none"},  # never dialled
        dkim={"keys": [{"domain": domain, "selector": "s1", "key": f"file://{key_files['rsa2048.pem']}"}]},
        spf={"egress_ip": [EGRESS], "on_fail": on_fail, "check_interval": "50ms", **spf},
    )
    store = SecretStore([FileBackend()], 60)
    await store.ensure([k.key for k in settings.dkim.keys])
    return PostureMonitor(settings, dns, KeyRing(settings.dkim, store), delivery, previous=previous)


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def held(monitor: PostureMonitor, domain: str) -> SmtpError | None:
    try:
        monitor.check(domain)
    except SmtpError as exc:
        return exc
    return None


async def test_monitor_refuse_holds_until_spf_passes(tmp_path, key_files):
    domain = "refuse.example.com"
    dns = FakeDns(posture_zone(domain, "v=spf1 ip4:198.51.100.0/24 -all"))
    monitor = await make_monitor(tmp_path, key_files, domain, dns)
    first = held(monitor, domain)  # before the first check: not verified yet
    assert (first.code, first.reply.enhanced) == (451, "4.7.24")
    await monitor.run_once()
    refused = held(monitor, domain)
    assert (refused.code, refused.reply.enhanced, refused.temporary) == (451, "4.7.23", True)
    assert refused.reply.text == (
        "SPF for refuse.example.com does not authorize egress IP 192.0.2.10 (result fail); try again later"
    )
    assert sample("relay_spf_egress_pass", domain=domain) == 0
    assert held(monitor, "not-signed.example.com") is None  # not the monitor's business
    dns.txt[domain] = ["v=spf1 ip4:192.0.2.10 -all"]
    await monitor.run_once()
    assert held(monitor, domain) is None
    assert held(monitor, domain.upper()) is None
    assert sample("relay_spf_egress_pass", domain=domain) == 1
    assert sample("relay_spf_gate_messages_total", domain=domain, action="held") == 2


async def test_monitor_gauges(tmp_path, key_files):
    domain = "gauges.example.com"
    dns = FakeDns(posture_zone(domain, "v=spf1 include:_spf.gauges.example.com -all"))
    dns.txt["_spf.gauges.example.com"] = ["v=spf1 a mx ip4:192.0.2.10 -all"]
    monitor = await make_monitor(tmp_path, key_files, domain, dns)
    await monitor.run_once()
    assert sample("relay_spf_egress_pass", domain=domain) == 1
    assert sample("relay_spf_lookups", domain=domain) == 3
    assert sample("relay_dkim_dns_key_match", domain=domain, selector="s1") == 1
    assert [
        sample("relay_dmarc_policy", domain=domain, policy=p) for p in ("none", "quarantine", "reject", "missing")
    ] == [0, 0, 1, 0]
    assert sample("relay_posture_last_check_timestamp_seconds") > 1.7e9
    del dns.txt[f"_dmarc.{domain}"]
    dns.txt[f"s1._domainkey.{domain}"] = ["v=DKIM1; k=rsa; p="]
    await monitor.run_once()
    assert sample("relay_dkim_dns_key_match", domain=domain, selector="s1") == 0
    assert sample("relay_dmarc_policy", domain=domain, policy="missing") == 1
    assert sample("relay_dmarc_policy", domain=domain, policy="reject") == 0


async def test_monitor_dns_outage_keeps_the_last_verdict(tmp_path, key_files):
    domain = "outage.example.com"
    dns = FakeDns(posture_zone(domain))
    monitor = await make_monitor(tmp_path, key_files, domain, dns)
    await monitor.run_once()
    assert held(monitor, domain) is None
    errors = {c: sample("relay_posture_check_errors_total", check=c) or 0 for c in ("spf", "dkim", "dmarc")}
    dns.down = True
    await monitor.run_once()
    assert held(monitor, domain) is None  # an outage does not turn a pass into a refusal
    assert sample("relay_spf_egress_pass", domain=domain) == 1
    assert sample("relay_dkim_dns_key_match", domain=domain, selector="s1") == 1
    for check in ("spf", "dkim", "dmarc"):
        assert sample("relay_posture_check_errors_total", check=check) == errors[check] + 1
    # ... nor a failure into a pass
    dns.down = False
    dns.txt[domain] = ["v=spf1 -all"]
    await monitor.run_once()
    dns.down = True
    await monitor.run_once()
    assert held(monitor, domain).reply.enhanced == "4.7.23"


async def test_monitor_outage_since_start_holds_temporarily(tmp_path, key_files):
    domain = "never.example.com"
    dns = FakeDns(posture_zone(domain))
    dns.down = True
    monitor = await make_monitor(tmp_path, key_files, domain, dns)
    await monitor.run_once()
    error = held(monitor, domain)
    assert (error.code, error.reply.enhanced) == (451, "4.7.24")
    assert error.reply.text == "SPF for never.example.com not verified yet; try again later"
    assert "timed out" in error.reason
    assert sample("relay_spf_egress_pass", domain=domain) is None  # nothing known, nothing claimed


async def test_monitor_warn_never_holds(tmp_path, key_files):
    domain = "warn.example.com"
    dns = FakeDns(posture_zone(domain, "v=spf1 -all"))
    monitor = await make_monitor(tmp_path, key_files, domain, dns, on_fail="warn")
    assert held(monitor, domain) is None
    await monitor.run_once()
    assert held(monitor, domain) is None
    assert sample("relay_spf_gate_messages_total", domain=domain, action="warned") == 1
    assert sample("relay_spf_egress_pass", domain=domain) == 0


async def test_monitor_reload_keeps_verdicts(tmp_path, key_files):
    domain = "reload.example.com"
    dns = FakeDns(posture_zone(domain))
    old = await make_monitor(tmp_path, key_files, domain, dns)
    await old.run_once()
    new = await make_monitor(tmp_path, key_files, domain, dns, previous=old)
    assert held(new, domain) is None
    changed = await make_monitor(tmp_path, key_files, domain, dns, previous=old, egress_ip=["203.0.113.1"])
    assert held(changed, domain).reply.enhanced == "4.7.24"  # another egress: old verdicts say nothing


class FakeDelivery:
    def __init__(self, banner: str) -> None:
        self.banner = banner
        self.probes = 0

    async def probe(self) -> str:
        self.probes += 1
        if not self.banner:
            raise SmtpError(451, "4.4.1", "down", reason="connect refused")
        return self.banner


async def test_monitor_auto_egress_keeps_the_last_known_ip(tmp_path, key_files):
    domain = "auto.example.com"
    dns = FakeDns(posture_zone(domain, "v=spf1 ip4:8.8.8.8 -all"))
    delivery = FakeDelivery("mx.test at your service, [8.8.8.8]")
    monitor = await make_monitor(tmp_path, key_files, domain, dns, delivery=delivery, egress_ip="auto")
    await monitor.run_once()
    assert monitor.egress.ips == ("8.8.8.8",) and monitor.egress.source == "upstream"
    assert held(monitor, domain) is None
    before = sample("relay_posture_check_errors_total", check="egress") or 0
    delivery.banner = ""
    await monitor.run_once()
    assert monitor.egress.ips == ("8.8.8.8",)
    assert held(monitor, domain) is None
    assert sample("relay_posture_check_errors_total", check="egress") == before + 1


async def test_monitor_run_survives_errors(tmp_path, key_files):
    domain = "loop.example.com"
    dns = FakeDns(posture_zone(domain))
    dns.broken = True
    monitor = await make_monitor(tmp_path, key_files, domain, dns)
    task = asyncio.create_task(monitor.run())
    await asyncio.sleep(0.2)
    assert not task.done()  # a failing pass is logged, and the loop goes on
    dns.broken = False
    await asyncio.sleep(0.2)
    assert held(monitor, domain) is None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_monitor_against_the_real_zones(tmp_path, key_files, resolver):
    settings = make_settings(
        tmp_path,
        dkim={
            "keys": [
                {"domain": "example.com", "selector": "s1", "key": f"file://{key_files['rsa2048.pem']}"},
                {
                    "domain": "example.net",
                    "selector": "s1",
                    "key": f"file://{key_files['ed25519.pem']}",
                    "algorithm": "ed25519-sha256",
                },
            ]
        },
        spf={"egress_ip": [EGRESS], "on_fail": "refuse"},
    )
    store = SecretStore([FileBackend()], 60)
    await store.ensure([k.key for k in settings.dkim.keys])
    monitor = PostureMonitor(settings, resolver, KeyRing(settings.dkim, store), None)
    found = {p.domain: p for p in await monitor.run_once()}
    assert held(monitor, "example.com") is None
    assert held(monitor, "example.net").reply.text == (
        "SPF for example.net does not authorize egress IP 192.0.2.10 (result fail); try again later"
    )
    assert found["example.net"].dkim[0].problem == "k=rsa does not fit the ed25519-sha256 key"
    assert sample("relay_dkim_dns_key_match", domain="example.net", selector="s1") == 0
    assert sample("relay_dmarc_policy", domain="example.net", policy="missing") == 1


# -- a hostile zone: loops, a 61 KB record, tag lists that are not ----------------------------


@pytest.mark.parametrize("domain", ["loop.hostile.test", "self.hostile.test"])
async def test_an_spf_include_loop_is_named_as_a_loop(resolver, domain):
    """Evaluation meets a loop only as "more than 10 DNS-querying terms"; the analysis used
    to follow it to its cap (31 lookups) and advise replacing include: terms with ip4:."""
    spf = await check_spf(resolver, domain, [EGRESS])
    assert (spf.status, spf.level) == ("permerror", "fail")
    assert spf.record.over_limit and spf.record.lookups <= 2
    assert spf.remediation.startswith(f"break the loop in the SPF records of {domain}: include:")
    assert f"loops: {domain} -> " in spf.remediation


async def test_an_spf_loop_is_permerror_also_without_an_egress_ip(resolver):
    spf = await check_spf(resolver, "loop.hostile.test", [])
    assert spf.level == "fail"


async def test_more_than_two_void_lookups_is_permerror(resolver):
    spf = await check_spf(resolver, "void.hostile.test", [EGRESS])
    assert spf.status == "permerror"
    assert spf.failing.result.problem == "more than 2 void lookups (at A nx3.hostile.test)"


async def test_a_61_kb_spf_record_is_read_and_its_error_is_cut(resolver):
    spf = await check_spf(resolver, "big.hostile.test", [EGRESS])
    assert spf.status == "permerror" and spf.record.length > 60_000  # the whole record, over TCP
    assert "... (61448 characters)" in spf.summary
    assert len(spf.summary) < 1000 and len(spf.remediation) < 1000  # not the 61 KB word


async def test_a_tag_list_that_is_not_one_says_what_is_wrong(resolver):
    async def problem(selector):
        key = signing_key("hostile.test", selector)
        return (
            await check_dkim_record(resolver, domain="hostile.test", selector=selector, algorithm="rsa-sha256", key=key)
        ).problem

    assert await problem("s1") == "not a DKIM key record: tag k= given twice (RFC 6376 §3.2)"
    assert await problem("s2") == r"not a DKIM key record: '\x00\x01\\xffgarbage' is not tag=value (RFC 6376 §3.2)"
    dmarc = await check_dmarc(resolver, "hostile.test")
    assert dmarc.status == "invalid"
    assert dmarc.problem.startswith("tag p= given twice (RFC 7489 §6.4)")
