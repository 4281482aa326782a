"""The production-shaped relay config every relay test starts from (loopback ports only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.certs import TestPki
from tests.support.dkim import DkimKeys
from tests.support.procs import dead_port, free_port

# The password of user "app" (its scrypt hash is made once per session: `app_password_hash`).
APP_PASSWORD = "app-password"


def loopback_bind() -> str:
    return f"127.0.0.1:{free_port()}"


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
        "dns": {"nameservers": ["127.0.0.1"], "port": dead_port(udp=True), "timeout": "1s", "attempts": 1},
        "logging": {"format": "json", "level": "info"},
        "drain_timeout": "10s",
        "data_dir": str(tmp_path),
    }
    for key, value in overrides.items():
        config[key] = value
    return config
