"""Token sources against a local authorization server over HTTPS: each provider's grant,
each failure and its reason, the egress proxies, and no token or secret in what is shown."""

from __future__ import annotations

import base64
import logging

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from relay.config.schema import UpstreamAuthSettings
from relay.oauth.cache import TokenCache
from relay.oauth.token import TokenError
from relay.observe.logs import JsonFormatter
from tests.support.oauth import MICROSOFT_SCOPE, AuthServer
from tests.support.oauth_config import MAILBOX, generic, google, microsoft, source_for
from tests.support.proxies import microsocks, tinyproxy


@pytest.fixture
def auth(pki):
    with AuthServer(pki) as server:
        yield server


# -- the grants ---------------------------------------------------------------------------


async def test_microsoft_client_secret(auth, tmp_path):
    app, _, settings, lookup = microsoft(auth, tmp_path)
    token = await source_for(settings, lookup).fetch()
    assert token.value in auth.tokens()
    assert auth.check(token.value, MAILBOX) is None
    assert token.lifetime == 3600


async def test_microsoft_certificate_assertion(auth, tmp_path):
    app, creds, settings, lookup = microsoft(auth, tmp_path, certificate=True)
    token = await source_for(settings, lookup).fetch()
    assert auth.check(token.value, MAILBOX) is None
    [(header, claims)] = auth.assertions
    # What Entra ID documents for certificate credentials.
    certificate = x509.load_pem_x509_certificate(creds.certificate_pem.read_bytes())
    thumbprint = base64.urlsafe_b64encode(certificate.fingerprint(hashes.SHA256())).rstrip(b"=").decode()
    assert header["alg"] == "PS256" and header["typ"] == "JWT" and header["x5t#S256"] == thumbprint
    assert claims["aud"] == auth.microsoft_url(app.tenant)
    assert claims["iss"] == claims["sub"] == app.client_id
    assert claims["jti"] and claims["nbf"] <= claims["iat"] < claims["exp"] <= claims["nbf"] + 600


async def test_microsoft_certificate_assertions_are_not_replayed(auth, tmp_path):
    _, _, settings, lookup = microsoft(auth, tmp_path, certificate=True)
    source = source_for(settings, lookup)
    first, second = await source.fetch(), await source.fetch()
    assert first.value != second.value
    assert len({claims["jti"] for _, claims in auth.assertions}) == 2


async def test_google_service_account_impersonates_the_user(auth, tmp_path):
    account, _, settings, lookup = google(auth, tmp_path)
    token = await source_for(settings, lookup).fetch()
    assert auth.check(token.value, MAILBOX) is None
    assert auth.check(token.value, "someone-else@example.com") == "insufficient_scope"
    [(header, claims)] = auth.assertions
    assert header["alg"] == "RS256" and header["kid"] == account.key_id
    assert claims["iss"] == account.email and claims["sub"] == MAILBOX
    assert claims["scope"] == "https://mail.google.com/" and claims["aud"] == auth.google_url
    assert claims["exp"] - claims["iat"] <= 3600


async def test_generic_client_credentials(auth, tmp_path):
    _, _, settings, lookup = generic(auth, tmp_path)
    token = await source_for(settings, lookup).fetch()
    assert token.value in auth.tokens()


# -- failures and their reasons -----------------------------------------------------------


async def fetch_error(settings, lookup, **kwargs) -> TokenError:
    with pytest.raises(TokenError) as caught:
        await source_for(settings, lookup, **kwargs).fetch()
    return caught.value


@pytest.mark.parametrize("make", [microsoft, google, generic])
@pytest.mark.parametrize("fail", ["invalid_client", "consent_missing"])
async def test_operator_failures(auth, tmp_path, make, fail):
    *_, settings, lookup = make(auth, tmp_path)
    auth.behaviour.fail = fail
    error = await fetch_error(settings, lookup)
    assert error.reason == fail and error.operator_fault
    # The endpoint's own words are in the detail, for the log.
    assert auth.errors[-1]["error"] in error.detail
    assert error.smtp_error("m365").reply.code == 451


async def test_microsoft_errors_quote_the_aadsts_code(auth, tmp_path):
    _, _, settings, lookup = microsoft(auth, tmp_path)
    auth.behaviour.fail = "consent_missing"
    error = await fetch_error(settings, lookup)
    assert "AADSTS65001" in error.detail and "invalid_grant" in error.detail


async def test_wrong_client_secret(auth, tmp_path):
    app, _, settings, lookup = microsoft(auth, tmp_path)
    app.secret = "rotated-on-the-portal"
    error = await fetch_error(settings, lookup)
    assert error.reason == "invalid_client" and "AADSTS7000215" in error.detail


async def test_unregistered_certificate(auth, tmp_path):
    app, _, settings, lookup = microsoft(auth, tmp_path, certificate=True)
    app.certificates.clear()
    error = await fetch_error(settings, lookup)
    assert error.reason == "invalid_client" and "AADSTS700027" in error.detail


async def test_unknown_tenant(auth, tmp_path):
    _, _, settings, lookup = microsoft(auth, tmp_path, token_url=auth.microsoft_url("contoso.onmicrosoft.com"))
    error = await fetch_error(settings, lookup)
    assert error.reason == "invalid_request" and "AADSTS90002" in error.detail


async def test_google_user_outside_the_delegation(auth, tmp_path):
    *_, settings, lookup = google(auth, tmp_path)
    error = await fetch_error(settings, lookup, user="stranger@example.com")
    assert error.reason == "invalid_request" and "Invalid email or User ID" in error.detail


@pytest.mark.parametrize("make", [microsoft, google, generic])
async def test_endpoint_unavailable(auth, tmp_path, make):
    *_, settings, lookup = make(auth, tmp_path)
    auth.behaviour.unavailable = True
    error = await fetch_error(settings, lookup)
    assert error.reason == "server_error" and "temporarily_unavailable" in error.detail
    assert not error.operator_fault


async def test_endpoint_down(auth, tmp_path):
    *_, settings, lookup = microsoft(auth, tmp_path)
    auth.stop()
    error = await fetch_error(settings, lookup)
    assert error.reason == "unreachable" and "connect call failed" in error.detail.lower()


async def test_endpoint_slow(auth, tmp_path):
    # The endpoint answers after 30 s; the relay waits 0.3 s.
    *_, settings, lookup = microsoft(auth, tmp_path, timeout="300ms")
    auth.behaviour.delay = 30
    error = await fetch_error(settings, lookup)
    assert error.reason == "timeout"


async def test_endpoint_certificate_not_trusted(auth, tmp_path):
    *_, settings, lookup = microsoft(auth, tmp_path, ca_file=None)
    error = await fetch_error(settings, lookup)
    assert error.reason == "unreachable" and "certificate verify failed" in error.detail


@pytest.mark.parametrize("make,key", [(microsoft, "client_secret"), (google, "service_account")])
async def test_secret_not_loaded(auth, tmp_path, make, key):
    *_, settings, _ = make(auth, tmp_path)
    error = await fetch_error(settings, lambda ref: None)
    assert error.reason == "credentials_unavailable" and key in error.detail
    assert auth.requests == 0


async def test_not_a_service_account_key(auth, tmp_path):
    *_, settings, _ = google(auth, tmp_path)
    error = await fetch_error(settings, lambda ref: b'{"type": "authorized_user"}')
    assert error.reason == "credentials_unavailable"


# -- through the egress proxy -------------------------------------------------------------


@pytest.mark.binaries
@pytest.mark.parametrize("scheme", ["socks5", "socks5h"])
async def test_through_microsocks(auth, tmp_path, scheme):
    *_, settings, lookup = microsoft(auth, tmp_path, certificate=True)
    with microsocks(tmp_path, user="relay", password="proxy-pass") as port:
        token = await source_for(settings, lookup, proxy=f"{scheme}://relay:proxy-pass@127.0.0.1:{port}").fetch()
    assert auth.check(token.value, MAILBOX) is None
    assert auth.peers == ["127.0.0.2"]  # the proxy's egress address, not ours


@pytest.mark.binaries
async def test_through_tinyproxy(auth, tmp_path):
    *_, settings, lookup = google(auth, tmp_path)
    with tinyproxy(tmp_path, user="relay", password="proxy-pass", connect_ports=[auth.port]) as port:
        token = await source_for(settings, lookup, proxy=f"http://relay:proxy-pass@127.0.0.1:{port}").fetch()
    assert auth.check(token.value, MAILBOX) is None
    assert auth.peers == ["127.0.0.2"]


@pytest.mark.binaries
async def test_proxy_refusal_is_unreachable(auth, tmp_path):
    *_, settings, lookup = microsoft(auth, tmp_path)
    with microsocks(tmp_path, user="relay", password="proxy-pass") as port:
        error = await fetch_error(settings, lookup, proxy=f"socks5://relay:wrong@127.0.0.1:{port}")
    assert error.reason == "unreachable" and "proxy" in error.detail and "wrong" not in error.detail
    assert auth.requests == 0


# -- nothing secret shows -----------------------------------------------------------------


async def test_no_token_or_secret_in_reprs_errors_and_logs(auth, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # every library logger, at its most verbose
    app, creds, settings, lookup = microsoft(auth, tmp_path)
    cache = TokenCache(source_for(settings, lookup), upstream="m365")
    token = await cache.token()
    shown = [repr(token), str(token), repr(cache.source)]
    app.secret = "rotated"
    auth.revoke_all()
    with pytest.raises(TokenError) as caught:
        await cache.refetch(token)
    shown += [str(caught.value), repr(caught.value), str(caught.value.smtp_error("m365"))]
    logged = "\n".join(JsonFormatter().format(record) for record in caplog.records)
    text = "\n".join(shown) + "\n" + logged
    for value in auth.tokens() + [creds.client_secret]:
        assert value not in text
    assert "AADSTS7000215" in logged  # the endpoint's error is logged
    await cache.close()


def test_microsoft_scope_is_exchange_online():
    settings = UpstreamAuthSettings.model_validate(
        {"provider": "microsoft", "tenant_id": "contoso.onmicrosoft.com", "client_id": "x", "client_secret": "env://S"}
    )
    assert settings.effective_mechanism == "xoauth2"
    assert MICROSOFT_SCOPE == "https://outlook.office365.com/.default"
