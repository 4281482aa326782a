"""The log contract: one JSON line per message with the documented fields, and nothing in
the log (or the metrics) that must stay private: no body, no subject, no password, no AUTH
blob, no DKIM private key material."""

from __future__ import annotations

import base64
import smtplib
import uuid

import pytest
from cryptography.hazmat.primitives import serialization

from tests.support.config import APP_PASSWORD
from tests.support.smtp import message, submit

pytestmark = pytest.mark.e2e

# docs/metrics.md, "Log lines": every message line that got as far as DATA has these.
MESSAGE_FIELDS = {
    "event",
    "id",
    "listener",
    "client",
    "user",
    "mail_from_domain",
    "from_domain",
    "recipients",
    "size",
    "dkim",
    "upstream",
    "upstream_reply",
    "upstream_id",
    "code",
    "enhanced",
    "duration_ms",
}
# A transaction refused at MAIL has no id, no recipients and no upstream yet.
MAIL_REFUSAL_FIELDS = {"event", "id", "listener", "client", "user", "mail_from_domain", "code", "enhanced", "reason"}

WRONG_PASSWORD = "wrong-" + uuid.uuid4().hex


def auth_login(relay, pki, password: str) -> None:
    """AUTH LOGIN (smtplib prefers PLAIN): the username and password go as separate blobs."""
    client = smtplib.SMTP("127.0.0.1", relay.port("submission"), timeout=20)
    with client:
        client.starttls(context=pki.client_context())
        client.ehlo("client.test")
        client.user, client.password = "app", password
        client.auth("LOGIN", client.auth_login)


def key_material(path) -> list[str]:
    """Fragments of a private key that must never be logged: each base64 line of its PEM,
    and its raw private bytes in base64 and hex."""
    pem = path.read_bytes()
    key = serialization.load_pem_private_key(pem, password=None)
    raw = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    lines = [line for line in pem.decode().splitlines() if not line.startswith("-----")]
    # A short last line ("Aw==") could occur anywhere by chance; 16 characters cannot.
    return [line for line in lines if len(line) >= 16] + [base64.b64encode(raw).decode(), raw.hex()]


def test_one_log_line_per_message_without_secrets_or_content(make_relay, upstream, pki, dkim_keys):
    relay = make_relay(upstream.port)
    marker = f"marker-{uuid.uuid4().hex}"
    relayed_body = f"The body says {marker}-relayed.\r\n"

    # 1. relayed, with two recipients
    assert (
        submit(
            relay,
            pki,
            rcpts=("a@example.net", "b@example.net"),
            data=message(subject=f"{marker}-subject", body=relayed_body),
        )
        == {}
    )
    # 2. refused by the upstream at DATA
    upstream.behaviour.data_reply = "451 4.3.0 Try again later"
    with pytest.raises(smtplib.SMTPDataError):
        submit(relay, pki, data=message(subject="refused", body=f"{marker}-refused\r\n"))
    upstream.behaviour.data_reply = None
    # 3. refused at DATA by policy: From domain the user may not use
    with pytest.raises(smtplib.SMTPDataError):
        submit(relay, pki, data=message(frm="app@other.example", subject="from", body=f"{marker}-from\r\n"))
    # 4. refused at MAIL: envelope sender not allowed
    with pytest.raises(smtplib.SMTPSenderRefused):
        submit(relay, pki, mail_from="app@elsewhere.example")
    # 5. failed AUTH, PLAIN and LOGIN: no transaction, no message line
    with pytest.raises(smtplib.SMTPAuthenticationError):
        submit(relay, pki, password=WRONG_PASSWORD)
    with pytest.raises(smtplib.SMTPAuthenticationError):
        auth_login(relay, pki, WRONG_PASSWORD)
    # 6. a successful AUTH LOGIN (the password goes as its own base64 blob)
    auth_login(relay, pki, APP_PASSWORD)

    upstream.wait_for(1)
    lines = relay.message_logs()
    assert len(lines) == 4, lines
    # One line each, and each line one JSON object (a message line never spans lines).
    raw = [line for line in relay.log_text().splitlines() if '"event": "message"' in line]
    assert len(raw) == 4 and all(line.startswith("{") and line.endswith("}") for line in raw), raw
    relayed, upstream_refused, from_refused, mail_refused = lines

    for line in (relayed, upstream_refused, from_refused):
        assert MESSAGE_FIELDS <= set(line), MESSAGE_FIELDS - set(line)
        assert line["id"] and line["listener"] == "submission"  # client: see the test below
        assert line["user"] == "app" and line["mail_from_domain"] == "example.com"
        assert isinstance(line["duration_ms"], (int, float)) and line["duration_ms"] >= 0
    assert len({line["id"] for line in (relayed, upstream_refused, from_refused)}) == 3

    assert relayed["code"] == 250 and relayed["enhanced"] == "2.0.0"
    assert relayed["recipients"] == 2 and relayed["from_domain"] == "example.com"
    assert relayed["size"] > len(relayed_body)
    assert relayed["dkim"] == ["example.com/s1", "example.com/ed1"]
    assert relayed["upstream"] == f"localhost:{upstream.port}"
    assert relayed["upstream_reply"].startswith("250 2.0.0")
    assert relayed["upstream_id"] == "Q000001"
    assert "reason" not in relayed

    assert upstream_refused["code"] == 451 and upstream_refused["enhanced"] == "4.3.0"
    assert upstream_refused["upstream_reply"] == "451 4.3.0 Try again later"
    assert upstream_refused["upstream_id"] is None and upstream_refused["reason"]

    assert from_refused["code"] == 550 and from_refused["from_domain"] == "other.example"
    assert from_refused["dkim"] == [] and from_refused["reason"]

    assert MAIL_REFUSAL_FIELDS <= set(mail_refused), MAIL_REFUSAL_FIELDS - set(mail_refused)
    assert mail_refused["code"] == 550 and mail_refused["mail_from_domain"] == "elsewhere.example"

    # Nothing private anywhere in the log, nor in a scrape.
    log_text, scrape = relay.log_text(), relay.scrape()
    forbidden = {
        "message body or subject": marker,
        "the password": APP_PASSWORD,
        "a wrong password": WRONG_PASSWORD,
        "AUTH PLAIN blob": base64.b64encode(f"\0app\0{APP_PASSWORD}".encode()).decode(),
        "AUTH PLAIN blob (wrong password)": base64.b64encode(f"\0app\0{WRONG_PASSWORD}".encode()).decode(),
        "AUTH LOGIN password blob": base64.b64encode(APP_PASSWORD.encode()).decode(),
        "AUTH LOGIN wrong password blob": base64.b64encode(WRONG_PASSWORD.encode()).decode(),
    }
    for path in (dkim_keys.rsa_path, dkim_keys.ed_path):
        for i, fragment in enumerate(key_material(path)):
            forbidden[f"DKIM private key {path.name} #{i}"] = fragment
    for what, text in forbidden.items():
        assert text not in log_text, f"{what} is in the log"
        assert text not in scrape, f"{what} is in the metrics"
    assert "PRIVATE KEY" not in log_text and "PRIVATE KEY" not in scrape


@pytest.mark.parametrize("listener", ["submissions", "submission"])
def test_message_line_names_the_client(make_relay, upstream, pki, listener):
    """The client address is taken at connect; STARTTLS (RFC 3207 §4.2) resets what the
    client said, not where it connects from."""
    relay = make_relay(upstream.port)
    assert submit(relay, pki, listener=listener) == {}
    with pytest.raises(smtplib.SMTPSenderRefused):
        submit(relay, pki, listener=listener, mail_from="app@elsewhere.example")
    relayed, refused = relay.message_logs()
    assert relayed["client"] == "127.0.0.1", relayed
    assert refused["client"] == "127.0.0.1", refused
