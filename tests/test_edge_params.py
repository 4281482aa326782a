"""What mail libraries send on MAIL and RCPT (RFC 5321 §4.1.1.2, §3.3 and the extensions'
parameters), and what DATA may carry. PRODUCT.md, "Next: the edge": the null sender,
`AUTH=`, DSN (`NOTIFY`, `ORCPT`, `RET`, `ENVID`), `SIZE`, `BODY=8BITMIME` and `SMTPUTF8` are
accepted; every reply is ASCII; no warning is logged on the normal path."""

from __future__ import annotations

import email
import smtplib

import pytest

from tests.support.dkim import verify_all
from tests.support.inloop import in_thread
from tests.support.smtp import connect, message, reply
from tests.support.upstream import Upstream


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
    # smtplib's data() returns the final reply (it raises only when 354 does not come).
    code, text = client.data(message(frm="ceo@other.example", subject="spoof"))
    assert code == 550
    assert text.startswith(b"5.7.1 From: <ceo@other.example> not allowed")
    assert len(upstream.messages) == 1


# smtplib's sendmail() sends SIZE= itself whenever the server offers SIZE, so every case
# here carries SIZE already (a second SIZE would be refused as a repeated parameter).
@pytest.mark.parametrize(
    "mail_options, rcpt_options",
    [
        (["SMTPUTF8"], []),
        (["BODY=8BITMIME"], []),
        (["BODY=7BIT"], []),
        (["AUTH=<>"], []),
        (["AUTH=app@example.com"], []),
        (["AUTH=app+2Bx@example.com"], []),  # xtext (RFC 3461 §4): "+2B" is "+"
        (["RET=HDRS", "ENVID=QQ314159"], []),
        (["RET=FULL"], ["NOTIFY=NEVER"]),
        ([], ["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;u@example.net"]),
        (["BODY=8BITMIME", "AUTH=<>", "RET=HDRS"], ["NOTIFY=FAILURE"]),
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


@in_thread
def test_smtputf8_asked_for_an_ascii_envelope_reaches_an_upstream_without_it(make_loop_relay, pki):
    """A client may ask for SMTPUTF8 whether or not the message needs it: Go's net/smtp
    (`smtp.SendMail`) does on every MAIL once the server offers it, as relay does. To an
    upstream without SMTPUTF8 every message of such an application got 553 5.6.7 at its
    first RCPT, although RFC 6531 §3.4 only forbids sending what needs it:
    an internationalized address (refused per recipient: 553 5.6.7) or a UTF-8 header
    (refused at DATA: 554 5.6.9, RFC 6532). An ASCII envelope and header go without it."""
    with Upstream(tls="starttls", server_context=pki.server_context(), smtputf8=False) as upstream:
        relay = make_loop_relay(upstream.port)
        client = connect(relay, pki)
        body = "Grüße\r\n".encode()
        data = message().replace(b"Hi there.\r\n", body)
        refused = client.sendmail(
            "app@example.com",
            ["u@example.net", "jörg@example.net"],
            data,
            ["SMTPUTF8", "BODY=8BITMIME"],
        )
        assert refused == {"jörg@example.net": (553, b"5.6.7 Upstream does not support SMTPUTF8 addresses")}
        [got] = upstream.wait_for(1)
        assert got.rcpt_tos == ["u@example.net"] and "SMTPUTF8" not in got.mail_options
        assert got.content.endswith(body)
        utf8_header = message(subject="Grüße")
        with pytest.raises(smtplib.SMTPDataError) as refusal:
            client.sendmail("app@example.com", ["u@example.net"], utf8_header, ["SMTPUTF8", "BODY=8BITMIME"])
        assert (refusal.value.smtp_code, refusal.value.smtp_error[:5]) == (554, b"5.6.9")
        client.quit()
        assert len(upstream.messages) == 1
        assert relay.metric("relay_messages_rejected_total", reason="smtputf8") == 1


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


@in_thread
def test_body_8bitmime_reaches_an_upstream_after_starttls(make_loop_relay, upstream, pki):
    """Regression: after STARTTLS to an upstream without AUTH the relay looked at the
    upstream's extensions before EHLO was sent again (RFC 3207 §4.2), saw none, and
    dropped BODY=8BITMIME (and refused SMTPUTF8, see above)."""
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    data = message(subject="8bit", body="caf\u00e9 cr\u00e8me\r\n")
    assert client.sendmail("app@example.com", ["u@example.net"], data, ["BODY=8BITMIME"]) == {}
    [got] = upstream.wait_for(1)
    assert "BODY=8BITMIME" in got.mail_options
    assert "caf\u00e9".encode() in got.content


@in_thread
def test_dsn_parameters_pass_to_an_upstream_that_offers_dsn(make_loop_relay, pki, dkim_keys):
    """RFC 3461 §5.2.1: the parameters go on unchanged (values keep their case)."""
    with Upstream(tls="starttls", server_context=pki.server_context(), dsn=True) as dsn_upstream:
        relay = make_loop_relay(dsn_upstream.port)
        client = connect(relay, pki)
        assert reply(client, "MAIL FROM:<app@example.com> ret=hdrs ENVID=Qq+2B314")[0] == 250
        assert reply(client, "RCPT TO:<u@example.net> NOTIFY=success,FAILURE ORCPT=rfc822;U+40example.net")[0] == 250
        assert reply(client, "RCPT TO:<v@example.net>")[0] == 250
        code, _ = client.data(message(subject="dsn-on"))
        assert code == 250
        [got] = dsn_upstream.wait_for(1)
        assert [o for o in got.mail_options if o.startswith(("RET=", "ENVID="))] == ["RET=HDRS", "ENVID=Qq+2B314"]
        assert got.rcpt_options["u@example.net"] == ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;U+40example.net"]
        assert got.rcpt_options["v@example.net"] == []
        assert verify_all(got.content, dkim_keys.dns()) == [True, True]
        # The upstream reports from here on: the relay sends no notice of its own.
        assert relay.metric("relay_dsn_relayed_notices_total") == 0


@in_thread
def test_success_notify_to_an_upstream_without_dsn_gets_a_relayed_notice(make_loop_relay, upstream, pki, dkim_keys):
    """RFC 3461 §5.2.2: the parameters stop here, and the recipients that asked for SUCCESS
    get a "relayed" DSN (RFC 3464), to the envelope sender with the null reverse-path."""
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com> ENVID=env+2B1")[0] == 250
    assert reply(client, "RCPT TO:<u@example.net> NOTIFY=SUCCESS ORCPT=rfc822;orig+2Bu@example.net")[0] == 250
    assert reply(client, "RCPT TO:<v@example.net> NOTIFY=FAILURE")[0] == 250
    assert client.data(message(subject="dsn-relayed"))[0] == 250
    original, notice = upstream.wait_for(2)
    assert (original.mail_from, original.rcpt_tos) == ("app@example.com", ["u@example.net", "v@example.net"])
    assert original.rcpt_options == {"u@example.net": [], "v@example.net": []}
    assert (notice.mail_from, notice.rcpt_tos) == ("", ["app@example.com"])
    parsed = email.message_from_bytes(notice.content)
    assert parsed["From"] == "Mail Delivery System <MAILER-DAEMON@example.com>"
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    report = notice.content.decode()
    assert "Original-Envelope-Id: env+1" in report
    assert "Original-Recipient: rfc822;orig+u@example.net\r\nFinal-Recipient: rfc822;u@example.net" in report
    assert "Action: relayed" in report and "Status: 2.0.0" in report
    assert "v@example.net" not in report.split("message/delivery-status")[1].split("text/rfc822-headers")[0]
    assert "Subject: dsn-relayed" in report  # the original header comes back, not the body
    assert verify_all(notice.content, dkim_keys.dns()) == [True, True]
    relay.wait_log(lambda e: e.get("event") == "dsn_relayed" and e.get("code") == 250)
    assert relay.metric("relay_dsn_relayed_notices_total", result="sent") == 1


@pytest.mark.parametrize(
    "mail_from, notify", [("app@example.com", "FAILURE,DELAY"), ("app@example.com", "NEVER"), ("", "SUCCESS")]
)
@in_thread
def test_no_relayed_notice_unless_success_was_asked_of_a_real_sender(make_loop_relay, upstream, pki, mail_from, notify):
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    assert reply(client, f"MAIL FROM:<{mail_from}>")[0] == 250
    assert reply(client, f"RCPT TO:<u@example.net> NOTIFY={notify}")[0] == 250
    assert client.data(message(subject="no-notice"))[0] == 250
    relay.settle()  # a notice would be decided before the 250 and sent right after it
    assert [m.rcpt_tos for m in upstream.messages] == [["u@example.net"]]
    assert relay.metric("relay_dsn_relayed_notices_total") == 0


@pytest.mark.parametrize(
    "auth_param, passed",
    [
        ("AUTH=app@example.com", "AUTH=app@example.com"),  # the user may send as it: vouched for
        ("AUTH=ceo@other.example", "AUTH=<>"),  # not the user's: RFC 4954 §5, as if AUTH=<>
        ("AUTH=<>", "AUTH=<>"),
        ("", None),  # no AUTH= from the client: none upstream
    ],
)
@in_thread
def test_auth_parameter_to_an_upstream_the_relay_authenticated_to(make_loop_relay, pki, auth_param, passed):
    users = {"relayuser": "Up-Str3am-pw"}
    with Upstream(tls="starttls", server_context=pki.server_context(), users=users) as authed:
        relay = make_loop_relay(authed.port, start=False)
        relay.config["upstream"].update({"username": "relayuser", "password": "env://UPSTREAM_PASSWORD"})
        relay.env["UPSTREAM_PASSWORD"] = "Up-Str3am-pw"
        relay.start()
        client = connect(relay, pki)
        options = [auth_param] if auth_param else []
        assert client.sendmail("app@example.com", ["u@example.net"], message(subject="auth"), options) == {}
        [got] = authed.wait_for(1)
        assert [o for o in got.mail_options if o.startswith("AUTH=")] == ([passed] if passed else [])


@pytest.mark.parametrize(
    "command, expected",
    [
        ("MAIL FROM:<jos\u00e9@example.com>", (553, "5.6.7")),  # non-ASCII without SMTPUTF8
        ("MAIL FROM:<app@example.com> SMTPUTF8=yes", (501, "5.5.4")),
        ("MAIL FROM:<app@example.com> ENVID=" + "x" * 101, (501, "5.5.4")),
        ("MAIL FROM:", (501, "5.5.4")),
        ("MAIL FROM:<a@b> SIZE=1\x00", (501, "5.5.4")),
        ("MAIL FROM:<app@example.com", (553, "5.1.3")),
        ("MAIL FROM:<> <>", (501, "5.5.4")),
    ],
)
@in_thread
def test_more_bad_mail_commands(make_loop_relay, upstream, pki, command, expected):
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    client.command_encoding = "utf-8"
    code, text = reply(client, command)
    assert (code, text.split()[0]) == expected
    # The session goes on: a good MAIL FROM is still taken.
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250


@in_thread
def test_rcpt_needs_mail_even_after_a_null_sender_was_refused(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki, login=False)
    assert reply(client, "MAIL FROM:<>")[0] == 530  # auth: required
    assert reply(client, "RCPT TO:<u@example.net>") == (503, "5.5.1 Send MAIL FROM first")


@in_thread
def test_declared_8bit_content_is_refused_for_an_upstream_without_8bitmime(make_loop_relay, pki):
    """RFC 6152 §3: 8-bit content may not go to an upstream that did not offer 8BITMIME, and
    converting it would break the signature. 7-bit content declared 8BITMIME still passes."""
    with Upstream(tls="starttls", server_context=pki.server_context(), eightbit=False) as seven_bit:
        relay = make_loop_relay(seven_bit.port)
        client = connect(relay, pki)
        assert reply(client, "MAIL FROM:<app@example.com> BODY=8BITMIME")[0] == 250
        assert reply(client, "RCPT TO:<u@example.net>")[0] == 250
        code, text = client.data(message(subject="8bit", body="caf\u00e9\r\n"))
        assert (code, text.split()[0]) == (554, b"5.6.3")
        assert client.sendmail("app@example.com", ["u@example.net"], message(subject="7bit"), ["BODY=8BITMIME"]) == {}
        [got] = seven_bit.wait_for(1)
        assert b"Subject: 7bit" in got.content and got.mail_options == []


def spool_queue(path) -> dict[str, object]:
    return {"mode": "spool", "dir": str(path / "spool"), "retry": ["1s"]}


@in_thread
def test_spool_keeps_the_dsn_request_for_an_upstream_that_offers_dsn(make_loop_relay, pki, tmp_path):
    """Spool mode: the parameters are stored with the message and passed on at delivery."""
    with Upstream(tls="starttls", server_context=pki.server_context(), dsn=True) as dsn_upstream:
        relay = make_loop_relay(dsn_upstream.port, queue=spool_queue(tmp_path))
        client = connect(relay, pki)
        assert reply(client, "MAIL FROM:<app@example.com> RET=HDRS ENVID=sp+2B1")[0] == 250
        assert reply(client, "RCPT TO:<u@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u@example.net")[0] == 250
        code, text = client.data(message(subject="spooled-dsn"))
        assert code == 250 and b"queued" in text
        [got] = dsn_upstream.wait_for(1, timeout=30)
        assert [o for o in got.mail_options if o.startswith(("RET=", "ENVID="))] == ["RET=HDRS", "ENVID=sp+2B1"]
        assert got.rcpt_options["u@example.net"] == ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;u@example.net"]


@in_thread
def test_spool_queues_a_relayed_notice_for_an_upstream_without_dsn(make_loop_relay, upstream, pki, tmp_path):
    relay = make_loop_relay(upstream.port, queue=spool_queue(tmp_path))
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com> ENVID=sp+2B2")[0] == 250
    assert reply(client, "RCPT TO:<u@example.net> NOTIFY=SUCCESS")[0] == 250
    assert client.data(message(subject="spooled-relayed"))[0] == 250
    original, notice = sorted(upstream.wait_for(2, timeout=30), key=lambda m: m.mail_from, reverse=True)
    assert original.mail_from == "app@example.com" and original.rcpt_options == {"u@example.net": []}
    assert (notice.mail_from, notice.rcpt_tos) == ("", ["app@example.com"])
    report = notice.content.decode()
    assert "From: Mail Delivery System <MAILER-DAEMON@relay.test>" in report
    assert "Action: relayed" in report and "Original-Envelope-Id: sp+2" in report
    assert relay.metric("relay_dsn_relayed_notices_total", result="queued") == 1


@in_thread
def test_spool_relayed_notice_of_8bit_headers_is_sent_as_8bitmime(make_loop_relay, upstream, pki, tmp_path):
    # The notice returns the original header (RFC 3461 §4.3): with UTF-8 in it the notice is
    # 8-bit content and must be declared so (RFC 6152), as the spool's failure reports are.
    relay = make_loop_relay(upstream.port, queue=spool_queue(tmp_path))
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com> BODY=8BITMIME SMTPUTF8")[0] == 250
    assert reply(client, "RCPT TO:<u@example.net> NOTIFY=SUCCESS")[0] == 250
    assert client.data(message(subject="caf\u00e9 relayed"))[0] == 250
    original, notice = sorted(upstream.wait_for(2, timeout=30), key=lambda m: m.mail_from, reverse=True)
    assert (notice.mail_from, notice.rcpt_tos) == ("", ["app@example.com"])
    assert "caf\u00e9 relayed".encode() in notice.content
    assert "BODY=8BITMIME" in notice.mail_options
