"""Delivery through real egress proxies (SOCKS5, HTTP CONNECT), TLS end to end with the
upstream, failure mapping, failover between upstreams and routes by sender domain."""

from __future__ import annotations

import smtplib

import pytest

from tests.support.dkim import verify_all
from tests.support.inloop import in_thread
from tests.support.procs import dead_port
from tests.support.proxies import microsocks, tinyproxy
from tests.support.smtp import connect, message, reply
from tests.support.upstream import Upstream

pytestmark = pytest.mark.binaries

PROXY_USER = "relay"
PROXY_PASSWORD = "Egress-S3cret-77"


def via_proxy(relay, url: str, *, tls: str = "starttls", port: int) -> None:
    relay.config["upstream"].update({"proxy": url, "proxy_password": "env://PROXY_PASSWORD", "tls": tls, "port": port})
    relay.env["PROXY_PASSWORD"] = PROXY_PASSWORD


@pytest.mark.parametrize("scheme", ["socks5", "socks5h"])
@in_thread
def test_socks5_proxy_carries_starttls_to_the_upstream(make_loop_relay, upstream, pki, dkim_keys, tmp_path, scheme):
    with microsocks(tmp_path, user=PROXY_USER, password=PROXY_PASSWORD) as proxy_port:
        relay = make_loop_relay(upstream.port, start=False)
        via_proxy(relay, f"{scheme}://{PROXY_USER}@127.0.0.1:{proxy_port}", port=upstream.port)
        relay.start()
        connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message())
        [got] = upstream.wait_for(1)
    assert got.peer[0] == "127.0.0.2", "the message must arrive through the proxy"
    assert got.tls
    assert verify_all(got.content, dkim_keys.dns()) == [True, True]
    assert PROXY_PASSWORD not in relay.log_text()


@in_thread
def test_http_connect_proxy_carries_implicit_tls(make_loop_relay, pki, dkim_keys, tmp_path):
    with (
        Upstream(tls="implicit", server_context=pki.server_context()) as smtps,
        tinyproxy(tmp_path, user=PROXY_USER, password=PROXY_PASSWORD, connect_ports=[smtps.port]) as proxy_port,
    ):
        relay = make_loop_relay(smtps.port, start=False)
        via_proxy(relay, f"http://{PROXY_USER}@127.0.0.1:{proxy_port}", tls="implicit", port=smtps.port)
        relay.start()
        connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message())
        [got] = smtps.wait_for(1)
    assert got.peer[0] == "127.0.0.2"
    assert verify_all(got.content, dkim_keys.dns()) == [True, True]


@in_thread
def test_http_connect_proxy_with_starttls(make_loop_relay, upstream, pki, tmp_path):
    with tinyproxy(tmp_path, user=PROXY_USER, password=PROXY_PASSWORD, connect_ports=[upstream.port]) as proxy_port:
        relay = make_loop_relay(upstream.port, start=False)
        via_proxy(relay, f"http://{PROXY_USER}@127.0.0.1:{proxy_port}", port=upstream.port)
        relay.start()
        for i in range(3):
            connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message(subject=f"m{i}"))
        messages = upstream.wait_for(3)
    assert {m.peer[0] for m in messages} == {"127.0.0.2"}


@in_thread
def test_wrong_upstream_certificate_name_fails_through_the_proxy(make_loop_relay, pki, tmp_path):
    cert, key = pki.issue(tmp_path, "other.test")
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    with (
        Upstream(tls="starttls", server_context=context) as wrong,
        microsocks(tmp_path, user=PROXY_USER, password=PROXY_PASSWORD) as proxy_port,
    ):
        relay = make_loop_relay(wrong.port, start=False, wait_ready=False)
        via_proxy(relay, f"socks5h://{PROXY_USER}@127.0.0.1:{proxy_port}", port=wrong.port)
        relay.start(wait_ready=False)
        client = connect(relay, pki)
        assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
        code, text = reply(client, "RCPT TO:<u@example.net>")
        assert (code, text[:5]) == (451, "4.7.5")
        line = relay.wait_log(lambda e: e.get("msg") == "recipient not accepted")
        assert "TLS failed" in line["reason"] and "localhost" in line["reason"]
        assert wrong.messages == []


@pytest.mark.parametrize("case", ["proxy_down", "wrong_password", "connect_forbidden"])
@in_thread
def test_proxy_failures_give_451_with_the_reason(make_loop_relay, upstream, pki, tmp_path, case):
    expected_label = {
        "proxy_down": "proxy_unreachable",
        "wrong_password": "proxy_auth",
        "connect_forbidden": "proxy_refused",
    }[case]
    allowed = [upstream.port] if case != "connect_forbidden" else [upstream.port + 1]
    with tinyproxy(tmp_path, user=PROXY_USER, password=PROXY_PASSWORD, connect_ports=allowed) as proxy_port:
        relay = make_loop_relay(upstream.port, start=False, wait_ready=False)
        port = dead_port() if case == "proxy_down" else proxy_port
        via_proxy(relay, f"http://{PROXY_USER}@127.0.0.1:{port}", port=upstream.port)
        if case == "wrong_password":
            relay.env["PROXY_PASSWORD"] = "not-the-password"
        relay.start(wait_ready=False)
        client = connect(relay, pki)
        assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
        code, text = reply(client, "RCPT TO:<u@example.net>")
        assert code == 451 and text.startswith("4.4."), text
        line = relay.wait_log(lambda e: e.get("msg") == "recipient not accepted")
        assert line["label"] == expected_label
        assert f"127.0.0.1:{port}" in line["reason"]
        assert relay.metric("relay_proxy_failures_total", reason=expected_label) >= 1
    assert upstream.messages == []
    assert PROXY_PASSWORD not in relay.log_text() and "not-the-password" not in relay.log_text()


def two_upstreams(relay, first: dict, second: dict) -> None:
    base = dict(relay.config["upstream"])
    relay.config["upstream"] = [{**base, **first}, {**base, **second}]


@in_thread
def test_failover_to_the_second_upstream_when_the_first_refuses_connections(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port, start=False)
    two_upstreams(relay, {"name": "primary", "port": dead_port()}, {"name": "secondary", "port": upstream.port})
    relay.start()
    connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message())
    assert len(upstream.wait_for(1)) == 1
    line = relay.wait_log(lambda e: e.get("event") == "message" and e.get("code") == 250)
    assert line["upstream"] == "secondary"
    assert relay.metric("relay_messages_relayed_total", upstream="secondary") == 1


@in_thread
def test_failover_on_a_4xx_at_data(make_loop_relay, upstream, pki):
    with Upstream(tls="starttls", server_context=pki.server_context()) as busy:
        busy.behaviour.data_reply = "451 4.3.0 Busy"
        relay = make_loop_relay(busy.port, start=False)
        two_upstreams(relay, {"name": "busy", "port": busy.port}, {"name": "spare", "port": upstream.port})
        relay.start()
        refused = connect(relay, pki).sendmail("app@example.com", ["a@example.net", "b@example.net"], message())
        assert refused == {}
        [got] = upstream.wait_for(1)
        assert got.rcpt_tos == ["a@example.net", "b@example.net"]
        assert busy.messages == []


@in_thread
def test_routes_pick_the_upstream_by_sender_domain(make_loop_relay, upstream, pki, app_password_hash, dkim_keys):
    with Upstream(tls="starttls", server_context=pki.server_context()) as billing:
        relay = make_loop_relay(upstream.port, start=False)
        two_upstreams(relay, {"name": "main", "port": upstream.port}, {"name": "billing", "port": billing.port})
        relay.config["routes"] = [{"sender_domain": "billing.example.com", "upstream": "billing"}]
        relay.config["clients"]["users"][0]["senders"] = ["example.com", "billing.example.com"]
        relay.config["dkim"]["keys"].append(
            {"domain": "billing.example.com", "selector": "s1", "key": f"file://{dkim_keys.rsa_path}"}
        )
        relay.start()
        client = connect(relay, pki)
        client.sendmail("app@example.com", ["u@example.net"], message())
        client.sendmail("invoices@billing.example.com", ["u@example.net"], message(frm="invoices@billing.example.com"))
        assert [m.mail_from for m in upstream.wait_for(1)] == ["app@example.com"]
        assert [m.mail_from for m in billing.wait_for(1)] == ["invoices@billing.example.com"]


@in_thread
def test_upstream_auth_with_a_password_from_a_secret(make_loop_relay, pki):
    with Upstream(tls="starttls", server_context=pki.server_context(), users={"relayuser": "Up-Str3am-pw"}) as up:
        relay = make_loop_relay(up.port, start=False)
        relay.config["upstream"].update({"username": "relayuser", "password": "env://UPSTREAM_PASSWORD"})
        relay.env["UPSTREAM_PASSWORD"] = "Up-Str3am-pw"
        relay.start()
        connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message())
        [got] = up.wait_for(1)
        assert got.user == "relayuser"
        assert "Up-Str3am-pw" not in relay.log_text()


@in_thread
def test_wrong_upstream_credentials_give_451(make_loop_relay, pki):
    with Upstream(tls="starttls", server_context=pki.server_context(), users={"relayuser": "right"}) as up:
        relay = make_loop_relay(up.port, start=False, wait_ready=False)
        relay.config["upstream"].update({"username": "relayuser", "password": "env://UPSTREAM_PASSWORD"})
        relay.env["UPSTREAM_PASSWORD"] = "wrong"
        relay.start(wait_ready=False)
        with pytest.raises(smtplib.SMTPRecipientsRefused) as err:
            connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message())
        code, text = err.value.recipients["u@example.net"]
        assert code == 451 and text.startswith(b"4.7.0")
