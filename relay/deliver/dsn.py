"""Delivery status notifications the passthrough relay issues itself: the "relayed" notice.

The relay holds nothing: the client's 250 to DATA is the upstream's 250. When the client
asked for DSNs (RFC 3461) and the upstream offers DSN, the parameters go on with the message
and the upstream, which holds it from then on, reports (§5.2.1). When the upstream does not
offer DSN, §5.2.2 says what a relaying MTA must do: pass the message on without the DSN
parameters and issue a "relayed" DSN for each recipient whose NOTIFY asked for SUCCESS, since
no success notice will come from further on. Failures need nothing from us: the upstream's
refusal comes back to the client while it waits, and the client reports it; a failure after
the upstream accepted the message comes from the upstream, to the unchanged envelope sender.

The notice is a multipart/report (RFC 3464) sent with the null reverse-path to the original
envelope sender (RFC 3461 §6.1), `From: MAILER-DAEMON@` the domain the original was signed
for, so it is signed with the same key and aligns under DMARC. RFC 3461 §4.3: only a
"failed" DSN returns the whole message; this one returns the header (text/rfc822-headers).

Also here: xtext (RFC 3461 §4), the encoding of ENVID, ORCPT and AUTH= values.
"""

from __future__ import annotations

import email.utils
import os
import re
from collections.abc import Sequence

from relay.deliver.base import DsnRequest

# RFC 3461 §4: xtext = *( xchar / hexchar ); xchar is "!".."~" except "+" and "=";
# hexchar is "+" and two upper-case hex digits.
XTEXT = re.compile(r"^(?:[!-*,-<>-~]|\+[0-9A-F]{2})*$")
_HEXCHAR = re.compile(rb"\+([0-9A-F]{2})")


def xtext_decode(text: str) -> str:
    raw = _HEXCHAR.sub(lambda m: bytes([int(m.group(1), 16)]), text.encode("utf-8", "surrogateescape"))
    return raw.decode("utf-8", "replace")


def xtext_encode(text: str) -> str:
    return "".join(
        chr(byte) if 0x21 <= byte <= 0x7E and byte not in (0x2B, 0x3D) else f"+{byte:02X}"
        for byte in text.encode("utf-8")
    )


def relayed_report(
    *,
    reporting_mta: str,
    sender: str,
    domain: str,
    recipients: Sequence[tuple[str, DsnRequest]],
    envid: str | None,
    arrival: float,
    upstream_reply: str,
    header: bytes,
) -> bytes:
    """The notice as a complete CRLF message (unsigned). `recipients` are (address, request)
    of the recipients that asked for SUCCESS; `header` is the relayed message's header block."""
    boundary = f"relayed-{os.urandom(8).hex()}"
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{domain}>",
        f"To: <{sender}>",
        "Subject: Delivery Status Notification (relayed)",
        f"Date: {email.utils.formatdate(localtime=False)}",
        f"Message-ID: <{os.urandom(8).hex()}.dsn@{reporting_mta}>",
        "Auto-Submitted: auto-replied",  # RFC 3834 §5
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        f"This is the mail system at {reporting_mta}.",
        "",
        "Your message was relayed to a mail system that does not send delivery",
        "notifications. It was accepted there for the recipients below; no further",
        "notice of its delivery will follow.",
        "",
        *(f"  <{address}>" for address, _ in recipients),
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        # RFC 3464 §2.2: the per-message fields, then one block per recipient (§2.3).
        f"Reporting-MTA: dns; {reporting_mta}",
    ]
    if envid:
        lines.append(f"Original-Envelope-Id: {xtext_decode(envid)}")
    lines.append(f"Arrival-Date: {email.utils.formatdate(arrival, localtime=False)}")
    for address, request in recipients:
        lines.append("")
        if request.orcpt:
            addr_type, _, original = request.orcpt.partition(";")
            lines.append(f"Original-Recipient: {addr_type};{xtext_decode(original)}")
        lines += [
            f"Final-Recipient: rfc822;{address}",
            "Action: relayed",
            "Status: 2.0.0",
            f"Diagnostic-Code: smtp; {upstream_reply}",
        ]
    lines += ["", f"--{boundary}", "Content-Type: text/rfc822-headers", "", ""]
    text = "\r\n".join(lines).encode("utf-8")
    return text + header + f"\r\n--{boundary}--\r\n".encode("ascii")
