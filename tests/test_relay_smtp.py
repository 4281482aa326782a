"""The whole data path over real sockets: a real client → the relay (subprocess) → a real
upstream SMTP listener, with every message checked by dkimpy against the public keys."""

from __future__ import annotations

import subprocess

import pytest

from tests.support.config import APP_PASSWORD
from tests.support.dkim import verify_all
from tests.support.inloop import in_thread
from tests.support.procs import require_binary
from tests.support.smtp import message, submit


@pytest.mark.parametrize("listener", ["submission", "submissions"])
@in_thread
def test_message_arrives_signed_with_rsa_and_ed25519(make_loop_relay, upstream, pki, dkim_keys, listener):
    relay = make_loop_relay(upstream.port)
    refused = submit(relay, pki, listener=listener)
    assert refused == {}
    [got] = upstream.wait_for(1)
    assert got.tls, "the relay must use STARTTLS to the upstream"
    assert got.mail_from == "app@example.com"
    assert got.rcpt_tos == ["user@example.net"]
    assert verify_all(got.content, dkim_keys.dns()) == [True, True]
    assert b"a=rsa-sha256" in got.content and b"a=ed25519-sha256" in got.content
    line = relay.wait_log(lambda e: e.get("event") == "message" and e.get("code") == 250)
    assert line["dkim"] == ["example.com/s1", "example.com/ed1"]
    assert line["upstream_id"] == "Q000001"
    assert line["user"] == "app" and line["recipients"] == 1


@pytest.mark.binaries
@in_thread
def test_swaks_submits_over_starttls_with_auth(make_loop_relay, upstream, dkim_keys):
    relay = make_loop_relay(upstream.port)
    result = subprocess.run(
        [
            require_binary("swaks"),
            "--server",
            f"127.0.0.1:{relay.port('submission')}",
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            "app",
            "--auth-password",
            APP_PASSWORD,
            "--from",
            "app@example.com",
            "--to",
            "someone@example.net",
            "--header",
            "From: app@example.com",
            "--helo",
            "swaks.test",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 Ok: relayed" in result.stdout
    [got] = upstream.wait_for(1)
    assert verify_all(got.content, dkim_keys.dns()) == [True, True]


@in_thread
def test_one_message_to_several_recipients_and_a_refused_one(make_loop_relay, upstream, pki):
    upstream.behaviour.rcpt_replies["nobody@example.net"] = "550 5.1.1 No such user here"
    relay = make_loop_relay(upstream.port)
    refused = submit(relay, pki, rcpts=("a@example.net", "nobody@example.net", "b@example.net"))
    # The upstream's per-recipient refusal comes back for that recipient only.
    assert refused == {"nobody@example.net": (550, b"5.1.1 No such user here")}
    [got] = upstream.wait_for(1)
    assert got.rcpt_tos == ["a@example.net", "b@example.net"]


@in_thread
def test_pooled_connection_is_reused(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    before = relay.metric("relay_upstream_connections_total", result="ok")  # the readiness probe
    for i in range(3):
        submit(relay, pki, data=message(subject=f"n{i}"))
    messages = upstream.wait_for(3)
    assert len({m.peer for m in messages}) == 1, "three messages should share one upstream connection"
    assert relay.metric("relay_upstream_connections_total", result="ok") == before + 1


@in_thread
def test_existing_own_signature_is_replaced_and_foreign_kept(make_loop_relay, upstream, pki, dkim_keys):
    relay = make_loop_relay(upstream.port)
    stale = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=s1; h=from; bh=AAAA; b=BBBB\r\n"
    foreign = b"DKIM-Signature: v=1; a=rsa-sha256; d=other.example; s=x; h=from; bh=AAAA; b=CCCC\r\n"
    submit(relay, pki, data=stale + foreign + message())
    [got] = upstream.wait_for(1)
    assert b"b=BBBB" not in got.content
    assert b"b=CCCC" in got.content
    assert got.content.count(b"d=example.com") == 2  # our two fresh signatures
