"""The configuration, as declared settings (validated once, at load).

Every model forbids unknown keys: a typo must not silently disable a policy. Values that are
secrets (keys, passwords, tokens) are secret references, never literals (see
`relay.secrets.base.SecretRef`); the config file itself is therefore not secret.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import socket
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationInfo,
    field_validator,
    model_validator,
)

from relay.auth.passwords import check_hash_format
from relay.config.defaults import METRICS_PORT
from relay.config.units import Bind, Duration, HostPort, Rate, Size
from relay.proxy.url import ProxyUrl, check_credentials, parse_proxy_url
from relay.secrets.base import SecretRef
from relay.sign.keyset import SELECTOR_SYNTAX


def _secret_ref(value: str) -> str:
    SecretRef.parse(value)
    return value


def _network(value: object) -> str:
    try:
        return str(ipaddress.ip_network(str(value), strict=False))
    except ValueError:
        raise ValueError(f"expected a network like 10.0.0.0/8, got {value!r}") from None


def _ip(value: object) -> str:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise ValueError(f"expected an IP address, got {value!r}") from None


def _egress_ip(value: object) -> str | list[str]:
    if value == "auto":
        return "auto"
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("expected auto, an IP address or a list of IP addresses")
    out = []
    for item in items:
        try:
            out.append(str(ipaddress.ip_address(str(item))))
        except ValueError:
            raise ValueError(f"expected auto or IP addresses, got {item!r}") from None
    return out


def _domain(value: str) -> str:
    value = value.strip().lower().rstrip(".")
    if len(value) > 253 or any(len(label) > 63 for label in value.split(".")):
        # RFC 1035 §2.3.4: no DNS query (SPF, DKIM, DMARC, MX) could ask for it.
        raise ValueError("expected a domain name: labels of at most 63 characters, 253 in all")
    if not value or " " in value or "@" in value or ".." in value or not value.isprintable():
        raise ValueError(f"expected a domain name, got {value!r}")
    return value


def _sender_pattern(value: str) -> str:
    """A `senders` entry: a domain, `*.domain` for its subdomains, or a full address."""
    value = value.strip().lower()
    if "@" in value:
        local, _, domain = value.rpartition("@")
        if not local or not domain:
            raise ValueError(f"expected an address like app@example.com, got {value!r}")
        return f"{local}@{_domain(domain)}"
    if value.startswith("*."):
        return "*." + _domain(value[2:])
    return _domain(value)


def _proxy_url(value: object) -> ProxyUrl:
    # The dialer's own parser: a URL it would refuse is refused here, at load, with the key path.
    if isinstance(value, ProxyUrl):
        return value
    if not isinstance(value, str):
        raise ValueError("expected a proxy URL like socks5h://proxy.internal:1080")
    return parse_proxy_url(value, check=False)  # credentials: see UpstreamSettings._shape


SecretRefStr = Annotated[str, AfterValidator(_secret_ref)]
# Timeouts and intervals: 0 would time out every wait, or poll in a busy loop.
PositiveDuration = Annotated[Duration, Field(gt=0)]
# Parsed once; dumped (for the redacted config log and reload comparison) as written.
ProxyUrlField = Annotated[ProxyUrl, PlainValidator(_proxy_url), PlainSerializer(lambda url: url.text, return_type=str)]
Network = Annotated[str, BeforeValidator(_network)]
IpAddress = Annotated[str, BeforeValidator(_ip)]
Domain = Annotated[str, AfterValidator(_domain)]
SenderPattern = Annotated[str, AfterValidator(_sender_pattern)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenerSettings(Strict):
    name: str = Field(min_length=1, pattern=r"^[a-z0-9_-]+$")
    bind: Bind
    tls: Literal["starttls", "implicit", "none"]
    auth: Literal["required", "optional", "none"] = "required"
    proxy_protocol: bool = False
    # Who may send the PROXY header (the load balancer's addresses); others are refused.
    # None: any source (only safe where nothing but the balancer can reach the listener).
    proxy_protocol_from: list[Network] | None = None
    # Who an unauthenticated client (auth: optional/none) may send as. Default: the
    # domains that have DKIM keys.
    senders: list[SenderPattern] | None = None

    @field_validator("auth")
    @classmethod
    def _unauthenticated_only_on_loopback(cls, auth: str, info: ValidationInfo) -> str:
        # Unauthenticated submission is for a sidecar next to one application: only a
        # process in the same network namespace can reach a loopback bind.
        bind = info.data.get("bind")
        if auth != "required" and bind is not None and not bind.is_loopback:
            raise ValueError(
                f"auth: {auth} is only allowed on a loopback bind (127.0.0.1, ::1), "
                f"not {bind}; shared listeners need auth: required"
            )
        return auth

    @field_validator("proxy_protocol_from")
    @classmethod
    def _proxy_sources_need_proxy_protocol(cls, sources: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if sources is not None and not info.data.get("proxy_protocol"):
            raise ValueError("needs proxy_protocol: true")
        return sources


def _tls_version(value: object) -> object:
    # `min_version: 1.3` unquoted is a YAML float: the version the user meant.
    return str(value) if isinstance(value, float) else value


class TlsSettings(Strict):
    cert_file: Path | None = None
    key_file: Path | None = None
    min_version: Annotated[Literal["1.2", "1.3"], BeforeValidator(_tls_version)] = "1.2"

    @model_validator(mode="after")
    def _pair(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class UserSettings(Strict):
    username: str = Field(min_length=1)
    password_hash: str | None = None
    password: SecretRefStr | None = None
    senders: list[SenderPattern] = Field(min_length=1)

    @field_validator("password_hash")
    @classmethod
    def _hash_format(cls, value: str | None) -> str | None:
        if value is not None:
            check_hash_format(value)
        return value

    @model_validator(mode="after")
    def _one_credential(self) -> UserSettings:
        if (self.password_hash is None) == (self.password is None):
            raise ValueError("give exactly one of password_hash or password (a secret reference)")
        return self


class AuthThrottleSettings(Strict):
    """AUTH failures counted across connections (relay.auth.throttle)."""

    # Failures from one client address before its AUTH attempts are refused (421 4.7.0).
    per_address: int = Field(default=5, ge=1)
    # Failures for one username (from any address) before only already-verified
    # credentials pass for it.
    per_username: int = Field(default=10, ge=1)
    window: PositiveDuration = 600.0
    max_tracked: int = Field(default=10_000, ge=100, le=1_000_000)


class ClientSettings(Strict):
    networks: list[Network] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    users: list[UserSettings] = Field(default_factory=list)
    max_message_size: Size = 25 * 1024 * 1024
    # DATA held in memory by all sessions of the process together; beyond it, 452 4.3.1.
    max_bytes_in_flight: Size = 256 * 1024 * 1024
    max_recipients: int = Field(default=100, ge=1, le=10_000)
    # Failed AUTH attempts in one session before it is closed (421 4.7.0).
    max_auth_failures: int = Field(default=3, ge=1)
    auth_throttle: AuthThrottleSettings = Field(default_factory=AuthThrottleSettings)
    session_timeout: PositiveDuration = 300.0
    # The whole DATA phase (354 to the final dot) and the whole connection, however often
    # the client sends a byte: a slow client cannot hold a session forever.
    data_timeout: PositiveDuration = 600.0
    max_session_duration: PositiveDuration = 1800.0
    # Sessions open at once, per process (each `--workers` process has its own), and from one
    # client address (after the PROXY header). Past either: 421 at the greeting. Off per
    # address by default: behind a load balancer that hides client addresses every
    # connection comes from a few of its own.
    max_connections: int = Field(default=1000, ge=1)
    max_connections_per_address: int | None = Field(default=None, ge=1)
    # Bare LF line endings in DATA: read as CRLF (as Postfix 3.9 does), or refuse the message.
    # Only CRLF.CRLF ends DATA either way; a bare CR is always refused.
    bare_newline: Literal["normalize", "reject"] = "normalize"

    @field_validator("users")
    @classmethod
    def _unique_users(cls, users: list[UserSettings]) -> list[UserSettings]:
        seen: set[str] = set()
        for user in users:
            if user.username in seen:
                raise ValueError(f"username {user.username!r} appears twice")
            seen.add(user.username)
        return users


DEFAULT_SIGN_HEADERS = [
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "in-reply-to",
    "references",
    "list-unsubscribe",
    "list-unsubscribe-post",
]


class DkimKeySettings(Strict):
    domain: Domain
    selector: str = Field(pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
    key: SecretRefStr
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"


WRITABLE_SCHEMES = ("file", "aws-sm")  # where `relay dkim rotate` can write and delete


def _writable_ref(value: str) -> str:
    ref = SecretRef.parse(value)
    if ref.scheme not in WRITABLE_SCHEMES:
        raise ValueError(f"rotation writes here: use file:// or aws-sm://, not {ref.scheme}://")
    if ref.field:
        raise ValueError("takes no #field: the whole secret is the document")
    return value


def _key_ref_pattern(value: str) -> str:
    if "{selector}" not in value:
        raise ValueError("must contain {selector}, e.g. aws-sm://relay/dkim/{domain}/{selector}")
    try:
        sample = value.format(domain="example.com", selector="s20260101")
    except (KeyError, IndexError, ValueError):
        raise ValueError("only {domain} and {selector} may appear in braces") from None
    _writable_ref(sample)
    return value


def _selector_pattern(value: str) -> str:
    try:
        sample = value.format(date="20260101")
    except (KeyError, IndexError, ValueError):
        raise ValueError("only {date} (YYYYMMDD, UTC) may appear in braces") from None
    if "{date}" not in value:
        raise ValueError("must contain {date}, so that every rotation gets a new selector")
    if not re.fullmatch(SELECTOR_SYNTAX, sample):
        raise ValueError(f"gives selectors like {sample!r}, which is not a valid selector")
    return value


def _publish_target(value: str) -> str:
    if value == "print" or (value.startswith("route53:") and len(value) > len("route53:")):
        return value
    raise ValueError("expected print or route53:ZONE_ID")


class DkimKeySetSettings(Strict):
    """A domain whose signing keys are listed in a key-set document, kept by
    `relay dkim rotate` and re-read by every replica (the design is in `relay.rotate`)."""

    domain: Domain
    key_set: Annotated[str, AfterValidator(_writable_ref)]
    key: Annotated[str, AfterValidator(_key_ref_pattern)]
    selector: Annotated[str, AfterValidator(_selector_pattern)] = "s{date}"
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"
    bits: Literal[2048, 3072, 4096] = 2048
    publish: Annotated[str, AfterValidator(_publish_target)] = "print"


class Route53Settings(Strict):
    region: str | None = None
    endpoint_url: str | None = None


class DkimRotationSettings(Strict):
    # Both keys sign for `overlap` once DNS serves the new one; the old record and secret
    # go `grace` after the old key stopped signing (mail signed with it may still be in
    # flight or queued, and replicas stop within secrets.refresh).
    overlap: Duration = 7 * 86400.0
    grace: Duration = 7 * 86400.0
    # One run waits this long for the resolver to serve the new record, asking every
    # `dns_poll`; a later run keeps waiting.
    dns_wait: Duration = 1800.0
    dns_poll: PositiveDuration = 30.0
    record_ttl: int = Field(default=3600, ge=60, le=86400)
    max_key_age: Duration = 180 * 86400.0
    route53: Route53Settings = Field(default_factory=Route53Settings)


class DkimSettings(Strict):
    keys: list[DkimKeySettings] = Field(default_factory=list)
    sign_headers: list[str] = Field(default_factory=lambda: list(DEFAULT_SIGN_HEADERS))
    oversign: list[str] = Field(default_factory=lambda: ["from", "to", "subject"])
    when_no_key: Literal["reject", "relay_unsigned"] = "reject"
    # RFC 8301 §3.2: signers MUST use RSA keys of at least 1024 bits; we require 2048
    # unless this is set (for a legacy selector that cannot be rotated yet).
    allow_weak_rsa: bool = False
    # Domains whose keys come from a key-set document that rotation maintains.
    key_sets: list[DkimKeySetSettings] = Field(default_factory=list)
    rotation: DkimRotationSettings = Field(default_factory=DkimRotationSettings)

    @field_validator("sign_headers", "oversign")
    @classmethod
    def _header_names(cls, names: list[str]) -> list[str]:
        out = []
        for name in names:
            name = name.strip().lower()
            if not name or any(c in name for c in ": \t"):
                raise ValueError(f"not a header field name: {name!r}")
            if name == "dkim-signature":
                raise ValueError("dkim-signature cannot be signed (RFC 6376 §5.4)")
            out.append(name)
        return out

    @model_validator(mode="after")
    def _from_signed(self) -> DkimSettings:
        # RFC 6376 §5.4: the From header field MUST be signed.
        if "from" not in self.sign_headers:
            raise ValueError("sign_headers must include 'from' (RFC 6376 §5.4)")
        pairs = [(k.domain, k.selector) for k in self.keys]
        for pair in pairs:
            if pairs.count(pair) > 1:
                raise ValueError(f"selector {pair[1]!r} for {pair[0]} appears twice")
        return self

    @field_validator("key_sets")
    @classmethod
    def _one_key_set_per_domain(cls, key_sets: list[DkimKeySetSettings]) -> list[DkimKeySetSettings]:
        first: dict[str, int] = {}
        for i, entry in enumerate(key_sets):
            if entry.domain in first:
                raise ValueError(f"key_sets[{i}]: {entry.domain} already has key_sets[{first[entry.domain]}]")
            first[entry.domain] = i
        return key_sets


class AwsSettings(Strict):
    region: str | None = None
    endpoint_url: str | None = None


class VaultSettings(Strict):
    url: str
    mount: str = "secret"
    auth: Literal["token", "kubernetes", "approle"] = "token"
    token: SecretRefStr | None = None
    role: str | None = None
    role_id: str | None = None
    secret_id: SecretRefStr | None = None
    auth_mount: str | None = None
    kubernetes_token_path: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105 - a path
    namespace: str | None = None
    ca_file: Path | None = None

    @model_validator(mode="after")
    def _auth_inputs(self) -> VaultSettings:
        if self.auth == "token" and not self.token:
            raise ValueError("auth: token needs token (a secret reference, e.g. env://VAULT_TOKEN)")
        if self.auth == "kubernetes" and not self.role:
            raise ValueError("auth: kubernetes needs role")
        if self.auth == "approle" and not (self.role_id and self.secret_id):
            raise ValueError("auth: approle needs role_id and secret_id")
        return self


class SecretsSettings(Strict):
    refresh: PositiveDuration = 300.0
    aws: AwsSettings = Field(default_factory=AwsSettings)
    vault: VaultSettings | None = None


class PoolSettings(Strict):
    max_connections: int = Field(default=8, ge=1, le=1000)
    max_messages_per_connection: int = Field(default=100, ge=1)
    idle_timeout: Duration = 30.0
    # How long a transaction waits for a free upstream connection before 451 4.4.5.
    acquire_timeout: Duration = 30.0


# RFC 7628 / XOAUTH2 token endpoints of the providers relay knows; `token_url` overrides.
MICROSOFT_TOKEN_URL = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"  # noqa: S105 - a URL
MICROSOFT_SCOPE = "https://outlook.office365.com/.default"
GOOGLE_SCOPE = "https://mail.google.com/"
# An Entra ID tenant: its GUID or one of its verified domain names (contoso.onmicrosoft.com).
_TENANT = (
    r"^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|[A-Za-z0-9][A-Za-z0-9.-]*\.[A-Za-z]{2,})$"
)


def _https_url(value: str) -> str:
    if not re.fullmatch(r"https://[^\s/?#@]+(/[^\s#]*)?", value):
        raise ValueError(f"expected an https:// URL, got {value!r}")
    return value


class UpstreamAuthSettings(Strict):
    """How the relay authenticates to its upstream (`upstream.auth`).

    `plain`/`login` use `upstream.username` + `upstream.password`. `xoauth2`/`oauthbearer`
    (RFC 7628) use `upstream.username` (the mailbox, or the user impersonated) and an access
    token the relay gets itself from the `provider`'s token endpoint.
    """

    mechanism: Literal["plain", "login", "xoauth2", "oauthbearer"] | None = None
    provider: Literal["microsoft", "google", "generic"] | None = None
    tenant_id: str | None = Field(default=None, pattern=_TENANT)
    client_id: str | None = Field(default=None, min_length=1)
    client_secret: SecretRefStr | None = None
    # A PEM holding the certificate registered on the app and its private key.
    client_certificate: SecretRefStr | None = None
    # The service account's JSON key (Google), with domain-wide delegation.
    service_account: SecretRefStr | None = None
    token_url: Annotated[str, AfterValidator(_https_url)] | None = None
    scope: str | None = Field(default=None, min_length=1)
    # Extra CA bundle for the token endpoint (a TLS-inspecting egress, a private endpoint).
    ca_file: Path | None = None
    # Bound on one token request (connect through the proxy, TLS, reply).
    timeout: PositiveDuration = 10.0

    @model_validator(mode="after")
    def _provider_inputs(self) -> UpstreamAuthSettings:
        oauth = self.effective_mechanism in ("xoauth2", "oauthbearer")
        if not oauth:
            extra = [k for k in _OAUTH_KEYS if getattr(self, k) is not None]
            if extra:
                raise ValueError(
                    f"mechanism: {self.mechanism} uses upstream.password; "
                    f"{', '.join(extra)} are for xoauth2/oauthbearer"
                )
            return self
        if self.provider is None:
            raise ValueError(f"mechanism: {self.mechanism} needs provider: microsoft, google or generic")
        needed, allowed = _PROVIDER_KEYS[self.provider]
        for key in needed:
            if getattr(self, key) is None:
                raise ValueError(f"provider: {self.provider} needs {key}")
        for key in _OAUTH_KEYS:
            if key not in allowed and key != "provider" and getattr(self, key) is not None:
                raise ValueError(f"{key} is not used with provider: {self.provider}")
        if self.provider == "microsoft" and (self.client_secret is None) == (self.client_certificate is None):
            raise ValueError("provider: microsoft needs exactly one of client_secret or client_certificate")
        return self

    @property
    def effective_mechanism(self) -> str | None:
        """The SASL mechanism; None leaves the choice to the client library (plain/login)."""
        if self.mechanism is None and self.provider is not None:
            return "xoauth2"
        return self.mechanism

    @property
    def uses_token(self) -> bool:
        return self.effective_mechanism in ("xoauth2", "oauthbearer")

    @property
    def secret_refs(self) -> list[str]:
        return [r for r in (self.client_secret, self.client_certificate, self.service_account) if r]


_OAUTH_KEYS = (
    "provider",
    "tenant_id",
    "client_id",
    "client_secret",
    "client_certificate",
    "service_account",
    "token_url",
    "scope",
    "ca_file",
)
# provider → (keys it needs, keys it accepts)
_PROVIDER_KEYS = {
    "microsoft": (
        ("tenant_id", "client_id"),
        ("tenant_id", "client_id", "client_secret", "client_certificate", "token_url", "scope", "ca_file"),
    ),
    "google": (("service_account",), ("service_account", "token_url", "scope", "ca_file")),
    "generic": (
        ("token_url", "client_id", "client_secret"),
        ("token_url", "client_id", "client_secret", "scope", "ca_file"),
    ),
}


class UpstreamSettings(Strict):
    name: str | None = None
    mode: Literal["smarthost", "mx", "outbox"] = "smarthost"
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    # smarthost default: starttls; mx default: opportunistic (STARTTLS when offered).
    tls: Literal["starttls", "implicit", "none", "opportunistic", "require"] | None = None
    verify_tls: bool = True
    ca_file: Path | None = None
    username: str | None = None
    password: SecretRefStr | None = None
    proxy: ProxyUrlField | None = None
    proxy_password: SecretRefStr | None = None
    pool: PoolSettings = Field(default_factory=PoolSettings)
    connect_timeout: PositiveDuration = 30.0
    command_timeout: PositiveDuration = 300.0
    helo_name: str | None = None
    outbox_dir: Path | None = None
    auth: UpstreamAuthSettings | None = None
    # Spool mode: deliveries to this upstream are paced to this many recipients per second
    # (Amazon SES counts each recipient against its per-second quota).
    max_rate: Rate | None = None

    @model_validator(mode="after")
    def _shape(self) -> UpstreamSettings:
        if self.mode == "smarthost" and not self.host:
            raise ValueError("mode: smarthost needs host")
        if self.mode == "outbox" and not self.outbox_dir:
            raise ValueError("mode: outbox needs outbox_dir")
        if self.mode == "mx" and self.host:
            raise ValueError("mode: mx takes no host (recipients' MX hosts are looked up)")
        if self.auth is not None and self.auth.uses_token:
            if not self.username:
                raise ValueError(
                    f"auth.mechanism: {self.auth.effective_mechanism} needs username "
                    "(the mailbox, or the user impersonated)"
                )
            if self.password is not None:
                raise ValueError(
                    f"auth.mechanism: {self.auth.effective_mechanism} takes no password "
                    "(the relay gets an access token from auth.provider)"
                )
            if self.mode != "smarthost":
                raise ValueError("auth with a token provider is for mode: smarthost")
        elif (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        elif self.auth is not None and self.auth.mechanism and self.username is None:
            raise ValueError(f"auth.mechanism: {self.auth.mechanism} needs username and password")
        if self.tls in ("opportunistic", "require") and self.mode != "mx":
            raise ValueError(f"tls: {self.tls} is for mode: mx; smarthosts use starttls/implicit/none")
        if self.tls in ("starttls",) and self.mode == "mx":
            raise ValueError("mode: mx uses tls: opportunistic (default), require or none")
        if self.proxy is not None:
            # proxy_password is resolved later, but whether the proxy's protocol can carry
            # the credentials is known now.
            password = "<proxy_password>" if self.proxy_password is not None else self.proxy.password  # noqa: S105
            check_credentials(self.proxy.scheme, self.proxy.username, password)
        return self

    @property
    def effective_tls(self) -> str:
        if self.tls:
            return self.tls
        return "opportunistic" if self.mode == "mx" else "starttls"

    @property
    def effective_port(self) -> int:
        if self.port:
            return self.port
        if self.mode == "mx":
            return 25
        return 465 if self.effective_tls == "implicit" else 587

    @property
    def label(self) -> str:
        """Bounded metrics label and log name for this upstream."""
        if self.name:
            return self.name
        if self.mode == "smarthost":
            return f"{self.host}:{self.effective_port}"
        return self.mode


def _upstream_list(value: object) -> object:
    # `upstream` is one mapping (the common case) or a list tried in order (failover).
    return [value] if isinstance(value, dict) else value


class RouteSettings(Strict):
    sender_domain: SenderPattern
    upstream: str


class DnsSettings(Strict):
    nameservers: list[IpAddress] | None = None
    port: int = Field(default=53, ge=1, le=65535)
    timeout: PositiveDuration = 3.0
    attempts: int = Field(default=2, ge=1, le=10)


class SpfSettings(Strict):
    # `auto`, one address, or the list of NAT gateway / proxy public addresses.
    egress_ip: Annotated[str | list[str], PlainValidator(_egress_ip)] = "auto"
    ip_echo_url: str | None = None
    check_interval: PositiveDuration = 600.0
    on_fail: Literal["warn", "refuse"] = "warn"


class MetricsSettings(Strict):
    bind: Bind = HostPort("0.0.0.0", METRICS_PORT)


class LoggingSettings(Strict):
    format: Literal["json", "text"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


def _limit_rate(value: object) -> object:
    from relay.limits.rules import parse_rate

    return None if value is None else parse_rate(value)


def _redis_url(value: str) -> str:
    try:
        url = urlsplit(value)
        port = url.port
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from None
    if url.scheme not in ("redis", "rediss"):
        raise ValueError("expected redis://HOST:PORT/DB or rediss://HOST:PORT/DB (TLS)")
    if not url.hostname:
        raise ValueError("the URL has no host (expected redis://HOST:PORT/DB)")
    if url.password is not None:
        raise ValueError("no password in the URL: put it in limits.redis.password as a secret reference")
    if url.query or url.fragment:
        # redis-py reads every query argument as a connection option that overrides relay's
        # own (`?password=` would end up in the logs, `?ssl_cert_reqs=none` turns TLS
        # verification off, `?socket_timeout=` bypasses limits.redis.timeout).
        raise ValueError(
            "no options in the URL's query (password, ssl_cert_reqs, ...): relay sets them from "
            "limits.redis (a password goes in limits.redis.password as a secret reference)"
        )
    if port is not None and not 0 < port < 65536:
        raise ValueError("port must be 1-65535")
    if url.path.strip("/") and not url.path.strip("/").isdigit():
        raise ValueError(f"the path is the database number, got {url.path!r}")
    return value


LimitRate = Annotated[object, PlainValidator(_limit_rate)]
_LIMIT_FIELDS = ("rate", "burst", "rate_counts", "daily", "daily_recipients")


class _LimitFields(Strict):
    rate: LimitRate = None  # messages per time: 10/s, 600/m, 1000/h (a token bucket)
    burst: int | None = Field(default=None, ge=1)  # default: the rate's count
    # What the rate's tokens are: messages (default), or recipients (how SES counts its
    # sending rate: a message to 50 recipients takes 50 tokens).
    rate_counts: Literal["messages", "recipients"] | None = None
    daily: int | None = Field(default=None, ge=0)  # messages in a rolling 24 h
    daily_recipients: int | None = Field(default=None, ge=0)  # recipients in a rolling 24 h


class LimitSettings(_LimitFields):
    """One domain's limits, or the default of every user; an omitted field is not limited."""

    @model_validator(mode="after")
    def _burst_with_rate(self) -> LimitSettings:
        if self.burst is not None and self.rate is None:
            raise ValueError("burst needs a rate")
        if self.rate_counts is not None and self.rate is None:
            raise ValueError("rate_counts needs a rate")
        return self


class UserOverrideSettings(_LimitFields):
    """One user's overrides: each field given replaces the default's; null lifts it."""


class UserLimitSettings(LimitSettings):
    """The default for every authenticated user, and per-user overrides keyed by username:
    `{rate: 10/s, daily: 50000, billing: {daily: 200000}}`."""

    model_config = ConfigDict(extra="allow", frozen=True)
    __pydantic_extra__: dict[str, UserOverrideSettings] = Field(init=False)

    @model_validator(mode="before")
    @classmethod
    def _overrides_are_mappings(cls, data: object) -> object:
        if isinstance(data, dict):
            for key, value in data.items():
                if key not in _LIMIT_FIELDS and not isinstance(value, dict):
                    guess = difflib.get_close_matches(str(key), _LIMIT_FIELDS, n=1)
                    hint = f" (did you mean {guess[0]!r}?)" if guess else ""
                    raise ValueError(
                        f"{key!r} is neither a limit ({', '.join(_LIMIT_FIELDS)}) nor a user's "
                        f"overrides (a mapping like {key}: {{daily: 1000}}){hint}"
                    )
        return data

    @model_validator(mode="after")
    def _override_burst_with_rate(self) -> UserLimitSettings:
        for username, override in (self.model_extra or {}).items():
            if override.burst is not None and override.rate is None and self.rate is None:
                raise ValueError(f"{username}: burst needs a rate (its own or the default's)")
        return self


class RedisLimitSettings(Strict):
    url: Annotated[str, AfterValidator(_redis_url)]
    password: SecretRefStr | None = None
    # Per call, waiting for a connection included; then local counters. Above 0 (0 would be
    # a permanent fail open), at most 10 s (it is added to a message's latency).
    timeout: Annotated[Duration, Field(gt=0, le=10.0)] = 1.0
    key_prefix: str = Field(default="relay:limits:", min_length=1)
    ca_file: Path | None = None  # for rediss://, on top of the system's CAs


class LimitsSettings(Strict):
    users: UserLimitSettings = Field(default_factory=UserLimitSettings)
    domains: dict[Domain, LimitSettings] = Field(default_factory=dict)
    # Clients that did not authenticate (listeners with auth: optional or none), counted
    # together per listener: without it, not authenticating escapes the user limits.
    unauthenticated: LimitSettings | None = None
    backend: Literal["local", "redis"] = "local"
    redis: RedisLimitSettings | None = None

    @field_validator("domains", mode="before")
    @classmethod
    def _one_key_per_domain(cls, value: object) -> object:
        # Keys are normalized (case, a trailing dot): two spellings of one domain would
        # otherwise leave only the last one's limits, silently.
        if isinstance(value, dict):
            seen: dict[str, str] = {}
            for key in value:
                if not isinstance(key, str):
                    continue
                name = key.strip().lower().rstrip(".")
                if name in seen:
                    raise ValueError(f"{seen[name]!r} and {key!r} are the same domain: give its limits once")
                seen[name] = key
        return value

    @model_validator(mode="after")
    def _redis_section(self) -> LimitsSettings:
        if self.backend == "redis" and self.redis is None:
            raise ValueError("backend: redis needs redis: {url: redis://HOST:PORT/DB}")
        return self


class QueueSettings(Strict):
    """Store-and-forward (relay.queue): `spool` answers 250 once the signed message is on disk."""

    mode: Literal["passthrough", "spool"] = "passthrough"
    dir: Path = Path("/var/lib/relay/spool")
    # Backoff per recipient; the last step repeats. Each delay gets some jitter.
    retry: list[Duration] = Field(default_factory=lambda: [60.0, 300.0, 900.0, 3600.0, 14400.0], min_length=1)
    max_age: Duration = 5 * 86400.0
    max_bytes: Size = 10 * 1024**3
    bounce: Literal["dsn", "drop"] = "dsn"
    dead_letter_age: Duration = 14 * 86400.0

    @field_validator("retry")
    @classmethod
    def _positive_steps(cls, steps: list[float]) -> list[float]:
        if any(step <= 0 for step in steps):
            raise ValueError("every retry step must be longer than 0s")
        return steps


def _hostname(value: str) -> str:
    # It is the greeting's and EHLO's domain, the Received: header's "by", MAILER-DAEMON@it:
    # a space or a control character there would break each (RFC 5321 §4.1.1.1).
    if len(value) > 253:  # RFC 1035 §2.3.4: 255 octets on the wire, 253 characters written out
        raise ValueError(f"a host name is at most 253 characters, got {len(value)}")
    if not value or re.search(r"[\x00-\x20\x7f]", value):
        raise ValueError(f"expected a host name like relay.example.com, got {value!r}")
    return value


class Settings(Strict):
    # socket.gethostname, not getfqdn: no DNS lookup just to load a config.
    hostname: Annotated[str, AfterValidator(_hostname)] = Field(default_factory=socket.gethostname)
    listeners: list[ListenerSettings] = Field(min_length=1)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    clients: ClientSettings = Field(default_factory=ClientSettings)
    dkim: DkimSettings = Field(default_factory=DkimSettings)
    secrets: SecretsSettings = Field(default_factory=SecretsSettings)
    upstream: Annotated[list[UpstreamSettings], BeforeValidator(_upstream_list)] = Field(min_length=1)
    routes: list[RouteSettings] = Field(default_factory=list)
    dns: DnsSettings = Field(default_factory=DnsSettings)
    spf: SpfSettings = Field(default_factory=SpfSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    # `Received:` header added by the relay (RFC 5321 §4.4). `relay_only` names the relay
    # and the protocol but not the client's private address; `full` adds the client.
    received_header: Literal["off", "relay_only", "full"] = "relay_only"
    drain_timeout: Duration = 30.0
    data_dir: Path = Path("/var/lib/relay")
    limits: LimitsSettings | None = None
