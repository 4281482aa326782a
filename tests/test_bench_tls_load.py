"""The TLS load client of `bench/` (tls_load, C + OpenSSL) against a real relay.

The submission benchmark's figures are only worth something if its client speaks the
dialogue an application speaks: STARTTLS or implicit TLS with the server certificate
verified, AUTH PLAIN, one message, QUIT; and if it counts what goes wrong. Built here with
the system compiler and Debian's libssl-dev (installed by .ci/run).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import trustme

from tests.support.config import APP_PASSWORD
from tests.support.dkim import verify_all
from tests.support.inloop import in_thread
from tests.support.procs import require_binary

SOURCE = Path(__file__).resolve().parent.parent / "bench" / "tls" / "tls_load.c"

pytestmark = pytest.mark.binaries  # a C compiler and libssl-dev


@pytest.fixture(scope="module")
def tls_load(tmp_path_factory) -> str:
    binary = tmp_path_factory.mktemp("bench") / "tls_load"
    compile_ = [require_binary("cc"), "-O2", "-Wall", "-Werror", "-o", str(binary), str(SOURCE)]
    subprocess.run([*compile_, "-lssl", "-lcrypto", "-lpthread"], check=True)
    return str(binary)


def run(tls_load: str, port: int, ca_file: Path, *args: str) -> tuple[int, dict]:
    login = ["-A", str(ca_file), "-u", "app", "-p", APP_PASSWORD]
    envelope = ["-f", "app@example.com", "-t", "user@example.net", "-l", "2048", "-T", "60"]
    command = [tls_load, *login, *envelope, *args, f"127.0.0.1:{port}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90)
    return result.returncode, json.loads(result.stdout)


@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize("listener, mode", [("submission", "starttls"), ("submissions", "implicit")])
@in_thread
def test_messages_arrive_signed_and_wrong_passwords_are_counted(
    make_loop_relay, upstream, pki, dkim_keys, tls_load, listener, mode, version
):
    relay = make_loop_relay(upstream.port)
    rc, stats = run(
        tls_load, relay.port(listener), pki.ca_file, "-e", mode, "-V", version, "-s", "2", "-m", "6", "-b", "3"
    )
    assert rc == 0, stats
    assert (stats["ok"], stats["bad_auth_refused"], stats["errors"]) == (4, 2, 0)
    assert stats["failures"] == {} and stats["handshakes"] == 6 and stats["resumed"] == 0
    received = upstream.wait_for(4)
    assert len(received) == 4
    for got in received:
        assert got.mail_from == "app@example.com"
        assert verify_all(got.content, dkim_keys.dns()) == [True, True]


@in_thread
def test_resumption_offers_the_last_session(make_loop_relay, upstream, pki, tls_load):
    relay = make_loop_relay(upstream.port)  # one process: one ticket key
    rc, stats = run(
        tls_load, relay.port("submission"), pki.ca_file, "-e", "starttls", "-V", "1.3", "-s", "1", "-m", "3", "-r"
    )
    assert rc == 0, stats
    assert (stats["ok"], stats["handshakes"], stats["resumed"]) == (3, 3, 2)


@in_thread
def test_a_certificate_from_another_ca_fails_verification(make_loop_relay, upstream, tmp_path, tls_load):
    relay = make_loop_relay(upstream.port)
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    rc, stats = run(tls_load, relay.port("submissions"), other_ca, "-e", "implicit", "-s", "1", "-m", "2")
    assert rc == 1
    assert (stats["ok"], stats["errors"]) == (0, 2)
    assert stats["failures"] == {"tls:verify": 2}
    assert upstream.messages == []


def test_refuses_targets_beyond_loopback(tls_load, pki):
    result = subprocess.run(
        [tls_load, "-A", str(pki.ca_file), "-m", "1", "192.0.2.1:587"], capture_output=True, text=True, timeout=10
    )
    assert result.returncode == 2
    assert "refusing non-loopback target" in result.stderr
