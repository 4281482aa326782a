"""A small SMTP client for tests: smtplib with the relay's test PKI and user.

    client = connect(relay, pki)                       # STARTTLS, EHLO, AUTH as "app"
    assert reply(client, "RCPT TO:<x@example.net>") == (503, "5.5.1 Send MAIL FROM first")
    refused = submit(relay, pki, rcpts=("a@example.net",))   # a whole message; {} when all passed

`relay` is anything with `port(listener_name)`: the in-loop relay (`tests.support.inloop`)
or the relay process (`tests.support.relayproc`). With the in-loop relay, call these from
the test's worker thread (`@in_thread`), never from the event loop.
"""

from __future__ import annotations

import smtplib
from collections.abc import Sequence
from typing import Any, Protocol

from tests.support.certs import TestPki
from tests.support.config import APP_PASSWORD


class HasPorts(Protocol):
    def port(self, listener_name: str) -> int: ...


def message(frm="app@example.com", to="user@example.net", subject="hello", body="Hi there.\r\n") -> bytes:
    return (
        f"From: App <{frm}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
        f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <t-{subject}@example.com>\r\n"
        f"\r\n{body}"
    ).encode()


def connect(relay: HasPorts, pki: TestPki, *, listener="submission", tls=True, login=True) -> smtplib.SMTP:
    port = relay.port(listener)
    if listener == "submissions":
        client = smtplib.SMTP_SSL("127.0.0.1", port, context=pki.client_context(), timeout=20)
    else:
        client = smtplib.SMTP("127.0.0.1", port, timeout=20)
        if tls:
            client.starttls(context=pki.client_context())
    client.ehlo("client.test")
    if login:
        client.login("app", APP_PASSWORD)
    return client


def reply(client: smtplib.SMTP, command: str) -> tuple[int, str]:
    code, text = client.docmd(command)
    return code, text.decode()


def submit(
    relay: HasPorts,
    pki: TestPki,
    *,
    listener: str = "submission",
    user: str | None = "app",
    password: str = APP_PASSWORD,
    mail_from: str = "app@example.com",
    rcpts: Sequence[str] = ("user@example.net",),
    data: bytes | None = None,
) -> dict[str, Any]:
    port = relay.port(listener)
    ctx = pki.client_context()
    if listener == "submissions":
        client = smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=20)
    else:
        client = smtplib.SMTP("127.0.0.1", port, timeout=20)
        client.starttls(context=ctx)
    with client:
        client.ehlo("client.test")
        if user:
            client.login(user, password)
        return client.sendmail(mail_from, list(rcpts), data or message(frm=mail_from))
