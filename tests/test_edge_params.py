"""What mail libraries send on MAIL and RCPT (RFC 5321 §4.1.1.2, §3.3 and the extensions'
parameters), and what DATA may carry. PRODUCT.md, "Next: the edge": the null sender,
`AUTH=`, DSN (`NOTIFY`, `ORCPT`, `RET`, `ENVID`), `SIZE`, `BODY=8BITMIME` and `SMTPUTF8` are
accepted; every reply is ASCII; no warning is logged on the normal path."""

from __future__ import annotations

import smtplib

import pytest

from tests.support.dkim import verify_all
from tests.support.inloop import in_thread
from tests.support.smtp import connect, message, reply


@in_thread
def test_ehlo_offers_dsn(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    assert "dsn" in client.esmtp_features
    assert "8bitmime" in client.esmtp_features and "smtputf8" in client.esmtp_features


@in_thread
def test_null_sender_is_relayed_and_the_header_from_still_checked(make_loop_relay, upstream, pki, dkim_keys):
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    assert client.sendmail("<>", ["u@example.net"], message(subject="null-sender")) == {}
    [got] = upstream.wait_for(1)
    assert got.mail_from == ""
    assert verify_all(got.content, dkim_keys.dns()) == [True, True]
    # No envelope domain to check, but the author still has to be one of the user's.
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<>")[0] == 250
    assert reply(client, "RCPT TO:<u@example.net>")[0] == 250
    with pytest.raises(smtplib.SMTPDataError) as refused:
        client.data(message(frm="ceo@other.example", subject="spoof"))
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error.startswith(b"5.7.1 From: <ceo@other.example> not allowed")
    assert len(upstream.messages) == 1


@pytest.mark.parametrize(
    "mail_options, rcpt_options",
    [
        (["SIZE=300"], []),
        (["BODY=8BITMIME"], []),
        (["BODY=7BIT"], []),
        (["AUTH=<>"], []),
        (["AUTH=app@example.com"], []),
        (["AUTH=app+2Bx@example.com"], []),  # xtext (RFC 3461 §4): "+2B" is "+"
        (["RET=HDRS", "ENVID=QQ314159"], []),
        (["RET=FULL"], ["NOTIFY=NEVER"]),
        ([], ["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;u@example.net"]),
        (["SIZE=300", "BODY=8BITMIME", "AUTH=<>", "RET=HDRS"], ["NOTIFY=FAILURE"]),
    ],
)
@in_thread
def test_mail_and_rcpt_parameters_are_accepted(make_loop_relay, upstream, pki, dkim_keys, mail_options, rcpt_options):
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    refused = client.sendmail(
        "app@example.com", ["u@example.net"], message(subject="params"), mail_options, rcpt_options
    )
    assert refused == {}
    [got] = upstream.wait_for(1)
    assert verify_all(got.content, dkim_keys.dns()) == [True, True]
    # The upstream offers no DSN: the DSN parameters are not passed on (RFC 3461 §5.2.2).
    assert not any(o.split("=")[0] in ("RET", "ENVID", "NOTIFY", "ORCPT", "AUTH") for o in got.mail_options)
    assert got.rcpt_options["u@example.net"] == []


@in_thread
def test_smtputf8_address_is_relayed(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    data = message(to="josé@example.net", subject="utf8").replace(b"jos\xc3\xa9", "josé".encode())
    assert client.sendmail("app@example.com", ["josé@example.net"], data, ["SMTPUTF8", "BODY=8BITMIME"]) == {}
    [got] = upstream.wait_for(1)
    assert got.rcpt_tos == ["josé@example.net"]


@pytest.mark.parametrize(
    "command, expected",
    [
        ("MAIL FROM:<app@example.com> SIZE=99999999", (552, "5.3.4")),
        ("MAIL FROM:<app@example.com> SIZE=big", (501, "5.5.4")),
        ("MAIL FROM:<app@example.com> BODY=BINARYMIME", (501, "5.5.4")),
        ("MAIL FROM:<app@example.com> RET=SOME", (501, "5.5.4")),
        ("MAIL FROM:<app@example.com> ENVID=a+zz", (501, "5.5.4")),  # bad xtext
        ("MAIL FROM:<app@example.com> AUTH=a+", (501, "5.5.4")),
        ("MAIL FROM:<app@example.com> RET=HDRS RET=FULL", (501, "5.5.4")),
        ("MAIL FROM:<app@example.com> XFOO=1", (555, "5.5.4")),
    ],
)
@in_thread
def test_bad_mail_parameters_get_a_clear_refusal(make_loop_relay, upstream, pki, command, expected):
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    code, text = reply(client, command)
    assert (code, text.split()[0]) == expected
    assert text.isascii()


@pytest.mark.parametrize(
    "rcpt, expected",
    [
        ("RCPT TO:<u@example.net> NOTIFY=NEVER,SUCCESS", (501, "5.5.4")),
        ("RCPT TO:<u@example.net> NOTIFY=SOMETIMES", (501, "5.5.4")),
        ("RCPT TO:<u@example.net> ORCPT=u@example.net", (501, "5.5.4")),  # no addr-type
        ("RCPT TO:<u@example.net> XFOO=1", (555, "5.5.4")),
    ],
)
@in_thread
def test_bad_rcpt_parameters_get_a_clear_refusal(make_loop_relay, upstream, pki, rcpt, expected):
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    code, text = reply(client, rcpt)
    assert (code, text.split()[0]) == expected
    assert text.isascii()


@in_thread
def test_nul_bytes_in_data_are_refused_and_never_reach_the_upstream(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        client.sendmail("app@example.com", ["u@example.net"], message(body="nul \x00 here\r\n"))
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error.startswith(b"5.6.0 ")
    assert refused.value.smtp_error.isascii()
    assert client.noop()[0] == 250
    assert upstream.messages == []
    line = relay.wait_log(lambda e: e.get("event") == "message" and e.get("code") == 550)
    assert line["reason"]


@in_thread
def test_upstream_reply_text_reaches_the_client_as_ascii(make_loop_relay, upstream, pki):
    upstream.behaviour.rcpt_replies["u@example.net"] = "550 5.1.1 Bénédicte est inconnue ici"
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    code, text = reply(client, "RCPT TO:<u@example.net>")
    assert code == 550
    assert text.isascii()
    assert text.startswith("5.1.1 B")


@in_thread
def test_no_warning_is_logged_on_the_normal_path(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    for listener in ("submission", "submissions"):
        client = connect(relay, pki, listener=listener)
        assert client.sendmail("app@example.com", ["u@example.net"], message(subject=listener)) == {}
        client.quit()
    upstream.wait_for(2)
    relay.wait_log(lambda e: e.get("event") == "message" and e.get("listener") == "submissions")
    # The message path (sessions, AUTH, messages, aiosmtpd's own log) stays below warning;
    # the DNS posture of the test domains is not this test's business.
    noisy = [e for e in relay.logs() if e.get("level") not in ("info", "debug") and e.get("logger") != "relay.posture"]
    assert noisy == []
    assert "deprecated" not in relay.log_text()
