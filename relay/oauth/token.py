"""Access tokens, and why getting one failed.

An `AccessToken` never shows its value: not in its repr, not in a log line, not in an
exception. A `TokenError` carries a reason from a fixed vocabulary (the metrics label) and a
detail for the log: the token endpoint's own error code and description, or the hop that
failed. Neither ever holds a token, a client secret or a key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import Counter

from relay.errors import SmtpError

TOKEN_FAILURES = Counter(
    "relay_upstream_token_failures_total",
    "Failed attempts to get an OAuth 2.0 access token for an upstream, and tokens the upstream refused, by reason.",
    ["upstream", "reason"],
)

# The token endpoint is down, slow or misbehaving: it may recover by itself.
TRANSIENT_REASONS = ("timeout", "unreachable", "server_error", "bad_response")
# An operator has to act: wrong or expired credentials, consent or delegation missing, a
# credential that cannot be read, or an upstream that refuses the tokens it is given.
OPERATOR_REASONS = ("invalid_client", "consent_missing", "invalid_request", "credentials_unavailable", "rejected")
REASONS = TRANSIENT_REASONS + OPERATOR_REASONS


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A bearer token and its lifetime on the monotonic clock."""

    value: str = field(repr=False)
    obtained_at: float  # time.monotonic() when the request was sent (conservative)
    lifetime: float  # seconds, from the endpoint's expires_in

    @property
    def expires_at(self) -> float:
        return self.obtained_at + self.lifetime

    @property
    def refresh_at(self) -> float:
        """When to fetch the next one: a quarter of the lifetime ahead, at most 5 minutes
        (an hour's token is refreshed 5 minutes before it expires)."""
        return self.expires_at - min(300.0, self.lifetime / 4)

    @property
    def usable_until(self) -> float:
        """Past this a token is not handed out any more: the upstream checks it a moment
        later, and clocks differ."""
        return self.expires_at - min(10.0, self.lifetime / 10)

    def __repr__(self) -> str:
        left = self.expires_at - time.monotonic()
        return f"AccessToken(<redacted>, expires in {left:.0f}s)"


class TokenError(Exception):
    """No token: `reason` is one of `REASONS`, `detail` says why (safe to log)."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    @property
    def operator_fault(self) -> bool:
        return self.reason in OPERATOR_REASONS

    def smtp_error(self, upstream: str) -> SmtpError:
        """What the client hears. Always 4xx: a token endpoint outage passes, and an
        operator's mistake must not bounce mail (RFC 3463 4.7.0: security, temporary)."""
        if self.operator_fault:
            text = "Upstream authentication failed, try again later"
        else:
            text = "Upstream authentication unavailable, try again later"
        return SmtpError(451, "4.7.0", text, reason=f"upstream {upstream} token: {self}", label="upstream_token")


_REMEDIATION = {
    ("microsoft", "invalid_client"): "check tenant_id, client_id and the credential: a client secret's value "
    "(not its ID) that has not expired, or a certificate uploaded to the app registration",
    ("microsoft", "consent_missing"): "grant admin consent for SMTP.SendAsApp (Office 365 Exchange Online, "
    "application permission) on the app registration",
    ("microsoft", "rejected"): "Exchange Online refused a fresh token: register the app's service principal "
    "(New-ServicePrincipal), give it the mailbox (Add-MailboxPermission) and enable SMTP AUTH for the mailbox "
    "(Set-CASMailbox -SmtpClientAuthenticationDisabled $false)",
    ("google", "invalid_client"): "the service account key was deleted or disabled: create a new JSON key and "
    "store it at the service_account reference",
    ("google", "consent_missing"): "authorize the service account's client ID for https://mail.google.com/ in "
    "the Admin console (Security > Access and data control > API controls > Domain-wide delegation)",
    ("google", "invalid_request"): "check that upstream.username is an existing user of the Workspace domain",
    ("google", "rejected"): "Gmail refused a fresh token: check that the user may use Gmail and SMTP",
}
_REMEDIATION_ANY = {
    "invalid_client": "check client_id and client_secret",
    "consent_missing": "the client is not allowed this scope at the token endpoint",
    "invalid_request": "the token endpoint refused the request: see its error",
    "credentials_unavailable": "the credential's secret reference could not be read or parsed: see the detail",
    "rejected": "the upstream refused a fresh token: check the user's permissions there",
    "timeout": "the token endpoint did not answer in time: check the egress path (upstream.proxy) to it",
    "unreachable": "the token endpoint could not be reached: let its host, port 443, through upstream.proxy",
    "server_error": "the token endpoint reported an outage: it usually passes",
    "bad_response": "the token URL does not answer like a token endpoint: check auth.token_url",
}


def remediation(provider: str, reason: str) -> str | None:
    """What an operator can do about a token failure (for `relay check`)."""
    return _REMEDIATION.get((provider, reason)) or _REMEDIATION_ANY.get(reason)
