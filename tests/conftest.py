"""Shared fixtures: test PKI, DKIM keys, a real upstream, and the relay as a subprocess."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from tests.support.certs import TestPki, make_pki
from tests.support.procs import free_port
from tests.support.relayproc import RelayProcess, loopback_bind
from tests.support.upstream import Upstream

# The scrypt hash of "app-password" for user "app" (made once with `relay hash-password`).
APP_PASSWORD = "app-password"


@dataclass
class DkimKeys:
    rsa_path: Path
    ed_path: Path
    rsa_txt: bytes
    ed_txt: bytes

    def dns(self, domain: str = "example.com", rsa_selector: str = "s1", ed_selector: str = "ed1"):
        records = {
            f"{rsa_selector}._domainkey.{domain}.".encode(): self.rsa_txt,
            f"{ed_selector}._domainkey.{domain}.".encode(): self.ed_txt,
        }

        def lookup(name: bytes, timeout: int = 5) -> bytes | None:
            return records.get(name)

        return lookup


def verify_all(message: bytes, dnsfunc) -> list[bool]:
    """Verify every DKIM-Signature on `message` with dkimpy; one bool per signature."""
    d = dkim.DKIM(message)
    count = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
    return [d.verify(idx=i, dnsfunc=dnsfunc) for i in range(count)]


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> TestPki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def dkim_keys(tmp_path_factory) -> DkimKeys:
    directory = tmp_path_factory.mktemp("dkim")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    rsa_path, ed_path = directory / "s1.pem", directory / "ed1.pem"
    for path, key in ((rsa_path, rsa_key), (ed_path, ed_key)):
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        os.chmod(path, 0o600)
    rsa_pub = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ed_pub = ed_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return DkimKeys(
        rsa_path,
        ed_path,
        b"v=DKIM1; k=rsa; p=" + base64.b64encode(rsa_pub),
        b"v=DKIM1; k=ed25519; p=" + base64.b64encode(ed_pub),
    )


@pytest.fixture(scope="session")
def app_password_hash() -> str:
    from relay.auth.passwords import hash_password

    return hash_password(APP_PASSWORD)


@pytest.fixture
def upstream(pki) -> Iterator[Upstream]:
    with Upstream(tls="starttls", server_context=pki.server_context()) as up:
        yield up


def relay_config(
    tmp_path: Path, pki: TestPki, dkim_keys: DkimKeys, upstream_port: int, password_hash: str, **overrides: Any
) -> dict[str, Any]:
    """A complete production-shaped config on loopback ports."""
    config: dict[str, Any] = {
        "hostname": "relay.test",
        "listeners": [
            {"name": "submission", "bind": loopback_bind(), "tls": "starttls", "auth": "required"},
            {"name": "submissions", "bind": loopback_bind(), "tls": "implicit", "auth": "required"},
        ],
        "tls": {"cert_file": str(pki.cert_file), "key_file": str(pki.key_file), "min_version": "1.2"},
        "clients": {
            "networks": ["127.0.0.0/8"],
            "users": [
                {"username": "app", "password_hash": password_hash, "senders": ["example.com"]},
            ],
            "max_message_size": "1MiB",
            "max_recipients": 5,
        },
        "dkim": {
            "keys": [
                {"domain": "example.com", "selector": "s1", "key": f"file://{dkim_keys.rsa_path}"},
                {
                    "domain": "example.com",
                    "selector": "ed1",
                    "key": f"file://{dkim_keys.ed_path}",
                    "algorithm": "ed25519-sha256",
                },
            ],
        },
        "upstream": {
            "host": "localhost",
            "port": upstream_port,
            "tls": "starttls",
            "ca_file": str(pki.ca_file),
            "connect_timeout": "5s",
            "command_timeout": "5s",
            "pool": {"max_connections": 4, "acquire_timeout": "5s"},
        },
        "metrics": {"bind": loopback_bind()},
        # Tests never send DNS beyond loopback: a port where nothing answers (fast temperror).
        "dns": {"nameservers": ["127.0.0.1"], "port": free_port(), "timeout": "1s", "attempts": 1},
        "logging": {"format": "json", "level": "info"},
        "drain_timeout": "10s",
        "data_dir": str(tmp_path),
    }
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.fixture
def make_relay(tmp_path, pki, dkim_keys, app_password_hash) -> Iterator[Callable[..., RelayProcess]]:
    started: list[RelayProcess] = []

    def factory(
        upstream_port: int,
        *,
        config: dict | None = None,
        env: dict | None = None,
        start: bool = True,
        wait_ready: bool = True,
        **overrides: Any,
    ) -> RelayProcess:
        workdir = tmp_path / f"relay{len(started)}"
        workdir.mkdir()
        cfg = config or relay_config(workdir, pki, dkim_keys, upstream_port, app_password_hash, **overrides)
        relay = RelayProcess(workdir, cfg, env=env)
        started.append(relay)
        if start:
            relay.start(wait_ready=wait_ready)
        return relay

    yield factory
    for relay in started:
        relay.__exit__(None, None, None)
