"""AUTH to a real upstream with the cached token: the forced refetch on 535, and each failure
as the 4xx the relay's client will hear."""

from __future__ import annotations

import aiosmtplib
import pytest
from prometheus_client import REGISTRY

from relay.errors import SmtpError
from relay.oauth.cache import TokenCache
from relay.oauth.upstream_auth import UpstreamTokenAuth
from tests.support.oauth import AuthServer
from tests.support.oauth_config import MAILBOX, google, microsoft, source_for
from tests.support.oauth_upstream import OAuthUpstream


@pytest.fixture
def auth(pki):
    with AuthServer(pki) as server:
        yield server


@pytest.fixture
def upstream(auth, pki):
    with OAuthUpstream(auth, tls="starttls", server_context=pki.server_context()) as up:
        yield up


@pytest.fixture
async def login(auth, tmp_path):
    caches = []

    def factory(label: str, mechanism: str = "xoauth2", make=microsoft) -> UpstreamTokenAuth:
        *_, settings, lookup = make(auth, tmp_path)
        cache = TokenCache(source_for(settings, lookup), upstream=label)
        caches.append(cache)
        return UpstreamTokenAuth(cache, mechanism=mechanism, username=MAILBOX)

    yield factory
    for cache in caches:
        await cache.close()


async def session(upstream, pki) -> aiosmtplib.SMTP:
    smtp = aiosmtplib.SMTP(
        hostname="localhost", port=upstream.port, start_tls=True, tls_context=pki.client_context(), timeout=10
    )
    await smtp.connect()
    return smtp


def failures(upstream: str, reason: str) -> float:
    value = REGISTRY.get_sample_value("relay_upstream_token_failures_total", {"upstream": upstream, "reason": reason})
    return value or 0.0


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
@pytest.mark.parametrize("make", [microsoft, google])
async def test_authenticates_with_the_cached_token(auth, upstream, pki, login, mechanism, make):
    auth_ = login(f"ok-{mechanism}-{make.__name__}", mechanism, make)
    for _ in range(3):
        smtp = await session(upstream, pki)
        await auth_.authenticate(smtp, "localhost", upstream.port)
        await smtp.quit()
    assert auth.requests == 1  # one token for three sessions
    assert [a.accepted for a in upstream.attempts()] == [True, True, True]


async def test_535_to_a_valid_token_refetches_once(auth, upstream, pki, login):
    auth_ = login("refetch")
    smtp = await session(upstream, pki)
    await auth_.authenticate(smtp, "localhost", upstream.port)
    await smtp.quit()
    auth.revoke_all()  # still unexpired, but no longer accepted
    smtp = await session(upstream, pki)
    await auth_.authenticate(smtp, "localhost", upstream.port)
    await smtp.quit()
    attempts = upstream.attempts()
    assert [a.accepted for a in attempts] == [True, False, True]
    assert attempts[1].dummy == b""  # the XOAUTH2 exchange was finished before retrying
    assert attempts[2].token != attempts[1].token and auth.requests == 2


async def test_fresh_token_refused_too_is_rejected_and_4xx(auth, upstream, pki, login):
    auth_ = login("refused")
    upstream.refuse_all = True  # e.g. SMTP AUTH disabled for the mailbox
    before = failures("refused", "rejected")
    smtp = await session(upstream, pki)
    with pytest.raises(SmtpError) as caught:
        await auth_.authenticate(smtp, "localhost", upstream.port)
    smtp.close()
    error = caught.value
    assert (error.code, error.reply.enhanced, error.label) == (451, "4.7.0", "upstream_token")
    assert "535" in error.reason and "rejected" in error.reason
    assert len(upstream.attempts()) == 2 and auth.requests == 2  # exactly one retry
    assert failures("refused", "rejected") == before + 1
    assert auth_.cache.problem.reason == "rejected"
    for token in auth.tokens():
        assert token not in str(error)
    # Once the mailbox is fixed, the next session clears the state.
    upstream.refuse_all = False
    smtp = await session(upstream, pki)
    await auth_.authenticate(smtp, "localhost", upstream.port)
    await smtp.quit()
    assert auth_.cache.problem is None


@pytest.mark.parametrize("fail,reason", [("invalid_client", "invalid_client"), ("consent_missing", "consent_missing")])
async def test_token_endpoint_refusal_is_451_with_the_endpoint_error(auth, upstream, pki, login, fail, reason):
    auth_ = login(f"endpoint-{fail}")
    auth.behaviour.fail = fail
    smtp = await session(upstream, pki)
    with pytest.raises(SmtpError) as caught:
        await auth_.authenticate(smtp, "localhost", upstream.port)
    smtp.close()
    assert (caught.value.code, caught.value.reply.enhanced) == (451, "4.7.0")
    assert caught.value.reply.text == "Upstream authentication failed, try again later"
    assert reason in caught.value.reason and "AADSTS" in caught.value.reason
    assert upstream.attempts() == []


async def test_token_endpoint_down_is_451(auth, upstream, pki, login):
    auth_ = login("endpoint-down")
    auth.stop()
    smtp = await session(upstream, pki)
    with pytest.raises(SmtpError) as caught:
        await auth_.authenticate(smtp, "localhost", upstream.port)
    smtp.close()
    assert (caught.value.code, caught.value.reply.enhanced) == (451, "4.7.0")
    assert caught.value.reply.text == "Upstream authentication unavailable, try again later"
    assert "unreachable" in caught.value.reason


async def test_mechanism_not_offered_is_rejected(auth, pki, login):
    auth_ = login("not-offered", "oauthbearer")
    with OAuthUpstream(auth, tls="starttls", server_context=pki.server_context(), mechanisms=("XOAUTH2",)) as up:
        smtp = await session(up, pki)
        with pytest.raises(SmtpError) as caught:
            await auth_.authenticate(smtp, "localhost", up.port)
        smtp.close()
    assert "does not offer AUTH OAUTHBEARER" in caught.value.reason
    assert auth_.cache.problem.reason == "rejected"
