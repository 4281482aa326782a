"""A real Postfix in front of the relay, as on an application host: `relayhost =
[relay]:587` with SASL over STARTTLS, or port 465 with `smtp_tls_wrappermode = yes`.

With an MTA in front, whatever the relay refuses is lost for good (bounced or dropped), so
what Postfix sends every day must pass: ordinary mail, its own bounces (null sender) and
DSN requests (`sendmail -N`). Every message that reaches the upstream must verify.
"""

from __future__ import annotations

import email
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.support.config import APP_PASSWORD
from tests.support.dkim import verify_all
from tests.support.postfix import PostfixClient
from tests.support.smtp import message
from tests.support.upstream import Upstream

pytestmark = pytest.mark.binaries

LISTENERS = {"starttls": ("submission", False), "wrappermode": ("submissions", True)}


@pytest.fixture
def make_postfix(pki):
    """Start a Postfix that relays through a running relay's listener; stopped at the end."""
    started: list[PostfixClient] = []
    base = Path(tempfile.mkdtemp(prefix="relay-postfix-"))
    base.chmod(0o755)  # Postfix's daemons (user postfix) must reach the instance below it

    def factory(relay, mode: str = "starttls") -> PostfixClient:
        listener, wrapper = LISTENERS[mode]
        mta = PostfixClient(
            base / f"pf{len(started)}",
            relay_port=relay.port(listener),
            ca_file=pki.ca_file,
            username="app",
            password=APP_PASSWORD,
            wrapper_mode=wrapper,
        )
        started.append(mta)
        return mta.start()

    yield factory
    for mta in started:
        mta.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def dsn_upstream(pki):
    with Upstream(tls="starttls", server_context=pki.server_context(), dsn=True) as up:
        yield up


def arrived(upstream: Upstream, mta: PostfixClient, count: int):
    """The upstream's messages once `count` arrived; else fail showing what Postfix logged."""
    try:
        return upstream.wait_for(count, timeout=30)
    except AssertionError as exc:
        exc.add_note("--- postfix log ---\n" + "\n".join(mta.log_text().splitlines()[-15:]))
        raise


@pytest.mark.parametrize("mode", ["starttls", "wrappermode"])
def test_postfix_relays_a_message_through_relay(make_relay, upstream, make_postfix, dkim_keys, mode):
    relay = make_relay(upstream.port)
    mta = make_postfix(relay, mode)
    mta.sendmail(message(subject=f"via-postfix-{mode}"), sender="app@example.com", recipients=["u@example.net"])
    [got] = arrived(upstream, mta, 1)
    mta.wait_until_idle()
    assert got.mail_from == "app@example.com"
    assert got.rcpt_tos == ["u@example.net"]
    assert verify_all(got.content, dkim_keys.dns()) == [True, True]
    assert [s[1] for s in mta.statuses()] == ["sent"]
    line = relay.wait_log(lambda e: e.get("event") == "message" and e.get("code") == 250)
    assert line["user"] == "app"
    assert line["listener"] == LISTENERS[mode][0]


@pytest.mark.parametrize("mode", ["starttls", "wrappermode"])
def test_postfix_bounce_with_the_null_sender_is_relayed(make_relay, upstream, make_postfix, dkim_keys, mode):
    """The upstream refuses a recipient; Postfix bounces to the sender with MAIL FROM:<>
    and From: MAILER-DAEMON@example.com (myorigin = $mydomain). The bounce must arrive."""
    upstream.behaviour.rcpt_replies["nobody@example.net"] = "550 5.1.1 No such user here"
    relay = make_relay(upstream.port)
    mta = make_postfix(relay, mode)
    mta.sendmail(
        message(to="nobody@example.net", subject="to-bounce"),
        sender="app@example.com",
        recipients=["nobody@example.net"],
    )
    [bounce] = arrived(upstream, mta, 1)
    mta.wait_until_idle()
    assert bounce.mail_from == ""
    assert bounce.rcpt_tos == ["app@example.com"]
    parsed = email.message_from_bytes(bounce.content)
    assert "MAILER-DAEMON@example.com" in parsed["From"]
    assert parsed.get_content_type() == "multipart/report"
    assert b"5.1.1 No such user here" in bounce.content
    assert verify_all(bounce.content, dkim_keys.dns()) == [True, True]
    # The original was refused (bounced) and the bounce was sent: nothing else happened.
    assert sorted(s[1] for s in mta.statuses()) == ["bounced", "sent"]
    line = relay.wait_log(lambda e: e.get("event") == "message" and e.get("code") == 250)
    assert line["mail_from_domain"] is None


def test_postfix_dsn_request_passes_to_an_upstream_that_offers_dsn(make_relay, dsn_upstream, make_postfix, dkim_keys):
    """`sendmail -N success,failure`: the relay offers DSN, so Postfix hands the request on
    (NOTIFY, ORCPT, RET, ENVID), and the relay passes it to an upstream that offers DSN.
    The upstream, which delivers, is then the one to send the success notice."""
    relay = make_relay(dsn_upstream.port)
    mta = make_postfix(relay)
    mta.sendmail(
        message(subject="dsn-pass"),
        sender="app@example.com",
        recipients=["u@example.net"],
        notify="success,failure",
        ret="hdrs",
        envid="env-42",
    )
    [got] = arrived(dsn_upstream, mta, 1)
    mta.wait_until_idle()
    assert verify_all(got.content, dkim_keys.dns()) == [True, True]
    assert "RET=HDRS" in got.mail_options
    assert "ENVID=env-42" in got.mail_options
    params = got.rcpt_options["u@example.net"]
    assert "NOTIFY=SUCCESS,FAILURE" in params
    assert "ORCPT=rfc822;u@example.net" in params
    # Postfix got an answer from a DSN server: it sends no notice of its own.
    assert [s[1] for s in mta.statuses()] == ["sent"]
    assert len(dsn_upstream.messages) == 1


def test_postfix_dsn_success_to_an_upstream_without_dsn_gets_a_relayed_notice(
    make_relay, upstream, make_postfix, dkim_keys
):
    """RFC 3461 §5.2.2: relaying to a server without DSN, the DSN parameters are not passed
    on and a request for SUCCESS notices is answered with a "relayed" DSN to the sender.
    The notice (null sender, multipart/report) arrives signed, and so does the message."""
    relay = make_relay(upstream.port)
    mta = make_postfix(relay)
    mta.sendmail(
        message(subject="dsn-relayed"),
        sender="app@example.com",
        recipients=["u@example.net"],
        notify="success,failure",
        envid="env-43",
    )
    messages = arrived(upstream, mta, 2)
    mta.wait_until_idle()
    original = next(m for m in messages if m.mail_from == "app@example.com")
    notice = next(m for m in messages if m.mail_from == "")
    assert not any(o.startswith(("NOTIFY", "ORCPT", "RET", "ENVID")) for o in original.mail_options)
    assert original.rcpt_options.get("u@example.net", []) == []
    assert notice.rcpt_tos == ["app@example.com"]
    parsed = email.message_from_bytes(notice.content)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    report = notice.content.decode("utf-8", "replace")
    assert "Action: relayed" in report
    assert "Final-Recipient: rfc822;u@example.net" in report.replace("rfc822; ", "rfc822;")
    assert "Original-Envelope-Id: env-43" in report
    assert len(upstream.messages) == 2
    for got in (original, notice):
        assert verify_all(got.content, dkim_keys.dns()) == [True, True]
