"""Token sources: one OAuth 2.0 grant per provider, each returning an `AccessToken`.

    microsoft  Entra ID v2.0 client-credentials grant (RFC 6749 §4.4) at
               /{tenant}/oauth2/v2.0/token, the client authenticated by its secret
               (client_secret_post) or by a certificate: a client-assertion JWT (RFC 7523
               §2.2, private_key_jwt) signed PS256 with the `x5t#S256` thumbprint of the
               registered certificate, as Entra ID documents for certificate credentials.
    google     the JWT-bearer grant (RFC 7523 §2.1) with a service-account key: the
               assertion names the service account (iss), the user it acts for through
               domain-wide delegation (sub), the scope and the token_uri (aud), signed
               RS256 with the key's id as `kid`.
    generic    client credentials at any token endpoint, client_secret_basic (the method
               RFC 6749 §2.3.1 makes every server support).

Secrets are read at each fetch through a callable, so a rotated secret is used at the next
fetch without a restart. Every failure becomes a `TokenError` with a fixed reason; its
detail quotes the endpoint's `error` and `error_description` (which name the problem, e.g.
`AADSTS7000215: Invalid client secret provided`) and never the request.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import httpx2
from authlib.integrations.base_client import OAuthError
from authlib.integrations.httpx_client import AsyncAssertionClient, AsyncOAuth2Client
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc.jwk import RSAKey

from relay.config.schema import GOOGLE_SCOPE, MICROSOFT_SCOPE, MICROSOFT_TOKEN_URL, UpstreamAuthSettings
from relay.deliver.dial import Dialer
from relay.oauth.token import AccessToken, TokenError
from relay.oauth.transport import DialerTransport, endpoint_tls_context

# The current value of a secret reference, or None while it is not loaded.
Credential = Callable[[], bytes | None]

# RFC 6750 §2.1 b64token: what a bearer token may contain. Anything else (a CR or LF above
# all) must never reach an SMTP command line.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_MAX_TOKEN_LENGTH = 16 * 1024
# RFC 6749 §5.1 makes expires_in optional; without it, assume a short life.
_DEFAULT_LIFETIME = 300.0
# How long a client assertion is valid: Entra ID asks for a short one (5-10 minutes).
_ASSERTION_LIFETIME = 600
_AADSTS = re.compile(r"\bAADSTS(\d+)")


class TokenSource(Protocol):
    """Gets a new access token each time `fetch` is called (caching is `TokenCache`'s).

    `fetch` raises `TokenError` and nothing else; it never blocks the event loop and has
    its own deadline. `endpoint` is the token URL (safe to log)."""

    provider: str
    endpoint: str

    async def fetch(self) -> AccessToken: ...

    def describe(self) -> str:
        """The token URL and the path to it (e.g. `... via socks5://proxy:1080`)."""
        ...


class TokenEndpoint:
    """The HTTPS side every grant shares: the dialer (direct or the egress proxy), the TLS
    context, the deadline, and turning what went wrong into a `TokenError`."""

    def __init__(self, url: str, dialer: Dialer, tls_context: Any, timeout: float) -> None:
        self.url = url
        self.dialer = dialer
        self.tls_context = tls_context
        self.timeout = timeout

    def describe(self) -> str:
        via = self.dialer.describe()
        return self.url if via == "direct" else f"{self.url} via {via}"

    def client_options(self) -> dict[str, Any]:
        return {
            "transport": DialerTransport(self.dialer, self.tls_context),
            "timeout": httpx2.Timeout(self.timeout),
            "follow_redirects": False,
            "trust_env": False,  # the proxy is the configured one, never HTTPS_PROXY
        }

    async def request(self, provider: str, call: Callable[[], Awaitable[Mapping[str, Any]]]) -> AccessToken:
        started = time.monotonic()
        where = self.describe()
        try:
            async with asyncio.timeout(self.timeout):
                response = await call()
        except TimeoutError:
            raise TokenError("timeout", f"no reply from {where} within {self.timeout:g}s") from None
        except OAuthError as exc:
            raise _oauth_error(provider, str(exc.error or ""), str(exc.description or ""), where) from None
        except httpx2.HTTPStatusError as exc:
            raise _status_error(provider, exc.response, where) from None
        except httpx2.TimeoutException as exc:
            raise TokenError("timeout", f"{where}: {_printable(str(exc))}") from None
        except httpx2.HTTPError as exc:
            raise TokenError("unreachable", f"{where}: {_printable(str(exc)) or type(exc).__name__}") from None
        except ValueError as exc:  # authlib: the reply is not a JSON object
            raise TokenError("bad_response", f"{where}: {_printable(str(exc))}") from None
        return _access_token(response, started, where)


class MicrosoftTokenSource:
    provider = "microsoft"

    def __init__(
        self,
        endpoint: TokenEndpoint,
        *,
        client_id: str,
        scope: str,
        client_secret: Credential | None = None,
        client_certificate: Credential | None = None,
    ) -> None:
        assert (client_secret is None) != (client_certificate is None)
        self._endpoint = endpoint
        self.endpoint = endpoint.url
        self._client_id = client_id
        self._scope = scope
        self._secret = client_secret
        self._certificate = client_certificate

    def describe(self) -> str:
        return self._endpoint.describe()

    async def fetch(self) -> AccessToken:
        options = self._endpoint.client_options()
        if self._certificate is not None:
            key, thumbprint = certificate_credential(_loaded(self._certificate, "client_certificate"))
            now = int(time.time())
            assertion = PrivateKeyJWT(
                self.endpoint,  # aud: the token endpoint itself
                headers={"typ": "JWT", "x5t#S256": thumbprint},
                claims={"nbf": now, "iat": now, "exp": now + _ASSERTION_LIFETIME},
                alg="PS256",
            )
            client = _oauth2_client(self._client_id, key, "private_key_jwt", self._scope, options)
            client.register_client_auth_method(assertion)
        else:
            secret = _loaded(self._secret, "client_secret").decode("utf-8").strip()
            client = _oauth2_client(self._client_id, secret, "client_secret_post", self._scope, options)

        async def call() -> Mapping[str, Any]:
            async with client:
                token: Mapping[str, Any] = await client.fetch_token(self.endpoint, grant_type="client_credentials")
                return token

        return await self._endpoint.request(self.provider, call)


class GoogleTokenSource:
    provider = "google"

    def __init__(
        self,
        endpoint_for: Callable[[str], TokenEndpoint],
        *,
        service_account: Credential,
        subject: str,
        scope: str,
        token_url: str | None = None,
    ) -> None:
        self._endpoint_for = endpoint_for
        self._service_account = service_account
        self._subject = subject
        self._scope = scope
        self._token_url = token_url
        self.endpoint = token_url or "(token_uri of the service account key)"
        self._last: TokenEndpoint | None = None

    def describe(self) -> str:
        return self._last.describe() if self._last is not None else self.endpoint

    async def fetch(self) -> AccessToken:
        key = service_account_key(_loaded(self._service_account, "service_account"))
        # The assertion's audience is the key's token_uri; `token_url` only changes where it
        # is sent (a private endpoint for the same service).
        url = self._token_url or key["token_uri"]
        self.endpoint = url
        endpoint = self._last = self._endpoint_for(url)
        client = AsyncAssertionClient(
            token_endpoint=url,
            issuer=key["client_email"],
            subject=self._subject,
            audience=key["token_uri"],
            claims={"scope": self._scope},
            key=RSAKey.import_key(key["private_key"]),
            header={"alg": "RS256", "typ": "JWT", "kid": key["private_key_id"]},
            **endpoint.client_options(),
        )

        async def call() -> Mapping[str, Any]:
            async with client:
                token: Mapping[str, Any] = await client.refresh_token()
                return token

        return await endpoint.request(self.provider, call)


class GenericTokenSource:
    provider = "generic"

    def __init__(
        self, endpoint: TokenEndpoint, *, client_id: str, client_secret: Credential, scope: str | None = None
    ) -> None:
        self._endpoint = endpoint
        self.endpoint = endpoint.url
        self._client_id = client_id
        self._secret = client_secret
        self._scope = scope

    def describe(self) -> str:
        return self._endpoint.describe()

    async def fetch(self) -> AccessToken:
        secret = _loaded(self._secret, "client_secret").decode("utf-8").strip()
        client = _oauth2_client(
            self._client_id, secret, "client_secret_basic", self._scope, self._endpoint.client_options()
        )

        async def call() -> Mapping[str, Any]:
            async with client:
                token: Mapping[str, Any] = await client.fetch_token(self.endpoint, grant_type="client_credentials")
                return token

        return await self._endpoint.request(self.provider, call)


def _oauth2_client(
    client_id: str, credential: Any, method: str, scope: str | None, options: dict[str, Any]
) -> AsyncOAuth2Client:
    return AsyncOAuth2Client(client_id, credential, token_endpoint_auth_method=method, scope=scope, **options)


# -- credentials ------------------------------------------------------------------------


def certificate_credential(pem: bytes) -> tuple[RSAKey, str]:
    """The private key and the `x5t#S256` thumbprint (base64url SHA-256 of the DER) of
    the certificate it belongs to, from one PEM holding both (a chain may follow)."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise TokenError(
            "credentials_unavailable", "client_certificate: no unencrypted private key in the PEM"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TokenError("credentials_unavailable", "client_certificate: the key must be RSA (Entra ID signs PS256)")
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        certificates = []
    public = key.public_key().public_numbers()
    for certificate in certificates:
        cert_key = certificate.public_key()
        if isinstance(cert_key, rsa.RSAPublicKey) and cert_key.public_numbers() == public:
            digest = certificate.fingerprint(hashes.SHA256())
            return RSAKey.import_key(key), base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
    raise TokenError("credentials_unavailable", "client_certificate: the PEM has no certificate for its private key")


def service_account_key(data: bytes) -> dict[str, str]:
    """The fields of a Google service-account JSON key that the JWT-bearer grant uses."""
    try:
        info = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise TokenError("credentials_unavailable", "service_account: not a JSON key file") from None
    if not isinstance(info, dict) or info.get("type") != "service_account":
        raise TokenError("credentials_unavailable", 'service_account: not a key of "type": "service_account"')
    missing = [
        k
        for k in ("client_email", "private_key", "private_key_id", "token_uri")
        if not isinstance(info.get(k), str) or not info[k]
    ]
    if missing:
        raise TokenError("credentials_unavailable", f"service_account: key file lacks {', '.join(missing)}")
    if not info["token_uri"].startswith("https://"):
        raise TokenError("credentials_unavailable", "service_account: token_uri is not an https:// URL")
    try:
        key = serialization.load_pem_private_key(info["private_key"].encode(), password=None)
    except (ValueError, TypeError):
        raise TokenError("credentials_unavailable", "service_account: private_key is not a PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TokenError("credentials_unavailable", "service_account: private_key is not an RSA key")
    return {k: info[k] for k in ("client_email", "private_key", "private_key_id", "token_uri")}


def _loaded(credential: Credential | None, name: str) -> bytes:
    value = credential() if credential is not None else None
    if not value:
        raise TokenError("credentials_unavailable", f"{name}: secret not loaded")
    return value


# -- replies ----------------------------------------------------------------------------


def _access_token(response: Mapping[str, Any], started: float, where: str) -> AccessToken:
    value = response.get("access_token")
    token_type = str(response.get("token_type", "")).lower()
    if not isinstance(value, str) or not value:
        raise TokenError("bad_response", f"{where}: reply has no access_token")
    if token_type != "bearer":  # noqa: S105 - the RFC 6750 token type
        raise TokenError("bad_response", f"{where}: token_type {_printable(token_type, 20)!r} is not Bearer")
    if len(value) > _MAX_TOKEN_LENGTH or not _B64TOKEN.fullmatch(value):
        raise TokenError("bad_response", f"{where}: access_token is not an RFC 6750 bearer token")
    try:
        lifetime = float(response.get("expires_in", _DEFAULT_LIFETIME))
    except (TypeError, ValueError):
        lifetime = _DEFAULT_LIFETIME
    return AccessToken(value, obtained_at=started, lifetime=max(1.0, lifetime))


def _oauth_error(provider: str, error: str, description: str, where: str) -> TokenError:
    """RFC 6749 §5.2 error codes, and what each provider means by them."""
    detail = f"{where}: {_printable(error, 60)}: {_printable(description)}".rstrip(": ")
    codes = set(_AADSTS.findall(description)) if provider == "microsoft" else set()
    lowered = description.lower()
    if error in ("temporarily_unavailable", "server_error"):
        return TokenError("server_error", detail)
    if provider == "microsoft" and codes & {"65001", "65004", "650051", "650052", "650056", "650057"}:
        # The admin has not (or no longer) consented to the app's permissions.
        return TokenError("consent_missing", detail)
    if provider == "google" and error in ("unauthorized_client", "access_denied"):
        # Domain-wide delegation is not granted for this client and scope (or an admin
        # policy forbids it).
        return TokenError("consent_missing", detail)
    if provider == "google" and error == "invalid_grant" and "signature" in lowered:
        # The key was deleted or disabled: the service account's credential is wrong.
        return TokenError("invalid_client", detail)
    if error in ("invalid_client", "unauthorized_client", "disabled_client"):
        return TokenError("invalid_client", detail)
    if error in ("consent_required", "interaction_required", "access_denied"):
        return TokenError("consent_missing", detail)
    return TokenError("invalid_request", detail)


def _status_error(provider: str, response: httpx2.Response, where: str) -> TokenError:
    """A non-JSON or 5xx reply; its JSON error, if any, still names the cause."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        error = _oauth_error(provider, body["error"], str(body.get("error_description", "")), where)
        if status >= 500:
            return TokenError("server_error", f"HTTP {status}, {error.detail}")
        return error
    reason = "server_error" if status >= 500 else "bad_response"
    return TokenError(reason, f"{where}: HTTP {status} {_printable(response.reason_phrase, 60)}")


def _printable(text: str, limit: int = 400) -> str:
    """Endpoint-supplied text made safe for one log line."""
    cleaned = " ".join("".join(c if " " <= c <= "~" else " " for c in text).split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


# -- from the config --------------------------------------------------------------------


def token_source(
    auth: UpstreamAuthSettings, username: str, dialer: Dialer, secret: Callable[[str], bytes | None]
) -> TokenSource:
    """The token source `upstream.auth` describes. `secret(ref)` returns the current value
    of a secret reference (None while not loaded); the dialer is the upstream's own."""
    assert auth.provider is not None
    tls_context = endpoint_tls_context(str(auth.ca_file) if auth.ca_file else None)

    def endpoint(url: str) -> TokenEndpoint:
        return TokenEndpoint(url, dialer, tls_context, auth.timeout)

    def credential(ref: str | None) -> Credential | None:
        return None if ref is None else (lambda: secret(ref))

    if auth.provider == "microsoft":
        assert auth.tenant_id and auth.client_id
        url = auth.token_url or MICROSOFT_TOKEN_URL.format(tenant=auth.tenant_id)
        return MicrosoftTokenSource(
            endpoint(url),
            client_id=auth.client_id,
            scope=auth.scope or MICROSOFT_SCOPE,
            client_secret=credential(auth.client_secret),
            client_certificate=credential(auth.client_certificate),
        )
    if auth.provider == "google":
        assert auth.service_account
        return GoogleTokenSource(
            endpoint,
            service_account=lambda: secret(auth.service_account or ""),
            subject=username,
            scope=auth.scope or GOOGLE_SCOPE,
            token_url=auth.token_url,
        )
    assert auth.token_url and auth.client_id and auth.client_secret
    return GenericTokenSource(
        endpoint(auth.token_url),
        client_id=auth.client_id,
        client_secret=lambda: secret(auth.client_secret or ""),
        scope=auth.scope,
    )
