"""MX delivery (RFC 5321 §5) against a real DNS server (NSD) serving tests/data/dns-mx/,
with real SMTP listeners on the loopback addresses the MX records name."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def mx_servers(tmp_path, pki, **options):
    """NSD plus SMTP listeners (STARTTLS) on mx-b, mx-c and implicit; mx-a stays down."""
    port = free_port()
    with dns_server(ZONES, tmp_path / "dns") as (dns_host, dns_port):
        servers = {
            name: Upstream(tls="starttls", server_context=pki.server_context(), host=ip, port=port, **options)
            for name, ip in HOSTS.items()
        }
        for server in servers.values():
            server.start()
        try:
            yield {"port": port, "dns": (dns_host, dns_port), **servers}
        finally:
            for server in servers.values():
                server.stop()


@pytest.fixture
def mx_world(tmp_path, pki):
    with mx_servers(tmp_path, pki) as made:
        yield made


@pytest.fixture
def pipelining_mx_world(tmp_path, pki):
    """The same, with MX hosts that offer PIPELINING (RFC 2920), as most do."""
    with mx_servers(tmp_path, pki, pipelining=True) as made:
        yield made


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


# -- MX hosts that offer PIPELINING: MAIL and the first RCPT in one write ----------------------


@in_thread
def test_delivery_to_an_mx_that_offers_pipelining(make_loop_relay, pipelining_mx_world, pki):
    world = pipelining_mx_world
    relay = mx_relay(make_loop_relay, world)
    refused = connect(relay, pki).sendmail("app@example.com", ["a@order.mx.test", "b@order.mx.test"], message())
    assert refused == {}
    [got] = world["mx-b"].wait_for(1)
    assert got.rcpt_tos == ["a@order.mx.test", "b@order.mx.test"] and got.tls
    assert world["mx-b"].mails == [("app@example.com", True)]  # the first RCPT went with MAIL
    assert world["mx-c"].mails == []


@pytest.mark.parametrize("refusal", ["451 4.3.0 Try again later", "421 4.3.2 Shutting down"])
@in_thread
def test_a_temporary_mail_refusal_moves_on_to_the_next_mx(make_loop_relay, pipelining_mx_world, pki, refusal):
    """4xx to MAIL FROM (with the first RCPT in the same write): not now, here. The next MX
    host takes the message, as after a 4xx greeting. Before, that 4xx was the client's
    answer at RCPT although the domain's second MX would have taken it."""
    world = pipelining_mx_world
    world["mx-b"].behaviour.mail_reply = refusal
    relay = mx_relay(make_loop_relay, world)
    connect(relay, pki).sendmail("app@example.com", ["a@order.mx.test"], message())
    [got] = world["mx-c"].wait_for(1)
    assert got.rcpt_tos == ["a@order.mx.test"]
    assert world["mx-b"].messages == [] and world["mx-b"].mails == [("app@example.com", True)]
    assert world["mx-c"].mails == [("app@example.com", True)]


@in_thread
def test_when_every_mx_refuses_mail_for_now_the_client_gets_the_last_refusal(make_loop_relay, pipelining_mx_world, pki):
    world = pipelining_mx_world
    world["mx-b"].behaviour.mail_reply = "451 4.3.0 Try again later"
    world["mx-c"].behaviour.mail_reply = "452 4.3.1 Insufficient system storage"
    relay = mx_relay(make_loop_relay, world)
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    assert reply(client, "RCPT TO:<a@order.mx.test>") == (452, "4.3.1 Insufficient system storage")
    assert len(world["mx-b"].mails) == 1 and len(world["mx-c"].mails) == 1


@in_thread
def test_a_permanent_mail_refusal_is_the_answer(make_loop_relay, pipelining_mx_world, pki):
    world = pipelining_mx_world
    world["mx-b"].behaviour.mail_reply = "550 5.7.1 Sender rejected"
    relay = mx_relay(make_loop_relay, world)
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    assert reply(client, "RCPT TO:<a@order.mx.test>") == (550, "5.7.1 Sender rejected")
    assert world["mx-b"].mails == [("app@example.com", True)]
    assert world["mx-c"].mails == []  # a 5xx is never tried elsewhere


@in_thread
def test_a_refused_first_recipient_at_a_pipelining_mx(make_loop_relay, pipelining_mx_world, pki):
    """The first RCPT went with MAIL: its refusal is that recipient's, the transaction goes on
    with the next recipient on the same MX host, and no other host is tried."""
    world = pipelining_mx_world
    world["mx-b"].behaviour.rcpt_replies["a@order.mx.test"] = "550 5.1.1 No such user here"
    relay = mx_relay(make_loop_relay, world)
    refused = connect(relay, pki).sendmail("app@example.com", ["a@order.mx.test", "b@order.mx.test"], message())
    assert refused == {"a@order.mx.test": (550, b"5.1.1 No such user here")}
    [got] = world["mx-b"].wait_for(1)
    assert got.rcpt_tos == ["b@order.mx.test"]
    assert world["mx-b"].mails == [("app@example.com", True)] and world["mx-c"].mails == []
