"""What trips a new user on day one: each case as they would meet it."""

from __future__ import annotations

import os
import pty
import re
import select
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from relay.config.dev import prepare_dev_dir
from relay.sign.keys import load_signing_key
from tests.support.config import loopback_bind
from tests.support.inloop import in_thread
from tests.support.smtp import connect, message, reply

ROOT = Path(__file__).resolve().parent.parent


def relay_cli(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args], capture_output=True, text=True, timeout=60, cwd=ROOT, **kwargs
    )


def zone_strings(text: str) -> list[str]:
    return re.findall(r'"([^"]*)"', text)


# --- relay keygen: the private key is kept somewhere, or nothing is made ---------------------


def test_keygen_without_a_destination_refuses_and_makes_nothing():
    result = relay_cli("keygen", "-d", "example.com", "-s", "s1")
    assert result.returncode == 2
    assert "--store" in result.stderr and "--out" in result.stderr and "--print-private-key" in result.stderr
    assert "TXT" not in result.stdout  # no record for a key nobody kept


def test_keygen_out_writes_the_key_0600_and_prints_its_record(tmp_path):
    out = tmp_path / "s1.key"
    result = relay_cli("keygen", "-d", "example.com", "-s", "s1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    key = load_signing_key(out.read_bytes(), domain="example.com", selector="s1", algorithm="rsa-sha256")
    [zone] = [line for line in result.stdout.splitlines() if " IN TXT " in line]
    assert "".join(zone_strings(zone)) == key.txt_value()
    assert f'key: "file://{out}"' in result.stdout
    again = relay_cli("keygen", "-d", "example.com", "-s", "s1", "--out", str(out))
    assert again.returncode == 1 and "--force" in again.stderr


def test_keygen_prints_the_pem_only_when_asked():
    result = relay_cli(
        "keygen", "-d", "example.com", "-s", "e1", "--algorithm", "ed25519-sha256", "--print-private-key"
    )
    assert result.returncode == 0, result.stderr
    pem = result.stdout[result.stdout.index("-----BEGIN") :].encode()
    serialization.load_pem_private_key(pem, password=None)


# --- relay hash-password and the help text -----------------------------------------------------


def test_hash_password_at_ctrl_d_says_so_without_a_traceback():
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "hash-password"],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        cwd=ROOT,
        start_new_session=True,
    )
    os.close(terminal)
    output = b""
    deadline = time.monotonic() + 30
    while b"Password:" not in output and time.monotonic() < deadline:
        if select.select([controller], [], [], 1)[0]:
            output += os.read(controller, 1024)
    os.write(controller, b"\x04")  # Ctrl-D: end of input at the prompt
    code = proc.wait(30)
    while select.select([controller], [], [], 0.5)[0]:
        try:
            chunk = os.read(controller, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    assert code == 2
    assert b"Traceback" not in output and b"no password given" in output


@pytest.mark.parametrize(
    "command",
    [
        ["serve"],
        ["check"],
        ["config", "validate"],
        ["dkim", "rotate"],
        ["dkim", "status"],
        ["queue", "list"],
        ["queue", "retry"],
    ],
)
def test_every_config_option_says_what_it_is(command):
    result = relay_cli(*command, "--help")
    assert re.search(r"-c CONFIG, --config CONFIG\s+config file", result.stdout), result.stdout


# --- the dev default's TXT record, in strings DNS servers accept -------------------------------


def test_dev_txt_record_is_split_into_255_byte_strings(tmp_path):
    paths = prepare_dev_dir(tmp_path)
    text = paths["dkim_txt"].read_text()
    strings = zone_strings(text)
    assert len(strings) > 1 and all(len(s.encode()) <= 255 for s in strings)
    key = load_signing_key(paths["dkim"].read_bytes(), domain="example.test", selector="dev", algorithm="rsa-sha256")
    assert "".join(strings) == key.txt_value()


# --- SMTP: replies that say what happened ------------------------------------------------------


@in_thread
def test_a_password_secret_that_cannot_be_loaded_is_a_temporary_failure(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["clients"]["users"].append(
        {"username": "svc", "password": "env://RELAY_TEST_UNSET_PASSWORD", "senders": ["example.com"]}
    )
    relay.start()
    client = connect(relay, pki, login=False)
    client.user, client.password = "svc", "anything"
    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        client.auth("PLAIN", client.auth_plain)
    # RFC 4954 §6: the client should try again later, not give up on its credentials.
    assert (err.value.smtp_code, err.value.smtp_error) == (454, b"4.7.0 Temporary authentication failure")
    assert relay.metric("relay_auth_attempts_total", mechanism="PLAIN", result="unavailable") == 1
    # Not counted as a failed guess: the session goes on.
    client.login("app", "app-password")
    client.quit()


@in_thread
def test_an_unauthenticated_client_is_not_told_about_a_user(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port, start=False)
    sidecar = {"name": "sidecar", "bind": loopback_bind(), "tls": "none", "auth": "none"}
    relay.config["listeners"].append(sidecar)
    relay.start()
    client = smtplib.SMTP("127.0.0.1", relay.port("sidecar"), timeout=20)
    client.ehlo()
    assert reply(client, "MAIL FROM:<someone@other.example>") == (
        550,
        "5.7.1 Sender <someone@other.example> not allowed for unauthenticated clients",
    )
    assert reply(client, "RSET")[0] == 250
    with pytest.raises(smtplib.SMTPDataError) as err:
        client.sendmail("app@example.com", ["user@example.net"], message(frm="ceo@other.example"))
    assert err.value.smtp_error == b"5.7.1 From: <ceo@other.example> not allowed for unauthenticated clients"
    client.quit()


# --- the command line: usage errors, not tracebacks --------------------------------------------


@pytest.mark.parametrize(("group", "subcommand"), [("dkim", "rotate"), ("config", "validate"), ("queue", "list")])
def test_a_command_group_without_its_subcommand_shows_its_own_help(group, subcommand):
    result = relay_cli(group)
    assert result.returncode == 2
    assert subcommand in result.stderr and f"relay {group}" in result.stderr, result.stderr
    assert result.stdout == ""


def test_a_bad_relay_workers_is_a_usage_error_of_serve_only():
    env = {**os.environ, "RELAY_WORKERS": "many"}
    other = relay_cli("config", "validate", "--offline", "-c", str(ROOT / "config" / "relay.example.yaml"), env=env)
    assert other.returncode == 0, other.stderr  # not a traceback of every command
    serve = relay_cli("serve", env=env)
    assert serve.returncode == 2 and "--workers" in serve.stderr and "'many'" in serve.stderr, serve.stderr
    assert "Traceback" not in serve.stderr


@pytest.mark.parametrize("count", ["0", "-2", "1025", "1000000000000"])
def test_serve_refuses_a_worker_count_out_of_range(count):
    # A trillion workers was a MemoryError traceback before anything forked.
    result = relay_cli("serve", "--workers", count)
    assert result.returncode == 2 and "1 to 1024" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("-s", "bad selector", "-s: not a selector"),
        ("-d", "exa mple.com", "-d: not a domain name"),
        ("-d", "a" * 64 + ".example.com", "is not a DNS name: labels of at most 63 characters, 253 in all"),
        ("-s", "s" * 200, "is not a DNS name: labels of at most 63 characters, 253 in all"),
        ("--store", "env://DKIM_KEY", "--store supports file:// and aws-sm://"),
        ("--store", "file://keys/s1.key", "--store: file:// reference needs an absolute path"),
    ],
)
def test_keygen_refuses_what_dns_or_the_store_cannot_take_before_making_a_key(tmp_path, option, value, says):
    args = {"-d": "example.com", "-s": "s1", "--store": f"file://{tmp_path}/s1.key", option: value}
    result = relay_cli("keygen", *[part for pair in args.items() for part in pair])
    assert result.returncode == 2, result.stdout + result.stderr
    assert says in result.stderr and "TXT" not in result.stdout
    assert list(tmp_path.iterdir()) == []  # no key made


def test_hash_password_with_stdin_closed_says_so_without_a_traceback():
    result = subprocess.run(
        ["bash", "-c", 'exec "$0" -m relay hash-password <&-', sys.executable],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2 and "no password given" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_output_cut_short_by_its_reader_is_no_traceback():
    # `relay queue list | head`: the reader is gone (here before anything was written).
    result = subprocess.run(
        ["bash", "-c", '"$0" -m relay keygen -d example.com -s s1 --print-private-key | true', sys.executable],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("stdin", "says"),
    [
        (b"\xff\xfepass\n", "password is not UTF-8 text"),
        (b"a" * 50_000 + b"\n", "password longer than 8192 octets"),
        (b"pass\x00word\n", "password holds a NUL character"),
        (b"\r\n", "empty password"),
    ],
    ids=["not-utf8", "huge", "nul", "empty"],
)
def test_hash_password_refuses_what_no_client_could_log_in_with(stdin, says):
    result = subprocess.run(
        [sys.executable, "-m", "relay", "hash-password"], input=stdin, capture_output=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 2, result.stderr
    assert says in result.stderr.decode()
    assert b"Traceback" not in result.stderr and result.stdout == b""


def test_hash_password_takes_the_first_line_as_utf8():
    from relay.auth.passwords import verify_password

    result = subprocess.run(
        [sys.executable, "-m", "relay", "hash-password"],
        input="pässwörd\r\nignored\n".encode(),
        capture_output=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert verify_password("pässwörd".encode(), result.stdout.decode().strip())


@pytest.mark.parametrize(
    ("store", "code", "says"),
    [
        ("file://{tmp}/absent/s1.key", 2, "--store: no such directory: {tmp}/absent"),
        ("file:///proc/relay-test-s1.key", 1, "cannot store the key: file:///proc/relay-test-s1.key: cannot write ("),
        (
            "file://{tmp}/a-directory",
            1,
            "cannot store the key: file://{tmp}/a-directory: cannot write (Is a directory)",
        ),
    ],
    ids=["missing-directory", "unwritable", "directory-at-the-name"],
)
def test_keygen_to_a_store_it_cannot_write_says_so_without_a_traceback(tmp_path, store, code, says):
    (tmp_path / "a-directory").mkdir()
    result = relay_cli("keygen", "-d", "example.com", "-s", "s1", "--force", "--store", store.format(tmp=tmp_path))
    assert result.returncode == code, result.stderr
    assert says.format(tmp=tmp_path) in result.stderr
    assert "Traceback" not in result.stderr and "TXT" not in result.stdout
