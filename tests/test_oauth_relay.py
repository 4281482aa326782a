"""The relay delivering through an upstream that wants OAuth 2.0: a real client submits, the
relay gets its token from the local authorization server over HTTPS (directly or through a
real proxy), and AUTHs to a real upstream that accepts only live tokens."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from relay.config.load import settings_from_mapping
from relay.wiring import preflight
from tests.support.config import relay_config
from tests.support.inloop import in_thread
from tests.support.oauth import AuthServer
from tests.support.oauth_upstream import OAuthUpstream
from tests.support.proxies import microsocks, tinyproxy
from tests.support.smtp import submit
from tests.support.upstream import Upstream

MAILBOX = "sender@example.com"


@pytest.fixture
def auth(pki):
    with AuthServer(pki) as server:
        yield server


@pytest.fixture
def oauth_upstream(auth, pki):
    with OAuthUpstream(auth, tls="starttls", server_context=pki.server_context()) as up:
        yield up


def microsoft_auth(auth: AuthServer, tmp_path: Path, *, certificate: bool = True, **extra: Any) -> dict:
    app, creds = auth.register_microsoft_app(tmp_path, mailbox=MAILBOX, certificate=certificate)
    settings: dict[str, Any] = {
        "mechanism": "xoauth2",
        "provider": "microsoft",
        "tenant_id": app.tenant,
        "client_id": app.client_id,
        "token_url": auth.microsoft_url(app.tenant),
        "ca_file": str(auth.pki.ca_file),
        "timeout": "5s",
    }
    if certificate:
        settings["client_certificate"] = f"file://{creds.certificate_pem}"
    else:
        secret = tmp_path / "m365-client-secret"
        secret.write_text(creds.client_secret)
        secret.chmod(0o600)
        settings["client_secret"] = f"file://{secret}"
    settings.update(extra)
    return settings


def google_auth(auth: AuthServer, tmp_path: Path, **extra: Any) -> dict:
    _, creds = auth.register_service_account(tmp_path, users={MAILBOX})
    return {
        "mechanism": "oauthbearer",
        "provider": "google",
        "service_account": f"file://{creds.service_account_json}",
        "ca_file": str(auth.pki.ca_file),
        "timeout": "5s",
        **extra,
    }


def with_oauth(relay, upstream_settings: dict, **pool: Any) -> None:
    """Turn the relay's default upstream into one that authenticates with a token. The
    egress IP is configured, so the only AUTH besides the messages' is the readiness probe
    (at start, then every 30 s)."""
    relay.config["spf"] = {"egress_ip": ["192.0.2.10"]}
    up = relay.config["upstream"]
    up["username"] = MAILBOX
    up["auth"] = upstream_settings
    up["pool"].update(pool)


def submit_many(relay, pki, count: int, workers: int = 8) -> list[object]:
    """`count` messages from `workers` clients at once; each result is {} (accepted) or the error."""

    def one(i: int) -> object:
        try:
            return submit(relay, pki)
        except smtplib.SMTPException as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(count)))


def refusal(relay, pki) -> tuple[int, str]:
    """The reply that refused a message: at RCPT, where the upstream transaction opens."""
    with pytest.raises(smtplib.SMTPRecipientsRefused) as caught:
        submit(relay, pki)
    [(code, text)] = caught.value.recipients.values()
    return code, text.decode()


# -- mail flows ---------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["microsoft", "google"])
@in_thread
def test_mail_is_relayed_with_a_token_fetched_before_first_use(
    make_loop_relay, auth, oauth_upstream, pki, tmp_path, provider
):
    relay = make_loop_relay(oauth_upstream.port, start=False)
    settings = microsoft_auth(auth, tmp_path) if provider == "microsoft" else google_auth(auth, tmp_path)
    with_oauth(relay, settings)
    relay.start()
    assert auth.requests == 1  # fetched at start, before any message
    relay.wait_log(lambda e: e.get("msg") == "upstream access token fetched" and e.get("provider") == provider)
    assert submit(relay, pki) == {}
    [message] = oauth_upstream.wait_for(1)
    assert message.user == MAILBOX and message.tls
    assert oauth_upstream.attempts()[0].mechanism == settings["mechanism"].upper()
    assert auth.requests == 1
    status, body = relay.http_json("/readyz")
    assert status == 200 and body["checks"]["upstream_token"] == "ok"


@in_thread
def test_many_concurrent_messages_one_token_fetch(make_loop_relay, auth, oauth_upstream, pki, tmp_path):
    relay = make_loop_relay(oauth_upstream.port, start=False)
    # A new upstream connection (and AUTH) for every message.
    with_oauth(relay, microsoft_auth(auth, tmp_path), max_connections=8, max_messages_per_connection=1)
    relay.start()
    probes = len(oauth_upstream.attempts())
    results = submit_many(relay, pki, 40)
    assert results == [{}] * 40
    assert len(oauth_upstream.wait_for(40)) == 40
    assert auth.requests == 1 and auth.max_inflight == 1
    attempts = oauth_upstream.attempts()[probes:]
    assert len(attempts) >= 40 and all(a.accepted for a in attempts)


@in_thread
def test_short_lived_tokens_are_refreshed_under_load(make_loop_relay, auth, oauth_upstream, pki, tmp_path):
    auth.behaviour.token_lifetime = 3  # each token is handed out for ~2.7 s, refreshed after ~2.25 s
    relay = make_loop_relay(oauth_upstream.port, start=False)
    with_oauth(relay, google_auth(auth, tmp_path), max_connections=8, max_messages_per_connection=1)
    relay.start()
    sent, deadline = 0, time.monotonic() + 90
    # Bounded in count and time: until three tokens have been used, at most 400 messages.
    while len({a.token for a in oauth_upstream.attempts()}) < 3:
        assert sent < 400 and time.monotonic() < deadline, "tokens were not refreshed"
        assert submit_many(relay, pki, 16) == [{}] * 16
        sent += 16
    attempts = oauth_upstream.attempts()
    # Every AUTH used a live token (the upstream refuses any other), and the endpoint was
    # never asked twice at once nor more often than tokens were used.
    assert all(a.accepted for a in attempts) and len(attempts) >= sent
    assert auth.max_inflight == 1
    assert auth.requests <= len({a.token for a in attempts}) + 1
    assert relay.metric("relay_upstream_token_failures_total") == 0


@in_thread
def test_535_to_a_valid_token_fetches_a_new_one_once(make_loop_relay, auth, oauth_upstream, pki, tmp_path):
    relay = make_loop_relay(oauth_upstream.port, start=False)
    with_oauth(relay, microsoft_auth(auth, tmp_path), max_messages_per_connection=1)
    relay.start()
    probes = len(oauth_upstream.attempts())
    assert submit(relay, pki) == {}
    auth.revoke_all()  # e.g. the app's permissions changed: the token is refused before it expires
    assert submit(relay, pki) == {}
    attempts = oauth_upstream.attempts()[probes:]
    assert [a.accepted for a in attempts] == [True, False, True]
    assert attempts[1].dummy == b""  # the refused XOAUTH2 exchange was finished first
    assert auth.requests == 2
    relay.wait_log(lambda e: e.get("msg") == "upstream refused a valid token; fetching a new one")
    assert relay.metric("relay_upstream_token_failures_total") == 0


# -- failures -----------------------------------------------------------------------------


@in_thread
def test_upstream_refusing_fresh_tokens_is_451_and_not_ready(make_loop_relay, auth, oauth_upstream, pki, tmp_path):
    relay = make_loop_relay(oauth_upstream.port, start=False)
    with_oauth(relay, microsoft_auth(auth, tmp_path))
    oauth_upstream.refuse_all = True  # e.g. SMTP AUTH disabled for the mailbox
    relay.start(wait_ready=False)
    assert refusal(relay, pki) == (451, "4.7.0 Upstream authentication failed, try again later")
    assert relay.metric("relay_upstream_token_failures_total", reason="rejected") >= 1
    status, body = relay.http_json("/readyz")
    assert status == 503 and "rejected" in body["checks"]["upstream_token"]
    assert "535" in body["checks"]["upstream_token"]
    assert oauth_upstream.messages == []


@pytest.mark.parametrize(
    "provider,fail,endpoint_says",
    [
        ("microsoft", "invalid_client", "AADSTS7000222"),
        ("microsoft", "consent_missing", "AADSTS65001"),
        ("google", "invalid_client", "Invalid JWT Signature"),
        ("google", "consent_missing", "unauthorized_client"),
    ],
)
@in_thread
def test_operator_mistakes_are_4xx_metric_and_readyz(
    make_loop_relay, auth, oauth_upstream, pki, tmp_path, provider, fail, endpoint_says
):
    auth.behaviour.fail = fail
    relay = make_loop_relay(oauth_upstream.port, start=False)
    with_oauth(relay, microsoft_auth(auth, tmp_path) if provider == "microsoft" else google_auth(auth, tmp_path))
    relay.start(wait_ready=False)
    # Mail is not bounced for an operator's mistake: the client keeps it and retries.
    assert refusal(relay, pki) == (451, "4.7.0 Upstream authentication failed, try again later")
    status, body = relay.http_json("/readyz")
    assert status == 503
    assert fail in body["checks"]["upstream_token"] and endpoint_says in body["checks"]["upstream_token"]
    assert relay.metric("relay_upstream_token_failures_total", reason=fail) >= 1
    line = relay.wait_log(lambda e: e.get("msg") == "upstream token fetch failed")
    assert line["reason"] == fail and endpoint_says in line["detail"]
    assert oauth_upstream.attempts() == []  # no AUTH without a token
    assert f'relay_upstream_token_failures_total{{reason="{fail}",upstream=' in relay.scrape()


@in_thread
def test_token_endpoint_down_then_back(make_loop_relay, auth, oauth_upstream, pki, tmp_path):
    relay = make_loop_relay(oauth_upstream.port, start=False)
    with_oauth(relay, microsoft_auth(auth, tmp_path))
    auth.stop()
    relay.start(wait_ready=False)
    assert refusal(relay, pki) == (451, "4.7.0 Upstream authentication unavailable, try again later")
    line = relay.wait_log(lambda e: e.get("msg") == "upstream token fetch failed")
    assert line["reason"] == "unreachable" and "connect" in line["detail"].lower()
    status, body = relay.http_json("/readyz")
    assert status == 503 and "unreachable" in body["checks"]["upstream_token"]
    auth.start()
    relay.wait_ready(timeout=60)  # the refresh task retries with backoff (1 s, 2 s, 4 s...)
    assert submit(relay, pki) == {}


@in_thread
def test_token_endpoint_slow_is_451_with_the_timeout_in_the_log(make_loop_relay, auth, oauth_upstream, pki, tmp_path):
    auth.behaviour.delay = 30  # the relay waits 300 ms
    relay = make_loop_relay(oauth_upstream.port, start=False)
    with_oauth(relay, microsoft_auth(auth, tmp_path, timeout="300ms"))
    relay.start(wait_ready=False)
    assert refusal(relay, pki) == (451, "4.7.0 Upstream authentication unavailable, try again later")
    line = relay.wait_log(lambda e: e.get("msg") == "upstream token fetch failed")
    assert line["reason"] == "timeout" and "within 0.3s" in line["detail"]
    assert relay.metric("relay_upstream_token_failures_total", reason="timeout") >= 1


@in_thread
def test_rotated_client_secret_is_picked_up(make_loop_relay, auth, oauth_upstream, pki, tmp_path):
    relay = make_loop_relay(oauth_upstream.port, start=False)
    settings = microsoft_auth(auth, tmp_path, certificate=False)
    with_oauth(relay, settings)
    app = next(iter(auth.apps.values()))
    app.secret = "rotated-on-the-portal-" + "x" * 18  # the relay still has the old one
    relay.start(wait_ready=False)
    assert refusal(relay, pki)[0] == 451
    Path(settings["client_secret"].removeprefix("file://")).write_text(app.secret)
    relay.wait_ready(timeout=30)  # the file is re-read, and the failed fetch retried at once
    assert submit(relay, pki) == {}


# -- through the egress proxy -------------------------------------------------------------


@pytest.mark.binaries
@pytest.mark.parametrize("proxy", ["socks5", "socks5h", "http"])
@in_thread
def test_token_and_mail_go_through_the_proxy(make_loop_relay, auth, oauth_upstream, pki, tmp_path, proxy):
    relay = make_loop_relay(oauth_upstream.port, start=False)
    with_oauth(relay, microsoft_auth(auth, tmp_path))
    if proxy == "http":
        cm = tinyproxy(tmp_path, user="relay", password="proxy-pass", connect_ports=[auth.port, oauth_upstream.port])
    else:
        cm = microsocks(tmp_path, user="relay", password="proxy-pass")
    with cm as port:
        relay.config["upstream"]["proxy"] = f"{proxy}://relay@127.0.0.1:{port}"
        relay.config["upstream"]["proxy_password"] = "env://PROXY_PASSWORD"
        relay.env["PROXY_PASSWORD"] = "proxy-pass"
        relay.start()
        assert submit(relay, pki) == {}
        [message] = oauth_upstream.wait_for(1)
    # Both the token endpoint and the upstream saw the proxy's egress address only.
    assert auth.peers == ["127.0.0.2"]
    assert message.peer[0] == "127.0.0.2"


# -- nothing secret shows -----------------------------------------------------------------


@in_thread
def test_no_token_or_secret_in_logs_metrics_or_replies(make_loop_relay, auth, oauth_upstream, pki, tmp_path):
    relay = make_loop_relay(oauth_upstream.port, start=False)
    settings = microsoft_auth(auth, tmp_path, certificate=False)
    with_oauth(relay, settings, max_messages_per_connection=1)
    relay.config["logging"]["level"] = "debug"
    relay.start()
    replies = [str(submit(relay, pki))]
    auth.revoke_all()
    replies.append(str(submit(relay, pki)))  # a refused token, then a new one
    oauth_upstream.refuse_all = True
    with pytest.raises(smtplib.SMTPRecipientsRefused) as caught:
        submit(relay, pki)
    replies.append(str(caught.value))
    seen = "\n".join([relay.log_text(), relay.scrape(), relay.http("/readyz")[1], *replies])
    secret = Path(settings["client_secret"].removeprefix("file://")).read_text()
    assert len(auth.tokens()) >= 2
    for value in [*auth.tokens(), secret]:
        assert value not in seen
    assert "upstream refused a fresh access token" in seen  # the refusal itself is logged


# -- relay check --------------------------------------------------------------------------


def check_settings(tmp_path, pki, dkim_keys, app_password_hash, upstream_port, auth_settings):
    config = relay_config(tmp_path, pki, dkim_keys, upstream_port, app_password_hash)
    config["dkim"] = {"keys": []}
    config["spf"] = {"egress_ip": ["192.0.2.10"]}
    config["upstream"].update({"name": "m365", "username": MAILBOX, "auth": auth_settings})
    return settings_from_mapping(config)


async def test_relay_check_fetches_a_token_and_authenticates(
    auth, oauth_upstream, pki, tmp_path, dkim_keys, app_password_hash
):
    settings = check_settings(
        tmp_path, pki, dkim_keys, app_password_hash, oauth_upstream.port, microsoft_auth(auth, tmp_path)
    )
    report = await preflight(settings)
    [token] = report.tokens
    assert token.ok and token.provider == "microsoft" and token.detail == "token issued, valid for 3600 s"
    assert report.upstream.ok and "authenticated with XOAUTH2" in report.upstream.detail
    assert auth.requests == 1 and oauth_upstream.attempts()[0].accepted
    doc = report.to_json()
    assert doc["tokens"][0]["ok"] is True and doc["tokens"][0]["reason"] is None
    assert "  ✓ token      m365 (microsoft): token issued, valid for 3600 s" in report.render()


async def test_relay_check_reports_consent_missing(auth, oauth_upstream, pki, tmp_path, dkim_keys, app_password_hash):
    auth.behaviour.fail = "consent_missing"
    settings = check_settings(
        tmp_path, pki, dkim_keys, app_password_hash, oauth_upstream.port, microsoft_auth(auth, tmp_path)
    )
    report = await preflight(settings)
    assert not report.ok
    [token] = report.tokens
    assert token.reason == "consent_missing" and "AADSTS65001" in token.detail
    assert "SMTP.SendAsApp" in token.remediation
    assert not report.upstream.ok and "consent_missing" in report.upstream.detail
    assert auth.requests == 1  # the upstream probe did not ask again (backoff)
    rendered = report.render()
    assert "  ✗ token      m365 (microsoft): consent_missing: " in rendered
    assert "→ grant admin consent for SMTP.SendAsApp" in rendered


@pytest.mark.e2e
def test_relay_check_command(auth, oauth_upstream, pki, tmp_path, dkim_keys, app_password_hash):
    auth.behaviour.fail = "invalid_client"
    config = relay_config(tmp_path, pki, dkim_keys, oauth_upstream.port, app_password_hash)
    config["dkim"] = {"keys": []}
    config["spf"] = {"egress_ip": ["192.0.2.10"]}
    config["upstream"].update({"name": "m365", "username": MAILBOX, "auth": microsoft_auth(auth, tmp_path)})
    path = tmp_path / "relay.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    result = subprocess.run(
        [sys.executable, "-m", "relay", "check", "-c", str(path)], capture_output=True, text=True, timeout=90
    )
    assert result.returncode == 1, result.stderr
    assert "  ✗ token      m365 (microsoft): invalid_client: " in result.stdout
    assert "AADSTS7000222" in result.stdout
    assert "→ check tenant_id, client_id and the credential" in result.stdout


# -- password mechanisms ------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["plain", "login"])
@in_thread
def test_password_with_a_chosen_mechanism(make_loop_relay, pki, mechanism):
    with Upstream(tls="starttls", server_context=pki.server_context(), users={"relay": "up-pass"}) as up:
        relay = make_loop_relay(up.port, start=False, env={"UPSTREAM_PASSWORD": "up-pass"})
        relay.config["upstream"].update(
            {"username": "relay", "password": "env://UPSTREAM_PASSWORD", "auth": {"mechanism": mechanism}}
        )
        relay.start()
        assert submit(relay, pki) == {}
        assert up.wait_for(1)[0].user == "relay"


# -- the process: reload ------------------------------------------------------------------


@pytest.mark.e2e
def test_reload_keeps_an_unchanged_upstreams_token_and_fetches_a_new_ones(
    make_relay, auth, oauth_upstream, pki, tmp_path
):
    relay = make_relay(oauth_upstream.port, start=False)
    with_oauth(relay, microsoft_auth(auth, tmp_path))
    relay.write_config()
    relay.start()
    assert submit(relay, pki) == {}
    assert auth.requests == 1
    # An unrelated change: the upstream keeps its pool and its token.
    relay.config["clients"]["max_recipients"] = 4
    relay.write_config()
    relay.signal(signal.SIGHUP)
    relay.wait_log(lambda e: e.get("msg") == "configuration reloaded")
    assert submit(relay, pki) == {}
    assert auth.requests == 1
    # A changed upstream is a new one: its token is fetched before it takes mail.
    relay.config["upstream"]["pool"]["max_connections"] = 2
    relay.write_config()
    relay.signal(signal.SIGHUP)
    relay.wait_log(
        lambda e: (
            e.get("msg") == "configuration reloaded"
            and e.get("config", {})["upstream"][0]["pool"]["max_connections"] == 2
        )
    )
    assert auth.requests == 2
    assert submit(relay, pki) == {}
    assert auth.requests == 2
    assert len(oauth_upstream.wait_for(3)) == 3


# -- spool mode -----------------------------------------------------------------------------


@in_thread
def test_spool_mode_delivers_with_the_token_and_defers_without_one(
    make_loop_relay, auth, oauth_upstream, pki, tmp_path
):
    relay = make_loop_relay(oauth_upstream.port, start=False)
    with_oauth(relay, microsoft_auth(auth, tmp_path), max_messages_per_connection=1)  # AUTH per delivery
    relay.config["queue"] = {"mode": "spool", "dir": str(tmp_path / "spool"), "retry": ["1s"]}
    relay.start()
    assert submit(relay, pki) == {}
    assert oauth_upstream.wait_for(1)[0].user == MAILBOX
    # The token endpoint refuses the app now, and the token is gone: the spool keeps the
    # message and retries; nothing bounces.
    auth.behaviour.fail = "invalid_client"
    auth.revoke_all()
    assert submit(relay, pki) == {}  # 250: on disk
    attempt = relay.wait_log(lambda e: e.get("msg") == "delivery attempt" and e.get("result") == "deferred")
    assert attempt["reply"] == 451
    auth.behaviour.fail = None
    assert len(oauth_upstream.wait_for(2, timeout=60)) == 2
    assert relay.metric("relay_queue_bounces_total") == 0
