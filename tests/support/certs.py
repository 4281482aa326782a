"""Test certificates: one trustme CA for everything, with server certificates for the
relay's listeners and for upstreams."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass
class TestPki:
    ca: trustme.CA
    ca_file: Path
    cert_file: Path  # localhost, 127.0.0.1, ::1, upstream.test
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        return context

    def issue(self, directory: Path, *names: str) -> tuple[Path, Path]:
        cert = self.ca.issue_cert(*names)
        cert_path, key_path = directory / f"{names[0]}.crt", directory / f"{names[0]}.key"
        cert.private_key_pem.write_to_path(str(key_path))
        cert.cert_chain_pems[0].write_to_path(str(cert_path))
        for extra in cert.cert_chain_pems[1:]:
            extra.write_to_path(str(cert_path), append=True)
        return cert_path, key_path


def make_pki(directory: Path) -> TestPki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    pki = TestPki(ca, ca_file, directory / "server.crt", directory / "server.key")
    cert = ca.issue_cert("localhost", "127.0.0.1", "::1", "upstream.test")
    cert.private_key_pem.write_to_path(str(pki.key_file))
    cert.cert_chain_pems[0].write_to_path(str(pki.cert_file))
    return pki
