"""SASL XOAUTH2 and OAUTHBEARER (RFC 7628) from aiosmtplib to a real upstream that checks
tokens with the authorization server that issued them."""

from __future__ import annotations

import aiosmtplib
import pytest

from relay.oauth import sasl
from tests.support.oauth import AuthServer
from tests.support.oauth_upstream import OAuthUpstream

MAILBOX = "sender@example.com"


@pytest.fixture
def auth(pki):
    with AuthServer(pki) as server:
        yield server


@pytest.fixture
def upstream(auth, pki):
    with OAuthUpstream(auth, tls="starttls", server_context=pki.server_context()) as up:
        yield up


def live_token(auth: AuthServer, tmp_path, user: str = MAILBOX) -> str:
    app, _ = auth.register_microsoft_app(tmp_path, mailbox=user)
    return auth._issue("microsoft", app.client_id, "https://outlook.office365.com/.default")


async def session(upstream: OAuthUpstream, pki) -> aiosmtplib.SMTP:
    smtp = aiosmtplib.SMTP(
        hostname="localhost", port=upstream.port, start_tls=True, tls_context=pki.client_context(), timeout=10
    )
    await smtp.connect()  # STARTTLS done; the EHLO after it is authenticate()'s to send
    return smtp


@pytest.mark.parametrize("mechanism", sasl.MECHANISMS)
async def test_live_token_is_accepted_and_mail_flows(auth, upstream, pki, tmp_path, mechanism):
    token = live_token(auth, tmp_path)
    assert len(token) > 1000  # an Exchange-sized token: the AUTH line is longer than 1000 octets
    smtp = await session(upstream, pki)
    reply = await sasl.authenticate(smtp, mechanism, MAILBOX, token, host="localhost", port=upstream.port)
    assert reply.code == 235
    await smtp.sendmail(MAILBOX, ["rcpt@example.net"], b"Subject: hi\r\n\r\nbody\r\n")
    await smtp.quit()
    [attempt] = upstream.attempts()
    assert attempt.mechanism == mechanism.upper() and attempt.user == MAILBOX and attempt.accepted
    assert upstream.wait_for(1)[0].user == MAILBOX
    if mechanism == "oauthbearer":
        assert attempt.fields["host"] == "localhost" and attempt.fields["port"] == str(upstream.port)


@pytest.mark.parametrize("mechanism,dummy,status", [("xoauth2", b"", "401"), ("oauthbearer", b"\x01", "invalid_token")])
async def test_refused_token_finishes_the_exchange(auth, upstream, pki, tmp_path, mechanism, dummy, status):
    token = live_token(auth, tmp_path)
    auth.revoke_all()
    smtp = await session(upstream, pki)
    with pytest.raises(sasl.OAuthRejected) as caught:
        await sasl.authenticate(smtp, mechanism, MAILBOX, token, host="localhost", port=upstream.port)
    error = caught.value
    # RFC 7628 §3.2.2/3: the error challenge, the client's dummy response, then the failure.
    assert error.code == 535 and error.status == status
    assert error.challenge["scope"] == "https://mail.google.com/"
    [attempt] = upstream.attempts()
    assert attempt.dummy == dummy
    assert token not in str(error) and token not in repr(error)
    # The session is still usable: a second AUTH with a live token works.
    fresh = live_token(auth, tmp_path)
    reply = await sasl.authenticate(smtp, mechanism, MAILBOX, fresh, host="localhost", port=upstream.port)
    assert reply.code == 235
    await smtp.quit()


async def test_token_for_another_mailbox_is_insufficient_scope(auth, upstream, pki, tmp_path):
    token = live_token(auth, tmp_path, user="other@example.com")
    smtp = await session(upstream, pki)
    with pytest.raises(sasl.OAuthRejected) as caught:
        await sasl.authenticate(smtp, "oauthbearer", MAILBOX, token, host="localhost", port=upstream.port)
    assert caught.value.status == "insufficient_scope"
    smtp.close()


async def test_oauthbearer_escapes_the_user_name(auth, upstream, pki, tmp_path):
    user = "odd,name=x@example.com"
    token = live_token(auth, tmp_path, user=user)
    assert sasl.oauthbearer_response(user, "t", "h", 1).startswith(b"n,a=odd=2Cname=3Dx@example.com,\x01")
    smtp = await session(upstream, pki)
    await sasl.authenticate(smtp, "oauthbearer", user, token, host="localhost", port=upstream.port)
    assert upstream.attempts()[0].user == user
    smtp.close()


async def test_mechanism_not_offered(auth, pki, tmp_path):
    with OAuthUpstream(auth, tls="starttls", server_context=pki.server_context(), mechanisms=("XOAUTH2",)) as up:
        smtp = await session(up, pki)
        with pytest.raises(sasl.MechanismNotOffered, match="offers: XOAUTH2"):
            await sasl.authenticate(smtp, "oauthbearer", MAILBOX, "t", host="localhost", port=up.port)
        smtp.close()


def test_control_characters_in_the_user_name_are_refused():
    with pytest.raises(ValueError):
        sasl.xoauth2_response("a\x01auth=Bearer forged", "t")
