"""`upstream.auth` settings for the relay, built against a test `AuthServer`: each builder
registers a client there, writes its secrets to files and returns what the relay gets
(the validated settings and a secret lookup by reference)."""

from __future__ import annotations

from pathlib import Path

from relay.config.schema import UpstreamAuthSettings
from relay.oauth.providers import token_source
from relay.proxy import dialer_for
from tests.support.oauth import AuthServer

MAILBOX = "sender@example.com"


def _secret_files(tmp_path: Path):
    """Secret references as files, the way the relay reads them (through a lookup)."""
    store: dict[str, bytes] = {}

    def put(name: str, value: bytes) -> str:
        path = tmp_path / name
        path.write_bytes(value)
        ref = f"file://{path}"
        store[ref] = value
        return ref

    return put, store.get


def microsoft(auth: AuthServer, tmp_path: Path, *, certificate: bool = False, **extra):
    app, creds = auth.register_microsoft_app(tmp_path, mailbox=MAILBOX, certificate=certificate)
    put, lookup = _secret_files(tmp_path)
    settings = {
        "mechanism": "xoauth2",
        "provider": "microsoft",
        "tenant_id": app.tenant,
        "client_id": app.client_id,
        "token_url": auth.microsoft_url(app.tenant),
        "ca_file": str(auth.pki.ca_file),
        "timeout": "5s",
    }
    if certificate:
        settings["client_certificate"] = put("m365.pem", creds.certificate_pem.read_bytes())
    else:
        settings["client_secret"] = put("m365-secret", creds.client_secret.encode())
    settings.update(extra)
    return app, creds, UpstreamAuthSettings.model_validate(settings), lookup


def google(auth: AuthServer, tmp_path: Path, *, user: str = MAILBOX, **extra):
    account, creds = auth.register_service_account(tmp_path, users={MAILBOX})
    put, lookup = _secret_files(tmp_path)
    settings = {
        "mechanism": "xoauth2",
        "provider": "google",
        "service_account": put("sa.json", creds.service_account_json.read_bytes()),
        "ca_file": str(auth.pki.ca_file),
        "timeout": "5s",
    }
    settings.update(extra)
    return account, creds, UpstreamAuthSettings.model_validate(settings), lookup


def generic(auth: AuthServer, tmp_path: Path, **extra):
    client_id, secret = auth.register_generic_client()
    put, lookup = _secret_files(tmp_path)
    settings = {
        "mechanism": "oauthbearer",
        "provider": "generic",
        "token_url": auth.generic_url,
        "client_id": client_id,
        "client_secret": put("generic-secret", secret.encode()),
        "scope": "smtp.send",
        "ca_file": str(auth.pki.ca_file),
        "timeout": "5s",
    }
    settings.update(extra)
    return client_id, secret, UpstreamAuthSettings.model_validate(settings), lookup


def source_for(settings: UpstreamAuthSettings, lookup, *, user: str = MAILBOX, proxy: str | None = None):
    return token_source(settings, user, dialer_for(proxy, connect_timeout=5, handshake_timeout=5), lookup)
