"""MX delivery (RFC 5321 §5) against a real DNS server (NSD) serving tests/data/dns-mx/,
with real SMTP listeners on the loopback addresses the MX records name."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.dns import dns_server
from tests.support.inloop import in_thread
from tests.support.procs import free_port
from tests.support.smtp import connect, message, reply
from tests.support.upstream import Upstream

pytestmark = pytest.mark.binaries

ZONES = Path(__file__).parent / "data" / "dns-mx"
HOSTS = {"mx-b": "127.0.0.12", "mx-c": "127.0.0.14", "implicit": "127.0.0.13"}


@pytest.fixture
def mx_world(tmp_path, pki):
    """NSD plus SMTP listeners (STARTTLS) on mx-b, mx-c and implicit; mx-a stays down."""
    port = free_port()
    with dns_server(ZONES, tmp_path / "dns") as (dns_host, dns_port):
        servers = {
            name: Upstream(tls="starttls", server_context=pki.server_context(), host=ip, port=port)
            for name, ip in HOSTS.items()
        }
        for server in servers.values():
            server.start()
        try:
            yield {"port": port, "dns": (dns_host, dns_port), **servers}
        finally:
            for server in servers.values():
                server.stop()


def mx_relay(make_loop_relay, world, **upstream):
    relay = make_loop_relay(world["port"], start=False)
    relay.config["upstream"] = {
        "mode": "mx",
        "port": world["port"],
        "connect_timeout": "3s",
        "command_timeout": "5s",
        **upstream,
    }
    relay.config["dns"] = {"nameservers": [world["dns"][0]], "port": world["dns"][1], "timeout": "2s"}
    relay.start()
    return relay


@in_thread
def test_preference_order(make_loop_relay, mx_world, pki):
    relay = mx_relay(make_loop_relay, mx_world)
    connect(relay, pki).sendmail("app@example.com", ["u@order.mx.test"], message())
    assert len(mx_world["mx-b"].wait_for(1)) == 1
    assert mx_world["mx-c"].messages == []
    assert mx_world["mx-b"].messages[0].tls  # opportunistic STARTTLS was used


@in_thread
def test_fallback_when_the_first_mx_is_down(make_loop_relay, mx_world, pki):
    relay = mx_relay(make_loop_relay, mx_world)
    connect(relay, pki).sendmail("app@example.com", ["u@fallback.mx.test"], message())
    [got] = mx_world["mx-b"].wait_for(1)
    assert got.rcpt_tos == ["u@fallback.mx.test"]


@in_thread
def test_implicit_mx(make_loop_relay, mx_world, pki):
    relay = mx_relay(make_loop_relay, mx_world)
    connect(relay, pki).sendmail("app@example.com", ["u@implicit.mx.test"], message())
    assert len(mx_world["implicit"].wait_for(1)) == 1


@pytest.mark.parametrize(
    "domain,expected",
    [
        ("nullmx.mx.test", (556, "5.1.10 Recipient domain nullmx.mx.test does not accept mail (null MX)")),
        ("nowhere.mx.test", (550, "5.1.2 Recipient domain nowhere.mx.test does not exist")),
    ],
)
@in_thread
def test_null_mx_and_nxdomain(make_loop_relay, mx_world, pki, domain, expected):
    relay = mx_relay(make_loop_relay, mx_world)
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    assert reply(client, f"RCPT TO:<u@{domain}>") == expected


@in_thread
def test_one_recipient_domain_per_transaction(make_loop_relay, mx_world, pki):
    relay = mx_relay(make_loop_relay, mx_world)
    client = connect(relay, pki)
    refused = client.sendmail(
        "app@example.com", ["a@order.mx.test", "b@implicit.mx.test", "c@order.mx.test"], message()
    )
    assert refused == {
        "b@implicit.mx.test": (452, b"4.5.3 Send recipients outside order.mx.test in a separate transaction")
    }
    # The client sends the refused recipient again, in its own transaction.
    client.sendmail("app@example.com", ["b@implicit.mx.test"], message())
    assert mx_world["mx-b"].wait_for(1)[0].rcpt_tos == ["a@order.mx.test", "c@order.mx.test"]
    assert mx_world["implicit"].wait_for(1)[0].rcpt_tos == ["b@implicit.mx.test"]


@in_thread
def test_tls_require_refuses_an_mx_without_starttls(make_loop_relay, mx_world, pki):
    with Upstream(tls="none", host="127.0.0.15", port=mx_world["port"]) as plain:
        relay = mx_relay(make_loop_relay, mx_world, tls="require", ca_file=str(pki.ca_file))
        client = connect(relay, pki)
        assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
        code, text = reply(client, "RCPT TO:<u@plain.mx.test>")
        assert code == 451 and text.startswith("4.7.5")
        assert plain.messages == []
        # Opportunistic (the default) delivers to the same host in plaintext.
        relay2 = mx_relay(make_loop_relay, mx_world)
        connect(relay2, pki).sendmail("app@example.com", ["u@plain.mx.test"], message())
        assert len(plain.wait_for(1)) == 1


@in_thread
def test_dns_outage_is_a_temporary_failure(make_loop_relay, mx_world, pki):
    from tests.support.dns import black_hole

    with black_hole() as (host, port):
        relay = make_loop_relay(mx_world["port"], start=False)
        relay.config["upstream"] = {"mode": "mx", "port": mx_world["port"]}
        relay.config["dns"] = {"nameservers": [host], "port": port, "timeout": "1s", "attempts": 1}
        relay.start()
        client = connect(relay, pki)
        assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
        code, text = reply(client, "RCPT TO:<u@order.mx.test>")
        assert code == 451 and text.startswith("4.4.3")


@in_thread
def test_at_most_five_mx_hosts_are_tried(make_loop_relay, mx_world, pki):
    """Every MX host costs up to connect_timeout and command_timeout while the client waits
    at RCPT: a domain with twenty unreachable ones held it for many minutes. Like Postfix
    (smtp_mx_address_limit), five are tried; the sixth, which answers, is not."""
    relay = mx_relay(make_loop_relay, mx_world)
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    code, text = reply(client, "RCPT TO:<u@many.mx.test>")
    assert (code, text[:5]) == (451, "4.4.1"), text
    assert mx_world["mx-b"].messages == [] and "MAIL" not in mx_world["mx-b"].commands
    [refused] = [e for e in relay.logs() if e.get("msg") == "recipient not accepted"]
    assert refused["reason"].startswith("the first 5 of 6 MX hosts (the most tried per message) of many.mx.test")
