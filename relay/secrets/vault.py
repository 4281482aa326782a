"""HashiCorp Vault KV v2 backend: `vault://MOUNT/PATH#field`.

MOUNT is the first path segment of the reference (the KV v2 secrets engine mount); the rest is
the secret path. The value is `data.data[field]` of `GET /v1/MOUNT/data/PATH` (a JSON string
becomes its UTF-8 bytes, any other JSON value its compact JSON text); the version is
`data.metadata.version`.

Why aiohttp and not hvac: the whole backend is a handful of documented HTTP calls (KV v2
read, three logins, token lookup/renew). aiohttp is already a dependency, is natively async
(no worker threads, no blocking of the event loop, cancellation works), and one
`ClientSession` gives connection reuse, the CA bundle and the timeout in one place. hvac is
synchronous (requests): every call would need `asyncio.to_thread`, its shared
`requests.Session` is not documented as thread-safe for concurrent calls, and a cancelled
fetch would leave the thread running.

Authentication (`auth`):
- `token`: the given token is used as is; `auth/token/lookup-self` learns its TTL and whether
  it is renewable (a token without lookup permission is still used, just never renewed).
- `kubernetes`: `POST auth/<auth_mount or kubernetes>/login` with `role` and the service
  account JWT, read from `kubernetes_token_path` at every login (projected tokens rotate).
- `approle`: `POST auth/<auth_mount or approle>/login` with `role_id` and `secret_id`.

Token lifecycle, checked before each fetch: a renewable token past 2/3 of its TTL is renewed
(`auth/token/renew-self`); if renewal fails, the token has expired or is not renewable,
kubernetes/approle log in again (a static token is then used until Vault refuses it). A
403 on a read triggers one re-login and one retry (kubernetes/approle only: a static token
cannot be replaced).

`namespace` is sent as `X-Vault-Namespace` on every request; `ca_file` is the CA bundle used
to verify Vault's TLS certificate (system trust store otherwise).

Error messages name the reference and the HTTP status or cause; they never contain a token,
a secret_id, a JWT or a secret value.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from relay.secrets.base import SecretFetchError, SecretRef, SecretValue
from relay.secrets.http_dns import ConfiguredDnsResolver, HostAddresses

__all__ = ["VaultBackend"]

log = logging.getLogger(__name__)

AUTH_METHODS = ("token", "kubernetes", "approle")
RENEW_FRACTION = 2 / 3
# A file path, not a credential.
K8S_SA_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105


class _HttpError(Exception):
    """A non-2xx reply from Vault (internal). The message is safe to show."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}{': ' + detail if detail else ''}")
        self.status = status


class VaultBackend:
    """Read KV v2 secrets from Vault, keeping one HTTP session and one token."""

    scheme = "vault"

    def __init__(
        self,
        url: str,
        *,
        auth: str = "token",
        token: str | None = None,
        role: str | None = None,
        role_id: str | None = None,
        secret_id: str | None = None,
        kubernetes_token_path: str = K8S_SA_TOKEN_PATH,
        auth_mount: str | None = None,
        namespace: str | None = None,
        ca_file: str | None = None,
        timeout: float = 10,
        resolver: HostAddresses | None = None,
    ) -> None:
        if auth not in AUTH_METHODS:
            raise ValueError(f"vault auth must be one of {', '.join(AUTH_METHODS)}, not {auth!r}")
        if auth == "token" and not token:
            raise ValueError("vault auth 'token' needs a token")
        if auth == "kubernetes" and not role:
            raise ValueError("vault auth 'kubernetes' needs a role")
        if auth == "approle" and not (role_id and secret_id):
            raise ValueError("vault auth 'approle' needs role_id and secret_id")
        self.url = url.rstrip("/")
        self.auth = auth
        self.role = role
        self.role_id = role_id
        self.kubernetes_token_path = kubernetes_token_path
        self.auth_mount = (auth_mount or ("" if auth == "token" else auth)).strip("/")
        self.namespace = namespace
        self.ca_file = ca_file
        self.timeout = timeout
        # dns.nameservers, when configured, for Vault's (and an HTTPS proxy's) host name.
        self._resolver = ConfiguredDnsResolver(resolver) if resolver is not None else None
        self._static_token = token
        self._secret_id = secret_id
        self._token: str | None = None
        self._ttl = 0.0  # seconds the current token was valid for when obtained; 0 = no expiry
        self._renewable = False
        self._obtained = 0.0  # clock() when the token/TTL was obtained
        self._session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()
        self.clock: Callable[[], float] = time.monotonic  # replaceable in tests

    def __repr__(self) -> str:
        return f"VaultBackend(url={self.url!r}, auth={self.auth!r}, namespace={self.namespace!r})"

    # -- HTTP -----------------------------------------------------------------------------

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            ssl_ctx: ssl.SSLContext | bool = True
            if self.ca_file:
                ssl_ctx = ssl.create_default_context(cafile=self.ca_file)
            headers = {"X-Vault-Request": "true"}
            if self.namespace:
                headers["X-Vault-Namespace"] = self.namespace
            self._session = aiohttp.ClientSession(
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(ssl=ssl_ctx, resolver=self._resolver),
                trust_env=True,  # HTTPS_PROXY / NO_PROXY, as the Vault CLI does
            )
        return self._session

    async def _request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        body: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One Vault API call; returns the JSON body or raises `_HttpError` / aiohttp errors."""
        headers = {"X-Vault-Token": token} if token else {}
        session = self._get_session()
        async with session.request(method, f"{self.url}/v1/{path}", headers=headers, json=body) as resp:
            text = await resp.text()
            if resp.status >= 400:
                raise _HttpError(resp.status, self._error_detail(text))
            if not text.strip():
                return {}
            try:
                parsed = json.loads(text)
            except ValueError:
                raise _HttpError(resp.status, "reply is not JSON") from None
            return parsed if isinstance(parsed, dict) else {}

    def _error_detail(self, text: str) -> str:
        """Vault's `errors` list, scrubbed of our own credentials, kept short."""
        try:
            errors = json.loads(text).get("errors") or []
            detail = "; ".join(str(e) for e in errors)
        except (ValueError, AttributeError):
            detail = ""
        for secret in (self._token, self._static_token, self._secret_id):
            if secret:
                detail = detail.replace(secret, "<redacted>")
        detail = " ".join(detail.split())
        return detail[:200]

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    # -- authentication -------------------------------------------------------------------

    def _set_lease(self, ttl: Any, renewable: Any) -> None:
        try:
            self._ttl = max(float(ttl or 0), 0.0)
        except (TypeError, ValueError):
            self._ttl = 0.0
        self._renewable = bool(renewable)
        self._obtained = self.clock()

    async def _login(self) -> None:
        """Obtain a token (or, for `token` auth, learn the given token's TTL)."""
        if self.auth == "token":
            try:
                reply = await self._request("GET", "auth/token/lookup-self", token=self._static_token)
            except _HttpError as exc:
                # A token may lack lookup-self permission; use it anyway, without renewal
                # (if it is invalid, the read says so). Transport errors propagate instead,
                # so that the lookup is retried on the next fetch.
                log.warning("vault token lookup-self failed (%s); token will not be renewed", exc)
                reply = {}
            data = reply.get("data") or {}
            self._token = self._static_token
            self._set_lease(data.get("ttl"), data.get("renewable"))
            return
        if self.auth == "kubernetes":
            try:
                jwt = (await asyncio.to_thread(Path(self.kubernetes_token_path).read_text)).strip()
            except OSError as exc:
                raise _LoginError(
                    f"cannot read kubernetes service account token {self.kubernetes_token_path} ({type(exc).__name__})"
                ) from None
            body = {"role": self.role, "jwt": jwt}
            what = f"kubernetes login (mount {self.auth_mount}, role {self.role})"
        else:
            body = {"role_id": self.role_id, "secret_id": self._secret_id}
            what = f"approle login (mount {self.auth_mount})"
        try:
            reply = await self._request("POST", f"auth/{self.auth_mount}/login", body=body)
        except _HttpError as exc:
            raise _LoginError(f"vault {what} failed: {exc}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _LoginError(f"vault {what} failed: {_describe(exc)}") from None
        auth = reply.get("auth") or {}
        token = auth.get("client_token")
        if not token:
            raise _LoginError(f"vault {what} failed: reply has no auth.client_token")
        self._token = token
        self._set_lease(auth.get("lease_duration"), auth.get("renewable"))
        log.info("vault %s ok (ttl %ss, renewable %s)", what, int(self._ttl), self._renewable)

    async def _renew(self) -> bool:
        try:
            reply = await self._request("POST", "auth/token/renew-self", token=self._token, body={})
        except (_HttpError, aiohttp.ClientError, TimeoutError) as exc:
            log.warning("vault token renewal failed: %s", _describe(exc))
            return False
        auth = reply.get("auth") or {}
        self._set_lease(auth.get("lease_duration"), auth.get("renewable"))
        return True

    async def _ensure_token(self) -> str:
        """The current token, renewed or replaced first when its TTL is mostly used."""
        async with self._lock:
            if self._token is None:
                await self._login()
            elif self._ttl > 0:
                age = self.clock() - self._obtained
                if age >= self._ttl * RENEW_FRACTION:
                    # An expired token cannot be renewed; a non-renewable one is replaced early.
                    renewed = self._renewable and age < self._ttl and await self._renew()
                    if not renewed and self.auth != "token":
                        await self._login()
            assert self._token is not None
            return self._token

    async def _relogin_after_denied(self, denied_token: str) -> bool:
        """After a 403: log in again unless someone already did. False if impossible."""
        if self.auth == "token":
            return False
        async with self._lock:
            if self._token == denied_token:
                await self._login()
        return True

    # -- fetch ----------------------------------------------------------------------------

    async def fetch(self, ref: SecretRef) -> SecretValue:
        if ref.scheme != self.scheme:
            raise SecretFetchError(f"{ref}: not a vault:// reference")
        mount, _, path = ref.location.strip("/").partition("/")
        if not mount or not path or not ref.field:
            raise SecretFetchError(f"{ref}: vault reference needs MOUNT/PATH#field")
        api_path = f"{quote(mount)}/data/{quote(path)}"
        try:
            token = await self._ensure_token()
            try:
                reply = await self._request("GET", api_path, token=token)
            except _HttpError as exc:
                if exc.status != 403 or not await self._relogin_after_denied(token):
                    raise
                reply = await self._request("GET", api_path, token=await self._ensure_token())
        except _LoginError as exc:
            raise SecretFetchError(f"{ref}: {exc}") from None
        except _HttpError as exc:
            hint = {404: " (no such secret)", 403: " (permission denied or token invalid)"}
            raise SecretFetchError(f"{ref}: vault read failed: {exc}{hint.get(exc.status, '')}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SecretFetchError(f"{ref}: vault request failed: {_describe(exc)}") from None

        data = reply.get("data")
        if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
            raise SecretFetchError(f"{ref}: vault reply is not a KV v2 secret (is {mount} a KV v2 mount?)")
        fields = data["data"]
        if ref.field not in fields:
            raise SecretFetchError(f"{ref}: secret has no field {ref.field!r}")
        value = fields[ref.field]
        if value is None:
            raise SecretFetchError(f"{ref}: field {ref.field!r} is null")
        raw = (
            value.encode("utf-8")
            if isinstance(value, str)
            else json.dumps(value, separators=(",", ":")).encode("utf-8")
        )
        version = (data.get("metadata") or {}).get("version")
        return SecretValue(raw, "" if version is None else str(version))


class _LoginError(Exception):
    """A login failed (internal). The message is safe to show."""


def _describe(exc: BaseException) -> str:
    """A credential-free description of a transport failure."""
    if isinstance(exc, _HttpError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "TLS certificate verification failed"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "TLS error"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port} ({type(exc).__name__})"
    return type(exc).__name__
