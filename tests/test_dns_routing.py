"""Every name the relay connects to goes through `dns.nameservers` when it is configured: the
upstream's and the proxy's, not only MX and the posture checks. Tested against a real DNS
server (NSD) on loopback serving names the system resolver cannot know (the tests' network
namespace has no other resolver, and these names are in no /etc/hosts)."""

from __future__ import annotations

import boto3
import pytest
from aiohttp import web

from relay.dns.addresses import AddressResolver
from relay.dns.resolver import DnsResolver
from relay.secrets.aws import AwsSecretsBackend
from relay.secrets.base import SecretRef
from relay.secrets.vault import VaultBackend
from tests.support.aws import AWS_ENV, REGION, moto_server
from tests.support.dns import dns_server
from tests.support.inloop import in_thread
from tests.support.proxies import microsocks, tinyproxy
from tests.support.redis import RedisServer
from tests.support.smtp import connect, message

pytestmark = pytest.mark.binaries

SECRETS_ZONE = (
    "@ 3600 IN SOA ns.secrets.test. admin.secrets.test. 1 3600 600 86400 60\n"
    "@ 3600 IN NS ns\nns 3600 IN A 127.0.0.1\nvault 3600 IN A 127.0.0.1\nsm 3600 IN A 127.0.0.1\n"
)
ZONES = {
    "secrets.test": SECRETS_ZONE,
    # upstream.test is one of the names on the test PKI's server certificate.
    "upstream.test": "@ 3600 IN SOA ns.upstream.test. admin.upstream.test. 1 3600 600 86400 60\n"
    "@ 3600 IN NS ns\nns 3600 IN A 127.0.0.1\n@ 3600 IN A 127.0.0.1\n",
    "proxy.test": "@ 3600 IN SOA ns.proxy.test. admin.proxy.test. 1 3600 600 86400 60\n"
    "@ 3600 IN NS ns\nns 3600 IN A 127.0.0.1\negress 3600 IN A 127.0.0.1\n",
    # Two addresses for the limits' Redis, one where nothing listens: in whichever order
    # they come, relay tries the next address after a refused one.
    "limits.test": "@ 3600 IN SOA ns.limits.test. admin.limits.test. 1 3600 600 86400 60\n"
    "@ 3600 IN NS ns\nns 3600 IN A 127.0.0.1\nredis 3600 IN A 127.0.0.2\nredis 3600 IN A 127.0.0.1\n",
}


@pytest.fixture
def nameserver(tmp_path):
    with dns_server(ZONES, tmp_path / "dns") as address:
        yield address


def _relay(make_loop_relay, upstream, nameserver, **upstream_settings):
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["upstream"].update(upstream_settings)
    relay.config["dns"] = {"nameservers": [nameserver[0]], "port": nameserver[1], "timeout": "2s", "attempts": 1}
    relay.start()
    return relay


@in_thread
def test_socks5_proxy_and_upstream_names_resolve_through_the_configured_dns(
    make_loop_relay, upstream, pki, nameserver, tmp_path
):
    with microsocks(tmp_path, user="relay", password="proxy-secret") as port:
        relay = _relay(
            make_loop_relay,
            upstream,
            nameserver,
            host="upstream.test",
            proxy=f"socks5://relay:proxy-secret@egress.proxy.test:{port}",
        )
        connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message())
        [received] = upstream.wait_for(1)
    assert received.tls
    assert received.peer[0] == "127.0.0.2"  # it came through the proxy


@in_thread
def test_http_connect_proxy_name_resolves_through_the_configured_dns(
    make_loop_relay, upstream, pki, nameserver, tmp_path
):
    with tinyproxy(tmp_path, user="relay", password="proxy-secret", connect_ports=[upstream.port]) as port:
        relay = _relay(
            make_loop_relay,
            upstream,
            nameserver,
            host="127.0.0.1",  # CONNECT: the proxy resolves the upstream itself
            proxy=f"http://relay:proxy-secret@egress.proxy.test:{port}",
        )
        connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message())
        [received] = upstream.wait_for(1)
    assert received.peer[0] == "127.0.0.2"


@in_thread
def test_direct_upstream_name_resolves_through_the_configured_dns(make_loop_relay, upstream, pki, nameserver):
    relay = _relay(make_loop_relay, upstream, nameserver, host="upstream.test")
    connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message())
    assert len(upstream.wait_for(1)) == 1


def _addresses(nameserver) -> AddressResolver:
    return AddressResolver(DnsResolver([nameserver[0]], port=nameserver[1], timeout=2, attempts=1))


async def test_vault_host_name_resolves_through_the_configured_dns(nameserver):
    async def read(request: web.Request) -> web.Response:
        assert request.headers["X-Vault-Token"] == "hvs.test"
        return web.json_response({"data": {"data": {"key": "PEM"}, "metadata": {"version": 3}}})

    async def lookup(request: web.Request) -> web.Response:
        return web.json_response({"data": {"ttl": 0, "renewable": False}})

    app = web.Application()
    app.router.add_get("/v1/secret/data/relay/dkim", read)
    app.router.add_get("/v1/auth/token/lookup-self", lookup)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    backend = VaultBackend(
        f"http://vault.secrets.test:{port}", auth="token", token="hvs.test", resolver=_addresses(nameserver)
    )
    try:
        value = await backend.fetch(SecretRef.parse("vault://secret/relay/dkim#key"))
        assert value.data == b"PEM"
    finally:
        await backend.close()
        await runner.cleanup()


async def test_secrets_manager_endpoint_name_resolves_through_the_configured_dns(nameserver, tmp_path, monkeypatch):
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    with moto_server(tmp_path / "moto.log") as (endpoint, _):
        boto3.client("secretsmanager", endpoint_url=endpoint, region_name=REGION).create_secret(
            Name="relay/dkim", SecretString="PEM"
        )
        named = endpoint.replace("127.0.0.1", "sm.secrets.test")
        backend = AwsSecretsBackend(region=REGION, endpoint_url=named, resolver=_addresses(nameserver))
        try:
            value = await backend.fetch(SecretRef.parse("aws-sm://relay/dkim"))
            assert value.data == b"PEM"
        finally:
            await backend.close()


@pytest.mark.parametrize("tls", [False, True], ids=["redis", "rediss"])
@in_thread
def test_limits_redis_host_name_resolves_through_the_configured_dns(
    make_loop_relay, upstream, pki, nameserver, tmp_path, tls
):
    """The Redis of `limits.backend: redis` by name: the system resolver cannot know it, so
    relay used to fall back to local counters. Over TLS the certificate is checked against
    the name (upstream.test is on the test certificate), not the address it resolved to."""
    with RedisServer(tmp_path, tls=(pki.cert_file, pki.key_file) if tls else None) as redis:
        host = "upstream.test" if tls else "redis.limits.test"
        redis_settings = {"url": f"{'rediss' if tls else 'redis'}://{host}:{redis.port}/0"}
        if tls:
            redis_settings["ca_file"] = str(pki.ca_file)
        relay = make_loop_relay(upstream.port, start=False)
        relay.config["limits"] = {"users": {"daily": 10}, "backend": "redis", "redis": redis_settings}
        relay.config["dns"] = {"nameservers": [nameserver[0]], "port": nameserver[1], "timeout": "2s", "attempts": 1}
        relay.start()
        connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message())
        assert len(upstream.wait_for(1)) == 1
        assert redis.cli("HGET", "relay:limits:user:app", "m").strip() == "1"  # counted in Redis
        assert relay.metric("relay_limit_fail_open_total", backend="redis") == 0
