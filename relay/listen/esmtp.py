"""The parameters of MAIL and RCPT (RFC 5321 §4.1.2 `esmtp-param`), checked once at the edge
and handed on typed.

What each one means for a relay that passes mail through:
- SIZE (RFC 1870 §4): the client's estimate; over `clients.max_message_size` the pipeline
  refuses at MAIL (552 5.3.4). Not passed on: the signed message is a little larger, and
  its real size is checked when it arrives.
- BODY (RFC 6152): 7BIT or 8BITMIME; 8BITMIME is passed to an upstream that offers it.
- SMTPUTF8 (RFC 6531 §3.4): passed on; an upstream without it cannot take the message.
- AUTH (RFC 4954 §5): accepted from every client. Trusted only when the authenticated user
  may send as the mailbox it names; otherwise it counts as AUTH=<> (§5 "MUST behave as if
  AUTH=<> was supplied"). See relay.deliver.connection for what the upstream gets.
- RET, ENVID (MAIL) and NOTIFY, ORCPT (RCPT), the DSN parameters (RFC 3461 §4): passed to
  an upstream that offers DSN; for one that does not, see relay.deliver.dsn.

Keywords are case-insensitive; values keep their case (ENVID and ORCPT are opaque to the
relay and come back to the sender in a DSN). A parameter given twice or a bad value gets
501 5.5.4; an unknown keyword 555 5.5.4 (RFC 5321 §4.1.1.11, RFC 3463 X.5.4).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.deliver.base import DsnRequest
from relay.deliver.dsn import XTEXT, xtext_decode
from relay.errors import SmtpError

_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")  # RFC 5321 §4.1.2 esmtp-keyword
_ADDR_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")  # RFC 3461 §4.2 addr-type (an atom)
_NOTIFY_EVENTS = ("SUCCESS", "FAILURE", "DELAY")
_MAX_ENVID = 100  # RFC 3461 §4.4
_MAX_ORCPT = 500  # RFC 3461 §4.2
_MAIL_KEYWORDS = frozenset({"SIZE", "BODY", "SMTPUTF8", "AUTH", "RET", "ENVID"})
_RCPT_KEYWORDS = frozenset({"NOTIFY", "ORCPT"})


@dataclass(frozen=True, slots=True)
class MailParams:
    size: int | None = None
    body_8bit: bool = False
    smtputf8: bool = False
    auth: str | None = None  # the mailbox AUTH= names, "" for AUTH=<>; not yet trusted
    ret: str | None = None  # FULL | HDRS
    envid: str | None = None  # xtext, as received


def parse_mail_params(words: list[str]) -> MailParams:
    values = _split(words, _MAIL_KEYWORDS, "MAIL FROM")
    size = None
    if "SIZE" in values:
        text = values["SIZE"] or ""
        if not (text.isascii() and text.isdigit()) or len(text) > 20:  # RFC 1870 §3: 1*20DIGIT
            raise _syntax("SIZE takes the message size in octets")
        size = int(text)
    body = (values["BODY"] or "").upper() if "BODY" in values else "7BIT"
    if body not in ("7BIT", "8BITMIME"):
        raise _syntax("BODY takes 7BIT or 8BITMIME")
    if values.get("SMTPUTF8", None) is not None:
        raise _syntax("SMTPUTF8 takes no value")
    auth = None
    if "AUTH" in values:
        mailbox = _xtext(values["AUTH"], "AUTH")
        if mailbox != "<>" and "@" not in mailbox:
            raise _syntax("AUTH takes a mailbox or <>")
        auth = "" if mailbox == "<>" else mailbox
    ret = None
    if "RET" in values:
        ret = (values["RET"] or "").upper()
        if ret not in ("FULL", "HDRS"):
            raise _syntax("RET takes FULL or HDRS")
    envid = None
    if "ENVID" in values:
        envid = values["ENVID"] or ""
        _xtext(envid, "ENVID")
        if len(envid) > _MAX_ENVID:
            raise _syntax(f"ENVID takes at most {_MAX_ENVID} characters")
    return MailParams(
        size=size,
        body_8bit=body == "8BITMIME",
        smtputf8="SMTPUTF8" in values,
        auth=auth,
        ret=ret,
        envid=envid,
    )


def parse_rcpt_params(words: list[str]) -> DsnRequest:
    values = _split(words, _RCPT_KEYWORDS, "RCPT TO")
    notify = None
    if "NOTIFY" in values:
        events = (values["NOTIFY"] or "").upper().split(",")
        # RFC 3461 §4.1: NEVER alone, or one or more of SUCCESS, FAILURE, DELAY.
        if events != ["NEVER"] and not (all(e in _NOTIFY_EVENTS for e in events) and len(set(events)) == len(events)):
            raise _syntax("NOTIFY takes NEVER, or SUCCESS, FAILURE and DELAY separated by commas")
        notify = ",".join(events)
    orcpt = None
    if "ORCPT" in values:
        orcpt = values["ORCPT"] or ""
        addr_type, semicolon, address = orcpt.partition(";")
        if not semicolon or not _ADDR_TYPE.match(addr_type) or not address or len(orcpt) > _MAX_ORCPT:
            raise _syntax("ORCPT takes addr-type;xtext, e.g. rfc822;user@example.com")
        _xtext(address, "ORCPT")
    return DsnRequest(notify=notify, orcpt=orcpt)


def _split(words: list[str], known: frozenset[str], command: str) -> dict[str, str | None]:
    values: dict[str, str | None] = {}
    for word in words:
        keyword, eq, value = word.partition("=")
        name = keyword.upper()
        if not _KEYWORD.match(keyword) or (eq and not value):
            raise _syntax(f"{command} parameters are KEYWORD or KEYWORD=value")
        if name not in known:
            shown = name[:20]
            raise SmtpError(
                555,
                "5.5.4",
                f"{command} parameter {shown} not recognized or not implemented",
                reason=f"unknown {command} parameter {shown}",
                label="syntax",
            )
        if name in values:
            raise _syntax(f"{name} given twice")
        values[name] = value if eq else None
    return values


def _xtext(value: str | None, name: str) -> str:
    if not value or not XTEXT.match(value):
        raise _syntax(f"{name} takes xtext (RFC 3461 section 4)")
    return xtext_decode(value)


def _syntax(text: str) -> SmtpError:
    return SmtpError(501, "5.5.4", f"Syntax error: {text}", reason=text, label="syntax")
