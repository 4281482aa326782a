"""DKIM keys from secrets backends, rotated without a restart; `relay keygen`; no leaks."""

from __future__ import annotations

import base64
import os
import re
import signal
import smtplib
import subprocess
import sys
import time

import boto3
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.aws import AWS_ENV, REGION, moto_server, stop
from tests.support.config import APP_PASSWORD
from tests.support.dkim import verify_all
from tests.support.proxies import microsocks
from tests.support.smtp import connect, message

pytestmark = [pytest.mark.e2e, pytest.mark.binaries]


def new_rsa(bits: int = 2048) -> tuple[bytes, bytes]:
    """(private PEM, TXT value) of a fresh RSA key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(pub)


def dns_for(records: dict[str, bytes]):
    table = {name.encode(): value for name, value in records.items()}
    return lambda name, timeout=5: table.get(name)


def only_rsa_key(relay, ref: str) -> None:
    relay.config["dkim"]["keys"] = [{"domain": "example.com", "selector": "s1", "key": ref}]
    relay.config["secrets"] = {"refresh": "1s"}


def send_one(relay, pki, upstream, n: int, subject: str) -> bytes:
    connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message(subject=subject))
    return upstream.wait_for(n)[n - 1].content


def test_aws_secrets_manager_key_rotation_and_outage(make_relay, upstream, pki, tmp_path):
    key_a, txt_a = new_rsa()
    key_b, txt_b = new_rsa()
    with moto_server(tmp_path / "moto.log") as (endpoint, moto):
        sm = boto3.client(
            "secretsmanager",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        sm.create_secret(Name="relay/dkim/example.com", SecretString=key_a.decode())
        relay = make_relay(upstream.port, start=False, env=dict(AWS_ENV))
        only_rsa_key(relay, "aws-sm://relay/dkim/example.com")
        relay.config["secrets"]["aws"] = {"region": REGION, "endpoint_url": endpoint}
        relay.start()

        first = send_one(relay, pki, upstream, 1, "a")
        assert verify_all(first, dns_for({"s1._domainkey.example.com.": txt_a})) == [True]

        sm.put_secret_value(SecretId="relay/dkim/example.com", SecretString=key_b.decode())
        relay.wait_log(lambda e: e.get("msg") == "DKIM key rotated", timeout=15)
        second = send_one(relay, pki, upstream, 2, "b")
        assert verify_all(second, dns_for({"s1._domainkey.example.com.": txt_b})) == [True]
        assert verify_all(second, dns_for({"s1._domainkey.example.com.": txt_a})) == [False]

        stop(moto)
        ref = "aws-sm://relay/dkim/example.com"
        deadline = time.monotonic() + 30
        while relay.metric("relay_secret_refresh_failures_total", secret=ref) < 1:
            assert time.monotonic() < deadline, "refresh failures were not counted"
            time.sleep(0.5)
        third = send_one(relay, pki, upstream, 3, "c")
        assert verify_all(third, dns_for({"s1._domainkey.example.com.": txt_b})) == [True]
        assert relay.http_json("/readyz")[0] == 200  # a key was loaded once: still ready
        assert relay.metric("relay_secret_age_seconds", secret=ref) >= 1


def test_mounted_secret_symlink_swap_is_picked_up(make_relay, upstream, pki, tmp_path):
    """Kubernetes updates a mounted Secret by pointing `..data` at a new directory."""
    key_a, txt_a = new_rsa()
    key_b, txt_b = new_rsa()
    mount = tmp_path / "mount"
    for version, pem in (("v1", key_a), ("v2", key_b)):
        (mount / version).mkdir(parents=True)
        (mount / version / "dkim.key").write_bytes(pem)
        os.chmod(mount / version / "dkim.key", 0o400)
    (mount / "..data").symlink_to("v1")
    (mount / "dkim.key").symlink_to("..data/dkim.key")
    relay = make_relay(upstream.port, start=False)
    only_rsa_key(relay, f"file://{mount / 'dkim.key'}")
    relay.start()
    assert verify_all(send_one(relay, pki, upstream, 1, "a"), dns_for({"s1._domainkey.example.com.": txt_a})) == [True]

    (mount / "..data_tmp").symlink_to("v2")
    os.replace(mount / "..data_tmp", mount / "..data")  # atomic, as the kubelet does
    relay.wait_log(lambda e: e.get("msg") == "DKIM key rotated", timeout=15)
    second = send_one(relay, pki, upstream, 2, "b")
    assert verify_all(second, dns_for({"s1._domainkey.example.com.": txt_b})) == [True]


def test_adding_a_selector_and_sighup_starts_dual_signing(make_relay, upstream, pki, dkim_keys):
    relay = make_relay(upstream.port, start=False)
    relay.config["dkim"]["keys"] = relay.config["dkim"]["keys"][:1]  # s1 only
    relay.start()
    assert b"s=ed1" not in send_one(relay, pki, upstream, 1, "a")
    relay.config["dkim"]["keys"].append(
        {
            "domain": "example.com",
            "selector": "ed1",
            "key": f"file://{dkim_keys.ed_path}",
            "algorithm": "ed25519-sha256",
        }
    )
    relay.write_config()
    relay.signal(signal.SIGHUP)
    relay.wait_log(lambda e: e.get("msg") == "configuration reloaded")
    second = send_one(relay, pki, upstream, 2, "b")
    assert verify_all(second, dkim_keys.dns()) == [True, True]


def test_missing_key_makes_the_relay_not_ready_and_holds_that_domain(make_relay, upstream, pki, tmp_path):
    key, txt = new_rsa()
    path = tmp_path / "later.key"
    relay = make_relay(upstream.port, start=False, wait_ready=False)
    only_rsa_key(relay, f"file://{path}")
    relay.start(wait_ready=False)
    status, body = relay.http_json("/readyz")
    assert status == 503 and "example.com/s1" in body["checks"]["dkim_keys"]
    with pytest.raises(Exception) as err:
        connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message())
    assert err.value.smtp_code == 451 and err.value.smtp_error.startswith(b"4.7.0")
    path.write_bytes(key)
    os.chmod(path, 0o600)
    relay.wait_ready(timeout=20)
    assert verify_all(send_one(relay, pki, upstream, 1, "ok"), dns_for({"s1._domainkey.example.com.": txt})) == [True]


def test_short_rsa_key_is_refused_unless_allowed(make_relay, upstream, pki, tmp_path):
    key, txt = new_rsa(1024)
    path = tmp_path / "weak.key"
    path.write_bytes(key)
    os.chmod(path, 0o600)
    relay = make_relay(upstream.port, start=False, wait_ready=False)
    only_rsa_key(relay, f"file://{path}")
    relay.start(wait_ready=False)
    line = relay.wait_log(lambda e: str(e.get("msg", "")).startswith("DKIM key unusable"))
    assert "RSA key has 1024 bits; at least 2048 are required" in line["reason"]
    relay.stop()
    relay.config["dkim"]["allow_weak_rsa"] = True
    relay.start()
    assert verify_all(send_one(relay, pki, upstream, 1, "w"), dns_for({"s1._domainkey.example.com.": txt})) == [True]


def keygen(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "relay", "keygen", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def txt_value(output: str) -> bytes:
    return re.search(r"^; value: (.+)$", output, re.M).group(1).encode()


def zone_strings(output: str) -> list[str]:
    line = next(line for line in output.splitlines() if " IN TXT " in line)
    return re.findall(r'"([^"]*)"', line)


@pytest.mark.parametrize("algorithm,bits", [("rsa-sha256", "2048"), ("rsa-sha256", "4096"), ("ed25519-sha256", "2048")])
def test_keygen_stores_a_key_that_verifies_against_its_txt(make_relay, upstream, pki, tmp_path, algorithm, bits):
    path = tmp_path / "k1.key"
    result = keygen(
        "-d", "example.com", "-s", "k1", "--algorithm", algorithm, "--bits", bits, "--store", f"file://{path}"
    )
    assert result.returncode == 0, result.stderr
    assert "PRIVATE KEY" not in result.stdout  # never printed unless asked
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    value = txt_value(result.stdout)
    strings = zone_strings(result.stdout)
    assert all(len(s.encode()) <= 255 for s in strings) and "".join(strings).encode() == value
    assert dict(p.strip().split("=", 1) for p in value.decode().split(";"))["v"] == "DKIM1"

    relay = make_relay(upstream.port, start=False)
    relay.config["dkim"]["keys"] = [
        {"domain": "example.com", "selector": "k1", "key": f"file://{path}", "algorithm": algorithm}
    ]
    relay.start()
    signed = send_one(relay, pki, upstream, 1, "keygen")
    assert verify_all(signed, dns_for({"k1._domainkey.example.com.": value})) == [True]

    again = keygen("-d", "example.com", "-s", "k1", "--store", f"file://{path}")
    assert again.returncode == 1 and "exists; pass --force" in again.stderr
    assert keygen("-d", "example.com", "-s", "k1", "--store", f"file://{path}", "--force").returncode == 0


def test_keygen_stores_in_aws_secrets_manager(tmp_path):
    with moto_server(tmp_path / "moto.log") as (endpoint, _):
        args = [
            "-d",
            "example.com",
            "-s",
            "k2",
            "--store",
            "aws-sm://relay/dkim/k2",
            "--aws-region",
            REGION,
            "--aws-endpoint-url",
            endpoint,
        ]
        first = keygen(*args, env=AWS_ENV)
        assert first.returncode == 0, first.stderr
        second = keygen(*args, env=AWS_ENV)  # a new version of the same secret
        assert second.returncode == 0, second.stderr
        sm = boto3.client(
            "secretsmanager",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        stored = sm.get_secret_value(SecretId="relay/dkim/k2")["SecretString"]
        assert "BEGIN PRIVATE KEY" in stored and stored not in second.stdout
        versions = sm.list_secret_version_ids(SecretId="relay/dkim/k2")["Versions"]
        assert len(versions) == 2


def test_no_secret_reaches_logs_metrics_or_replies(make_relay, pki, tmp_path, dkim_keys):
    """Known secret values go through a whole session, failures included; none of them may
    appear in any log line, in the metrics, or in any reply the client sees."""
    from tests.support.upstream import Upstream

    secrets = {"USER_PW": "User-Pa55-QX81", "UP_PW": "Upstream-Pa55-ZK42", "PROXY_PW": "Proxy-Pa55-WM27"}
    with (
        Upstream(tls="starttls", server_context=pki.server_context(), users={"relayuser": secrets["UP_PW"]}) as up,
        microsocks(tmp_path, user="relayproxy", password=secrets["PROXY_PW"]) as proxy_port,
    ):
        relay = make_relay(up.port, start=False, env=dict(secrets))
        relay.config["clients"]["users"].append(
            {"username": "svc", "password": "env://USER_PW", "senders": ["example.com"]}
        )
        # A real proxy that needs the password, so the proxy password is really used.
        relay.config["upstream"].update(
            {
                "username": "relayuser",
                "password": "env://UP_PW",
                "proxy": f"socks5://relayproxy@127.0.0.1:{proxy_port}",
                "proxy_password": "env://PROXY_PW",
            }
        )
        relay.start()
        replies: list[str] = []
        client = connect(relay, pki, login=False)
        client.user, client.password = "svc", secrets["USER_PW"] + "x"
        with pytest.raises(smtplib.SMTPAuthenticationError) as wrong_password:
            client.auth("PLAIN", client.auth_plain)
        replies.append(str(wrong_password.value))
        client.login("svc", secrets["USER_PW"])
        client.sendmail("app@example.com", ["u@example.net"], message())
        with pytest.raises(smtplib.SMTPDataError) as from_denied:
            client.sendmail("app@example.com", ["u@example.net"], message(frm="x@other.example"))
        assert from_denied.value.smtp_code == 550
        replies.append(str(from_denied.value))
        [received] = up.wait_for(1)
        assert received.peer[0] == "127.0.0.2"  # through the proxy, which took the password
        assert received.user == "relayuser"
        validate = subprocess.run(
            [sys.executable, "-m", "relay", "config", "validate", "-c", str(relay.config_path)],
            capture_output=True,
            text=True,
            env={**os.environ, **secrets},
        )
        texts = [relay.log_text(), relay.scrape(), "\n".join(replies), validate.stdout + validate.stderr]
    key_material = dkim_keys.rsa_path.read_text().splitlines()[1]
    for needle in [
        *secrets.values(),
        key_material,
        base64.b64encode(f"\0svc\0{secrets['USER_PW']}".encode()).decode(),
        APP_PASSWORD,
    ]:
        for text in texts:
            assert needle not in text
