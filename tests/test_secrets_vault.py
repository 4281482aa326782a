"""Vault KV v2 backend against a local fake Vault.

Vault is not installable here; this server implements the documented endpoints the backend
uses, with Vault's request and response shapes (https://developer.hashicorp.com/vault/api-docs):

- `GET  /v1/{mount}/data/{path}` (KV v2 read: `data.data`, `data.metadata.version`; 404 with
  `{"errors": []}` when missing; 403 `permission denied` for a missing/invalid/expired token),
- `GET  /v1/auth/token/lookup-self` (`data.ttl`, `data.renewable`),
- `POST /v1/auth/token/renew-self` (`auth.client_token`, `auth.lease_duration`, `auth.renewable`),
- `POST /v1/auth/{kubernetes mount}/login` (`role` + `jwt`),
- `POST /v1/auth/{approle mount}/login` (`role_id` + `secret_id`),

with the `X-Vault-Token` and `X-Vault-Namespace` headers (secrets live per namespace, as in
Vault Enterprise/HCP). The fake's clock is shared with the backend (`backend.clock`) so TTL
and renewal behaviour is tested without sleeping; one test uses real time.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import time
import uuid
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from relay.secrets.base import SecretFetchError, SecretRef
from relay.secrets.vault import VaultBackend
from tests.support.procs import dead_port

PEM = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIS3cr3tK3yMat3r1al0123456789\n-----END PRIVATE KEY-----\n"
ROOT_TOKEN = "hvs.R00tT0kenDoNotLeak"
K8S_JWT = "eyJhbGciOiJSUzI1NiJ9.k8s-service-account-jwt-DoNotLeak.sig"
ROLE_ID = "role-id-1234"
SECRET_ID = "s3cret-id-DoNotLeak"


# -- the fake Vault ----------------------------------------------------------------------------


@dataclass
class Token:
    ttl: int  # 0 = never expires
    renewable: bool
    issued: float
    max_ttl: int = 0  # 0 = unlimited renewals
    created: float = 0.0


@dataclass
class FakeVault:
    now: float = 1_000_000.0
    login_ttl: int = 60
    login_renewable: bool = True
    login_max_ttl: int = 0
    namespace: str | None = None  # when set, secrets are only visible in this namespace
    kv: dict = field(default_factory=dict)  # (namespace, mount, path) -> list of data versions
    tokens: dict = field(default_factory=dict)
    k8s_roles: dict = field(default_factory=lambda: {"relay": K8S_JWT})
    approles: dict = field(default_factory=lambda: {ROLE_ID: SECRET_ID})
    requests: list = field(default_factory=list)  # (method, path, headers, json body)
    issued_tokens: list = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    def put(self, mount: str, path: str, data: dict, namespace: str | None = None) -> int:
        versions = self.kv.setdefault((namespace or self.namespace, mount, path), [])
        versions.append(dict(data))
        return len(versions)

    def add_token(self, token: str, ttl: int = 0, renewable: bool = False) -> None:
        self.tokens[token] = Token(ttl, renewable, self.now, created=self.now)

    def revoke(self, token: str) -> None:
        self.tokens.pop(token, None)

    def calls(self, path: str) -> list:
        return [r for r in self.requests if r[1] == path]

    # -- helpers

    def _valid(self, request: web.Request) -> str | None:
        token = request.headers.get("X-Vault-Token")
        info = self.tokens.get(token) if token else None
        if info is None:
            return None
        if info.ttl and self.now >= info.issued + info.ttl:
            del self.tokens[token]
            return None
        return token

    def _issue(self) -> dict:
        token = "hvs." + secrets.token_urlsafe(16)
        self.tokens[token] = Token(self.login_ttl, self.login_renewable, self.now, self.login_max_ttl, self.now)
        self.issued_tokens.append(token)
        return self._auth_reply(token)

    def _auth_reply(self, token: str) -> dict:
        info = self.tokens[token]
        return {
            "request_id": str(uuid.uuid4()),
            "lease_id": "",
            "renewable": False,
            "lease_duration": 0,
            "data": None,
            "wrap_info": None,
            "warnings": None,
            "auth": {
                "client_token": token,
                "accessor": "acc-" + token[-6:],
                "policies": ["default", "relay"],
                "token_policies": ["default", "relay"],
                "metadata": {},
                "lease_duration": info.ttl,
                "renewable": info.renewable,
                "entity_id": "",
                "token_type": "service",
                "orphan": True,
            },
        }

    @staticmethod
    def _error(status: int, *errors: str) -> web.Response:
        return web.json_response({"errors": list(errors)}, status=status)

    # -- handler

    async def handle(self, request: web.Request) -> web.Response:
        body = None
        if request.method in ("POST", "PUT") and request.can_read_body:
            body = await request.json()
        path = request.match_info["tail"]
        self.requests.append((request.method, path, dict(request.headers), body))
        ns = request.headers.get("X-Vault-Namespace")

        if path == "auth/token/lookup-self" and request.method == "GET":
            token = self._valid(request)
            if token is None:
                return self._error(403, "permission denied")
            info = self.tokens[token]
            remaining = max(int(info.issued + info.ttl - self.now), 0) if info.ttl else 0
            return web.json_response(
                {
                    "data": {
                        "accessor": "acc",
                        "creation_ttl": info.ttl,
                        "display_name": "token",
                        "id": token,  # Vault really echoes the token here
                        "policies": ["default"],
                        "renewable": info.renewable,
                        "ttl": remaining,
                    }
                }
            )
        if path == "auth/token/renew-self" and request.method in ("POST", "PUT"):
            token = self._valid(request)
            if token is None:
                return self._error(403, "permission denied")
            info = self.tokens[token]
            if not info.renewable:
                return self._error(400, "lease is not renewable")
            ttl = info.ttl
            if info.max_ttl:
                ttl = int(min(ttl, info.created + info.max_ttl - self.now))
                if ttl <= 0:
                    return self._error(400, "past the max TTL, cannot renew")
            info.issued, info.ttl = self.now, ttl
            return web.json_response(self._auth_reply(token))
        if path.startswith("auth/") and path.endswith("/login") and request.method == "POST":
            mount = path[len("auth/") : -len("/login")]
            body = body or {}
            if mount in ("kubernetes", "k8s-prod"):
                role = body.get("role")
                if role not in self.k8s_roles:
                    return self._error(400, f'invalid role name "{role}"')
                if body.get("jwt") != self.k8s_roles[role]:
                    return self._error(403, "permission denied")
                return web.json_response(self._issue())
            if mount in ("approle", "approle-relay"):
                role_id, secret_id = body.get("role_id"), body.get("secret_id")
                if not role_id or self.approles.get(role_id) != secret_id:
                    return self._error(400, "invalid role or secret ID")
                return web.json_response(self._issue())
            return self._error(400, f"no handler for route 'auth/{mount}/login'")

        mount, sep, rest = path.partition("/data/")
        if sep and request.method == "GET":
            if self._valid(request) is None:
                return self._error(403, "permission denied")
            versions = self.kv.get((ns, mount, rest))
            if not versions:
                return self._error(404)
            return web.json_response(
                {
                    "request_id": str(uuid.uuid4()),
                    "lease_id": "",
                    "renewable": False,
                    "lease_duration": 0,
                    "data": {
                        "data": versions[-1],
                        "metadata": {
                            "created_time": "2024-01-01T00:00:00.000000Z",
                            "custom_metadata": None,
                            "deletion_time": "",
                            "destroyed": False,
                            "version": len(versions),
                        },
                    },
                    "wrap_info": None,
                    "warnings": None,
                    "auth": None,
                }
            )
        return self._error(404)


async def start_fake(vault: FakeVault, ssl_context: ssl.SSLContext | None = None):
    app = web.Application()
    app.router.add_route("*", "/v1/{tail:.*}", vault.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = runner.addresses[0][1]
    scheme = "https" if ssl_context else "http"
    return runner, f"{scheme}://127.0.0.1:{port}"


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def vault():
    fake = FakeVault()
    fake.add_token(ROOT_TOKEN)
    fake.put("secret", "relay/dkim/s1", {"private_key": PEM, "selector": "s1", "bits": 2048})
    runner, url = await start_fake(fake)
    fake.url = url
    yield fake
    await runner.cleanup()


@pytest.fixture
async def make_backend(vault):
    made = []

    def make(**kwargs):
        kwargs.setdefault("timeout", 5)
        b = VaultBackend(vault.url, **kwargs)
        b.clock = vault.clock
        made.append(b)
        return b

    yield make
    for b in made:
        await b.close()


@pytest.fixture
def jwt_file(tmp_path):
    path = tmp_path / "sa-token"
    path.write_text(K8S_JWT + "\n")
    return str(path)


REF = SecretRef.parse("vault://secret/relay/dkim/s1#private_key")


def assert_clean(message: str, vault: FakeVault | None = None) -> None:
    leaks = [ROOT_TOKEN, K8S_JWT, SECRET_ID, "S3cr3t", "Mat3r1al", "PRIVATE KEY"]
    if vault is not None:
        leaks += list(vault.issued_tokens)
    for leak in leaks:
        assert leak not in message, f"error message leaks {leak!r}: {message!r}"


# -- auth methods ------------------------------------------------------------------------------


async def test_token_auth_read(vault, make_backend):
    backend = make_backend(auth="token", token=ROOT_TOKEN)
    value = await backend.fetch(REF)
    assert value.data == PEM.encode()
    assert value.version == "1"
    lookups = vault.calls("auth/token/lookup-self")
    assert len(lookups) == 1 and lookups[0][2]["X-Vault-Token"] == ROOT_TOKEN
    read = vault.calls("secret/data/relay/dkim/s1")
    assert read[0][0] == "GET" and read[0][2]["X-Vault-Token"] == ROOT_TOKEN
    assert "X-Vault-Namespace" not in read[0][2]

    vault.put("secret", "relay/dkim/s1", {"private_key": "rotated", "bits": 4096})
    value = await backend.fetch(REF)
    assert value.data == b"rotated" and value.version == "2"
    bits = await backend.fetch(SecretRef.parse("vault://secret/relay/dkim/s1#bits"))
    assert bits.data == b"4096"
    assert len(vault.calls("auth/token/lookup-self")) == 1  # no lookup per fetch
    assert ROOT_TOKEN not in repr(backend)


async def test_kubernetes_login(vault, make_backend, jwt_file):
    backend = make_backend(auth="kubernetes", role="relay", kubernetes_token_path=jwt_file)
    assert (await backend.fetch(REF)).data == PEM.encode()
    logins = vault.calls("auth/kubernetes/login")
    assert len(logins) == 1
    assert logins[0][3] == {"role": "relay", "jwt": K8S_JWT}
    token = vault.issued_tokens[0]
    assert vault.calls("secret/data/relay/dkim/s1")[0][2]["X-Vault-Token"] == token
    await backend.fetch(REF)
    assert len(vault.calls("auth/kubernetes/login")) == 1  # token kept


async def test_kubernetes_custom_mount(vault, make_backend, jwt_file):
    backend = make_backend(auth="kubernetes", role="relay", kubernetes_token_path=jwt_file, auth_mount="k8s-prod")
    assert (await backend.fetch(REF)).data == PEM.encode()
    assert len(vault.calls("auth/k8s-prod/login")) == 1


async def test_kubernetes_bad_jwt_and_missing_file(vault, make_backend, tmp_path):
    bad = tmp_path / "bad"
    bad.write_text("not-the-jwt")
    backend = make_backend(auth="kubernetes", role="relay", kubernetes_token_path=str(bad))
    with pytest.raises(SecretFetchError) as info:
        await backend.fetch(REF)
    assert "kubernetes login" in str(info.value) and "HTTP 403" in str(info.value)
    assert "not-the-jwt" not in str(info.value)
    assert str(REF) in str(info.value)

    missing = make_backend(auth="kubernetes", role="relay", kubernetes_token_path=str(tmp_path / "nope"))
    with pytest.raises(SecretFetchError) as info:
        await missing.fetch(REF)
    assert "cannot read kubernetes service account token" in str(info.value)


async def test_approle_login(vault, make_backend):
    backend = make_backend(auth="approle", role_id=ROLE_ID, secret_id=SECRET_ID)
    assert (await backend.fetch(REF)).data == PEM.encode()
    logins = vault.calls("auth/approle/login")
    assert len(logins) == 1 and logins[0][3] == {"role_id": ROLE_ID, "secret_id": SECRET_ID}
    custom = make_backend(auth="approle", role_id=ROLE_ID, secret_id=SECRET_ID, auth_mount="approle-relay")
    assert (await custom.fetch(REF)).data == PEM.encode()
    assert len(vault.calls("auth/approle-relay/login")) == 1


async def test_approle_bad_secret_id(vault, make_backend):
    backend = make_backend(auth="approle", role_id=ROLE_ID, secret_id="wrong-S3cr3t-id")
    with pytest.raises(SecretFetchError) as info:
        await backend.fetch(REF)
    message = str(info.value)
    assert str(REF) in message and "approle login" in message and "HTTP 400" in message
    assert "wrong-S3cr3t-id" not in message
    assert_clean(message, vault)


async def test_namespace_header(vault, make_backend):
    vault.put("secret", "ns/only", {"k": "in-namespace"}, namespace="team-a")
    backend = make_backend(auth="approle", role_id=ROLE_ID, secret_id=SECRET_ID, namespace="team-a")
    assert (await backend.fetch(SecretRef.parse("vault://secret/ns/only#k"))).data == (b"in-namespace")
    assert vault.requests and all(r[2].get("X-Vault-Namespace") == "team-a" for r in vault.requests)
    # The root namespace does not see it.
    plain = make_backend(auth="token", token=ROOT_TOKEN)
    with pytest.raises(SecretFetchError, match="HTTP 404"):
        await plain.fetch(SecretRef.parse("vault://secret/ns/only#k"))


# -- token lifecycle ---------------------------------------------------------------------------


async def test_renewal_when_ttl_mostly_used(vault, make_backend):
    vault.login_ttl = 30
    backend = make_backend(auth="approle", role_id=ROLE_ID, secret_id=SECRET_ID)
    await backend.fetch(REF)
    token = vault.issued_tokens[0]

    vault.now += 15  # half the TTL: nothing to do
    await backend.fetch(REF)
    assert not vault.calls("auth/token/renew-self")

    vault.now += 6  # 21s of 30: past 2/3
    await backend.fetch(REF)
    renewals = vault.calls("auth/token/renew-self")
    assert len(renewals) == 1 and renewals[0][2]["X-Vault-Token"] == token
    assert len(vault.calls("auth/approle/login")) == 1

    vault.now += 15  # 36s after login, 15s after renewal: still valid thanks to the renewal
    await backend.fetch(REF)
    assert len(vault.calls("auth/token/renew-self")) == 1
    vault.now += 6
    await backend.fetch(REF)
    assert len(vault.calls("auth/token/renew-self")) == 2
    assert len(vault.calls("auth/approle/login")) == 1
    assert vault.issued_tokens == [token]


async def test_static_token_renewal(vault, make_backend):
    vault.add_token("hvs.static-renewable", ttl=30, renewable=True)
    backend = make_backend(auth="token", token="hvs.static-renewable")
    await backend.fetch(REF)
    vault.now += 25
    await backend.fetch(REF)
    assert len(vault.calls("auth/token/renew-self")) == 1
    vault.now += 25  # would have expired at +30 without the renewal
    assert (await backend.fetch(REF)).data == PEM.encode()


async def test_relogin_when_renewal_fails(vault, make_backend, jwt_file):
    vault.login_ttl = 30
    backend = make_backend(auth="kubernetes", role="relay", kubernetes_token_path=jwt_file)
    await backend.fetch(REF)
    vault.revoke(vault.issued_tokens[0])  # e.g. revoked by an operator
    vault.now += 21
    await backend.fetch(REF)  # renewal refused (403): log in again before reading
    assert len(vault.calls("auth/token/renew-self")) == 1
    assert len(vault.calls("auth/kubernetes/login")) == 2
    reads = vault.calls("secret/data/relay/dkim/s1")
    assert len(reads) == 2  # no 403 on the read: the new token was ready in time
    assert reads[-1][2]["X-Vault-Token"] == vault.issued_tokens[1]


async def test_relogin_at_max_ttl(vault, make_backend, jwt_file):
    vault.login_ttl, vault.login_max_ttl = 30, 35
    backend = make_backend(auth="kubernetes", role="relay", kubernetes_token_path=jwt_file)
    await backend.fetch(REF)
    vault.now += 21
    await backend.fetch(REF)  # renewed, but capped by max_ttl: 14s left
    assert len(vault.calls("auth/token/renew-self")) == 1
    vault.now += 14  # expired at max TTL: no renewal attempt, log in again
    assert (await backend.fetch(REF)).data == PEM.encode()
    assert len(vault.calls("auth/token/renew-self")) == 1
    assert len(vault.calls("auth/kubernetes/login")) == 2
    read = vault.calls("secret/data/relay/dkim/s1")[-1]
    assert read[2]["X-Vault-Token"] == vault.issued_tokens[1]


async def test_relogin_when_expired_or_not_renewable(vault, make_backend):
    vault.login_ttl, vault.login_renewable = 30, False
    backend = make_backend(auth="approle", role_id=ROLE_ID, secret_id=SECRET_ID)
    await backend.fetch(REF)
    vault.now += 21  # not renewable: replaced early instead of renewed
    await backend.fetch(REF)
    assert not vault.calls("auth/token/renew-self")
    assert len(vault.calls("auth/approle/login")) == 2

    vault.login_renewable = True
    vault.now += 100  # long expired: no renewal attempt, straight to login
    await backend.fetch(REF)
    assert not vault.calls("auth/token/renew-self")
    assert len(vault.calls("auth/approle/login")) == 3


async def test_revoked_token_relogin_once(vault, make_backend):
    backend = make_backend(auth="approle", role_id=ROLE_ID, secret_id=SECRET_ID)
    await backend.fetch(REF)
    vault.revoke(vault.issued_tokens[0])
    assert (await backend.fetch(REF)).data == PEM.encode()
    assert len(vault.calls("auth/approle/login")) == 2
    reads = vault.calls("secret/data/relay/dkim/s1")
    assert len(reads) == 3  # ok, 403, retried ok
    assert reads[-1][2]["X-Vault-Token"] == vault.issued_tokens[1]

    # Revoked again and the credentials no longer work: exactly one re-login, then an error.
    vault.revoke(vault.issued_tokens[1])
    vault.approles.clear()
    with pytest.raises(SecretFetchError) as info:
        await backend.fetch(REF)
    assert len(vault.calls("auth/approle/login")) == 3
    assert "approle login" in str(info.value)
    assert_clean(str(info.value), vault)


async def test_revoked_static_token(vault, make_backend):
    backend = make_backend(auth="token", token=ROOT_TOKEN)
    await backend.fetch(REF)
    vault.revoke(ROOT_TOKEN)
    with pytest.raises(SecretFetchError) as info:
        await backend.fetch(REF)
    message = str(info.value)
    assert str(REF) in message and "HTTP 403" in message and "permission denied" in message
    assert_clean(message, vault)


async def test_static_token_without_lookup_permission_still_reads(vault, make_backend):
    backend = make_backend(auth="token", token="hvs.unknown-to-lookup")
    vault.add_token("hvs.unknown-to-lookup")
    vault.tokens["hvs.unknown-to-lookup"].ttl = 0
    assert (await backend.fetch(REF)).data == PEM.encode()


async def test_real_time_renewal():
    """The default clock: a 2s token is renewed after ~1.4s of real time."""
    fake = FakeVault(now=time.monotonic(), login_ttl=2)  # backend keeps the default clock
    fake.put("secret", "relay/dkim/s1", {"private_key": PEM})
    runner, url = await start_fake(fake)
    backend = VaultBackend(url, auth="approle", role_id=ROLE_ID, secret_id=SECRET_ID)
    try:
        await backend.fetch(REF)
        await asyncio.sleep(1.5)
        fake.now = time.monotonic()
        await backend.fetch(REF)
        assert len(fake.calls("auth/token/renew-self")) == 1
        assert len(fake.calls("auth/approle/login")) == 1
    finally:
        await backend.close()
        await runner.cleanup()


# -- errors ------------------------------------------------------------------------------------


async def test_missing_secret_and_field(vault, make_backend):
    backend = make_backend(auth="approle", role_id=ROLE_ID, secret_id=SECRET_ID)
    missing = SecretRef.parse("vault://secret/relay/dkim/nope#private_key")
    with pytest.raises(SecretFetchError) as info:
        await backend.fetch(missing)
    message = str(info.value)
    assert str(missing) in message and "HTTP 404" in message
    assert_clean(message, vault)

    nofield = SecretRef.parse("vault://secret/relay/dkim/s1#public_key")
    with pytest.raises(SecretFetchError) as info:
        await backend.fetch(nofield)
    message = str(info.value)
    assert str(nofield) in message and "'public_key'" in message
    assert_clean(message, vault)

    wrong_mount = SecretRef.parse("vault://kv/relay/dkim/s1#private_key")
    with pytest.raises(SecretFetchError) as info:
        await backend.fetch(wrong_mount)
    assert str(wrong_mount) in str(info.value)
    assert_clean(str(info.value), vault)


async def test_unreachable_vault_is_a_fetch_error():
    backend = VaultBackend(f"http://127.0.0.1:{dead_port()}", token=ROOT_TOKEN, timeout=3)
    try:
        with pytest.raises(SecretFetchError) as info:
            await backend.fetch(REF)
    finally:
        await backend.close()
    assert str(REF) in str(info.value) and "cannot connect" in str(info.value)
    assert_clean(str(info.value))


async def test_tls_with_ca_file(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))

    fake = FakeVault()
    fake.add_token(ROOT_TOKEN)
    fake.put("secret", "relay/dkim/s1", {"private_key": PEM})
    runner, url = await start_fake(fake, ssl_context=server_ctx)
    trusted = VaultBackend(url, token=ROOT_TOKEN, ca_file=str(ca_path))
    untrusted = VaultBackend(url, token=ROOT_TOKEN)
    try:
        assert (await trusted.fetch(REF)).data == PEM.encode()
        with pytest.raises(SecretFetchError) as info:
            await untrusted.fetch(REF)
        assert "TLS" in str(info.value) or "certificate" in str(info.value)
        assert_clean(str(info.value))
    finally:
        await trusted.close()
        await untrusted.close()
        await runner.cleanup()


def test_constructor_validation():
    with pytest.raises(ValueError, match="token"):
        VaultBackend("http://127.0.0.1:1")
    with pytest.raises(ValueError, match="role"):
        VaultBackend("http://127.0.0.1:1", auth="kubernetes")
    with pytest.raises(ValueError, match="role_id"):
        VaultBackend("http://127.0.0.1:1", auth="approle", role_id="x")
    with pytest.raises(ValueError, match="one of"):
        VaultBackend("http://127.0.0.1:1", auth="ldap")
    b = VaultBackend("http://127.0.0.1:1", token=ROOT_TOKEN)
    assert b.scheme == "vault" and ROOT_TOKEN not in repr(b)


async def test_concurrent_fetches_share_one_relogin(vault, make_backend):
    backend = make_backend(auth="approle", role_id=ROLE_ID, secret_id=SECRET_ID)
    await backend.fetch(REF)
    vault.revoke(vault.issued_tokens[0])
    values = await asyncio.gather(*(backend.fetch(REF) for _ in range(5)))
    assert {v.data for v in values} == {PEM.encode()}
    assert len(vault.calls("auth/approle/login")) == 2
