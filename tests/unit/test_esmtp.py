"""MAIL/RCPT parameters as the edge parses them (relay.listen.esmtp) and xtext (RFC 3461 §4)."""

from __future__ import annotations

import pytest

from relay.deliver.base import DsnRequest
from relay.deliver.dsn import xtext_decode, xtext_encode
from relay.errors import SmtpError
from relay.listen.esmtp import MailParams, parse_mail_params, parse_rcpt_params


@pytest.mark.parametrize(
    "words, expected",
    [
        ([], MailParams()),
        (["SIZE=0", "body=8bitmime"], MailParams(size=0, body_8bit=True)),
        (["BODY=7BIT", "SMTPUTF8"], MailParams(smtputf8=True)),
        (["AUTH=<>"], MailParams(auth="")),
        (["AUTH=a+2Bb@example.com"], MailParams(auth="a+b@example.com")),
        (["ret=hdrs", "ENVID=Ab+2Bc"], MailParams(ret="HDRS", envid="Ab+2Bc")),  # ENVID keeps its case
    ],
)
def test_mail_parameters(words, expected):
    assert parse_mail_params(words) == expected


@pytest.mark.parametrize(
    "words, code",
    [
        (["SIZE=-1"], 501),
        (["SIZE=" + "9" * 21], 501),
        (["SIZE="], 501),
        (["BODY=BINARYMIME"], 501),
        (["SMTPUTF8=1"], 501),
        (["AUTH=nobody"], 501),  # neither a mailbox nor <>
        (["AUTH=a b"], 501),
        (["RET=NONE"], 501),
        (["ENVID=a=b"], 501),  # "=" is not an xchar
        (["ENVID=a+2b"], 501),  # hexchar digits are upper case
        (["BODY=7BIT", "body=8BITMIME"], 501),
        (["X-FOO"], 555),
        (["NOTIFY=NEVER"], 555),  # a RCPT parameter on MAIL
    ],
)
def test_bad_mail_parameters(words, code):
    with pytest.raises(SmtpError) as err:
        parse_mail_params(words)
    assert (err.value.code, err.value.reply.enhanced) == (code, "5.5.4")
    assert str(err.value.reply).isascii()


@pytest.mark.parametrize(
    "words, expected",
    [
        ([], DsnRequest()),
        (["notify=success,delay"], DsnRequest(notify="SUCCESS,DELAY")),
        (
            ["NOTIFY=NEVER", "ORCPT=rfc822;Bob+40example.com"],
            DsnRequest(notify="NEVER", orcpt="rfc822;Bob+40example.com"),
        ),
        (["ORCPT=utf-8;bob@example.com"], DsnRequest(orcpt="utf-8;bob@example.com")),
    ],
)
def test_rcpt_parameters(words, expected):
    assert parse_rcpt_params(words) == expected


@pytest.mark.parametrize(
    "words",
    [
        ["NOTIFY=NEVER,FAILURE"],
        ["NOTIFY=SUCCESS,SUCCESS"],
        ["NOTIFY="],
        ["ORCPT=bob@example.com"],
        ["ORCPT=;bob@example.com"],
        ["ORCPT=rfc822;"],
        ["ORCPT=rfc822;" + "a" * 500],
        ["NOTIFY=FAILURE", "NOTIFY=DELAY"],
    ],
)
def test_bad_rcpt_parameters(words):
    with pytest.raises(SmtpError) as err:
        parse_rcpt_params(words)
    assert (err.value.code, err.value.reply.enhanced) == (501, "5.5.4")


def test_what_a_recipient_is_notified_of():
    # RFC 3461 §4.1: without NOTIFY, failures are reported and successes are not.
    assert DsnRequest().notifies("FAILURE") and not DsnRequest().notifies("SUCCESS")
    assert DsnRequest(notify="SUCCESS,DELAY").notifies("SUCCESS")
    assert not DsnRequest(notify="NEVER").notifies("FAILURE")


@pytest.mark.parametrize("text", ["plain@example.com", "a+b=c d", "jos\u00e9@example.com", "<>", ""])
def test_xtext_round_trip(text):
    encoded = xtext_encode(text)
    assert encoded.isascii() and " " not in encoded and "=" not in encoded
    assert xtext_decode(encoded) == text
