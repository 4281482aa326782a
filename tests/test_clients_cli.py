"""Command-line mail clients as applications use them: curl, msmtp and swaks, over STARTTLS
and implicit TLS. What they send by default (curl's bare LF line endings, `--mail-auth`,
msmtp's DSN requests, swaks' null sender) must be relayed, and every message verifies."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support.config import APP_PASSWORD
from tests.support.dkim import verify_all
from tests.support.procs import require_binary
from tests.support.smtp import message
from tests.support.upstream import Upstream

pytestmark = pytest.mark.binaries

LF_ONLY = (
    b"From: App <app@example.com>\nTo: <u@example.net>\nSubject: lf only\n"
    b"Date: Mon, 23 Nov 2026 10:00:00 +0000\nMessage-ID: <lf-only@example.com>\n"
    b"\nline one\nline two\n"
)


@pytest.fixture
def dsn_upstream(pki):
    with Upstream(tls="starttls", server_context=pki.server_context(), dsn=True) as up:
        yield up


def curl(relay, pki, tmp_path, data: bytes, *, implicit: bool = False, extra: tuple[str, ...] = ()):
    path = tmp_path / "message.eml"
    path.write_bytes(data)
    if implicit:
        url = f"smtps://127.0.0.1:{relay.port('submissions')}/curl.test"
        tls = ()
    else:
        url = f"smtp://127.0.0.1:{relay.port('submission')}/curl.test"
        tls = ("--ssl-reqd",)
    argv = [
        require_binary("curl"), "--silent", "--show-error", "--verbose", "--url", url, *tls,
        "--cacert", str(pki.ca_file), "--user", f"app:{APP_PASSWORD}",
        "--mail-from", "app@example.com", "--mail-rcpt", "u@example.net",
        "--upload-file", str(path), "--max-time", "30", *extra,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("implicit", [False, True], ids=["smtp-ssl-reqd", "smtps"])
def test_curl_submits(make_relay, upstream, pki, dkim_keys, tmp_path, implicit):
    relay = make_relay(upstream.port)
    result = curl(relay, pki, tmp_path, message(to="u@example.net", subject="curl"), implicit=implicit)
    assert result.returncode == 0, result.stderr
    [got] = upstream.wait_for(1)
    assert got.mail_from == "app@example.com"
    assert verify_all(got.content, dkim_keys.dns()) == [True, True]


def test_curl_mail_auth_is_accepted(make_relay, upstream, pki, dkim_keys, tmp_path):
    """curl --mail-auth sends `MAIL FROM:<a> AUTH=<a>` (RFC 4954 §5): a server that offers
    AUTH must take the parameter."""
    relay = make_relay(upstream.port)
    result = curl(relay, pki, tmp_path, message(to="u@example.net", subject="mail-auth"),
                  extra=("--mail-auth", "app@example.com"))  # fmt: skip
    [mail] = [line for line in result.stderr.splitlines() if line.startswith("> MAIL FROM")]
    assert "AUTH=" in mail, mail  # curl really sent it
    assert result.returncode == 0, result.stderr
    [got] = upstream.wait_for(1)
    assert verify_all(got.content, dkim_keys.dns()) == [True, True]


def test_curl_lf_only_file_is_normalized(make_relay, upstream, pki, dkim_keys, tmp_path):
    """curl without --crlf sends a file's bare LF line endings as they are. By default
    (`clients.bare_newline: normalize`) they are read as CRLF: the upstream gets CRLF only."""
    relay = make_relay(upstream.port)
    result = curl(relay, pki, tmp_path, LF_ONLY)
    assert result.returncode == 0, result.stderr
    [got] = upstream.wait_for(1)
    assert got.content.count(b"\n") == got.content.count(b"\r\n")
    assert b"\r\nSubject: lf only\r\n" in got.content
    assert b"\r\n\r\nline one\r\nline two\r\n" in got.content
    assert verify_all(got.content, dkim_keys.dns()) == [True, True]


def test_curl_lf_only_file_is_refused_when_bare_newline_is_reject(make_relay, upstream, pki, tmp_path):
    relay = make_relay(upstream.port, start=False)
    relay.config["clients"]["bare_newline"] = "reject"
    relay.start()
    result = curl(relay, pki, tmp_path, LF_ONLY)
    assert result.returncode != 0
    assert "550 5.6.0" in result.stderr
    refusal = next(line for line in result.stderr.splitlines() if "550 5.6.0" in line)
    assert refusal.isascii()
    assert upstream.messages == []


def msmtp(relay, pki, tmp_path, data: bytes, *, implicit: bool = False, dsn: bool = False):
    conf = tmp_path / "msmtprc"
    lines = [
        "defaults",
        "tls on",
        f"tls_trust_file {pki.ca_file}",
        "account relay",
        "host 127.0.0.1",
        f"port {relay.port('submissions' if implicit else 'submission')}",
        f"tls_starttls {'off' if implicit else 'on'}",
        "auth on",
        "user app",
        f"password {APP_PASSWORD}",
        "from app@example.com",
        "domain msmtp.test",
    ]
    if dsn:
        lines += ["dsn_notify success,failure", "dsn_return headers"]
    conf.write_text("\n".join([*lines, "account default : relay", ""]))
    os.chmod(conf, 0o600)
    argv = [require_binary("msmtp"), "-C", str(conf), "--debug", "-f", "app@example.com", "u@example.net"]
    return subprocess.run(argv, input=data, capture_output=True, timeout=60)


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_msmtp_submits(make_relay, upstream, pki, dkim_keys, tmp_path, implicit):
    relay = make_relay(upstream.port)
    result = msmtp(relay, pki, tmp_path, message(to="u@example.net", subject="msmtp"), implicit=implicit)
    assert result.returncode == 0, result.stdout.decode(errors="replace")
    [got] = upstream.wait_for(1)
    assert verify_all(got.content, dkim_keys.dns()) == [True, True]


def test_msmtp_dsn_request_reaches_an_upstream_that_offers_dsn(make_relay, dsn_upstream, pki, dkim_keys, tmp_path):
    """msmtp with dsn_notify refuses to send unless the server offers DSN."""
    relay = make_relay(dsn_upstream.port)
    result = msmtp(relay, pki, tmp_path, message(to="u@example.net", subject="msmtp-dsn"), dsn=True)
    assert result.returncode == 0, result.stdout.decode(errors="replace")
    [got] = dsn_upstream.wait_for(1)
    assert "RET=HDRS" in got.mail_options
    assert "NOTIFY=SUCCESS,FAILURE" in got.rcpt_options["u@example.net"]
    assert verify_all(got.content, dkim_keys.dns()) == [True, True]


def test_swaks_null_sender_is_relayed(make_relay, upstream, pki, dkim_keys):
    """An auto-reply (RFC 3834 §3.3: sent with the null reverse-path) from an allowed From."""
    relay = make_relay(upstream.port)
    argv = [
        require_binary("swaks"), "--server", f"127.0.0.1:{relay.port('submission')}", "--tls",
        "--tls-ca-path", str(pki.ca_file), "--tls-verify",
        "--auth", "PLAIN", "--auth-user", "app", "--auth-password", APP_PASSWORD,
        "--from", "<>", "--to", "u@example.net", "--helo", "swaks.test",
        "--header", "From: app@example.com", "--header", "Auto-Submitted: auto-replied",
    ]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    [got] = upstream.wait_for(1)
    assert got.mail_from == ""
    assert verify_all(got.content, dkim_keys.dns()) == [True, True]
