"""Delivery status notifications for recipients that failed for good (RFC 3464).

The report goes to the envelope sender with the null reverse-path (RFC 5321 §4.5.5, so a
report about a report can never be made) and `Auto-Submitted: auto-replied` (RFC 3834 §5).
It is never made for a message whose own sender is null: that message is a report itself.
RFC 3461 is honoured: a recipient whose NOTIFY does not include FAILURE (or is NEVER) is
left out; ORCPT and ENVID are echoed; RET=FULL returns the whole message, otherwise only its
header (the default here: an application's mail can be large and the header is what the
sender needs to recognise it); a message above `RETURN_FULL_MAX` is returned as its header
alone, as Postfix does above `bounce_size_limit`.

8-bit content (a UTF-8 diagnostic, an SMTPUTF8 message's header) is declared as such: the
parts that carry it say `Content-Transfer-Encoding: 8bit` (RFC 6152), and the report is
queued with BODY=8BITMIME (`report_envelope`); UTF-8 addresses use the RFC 6533 forms
(`utf-8;` address type, message/global-delivery-status, message/global-headers).
"""

from __future__ import annotations

import email.utils
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from relay.deliver.dsn import xtext_decode
from relay.queue.entry import QueueEntry, RecipientState

if TYPE_CHECKING:
    from relay.sign.dkim import DkimSigner
    from relay.sign.keys import SigningKey


def wants_report(recipient: RecipientState) -> bool:
    """RFC 3461 §4.1: without NOTIFY, failures are reported; with it, only if it says FAILURE."""
    if recipient.notify is None:
        return True
    return "FAILURE" in {word.strip().upper() for word in recipient.notify.split(",")}


def reportable(entry: QueueEntry) -> list[RecipientState]:
    if not entry.mail_from:
        return []  # never a bounce of a bounce
    return [r for r in entry.failed if wants_report(r)]


RETURN_FULL_MAX = 50_000


def report_envelope(report: bytes, sender: str) -> tuple[bool, bool]:
    """(body_8bit, smtputf8) for the entry that carries `report` to `sender`."""
    return not report.isascii(), not sender.isascii()


def build_dsn(
    entry: QueueEntry, failed: Sequence[RecipientState], message: bytes, *, hostname: str, now: float
) -> bytes:
    """The report as a complete CRLF message (unsigned)."""
    boundary = f"dsn-{entry.id}-{os.urandom(6).hex()}"
    date = email.utils.formatdate(now, localtime=False)
    arrival = email.utils.formatdate(entry.created, localtime=False)
    header = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{entry.mail_from}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {date}",
        f"Message-ID: <{entry.id}.{os.urandom(4).hex()}.dsn@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
    ]
    human = [
        f"This is the mail system at {hostname}.",
        "",
        "Your message could not be delivered to the following recipients:",
        "",
        *(f"  <{r.address}>: {r.last_reply or 'no answer'}" for r in failed),
    ]
    # RFC 3464 §2.2: per-message fields, then one block per recipient (§2.3).
    status = [f"Reporting-MTA: dns; {hostname}"]
    if entry.envid:
        # RFC 3461 §4.4, §4.2: ENVID and ORCPT travel as xtext; the report shows them decoded.
        status.append(f"Original-Envelope-Id: {xtext_decode(entry.envid)}")
    status.append(f"Arrival-Date: {arrival}")
    for r in failed:
        status.append("")
        if r.address.isascii():
            status.append(f"Final-Recipient: rfc822; {r.address}")
        else:
            status.append(f"Final-Recipient: utf-8; {r.address}")  # RFC 6533 §3
        if r.orcpt:
            addr_type, _, original = r.orcpt.partition(";")
            status.append(f"Original-Recipient: {addr_type};{xtext_decode(original)}")
        status.append("Action: failed")
        status.append(f"Status: {_status_code(r.last_reply)}")
        if r.last_reply:
            status.append(f"Diagnostic-Code: smtp; {r.last_reply}")
        if r.last_attempt:
            status.append(f"Last-Attempt-Date: {email.utils.formatdate(r.last_attempt, localtime=False)}")
    full = (entry.ret or "").upper() == "FULL" and len(message) <= RETURN_FULL_MAX
    returned = message if full else _header_block(message)
    human_text = "\r\n".join(human).encode("utf-8")
    status_text = "\r\n".join(status).encode("utf-8")
    global_status = not status_text.isascii()  # RFC 6533 §6.2
    if full:
        returned_type = b"message/global" if not returned.isascii() else b"message/rfc822"
    else:
        returned_type = b"message/global-headers" if not returned.isascii() else b"text/rfc822-headers"
    parts = [
        "\r\n".join(header).encode("utf-8"),
        b"",
        b"This is a MIME-encapsulated message.",
        b"",
        f"--{boundary}".encode(),
        b'Content-Type: text/plain; charset="utf-8"',
        *_eight_bit(human_text),
        b"Content-Description: Notification",
        b"",
        human_text,
        b"",
        f"--{boundary}".encode(),
        b"Content-Type: message/global-delivery-status" if global_status else b"Content-Type: message/delivery-status",
        *_eight_bit(status_text),
        b"Content-Description: Delivery report",
        b"",
        status_text,
        b"",
        f"--{boundary}".encode(),
        b"Content-Type: " + returned_type,
        *_eight_bit(returned),
        b"Content-Description: " + (b"Undelivered message" if full else b"Undelivered message header"),
        b"",
    ]
    body = b"\r\n".join(parts) + b"\r\n" + returned
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + f"\r\n--{boundary}--\r\n".encode()


def _eight_bit(part: bytes) -> list[bytes]:
    return [] if part.isascii() else [b"Content-Transfer-Encoding: 8bit"]


def _status_code(reply: str) -> str:
    """The RFC 3463 code of the last answer ("550 5.1.1 ..." → 5.1.1); 5.0.0 without one."""
    words = reply.split()
    if len(words) >= 2 and words[1][:1] in "45" and words[1].count(".") == 2:
        return words[1]
    if words and words[0][:1] == "4":
        return "4.4.7"  # delivery time expired (RFC 3463 §3.5)
    return "5.0.0"


def _header_block(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end == -1 else message[: end + 2]


def report_signer(
    keys_for: Callable[[str], Sequence[SigningKey]], signer: DkimSigner, hostname: str
) -> Callable[[bytes], bytes]:
    """Sign reports with the key of the hostname's domain, if one is configured: the
    report's From is MAILER-DAEMON@hostname, and a key for the hostname or a parent of it
    (relay.mail.example.com → mail.example.com → example.com) aligns with it under DMARC's
    relaxed alignment (RFC 7489 §3.1.1). Without such a key the report goes unsigned."""
    labels = hostname.lower().rstrip(".").split(".")
    candidates = [".".join(labels[i:]) for i in range(len(labels) - 1)]

    def sign(report: bytes) -> bytes:
        from relay.message import Message

        for domain in candidates:
            keys = keys_for(domain)
            if keys:
                return Message.parse(report).to_bytes(signer.sign(Message.parse(report), keys))
        return report

    return sign
