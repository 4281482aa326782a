"""DKIM test keys (RSA-2048 and Ed25519, made once per session) and verification with dkimpy."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa


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


def make_dkim_keys(directory: Path) -> DkimKeys:
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
