"""A local OAuth 2.0 authorization server over HTTPS, for tests.

It implements the documented token endpoints the relay talks to, checking requests as the
real ones do, and issues short-lived bearer tokens that `OAuthUpstream` accepts while live:

    POST /{tenant}/oauth2/v2.0/token   Entra ID v2.0 client credentials: client_secret, or a
                                        client_assertion JWT (PS256/RS256) verified against
                                        the registered certificate (x5t#S256 or x5t), with
                                        aud = this endpoint, iss = sub = client_id, exp, jti
    POST /token                         Google token_uri: the JWT-bearer grant, the assertion
                                        verified against the service account's public key
                                        (kid), iss, aud, scope, sub, exp - iat <= 1 hour
    POST /oauth/token                   generic client credentials, client_secret_basic

Errors follow the providers' documented replies (RFC 6749 §5.2 JSON; Entra ID adds AADSTS
codes). Switches (`behaviour`): `delay` (slow), `unavailable` (503), `fail` =
"invalid_client" | "consent_missing", `token_lifetime`. `stop()` takes it down (connection
refused); `start()` brings it back on the same port.

Assertions are verified with PyJWT, not with the library the relay signs them with.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import hashlib
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote_plus

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.certs import TestPki
from tests.support.procs import free_port

MICROSOFT_SCOPE = "https://outlook.office365.com/.default"
GOOGLE_SCOPE = "https://mail.google.com/"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
LEEWAY = 60


@dataclass
class Behaviour:
    delay: float = 0.0  # seconds before answering (a slow endpoint)
    unavailable: bool = False  # 503 temporarily_unavailable
    fail: str | None = None  # "invalid_client" | "consent_missing"
    token_lifetime: int = 3600


@dataclass
class Issued:
    value: str
    provider: str
    client: str  # client_id, or the service account's email
    scope: str
    expires_at: float  # time.time()
    subject: str | None = None  # the user a Google token acts for
    revoked: bool = False


@dataclass
class MicrosoftApp:
    tenant: str
    client_id: str
    secret: str | None = None
    certificates: list[x509.Certificate] = field(default_factory=list)
    mailboxes: set[str] = field(default_factory=set)  # SMTP.SendAsApp granted for these


@dataclass
class ServiceAccount:
    email: str
    key_id: str
    public_key: rsa.RSAPublicKey
    users: set[str]  # the domain's users it may impersonate (domain-wide delegation)
    scopes: set[str] = field(default_factory=lambda: {GOOGLE_SCOPE})


@dataclass
class Credentials:
    """Files a test hands to the relay as secret references."""

    client_secret: str | None = None
    certificate_pem: Path | None = None
    service_account_json: Path | None = None


class AuthServer:
    def __init__(
        self, pki: TestPki, *, host: str = "127.0.0.1", port: int | None = None, hostname: str = "localhost"
    ) -> None:
        self.pki = pki
        self.host = host
        self.port = port or free_port(host)
        self.hostname = hostname
        self.behaviour = Behaviour()
        self.lock = threading.Lock()
        self.apps: dict[tuple[str, str], MicrosoftApp] = {}
        self.service_accounts: dict[str, ServiceAccount] = {}
        self.generic_clients: dict[str, str] = {}
        self.issued: dict[str, Issued] = {}
        self.requests = 0
        self.inflight = 0
        self.max_inflight = 0
        self.peers: list[str] = []
        self.assertions: list[tuple[dict, dict]] = []  # (header, claims) of verified JWTs
        self.errors: list[dict] = []  # error bodies sent
        self._seen_jti: set[str] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None

    # -- URLs -------------------------------------------------------------------------------

    @property
    def base(self) -> str:
        return f"https://{self.hostname}:{self.port}"

    def microsoft_url(self, tenant: str) -> str:
        return f"{self.base}/{tenant}/oauth2/v2.0/token"

    @property
    def google_url(self) -> str:
        return f"{self.base}/token"

    @property
    def generic_url(self) -> str:
        return f"{self.base}/oauth/token"

    # -- registrations ----------------------------------------------------------------------

    def register_microsoft_app(
        self, directory: Path, *, tenant: str | None = None, mailbox: str, certificate: bool = False
    ) -> tuple[MicrosoftApp, Credentials]:
        """An app registration with Mail.Send-as-app on `mailbox`; a secret, or a certificate
        whose key (with the certificate) is written to a PEM for the relay."""
        app = MicrosoftApp(tenant or str(uuid.uuid4()), str(uuid.uuid4()), mailboxes={mailbox})
        creds = Credentials()
        if certificate:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            cert = _self_signed(key, f"relay {app.client_id}")
            app.certificates.append(cert)
            pem = directory / f"{app.client_id}.pem"
            pem.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
                + cert.public_bytes(serialization.Encoding.PEM)
            )
            pem.chmod(0o600)
            creds.certificate_pem = pem
        else:
            # Entra ID secrets look like this: 40 characters with ~ . _ -
            app.secret = secrets.token_urlsafe(30)[:36] + "~Q8." + "x"
            creds.client_secret = app.secret
        self.apps[(app.tenant, app.client_id)] = app
        return app, creds

    def register_service_account(self, directory: Path, *, users: set[str]) -> tuple[ServiceAccount, Credentials]:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_id = secrets.token_hex(20)
        email = f"relay-{secrets.token_hex(3)}@relay-project.iam.gserviceaccount.com"
        account = ServiceAccount(email, key_id, key.public_key(), set(users))
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        info = {
            "type": "service_account",
            "project_id": "relay-project",
            "private_key_id": key_id,
            "private_key": pem,
            "client_email": email,
            "client_id": str(secrets.randbelow(10**21)),
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.google_url,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": f"https://www.googleapis.com/robot/v1/metadata/x509/{email}",
            "universe_domain": "googleapis.com",
        }
        path = directory / f"{key_id}.json"
        path.write_text(json.dumps(info, indent=2))
        path.chmod(0o600)
        self.service_accounts[key_id] = account
        return account, Credentials(service_account_json=path)

    def register_generic_client(self) -> tuple[str, str]:
        client_id, secret = f"relay-{secrets.token_hex(4)}", secrets.token_urlsafe(24)
        self.generic_clients[client_id] = secret
        return client_id, secret

    # -- what the upstream asks -------------------------------------------------------------

    def check(self, token: str, user: str) -> str | None:
        """None if `token` may send as `user` now, else the RFC 6750 error
        (invalid_token, insufficient_scope)."""
        with self.lock:
            issued = self.issued.get(token)
        if issued is None or issued.revoked or time.time() >= issued.expires_at:
            return "invalid_token"
        if issued.provider == "microsoft":
            app = next((a for a in self.apps.values() if a.client_id == issued.client), None)
            if app is None or user.lower() not in app.mailboxes:
                return "insufficient_scope"
        elif issued.provider == "google":
            if issued.subject != user or GOOGLE_SCOPE not in issued.scope.split():
                return "insufficient_scope"
        return None

    def revoke_all(self) -> None:
        """Tokens stop working before they expire (a permission change, a revocation)."""
        with self.lock:
            for issued in self.issued.values():
                issued.revoked = True

    def tokens(self) -> list[str]:
        with self.lock:
            return list(self.issued)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> AuthServer:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup() if self._runner else asyncio.sleep(0))
            loop.close()

        self._thread = threading.Thread(target=run, name="oauth-server", daemon=True)
        self._thread.start()
        if not ready.wait(10) or failure:
            raise RuntimeError(f"authorization server did not start: {failure}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._thread = self._loop = self._runner = None

    def __enter__(self) -> AuthServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._microsoft)
        app.router.add_post("/token", self._google)
        app.router.add_post("/oauth/token", self._generic)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.host, self.port, ssl_context=self.pki.server_context(), reuse_address=True
        )
        await site.start()

    # -- endpoints --------------------------------------------------------------------------

    async def _microsoft(self, request: web.Request) -> web.Response:
        return await self._handle(request, self._microsoft_grant)

    async def _google(self, request: web.Request) -> web.Response:
        return await self._handle(request, self._google_grant)

    async def _generic(self, request: web.Request) -> web.Response:
        return await self._handle(request, self._generic_grant)

    async def _handle(self, request: web.Request, grant) -> web.Response:
        with self.lock:
            self.requests += 1
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            self.peers.append(request.remote or "")
        try:
            b = self.behaviour
            if b.delay:
                await asyncio.sleep(b.delay)
            if b.unavailable:
                return self._error(
                    503, "temporarily_unavailable", "The service is temporarily unavailable. Try again later."
                )
            if request.content_type != "application/x-www-form-urlencoded":
                return self._error(400, "invalid_request", "Content-Type must be application/x-www-form-urlencoded")
            form = await request.post()
            return grant(request, {k: str(v) for k, v in form.items()})
        finally:
            with self.lock:
                self.inflight -= 1

    def _microsoft_grant(self, request: web.Request, form: dict[str, str]) -> web.Response:
        tenant = request.match_info["tenant"]
        if not any(t == tenant for t, _ in self.apps):
            return self._aad(400, "invalid_request", 90002, f"Tenant '{tenant}' not found.")
        if form.get("grant_type") != "client_credentials":
            return self._aad(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
        client_id = form.get("client_id", "")
        app = self.apps.get((tenant, client_id))
        assertion = form.get("client_assertion")
        if app is None and assertion:
            client_id = str(_unverified_claims(assertion).get("sub", ""))
            app = self.apps.get((tenant, client_id))
        if app is None:
            return self._aad(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory '{tenant}'.",
            )
        scope = form.get("scope", "")
        if not scope.endswith("/.default"):
            return self._aad(
                400,
                "invalid_scope",
                1002012,
                f"The provided value for scope {scope} is not valid. Client credential flows must "
                "have a scope value with /.default suffixed to the resource identifier.",
            )
        if scope != MICROSOFT_SCOPE:
            return self._aad(400, "invalid_resource", 500011, "The resource principal was not found in the tenant.")
        if "client_secret" in form and assertion:
            return self._aad(400, "invalid_request", 90014, "Only one client credential may be sent.")
        if assertion:
            if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
                return self._aad(400, "invalid_request", 50027, "Invalid client_assertion_type.")
            problem = self._verify_client_assertion(assertion, app, self.microsoft_url(tenant))
            if problem:
                return self._aad(401, "invalid_client", 700027, problem)
        elif "client_secret" in form:
            if app.secret is None or not secrets.compare_digest(form["client_secret"], app.secret):
                return self._aad(
                    401,
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request is "
                    "the client secret value, not the client secret ID, for a secret added to app "
                    f"'{client_id}'.",
                )
        else:
            return self._aad(
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
            )
        if self.behaviour.fail == "invalid_client":
            return self._aad(
                401, "invalid_client", 7000222, f"The provided client secret keys for app '{client_id}' are expired."
            )
        if self.behaviour.fail == "consent_missing":
            return self._aad(
                400,
                "invalid_grant",
                65001,
                f"The user or administrator has not consented to use the application with ID "
                f"'{client_id}'. Send an interactive authorization request for this user and resource.",
            )
        token = self._issue("microsoft", client_id, scope)
        lifetime = self.behaviour.token_lifetime
        return web.json_response(
            {"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": token}
        )

    def _verify_client_assertion(self, assertion: str, app: MicrosoftApp, audience: str) -> str | None:
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            return "The client assertion is not a JWT."
        if header.get("alg") not in ("PS256", "RS256"):
            return f"The client assertion algorithm {header.get('alg')!r} is not supported."
        certificate = None
        for cert in app.certificates:
            if header.get("x5t#S256") == _b64url(cert.fingerprint(hashes.SHA256())) or header.get("x5t") == _b64url(
                cert.fingerprint(hashes.SHA1())
            ):  # noqa: S303 - x5t is SHA-1
                certificate = cert
        if certificate is None:
            return (
                "The certificate with identifier used to sign the client assertion is not registered on "
                f"application. [Reason - The key was not found., Thumbprint of key used by client: "
                f"'{header.get('x5t#S256') or header.get('x5t')}']"
            )
        try:
            claims = jwt.decode(
                assertion,
                certificate.public_key(),
                algorithms=[header["alg"]],
                audience=audience,
                issuer=app.client_id,
                leeway=LEEWAY,
                options={"require": ["exp", "iss", "sub", "aud", "jti"]},
            )
        except jwt.InvalidAudienceError:
            return (
                f"The audience claim value is invalid for current resource. Audience claim is "
                f"'{_unverified_claims(assertion).get('aud')}', request url is '{audience}'."
            )
        except jwt.PyJWTError as exc:
            return f"Client assertion failed signature validation. ({exc})"
        if claims["sub"] != app.client_id:
            return "The client assertion's sub claim must be the client_id."
        if claims["jti"] in self._seen_jti:
            return "The client assertion was already used (jti replay)."
        self._seen_jti.add(claims["jti"])
        self.assertions.append((header, claims))
        return None

    def _google_grant(self, request: web.Request, form: dict[str, str]) -> web.Response:
        if form.get("grant_type") != JWT_BEARER:
            return self._error(400, "unsupported_grant_type", f"Invalid grant_type: {form.get('grant_type')}")
        assertion = form.get("assertion", "")
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            return self._error(400, "invalid_request", "Invalid JWT.")
        account = self.service_accounts.get(str(header.get("kid")))
        if account is None or header.get("alg") != "RS256" or self.behaviour.fail == "invalid_client":
            return self._error(400, "invalid_grant", "Invalid JWT Signature.")
        try:
            claims = jwt.decode(
                assertion,
                account.public_key,
                algorithms=["RS256"],
                audience=self.google_url,
                issuer=account.email,
                leeway=LEEWAY,
                options={"require": ["exp", "iat", "iss", "aud"]},
            )
        except jwt.InvalidSignatureError:
            return self._error(400, "invalid_grant", "Invalid JWT Signature.")
        except jwt.PyJWTError:
            return self._error(
                400,
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable "
                "timeframe. Check your iat and exp values in the JWT claim.",
            )
        if claims["exp"] - claims["iat"] > 3600:
            return self._error(
                400,
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable "
                "timeframe. Check your iat and exp values in the JWT claim.",
            )
        self.assertions.append((header, claims))
        scopes = set(str(claims.get("scope", "")).split())
        subject = claims.get("sub")
        if subject is not None and subject not in account.users:
            return self._error(400, "invalid_grant", "Invalid email or User ID")
        if not scopes or not scopes <= account.scopes or self.behaviour.fail == "consent_missing":
            return self._error(
                401,
                "unauthorized_client",
                "Client is unauthorized to retrieve access tokens using this method, or client not "
                "authorized for any of the scopes requested.",
            )
        token = self._issue("google", account.email, " ".join(sorted(scopes)), subject=subject)
        return web.json_response(
            {"access_token": token, "expires_in": self.behaviour.token_lifetime, "token_type": "Bearer"}
        )

    def _generic_grant(self, request: web.Request, form: dict[str, str]) -> web.Response:
        client_id, secret = _basic_credentials(request.headers.get("Authorization", ""))
        if client_id is None:
            return self._error(401, "invalid_client", "Client authentication failed.", basic=True)
        if form.get("grant_type") != "client_credentials":
            return self._error(400, "unsupported_grant_type", "grant_type must be client_credentials")
        known = self.generic_clients.get(client_id)
        if known is None or not secrets.compare_digest(known, secret or "") or self.behaviour.fail == "invalid_client":
            return self._error(401, "invalid_client", "Client authentication failed.", basic=True)
        if self.behaviour.fail == "consent_missing":
            return self._error(400, "access_denied", "The client is not allowed this scope.")
        token = self._issue("generic", client_id, form.get("scope", ""))
        return web.json_response(
            {"access_token": token, "token_type": "Bearer", "expires_in": self.behaviour.token_lifetime}
        )

    # -- replies ----------------------------------------------------------------------------

    def _issue(self, provider: str, client: str, scope: str, subject: str | None = None) -> str:
        if provider == "microsoft":
            # The shape and size of an Exchange Online app token: a JWT of ~1.5 KB.
            parts = [
                _b64url(json.dumps({"typ": "JWT", "alg": "RS256", "x5t": secrets.token_hex(8)}).encode()),
                _b64url(secrets.token_bytes(900)),
                _b64url(secrets.token_bytes(256)),
            ]
            value = ".".join(parts)
        else:
            value = "ya29." + secrets.token_urlsafe(150)
        lifetime = self.behaviour.token_lifetime
        with self.lock:
            self.issued[value] = Issued(value, provider, client, scope, time.time() + lifetime, subject)
        return value

    def _aad(self, status: int, error: str, code: int, text: str) -> web.Response:
        trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
        stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
        body = {
            "error": error,
            "error_description": f"AADSTS{code}: {text} Trace ID: {trace} Correlation ID: {correlation} "
            f"Timestamp: {stamp}",
            "error_codes": [code],
            "timestamp": stamp,
            "trace_id": trace,
            "correlation_id": correlation,
            "error_uri": f"https://login.microsoftonline.com/error?code={code}",
        }
        return self._json_error(status, body)

    def _error(self, status: int, error: str, description: str, *, basic: bool = False) -> web.Response:
        response = self._json_error(status, {"error": error, "error_description": description})
        if basic:
            response.headers["WWW-Authenticate"] = 'Basic realm="token"'
        return response

    def _json_error(self, status: int, body: dict) -> web.Response:
        with self.lock:
            self.errors.append(body)
        return web.json_response(body, status=status)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unverified_claims(token: str) -> dict:
    try:
        return jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return {}


def _basic_credentials(header: str) -> tuple[str | None, str | None]:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        decoded = base64.b64decode(value, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        return None, None
    # RFC 6749 §2.3.1: both parts are form-urlencoded before Basic encoding.
    return unquote_plus(client_id), unquote_plus(secret)


def _self_signed(key: rsa.RSAPrivateKey, name: str) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)])
    start = datetime.datetime.fromtimestamp(time.time() - 3600, datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )


def fingerprint_sha256(cert: x509.Certificate) -> str:
    return _b64url(hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest())
