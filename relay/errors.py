"""The one error type of the message path, and SMTP replies.

Every refusal a client can see is an `SmtpError`: a reply code, an enhanced status code
(RFC 3463), a generic text for the client and a detailed reason for the log. The client text
never carries internal detail (hosts, proxy URLs, secrets); the log reason may name hops and
causes but never a secret value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")
# RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets with its CRLF.
_REPLY_LINE_MAX = 510


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: code, enhanced status code and text (RFC 5321 §4.2, RFC 2034)."""

    code: int
    enhanced: str
    text: str

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def __str__(self) -> str:
        # Multi-line texts are folded into one line: a relayed upstream reply must never
        # inject extra reply lines into our session.
        # An upstream's reply of many lines (up to 32 KiB) becomes one line, cut to the
        # length every client reads (Python's smtplib gives up past 8 KiB).
        text = " ".join(self.text.split())
        line = f"{self.code} {self.enhanced} {text}".rstrip()
        return line if len(line) <= _REPLY_LINE_MAX else line[: _REPLY_LINE_MAX - 3] + "..."

    @classmethod
    def from_upstream(cls, code: int, message: str) -> Reply:
        """Build a reply from an upstream's code and text, keeping its enhanced code.

        RFC 3463 §2: the enhanced code's class must agree with the reply code; when the
        upstream gave none (or a mismatching one), a neutral one for the class is used.
        """
        text = " ".join(message.split())
        match = _ENHANCED.match(text)
        if match and match.group(1) == str(code)[0]:
            return cls(code, match.group(0), text[match.end() :].strip())
        return cls(code, f"{str(code)[0]}.0.0", text)


class SmtpError(Exception):
    """A refusal with its SMTP meaning.

    `client_text` goes on the wire; `reason` goes to the log (and the metrics reason label,
    which must stay a small fixed vocabulary: see `label`).
    """

    def __init__(
        self,
        code: int,
        enhanced: str,
        client_text: str,
        *,
        reason: str | None = None,
        label: str = "other",
    ) -> None:
        super().__init__(reason or client_text)
        self.reply = Reply(code, enhanced, client_text)
        self.reason = reason or client_text
        self.label = label

    @property
    def code(self) -> int:
        return self.reply.code

    @property
    def temporary(self) -> bool:
        return self.reply.temporary

    def __str__(self) -> str:
        return f"{self.reply} ({self.reason})"
