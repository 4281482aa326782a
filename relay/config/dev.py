"""The embedded dev default: `relay serve` with no config, useful in ten seconds.

Loopback only. It makes (once) a self-signed certificate and an RSA-2048 DKIM key for
`example.test` in a local data folder, accepts mail without AUTH from loopback, and writes
each signed message as an `.eml` file into the folder's `outbox/`.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.config.defaults import DEV_PLAIN_PORT, DEV_SUBMISSION_PORT, DEV_SUBMISSIONS_PORT
from relay.config.load import settings_from_mapping
from relay.config.schema import Settings
from relay.sign.keys import generate_private_key, load_signing_key, private_key_pem, zone_line

DEV_DOMAIN = "example.test"
DEV_SELECTOR = "dev"


def dev_dir() -> Path:
    explicit = os.environ.get("RELAY_DEV_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "relay" / "dev"


def dev_settings(base: Path | None = None, *, prepare: bool = True) -> Settings:
    """The dev default's settings. `prepare`: make the folder, certificate and key if they
    are missing (serve); without it nothing is written (`relay config validate`)."""
    base = base or dev_dir()
    paths = prepare_dev_dir(base) if prepare else dev_paths(base)
    return settings_from_mapping(
        {
            "hostname": "localhost",
            "listeners": [
                {"name": name, "bind": f"127.0.0.1:{port}", "tls": tls, "auth": "optional"}
                for name, port, tls in (
                    ("dev-plain", DEV_PLAIN_PORT, "starttls"),
                    ("dev-submission", DEV_SUBMISSION_PORT, "starttls"),
                    ("dev-submissions", DEV_SUBMISSIONS_PORT, "implicit"),
                )
            ],
            "tls": {"cert_file": str(paths["cert"]), "key_file": str(paths["key"])},
            "clients": {"networks": ["127.0.0.0/8", "::1/128"]},
            "dkim": {"keys": [{"domain": DEV_DOMAIN, "selector": DEV_SELECTOR, "key": f"file://{paths['dkim']}"}]},
            "upstream": {"mode": "outbox", "outbox_dir": str(paths["outbox"])},
            "metrics": {"bind": "127.0.0.1:9464"},
            "logging": {"format": "text", "level": "info"},
            "data_dir": str(base),
        },
        source="embedded dev default",
        offline=not prepare,  # the files are not there yet: serve makes them
    )


def dev_paths(base: Path) -> dict[str, Path]:
    return {
        "cert": base / "tls.crt",
        "key": base / "tls.key",
        "dkim": base / f"{DEV_SELECTOR}.{DEV_DOMAIN}.key",
        "dkim_txt": base / f"{DEV_SELECTOR}.{DEV_DOMAIN}.txt",
        "outbox": base / "outbox",
    }


def dev_dir_is_prepared(base: Path) -> bool:
    """Whether `relay serve` has made the dev folder's files already."""
    return all(path.exists() for path in dev_paths(base).values())


def prepare_dev_dir(base: Path) -> dict[str, Path]:
    paths = dev_paths(base)
    paths["outbox"].mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o700)
    if not paths["cert"].exists() or not paths["key"].exists():
        cert, key = self_signed_certificate("localhost")
        _write(paths["key"], key)
        _write(paths["cert"], cert)
    if not paths["dkim"].exists():
        _write(paths["dkim"], private_key_pem(generate_private_key("rsa-sha256", 2048)))
    if not paths["dkim_txt"].exists():
        signing = load_signing_key(
            paths["dkim"].read_bytes(), domain=DEV_DOMAIN, selector=DEV_SELECTOR, algorithm="rsa-sha256"
        )
        _write(paths["dkim_txt"], (zone_line(DEV_DOMAIN, DEV_SELECTOR, signing.txt_value()) + "\n").encode())
    return paths


def self_signed_certificate(hostname: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(hostname),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
