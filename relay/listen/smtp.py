"""The SMTP server protocol: aiosmtpd, adjusted at the edge where the relay needs more.

What changes against aiosmtpd 1.4.6, and why:
- Every reply carries an enhanced status code (RFC 2034, RFC 3463); aiosmtpd's own replies
  ("503 Error: need MAIL command", "552 Error: Too much mail data") do not.
- A client outside `clients.networks` gets 554 5.7.1 instead of the greeting (RFC 5321
  §3.1), checked after a PROXY header when the listener expects one.
- MAIL and RCPT are our own: the null reverse-path `<>` (aiosmtpd takes an empty sender for
  "no MAIL yet"), and every parameter parsed and checked once (relay.listen.esmtp): SIZE,
  BODY, SMTPUTF8, AUTH= and DSN's RET, ENVID, NOTIFY, ORCPT.
- EHLO advertises PIPELINING, DSN and ENHANCEDSTATUSCODES, and AUTH only where it may be used:
  after STARTTLS, or at once on an implicit-TLS listener (aiosmtpd cannot tell that its
  transport is already TLS there), and never on an `auth: none` listener.
- DATA is read in large chunks, not line by line, and only CRLF.CRLF ends it (RFC 5321
  §4.1.1.4). A bare LF is read as CRLF or refused (`clients.bare_newline`); a bare CR or a
  NUL is always refused (see `data_content`), so no `\\n.\\n`-style sequence can be read as
  an end of data by us or by any hop after us (the 2023 SMTP smuggling advisories).
- The DATA phase and the whole session have deadlines of their own (`clients.data_timeout`,
  `clients.max_session_duration`): a client that sends one byte at a time still ends.
- A PROXY header is taken only from `proxy_protocol_from`; EHLO/HELO names with spaces or
  control characters are refused (they would reach the Received header); STARTTLS works once.
- Command line limits are the session's own (aiosmtpd shares one dict between all
  sessions); AUTH takes the 12288 octets of RFC 4954 §4, on its line and in a response to
  a challenge, and a longer response gets 500 5.5.6 (§6), not an internal error.

The edge only translates: aiosmtpd's commands and hooks become calls on the connection's
`ClientSession` (relay.listen.session), one way; the session never calls back. The private
aiosmtpd members used here are listed and checked in `relay.listen.patches`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import re
import unicodedata
from collections.abc import Iterator
from typing import Any, cast

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session, syntax

from relay.errors import Reply, SmtpError
from relay.listen import starttls
from relay.listen.budget import DataBudget
from relay.listen.connections import Connections
from relay.listen.esmtp import parse_mail_params, parse_rcpt_params
from relay.listen.session import ClientSession
from relay.observe import sessions
from relay.policy.senders import ClientNetworks

# RFC 5321 §4.1.2 Mailbox, loosely: a local part without spaces or brackets, then a domain
# of dotted labels (UTF-8 allowed for SMTPUTF8, RFC 6531) or an address literal. Bytes that
# are not UTF-8 reach us as lone surrogates (aiosmtpd decodes with surrogateescape): never.
_MAILBOX = re.compile(
    r'^[^\s<>()\[\],;:@\ud800-\udfff]+@(?:[^\s<>()\[\],;:@."\ud800-\udfff]+'
    r'(?:\.[^\s<>()\[\],;:@."\ud800-\udfff]+)*|\[[^\]\s\ud800-\udfff]+\])$'
)
_SIMPLE_PATH = re.compile(r'^\s*<([^<>\s"()\\,;:]+@[^<>\s"()\\,;:@]+)>\s*(.*)$', re.DOTALL)
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?:\s|$)")
_SINGLE_LINE = re.compile(r"^(\d{3}) (.*)$", re.DOTALL)

# Default enhanced codes for replies that come without one (RFC 3463 §3).
_DEFAULT_ENHANCED = {
    "2": "2.0.0",
    "421": "4.3.0",
    "450": "4.2.0",
    "451": "4.3.0",
    "452": "4.5.3",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "535": "5.7.8",
    "538": "5.7.11",
    "550": "5.7.1",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.7.0",
    "555": "5.5.4",
}

# aiosmtpd's texts that deserve a clearer wording.
_REWORDED = {
    "500 Error: bad syntax": "500 5.5.2 Syntax error, command unrecognized",
    "503 Error: need MAIL command": "503 5.5.1 Send MAIL FROM first",
    "503 Error: need RCPT command": "503 5.5.1 Send RCPT TO first",
    "503 Error: nested MAIL command": "503 5.5.1 Sender already given; send RSET to start over",
    "503 Error: send HELO first": "503 5.5.1 Send EHLO first",
    "503 Error: send EHLO first": "503 5.5.1 Send EHLO first",
    "500 Command line too long": "500 5.5.2 Command line too long",
    "221 Bye": "221 2.0.0 Bye",
    "250 OK": "250 2.0.0 OK",
    "220 Ready to start TLS": "220 2.0.0 Ready to start TLS",
}


def with_enhanced_code(status: str) -> str:
    """Give a single-line reply an enhanced status code if it has none."""
    reworded = _REWORDED.get(status)
    if reworded:
        return reworded
    if _HAS_ENHANCED.match(status):
        return status
    match = _SINGLE_LINE.match(status)
    if not match or match.group(1)[0] == "3":
        return status  # 334 AUTH challenges and 354 carry no enhanced code
    code, text = match.groups()
    if code.startswith("552"):
        text = text.removeprefix("Error: ")
    enhanced = _DEFAULT_ENHANCED.get(code) or _DEFAULT_ENHANCED.get(code[0], f"{code[0]}.0.0")
    return f"{code} {enhanced} {text}"


# Bounds the STARTTLS handshake and the implicit-TLS one (relay.listen.listeners).
TLS_HANDSHAKE_TIMEOUT = 30.0
_CLOSING = b"421 4.3.2 Service shutting down, closing connection\r\n"
_SESSION_OVER = b"421 4.4.2 Session time limit reached, closing connection\r\n"
_IDLE_TIMEOUT = b"421 4.4.2 Timeout exceeded, closing connection\r\n"
_HOLD_TIMEOUT = b"421 4.4.2 Transaction not completed in time, closing connection\r\n"
_HOLD_REASON = "the transaction held an upstream connection past clients.session_timeout waiting on the client"
# Closing a TLS transport waits for the client's close_notify (asyncio gives it 30 s), and
# closing any transport waits for its unsent data: a client that reads nothing would hold its
# connection, and a drain, that long. Once our last reply is out, it gets this long to go.
CLOSE_GRACE = 5.0
# A loop timer may fire this much before its time (uvloop counts in milliseconds): the idle
# timer then counts as due, as it did when it was set anew for every command.
_TIMER_SLACK = 0.001
# DATA is read in blocks of up to this size (see RelaySMTP._read_data).
_DATA_BLOCK = 64 * 1024
_END_OF_DATA = b"\r\n.\r\n"
_BDAT_ARG = re.compile(r"(\d{1,20})(?: +LAST)?", re.IGNORECASE)  # RFC 3030 §2: chunk-size [SP end-marker]
# What one header line costs once parsed (relay.message.Message.parse): the line, the
# field's value and its HeaderField, and the signer's tuple of them (about 210 bytes for a
# tiny field, measured); see RelaySMTP._charge_header_fields.
_FIELD_COST = 256
_AUTH_RESPONSE_LIMIT = 12288  # RFC 4954 §4
_AUTH_LINE_TOO_LONG = "500 5.5.6 Authentication Exchange line is too long"  # RFC 4954 §6
_PROXY_REFUSED = b"554 5.7.1 Access denied: PROXY header not accepted from this address\r\n"
# RFC 5321 §4.1.1.1: EHLO/HELO take a domain or an address literal; neither has a space or a
# control character (and a CR there would become a header line in `Received:`), nor bytes
# that are not UTF-8 (aiosmtpd hands them on as lone surrogates, which no header can carry).
_BAD_HELO = re.compile(r"[\x00-\x20\x7f\ud800-\udfff]")
# A line ending, bare LF or CRLF, and the transparency dot after it (RFC 5321 §4.5.2).
_LINE_END_AND_DOT = re.compile(rb"\r?\n\.?")
_MAIL_SYNTAX = "501 5.5.4 Syntax: MAIL FROM: <address> [SP <mail-parameters>]"
_RCPT_SYNTAX = "501 5.5.4 Syntax: RCPT TO: <address> [SP <mail-parameters>]"
_MALFORMED_ADDRESS = "553 5.1.3 Error: malformed address"
_NULL_PATH = re.compile(r"^<>(?:\s+(.*))?$", re.DOTALL)  # RFC 5321 §4.1.1.2 the null reverse-path
# RFC 6531 §3.4: a non-ASCII address needs SMTPUTF8 on MAIL (X.6.7, RFC 6531 §3.7.1).
_NEEDS_SMTPUTF8 = SmtpError(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter", label="smtputf8")
BARE_LINE_ENDING = "Message contains a bare CR or LF; lines must end with CRLF (RFC 5321 section 2.3.8)"


def data_content(raw: bytes, bare_newline: str) -> bytes:
    """The message from the raw DATA bytes (up to, not including, the final CRLF.CRLF).

    RFC 5321 §2.3.8 wants CRLF only. A bare CR is refused in every mode: reading it as a
    line break would change the lines the next hops see, and passing it on is what the
    smuggling advisories exploit. A bare LF is read as CRLF (`normalize`, like Postfix 3.9)
    or refused (`reject`). A NUL is refused (RFC 5322 §3.5 has no place for it). Then the
    transparency rule (RFC 5321 §4.5.2) drops the first dot of every line, whatever its
    ending was. Costs: a few C-level scans, and one copy only when something changes (the
    line endings and the dots are fixed in the same pass), so at most twice the message is
    held while this runs.
    """
    crlf = raw.count(b"\r\n")
    if raw.count(b"\r") != crlf:
        raise SmtpError(550, "5.6.0", BARE_LINE_ENDING, reason="bare CR in DATA", label="bare_line_ending")
    if b"\x00" in raw:
        raise SmtpError(550, "5.6.0", "Message contains NUL characters", reason="NUL in DATA", label="nul")
    if raw.count(b"\n") != crlf:
        if bare_newline == "reject":
            raise SmtpError(550, "5.6.0", BARE_LINE_ENDING, reason="bare LF in DATA", label="bare_line_ending")
        raw = _LINE_END_AND_DOT.sub(b"\r\n", raw)
    elif b"\r\n." in raw:
        raw = raw.replace(b"\r\n.", b"\r\n")
    if raw.startswith(b"."):
        raw = raw[1:]
    return raw


class RelaySMTP(SMTP):
    """One client connection on one listener."""

    # The stream buffer limit, not a line limit: DATA is read in chunks up to this size.
    # Command lines are still limited to 512 octets (RFC 5321 §4.5.3.1.4) by aiosmtpd.
    line_length_limit = 64 * 1024

    def __init__(
        self,
        client: ClientSession,
        connections: Connections,
        *,
        implicit_tls: bool,
        advertise_auth: bool,
        budget: DataBudget | None = None,
        bare_newline: str = "normalize",
        data_timeout: float = 600.0,
        max_session_duration: float = 1800.0,
        proxy_from: ClientNetworks | None = None,
        max_connections: int = 1000,
        max_connections_per_address: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(_HOOKS, **kwargs)
        # aiosmtpd keeps these limits in a dict on its class, shared by every session and
        # emptied by each new connection: a session's raised limits (smtp_EHLO) were lost
        # whenever another client connected. Each session has its own.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        # RFC 4954 §4: 12288 octets is a sufficient response length for deployed mechanisms;
        # clients send PLAIN's initial response on the AUTH line whatever its length.
        self.command_size_limits["AUTH"] = len("AUTH PLAIN \r\n") + _AUTH_RESPONSE_LIMIT
        self._budget = budget or DataBudget(2**62)
        self._budget_held = 0  # this session's share of the budget
        self._over_budget = False
        self.bare_newline = bare_newline
        self.data_timeout = data_timeout
        self.max_session_duration = max_session_duration
        self.proxy_from = proxy_from
        self.max_connections = max_connections
        self.max_connections_per_address = max_connections_per_address
        self._deadline: float | None = None
        self._idle_expiry = 0.0  # when the session is idle for too long (see _reset_timeout)
        self._hold_expiry: float | None = None  # see _hold_upstream
        self._ending = "client disconnected"  # what ends an open transaction, for its log line
        self._abort_handle: asyncio.TimerHandle | None = None
        self.client = client
        self._connections = connections
        self._implicit_tls = implicit_tls
        self._advertise_auth = advertise_auth
        self._greeted = False
        self._shutting_down = False
        self._upgraded = False  # STARTTLS done (see smtp_STARTTLS)
        self._handshaking = False
        self._lost = False

    @property
    def tls_active(self) -> bool:
        return self._implicit_tls or self._upgraded

    # -- the connection's events --------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Once per connection (STARTTLS goes through _tls_started); TLS here is implicit TLS.
        self._deadline = self.loop.time() + self.max_session_duration
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.client.on_tls(ssl_object.version(), restarted=False)

    def connection_lost(self, error: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        try:
            super().connection_lost(error)
        finally:
            if self._abort_handle is not None:
                self._abort_handle.cancel()
            self._release_budget()
            self._connections.discard(self)
            self.client.on_close(self._ending)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Re-arm the idle timer (session_timeout, RFC 5321 §4.5.3.2.7), which never runs past
        the session's deadline. aiosmtpd cancels it and makes a new one for every command (and
        relay for every DATA chunk); here the new expiry is only noted, and the one timer,
        when it fires early, is set again for what remains (`_idle_timer_fired`). A timer is
        made only when there is none or it would fire late (a shorter duration, a stop)."""
        now = self.loop.time()
        duration = duration or self._timeout_duration
        if self._deadline is not None:
            duration = max(0.01, min(duration, self._deadline - now))
        if self._hold_expiry is not None:
            duration = max(0.01, min(duration, self._hold_expiry - now))
        expiry = self._idle_expiry = now + duration
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > expiry:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(expiry, self._idle_timer_fired)

    def _idle_timer_fired(self) -> None:
        if self.loop.time() < self._idle_expiry - _TIMER_SLACK:
            # Activity since it was set: wait for the rest.
            self._timeout_handle = self.loop.call_at(self._idle_expiry, self._idle_timer_fired)
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        # Never runs while the upstream's answer is awaited (_waiting_for_upstream stops the
        # timer): after DATA, the session then ends right after the reply (smtp_DATA).
        reply = _IDLE_TIMEOUT
        held = self._hold_expiry is not None and self.loop.time() >= self._hold_expiry - _TIMER_SLACK
        if self._past_deadline():
            self._ending = "session time limit"
            reply = _SESSION_OVER
        elif held:
            reply = _HOLD_TIMEOUT
        else:
            self._ending = "idle for clients.session_timeout"
        if self.client.holds_upstream:
            # An upstream connection was waiting on this client: the transaction is ended
            # by the relay, with its reply, in its log line and the rejection count.
            self.client.timed_out(
                SmtpError(
                    421,
                    "4.4.2",
                    "Transaction not completed in time" if held else "Timeout exceeded",
                    reason=_HOLD_REASON if held else self._ending,
                    label="timeout",
                )
            )
        transport = _writable(self.transport)
        if transport is not None and not transport.is_closing() and not self._handshaking:
            # RFC 5321 §3.8: a server that must close says 421 first, so that a client
            # waiting on its own timer knows the session is over and why (Postfix: "421
            # 4.4.2 … Error: timeout exceeded"); mid-handshake there is no channel to say it on.
            transport.write(reply)
        self.close()  # aiosmtpd's closes at once: a command crossing the 421 would meet RST

    async def _handle_client(self) -> None:
        # Only the load balancer may say who the client is (listeners[].proxy_protocol_from).
        if self._proxy_timeout is not None and self.proxy_from is not None:
            assert self.session is not None
            peer = str(self.session.peer[0]) if self.session.peer else ""
            if not self.proxy_from.allows(peer):
                self.client.proxy_refused(peer)
                transport = _writable(self.transport)
                assert transport is not None
                transport.write(_PROXY_REFUSED)
                self.close()
                return
        try:
            await super()._handle_client()
        finally:
            # QUIT or too many errors: aiosmtpd closed the transport.
            self._abort_when_stuck()

    def _set_post_data_state(self) -> None:
        # The message is answered: its bytes leave the budget (and on a lost connection, in
        # connection_lost). Also every reset (RSET, EHLO, STARTTLS): no upstream is held.
        self._release_budget()
        self._hold_expiry = None
        super()._set_post_data_state()  # type: ignore[no-untyped-call]

    def _release_budget(self) -> None:
        # Runs at every reset (connect, EHLO, STARTTLS, RSET) and close, mostly with nothing
        # held: the gauge (a shared-memory write under --workers) is only set for a change.
        if self._budget_held:
            self._budget.give(self._budget_held)
        self._budget_held, self._over_budget = 0, False

    def _set_rset_state(self) -> None:
        # EHLO, HELO, RSET and STARTTLS reset the transaction (RFC 5321 §4.1.1.1, §4.1.1.5,
        # RFC 3207 §4.2); the upstream transaction that mirrors it ends too.
        super()._set_rset_state()  # type: ignore[no-untyped-call]
        self.client.on_reset(self._ending)
        self._ending = "client disconnected"

    def _create_session(self) -> Session:
        return _Session(self.loop)

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, bytes):
            status = status.decode("utf-8", "replace")
        if not status.isascii():
            # RFC 5321 §4.2: reply texts are ASCII (an upstream's own text may not be).
            status = _ascii(status)
        if not self._greeted:
            self._greeted = True
            await self._greet(status)
            return
        await super().push(with_enhanced_code(status))

    async def _greet(self, greeting: str) -> None:
        """aiosmtpd sends its greeting through push() once the PROXY header (if any) is read:
        the moment the client is admitted, or refused instead of greeted (RFC 5321 §3.1)."""
        assert self.session is not None
        proxy = self.session.proxy_data
        if proxy is not None and proxy.src_addr is not None:
            client_ip = str(proxy.src_addr)
        else:
            client_ip = str(self.session.peer[0]) if self.session.peer else ""
        full = self._connections.refusal(client_ip, self.max_connections, self.max_connections_per_address)
        refusal = self.client.on_connect(client_ip, full)
        if refusal is not None:
            await super().push(str(refusal.reply))
            self.close()
            return
        self._connections.add(self, client_ip)
        await super().push(greeting)

    def shutdown(self) -> None:
        """Drain (RFC 5321 §3.8): an idle session gets 421 and is closed now; a session inside
        a transaction gets it right after the transaction's final reply (see smtp_DATA)."""
        self._shutting_down = True
        if self._handshaking:
            self.close()  # mid-STARTTLS: nothing can be said in the clear any more
            return
        transport = _writable(self.transport)
        if self.client.idle and transport is not None:
            transport.write(_CLOSING)
            self.close()

    def close(self) -> None:
        """End the session after the relay's last reply: the connection lingers (see
        _Linger); mid-STARTTLS it closes."""
        transport = _writable(self.transport)
        if transport is None:
            return
        if not self._handshaking and not transport.is_closing():
            linger = _Linger(cast(asyncio.Transport, transport), self.loop, self._connections, self._writer)
            transport.set_protocol(linger)
            # aiosmtpd's command loop, cancelled by connection_lost while it waits for a
            # command (a drain's 421 comes from outside it), closes its writer on the way out:
            # that would close the socket under _Linger, with the client's input unread.
            self._writer = cast(asyncio.StreamWriter, _HandedOver())
            self.connection_lost(None)  # the session is over now; the socket is _Linger's
            return
        transport.close()
        self._abort_when_stuck()

    def _abort_when_stuck(self) -> None:
        """Abort the connection if it is still closing after CLOSE_GRACE (see there)."""
        transport = _writable(self.transport)
        if transport is None or not transport.is_closing() or self._abort_handle:
            return

        def abort() -> None:
            if self.transport is transport:  # connection_lost has not come
                transport.abort()

        self._abort_handle = self.loop.call_later(CLOSE_GRACE, abort)

    async def handle_exception(self, error: Exception) -> str:
        sessions.session_error(self.client.listener.name, error)
        return "451 4.3.0 Internal error, try again later"

    # -- commands -------------------------------------------------------------------------
    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # The common `<local@domain> [params]` is matched directly: the email package's
        # parser that aiosmtpd uses costs about 13% of the relay's CPU under load.
        simple = _SIMPLE_PATH.match(arg)
        if simple and _MAILBOX.match(simple.group(1)):
            return simple.group(1), simple.group(2)
        # Anything else (quoted local parts, comments, the null path) goes the long way, with
        # aiosmtpd's parser made strict: it lets "<a@b" without ">" pass; a relay must not.
        try:
            address, rest = super()._getaddr(arg)
        except RecursionError:
            # The email package's parser recurses once per nested comment (RFC 5322
            # §3.2.2): a line of "(((..." is a malformed address, not an internal error.
            return None, None
        if address is None:
            return None, None
        stripped = arg.lstrip()
        if stripped.startswith("<") and ">" not in stripped:
            return None, None
        if address and not _MAILBOX.match(address):
            return None, None
        return address, rest

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        # Our own: aiosmtpd takes an empty `mail_from` for "no MAIL yet", so it cannot carry
        # the null reverse-path (RFC 5321 §4.5.5), and it knows no DSN or AUTH= parameter.
        if await self.check_helo_needed() or await self.check_auth_needed("MAIL"):
            return
        assert self.session is not None and self.envelope is not None
        path = self._strip_command_keyword("FROM:", arg) if arg else None
        if not path:
            await self.push(_MAIL_SYNTAX)
            return
        if self.envelope.mail_from is not None:
            await self.push("503 5.5.1 Sender already given; send RSET to start over")
            return
        null = _NULL_PATH.match(path)
        address, rest = ("", null.group(1) or "") if null else self._getaddr(path)
        if address is None or rest is None or not (address or null):
            await self.push(_MALFORMED_ADDRESS)
            return
        words = rest.split()
        if words and not self.session.extended_smtp:
            await self.push(_MAIL_SYNTAX)
            return
        try:
            params = parse_mail_params(words)
            if not address.isascii() and not params.smtputf8:
                raise _NEEDS_SMTPUTF8
        except SmtpError as refusal:
            await self.push(str(refusal.reply))
            return
        reply = self.client.mail(address, params, helo=self.session.host_name)
        if reply.positive:
            self.envelope.mail_from = address
            self.envelope.mail_options.extend(words)
            self.envelope.smtp_utf8 = params.smtputf8
        elif reply.code == 421:
            # RFC 5321 §3.8: after 421 the server closes the channel.
            self.loop.call_soon(self.close)
        await self.push(str(reply))

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("RCPT"):
            return
        assert self.session is not None and self.envelope is not None
        if self.envelope.mail_from is None:
            await self.push("503 5.5.1 Send MAIL FROM first")
            return
        path = self._strip_command_keyword("TO:", arg) if arg else None
        if not path:
            await self.push(_RCPT_SYNTAX)
            return
        address, rest = self._getaddr(path)
        if not address or rest is None:
            await self.push(_MALFORMED_ADDRESS)
            return
        words = rest.split()
        if words and not self.session.extended_smtp:
            await self.push(_RCPT_SYNTAX)
            return
        try:
            dsn = parse_rcpt_params(words)
            if not address.isascii() and not self.envelope.smtp_utf8:
                raise _NEEDS_SMTPUTF8
        except SmtpError as refusal:
            await self.push(str(refusal.reply))
            return
        with self._waiting_for_upstream():
            reply = await self.client.rcpt(address, dsn)
        self._hold_upstream()
        if reply.positive:
            self.envelope.rcpt_tos.append(address)
            self.envelope.rcpt_options.extend(words)
        elif reply.code == 421:
            # RFC 5321 §3.8: after 421 the server closes the channel (an upstream's 421,
            # passed on, says the same to the client: its transaction cannot go on).
            self.loop.call_soon(self.close)
        await self.push(str(reply))

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        if not hostname or _BAD_HELO.search(hostname):
            await self.push("501 5.5.4 Syntax: HELO hostname")
            return
        await super().smtp_HELO(hostname)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname or _BAD_HELO.search(hostname):
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        self._set_rset_state()
        assert self.session is not None
        self.session.extended_smtp = True
        self.session.host_name = hostname
        lines = [self.hostname, "PIPELINING"]
        if self.data_size_limit:
            lines.append(f"SIZE {self.data_size_limit}")
        lines += ["8BITMIME", "SMTPUTF8", "DSN", "ENHANCEDSTATUSCODES"]
        # RFC 5321 §4.5.3.1.4: 512 octets, plus what each extension's parameters may add:
        # SIZE 26 (RFC 1870 §3), SMTPUTF8 10 (RFC 6531 §3.4), AUTH= 500 (RFC 4954 §5),
        # RET= and ENVID= 110 on MAIL, NOTIFY= and ORCPT= 500 on RCPT (RFC 3461 §4).
        self.command_size_limits["MAIL"] = 512 + 26 + 10 + 500 + 110
        self.command_size_limits["RCPT"] = 512 + 500
        if self.tls_context and not self.tls_active:
            lines.append("STARTTLS")
        if self._advertise_auth and self.tls_active:
            lines.append("AUTH PLAIN LOGIN")
        # One write for the whole reply, not one per line: over TLS each write is a record
        # and a send, and EHLO is sent twice per STARTTLS session.
        last = len(lines) - 1
        await SMTP.push(self, "\r\n".join(f"250{' ' if i == last else '-'}{line}" for i, line in enumerate(lines)))

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        # RFC 3207 §4.2: once. aiosmtpd would start a second TLS layer inside the first.
        if self.tls_active:
            await self.push("503 5.5.1 TLS already active")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        if self.tls_context is None:
            # A listener without TLS (tls: none) does not offer it (RFC 3207 §4: 454).
            await self.push("454 4.7.0 TLS not available")
            return
        # Not aiosmtpd's STARTTLS, which wraps the socket in asyncio's pure-Python SSLProtocol
        # itself: loop.start_tls() gives the event loop's own TLS transport (uvloop's is
        # native code), a third of the relay's CPU per message when each message is a new
        # session. See relay.listen.starttls.
        self._ending = "STARTTLS"
        self._set_rset_state()  # RFC 3207 §4.2: the transaction ends here, handshake or not
        self._handshaking = True
        try:
            tls = await starttls.upgrade(self, self._reader, self._writer, self.tls_context, TLS_HANDSHAKE_TIMEOUT)
        finally:
            self._handshaking = False
        if tls is None:
            # The loop may or may not report the lost connection itself (asyncio does not
            # when it is lost mid-handshake); connection_lost runs once either way.
            self.connection_lost(None)
            return
        self._tls_started(tls)

    def _tls_started(self, transport: asyncio.Transport) -> None:
        """What aiosmtpd's connection_made does after its own STARTTLS (RFC 3207 §4.2: the
        session starts over), on the loop's TLS transport."""
        self.transport = transport
        self._upgraded = True
        old = self.session
        self.session = self._create_session()
        if old is not None:
            self.session.peer, self.session.proxy_data = old.peer, old.proxy_data
        ssl_object = transport.get_extra_info("ssl_object")
        # A non-None `ssl` also tells aiosmtpd's eof_received that the transport is TLS.
        self.session.ssl = {
            "ssl_object": ssl_object,
            "cipher": transport.get_extra_info("cipher"),
            "peercert": transport.get_extra_info("peercert"),
        }
        self._reset_timeout()
        self.client.on_tls(ssl_object.version() if ssl_object is not None else None, restarted=True)

    @syntax("RSET")
    async def smtp_RSET(self, arg: str) -> None:
        self._ending = "RSET"
        await super().smtp_RSET(arg)

    @syntax("QUIT")
    async def smtp_QUIT(self, arg: str) -> None:
        self._ending = "QUIT"
        await super().smtp_QUIT(arg)

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        if not self._advertise_auth:
            await self.push("503 5.5.1 AUTH not available on this listener")
            return
        if not self.tls_active:
            await self.push("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        await super().smtp_AUTH(arg)

    async def challenge_auth(
        self, challenge: str | bytes, encode_to_b64: bool = True, log_client_response: bool = False
    ) -> Any:
        """aiosmtpd's, with the client's response line bounded: aiosmtpd reads it with
        `readline()`, whose buffer limit then surfaced as an exception (451 Internal error),
        and the rest of the line was read as commands."""
        data = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (base64.b64encode(data) if encode_to_b64 else data))
        line = await _read_line(self._reader)
        if line is None or len(line) > _AUTH_RESPONSE_LIMIT + 2:
            await self.push(_AUTH_LINE_TOO_LONG)
            return MISSING
        blob = line.strip()
        if blob == b"*":  # RFC 4954 §4: the client cancels the exchange
            await self.push("501 5.7.0 Auth aborted")
            return MISSING
        decoded = _b64(blob)
        if decoded is None:
            await self.push("501 5.5.2 Cannot decode base64")
            return MISSING
        return decoded

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Send RCPT TO first (no recipient was accepted)")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        if self._budget.spent:
            reply = self.client.data_refused(_budget_spent("DATA refused: the in-flight budget is spent"), 0)
            self._set_post_data_state()
            await self.push(str(reply))
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        # From here the DATA phase is bounded by data_timeout (the upstream still waits).
        self._hold_expiry = None
        assert self._deadline is not None
        time_left = min(self.data_timeout, self._deadline - self.loop.time())
        try:
            async with asyncio.timeout(max(time_left, 0.01)):
                raw, size = await self._read_data()
        except TimeoutError:
            # RFC 5321 §4.5.3.2: the server may close a stalled session; the transaction
            # ends unanswered (nothing was accepted), with its log line.
            self._release_budget()
            self.client.data_refused(
                SmtpError(
                    421,
                    "4.4.2",
                    "Timeout: DATA took too long",
                    reason="DATA phase over its time limit",
                    label="timeout",
                ),
                0,
            )
            await self.push("421 4.4.2 Timeout: DATA took too long, closing connection")
            self.close()
            return
        if self._over_budget:
            reply = self.client.data_refused(_budget_spent(f"{size} bytes of DATA over the in-flight budget"), size)
        elif raw is None:
            reply = self.client.data_refused(
                SmtpError(
                    552,
                    "5.3.4",
                    f"Message size exceeds the limit of {self.data_size_limit} bytes",
                    reason=f"{size} bytes of DATA",
                    label="too_big",
                ),
                size,
            )
        else:
            try:
                content = data_content(raw, self.bare_newline)
            except SmtpError as refusal:
                reply = self.client.data_refused(refusal, size)
            else:
                del raw
                too_many = self._charge_header_fields(content)
                if too_many is not None:
                    reply = self.client.data_refused(too_many, size)
                else:
                    with self._waiting_for_upstream():
                        reply = await self.client.data(content)
        self._set_post_data_state()
        await self.push(str(reply))
        if self._past_deadline():
            # The session's time ran out while the upstream answered (see _timeout_cb).
            await self.push("421 4.4.2 Session time limit reached, closing connection")
            self.close()
        elif self._shutting_down or self.client.draining:
            await self.push("421 4.3.2 Service shutting down, closing connection")
            self.close()

    async def smtp_BDAT(self, arg: str | None) -> None:
        """RFC 3030: relay does not offer CHUNKING, yet a client may send BDAT anyway, its
        chunk right behind it. Those octets are message content, not commands: read as
        commands, a line of the message such as "RSET" or "RCPT TO:<...>" was carried out.
        The chunk is read and dropped (within data_timeout, as DATA), then 502. Without a
        chunk size nothing can be skipped: 501. No @syntax: HELP does not list it."""
        assert self.session is not None and self._deadline is not None
        match = _BDAT_ARG.fullmatch(arg or "")
        if match is None:
            await self.push("501 5.5.4 Syntax: BDAT chunk-size [LAST]")
            return
        left = int(match.group(1))
        time_left = min(self.data_timeout, self._deadline - self.loop.time())
        try:
            async with asyncio.timeout(max(time_left, 0.01)):
                while left:
                    block = await self._reader.read(min(left, _DATA_BLOCK))
                    if not block:
                        raise ConnectionResetError("client closed the connection during BDAT")
                    left -= len(block)
                    self._reset_timeout()
        except TimeoutError:
            await self.push("421 4.4.2 Timeout: BDAT took too long, closing connection")
            self.close()
            return
        await self.push("502 5.5.1 BDAT not implemented: CHUNKING is not offered (RFC 3030)")

    def _charge_header_fields(self, content: bytes) -> SmtpError | None:
        """Parsing makes an object of every header field (relay.message), some _FIELD_COST
        bytes each: a header of millions of tiny fields ("a:x") takes forty times its own
        size. That memory is charged to the DATA budget with the bytes themselves, from a
        count of the header's lines (one C-level scan), so the budget still bounds what the
        process holds. A header that alone would take more than the whole budget can never
        pass: 552 5.3.4 (RFC 3463 X.3.4), not the 452 of a budget spent by others."""
        end = content.find(b"\r\n\r\n")
        lines = content.count(b"\r\n", 0, len(content) if end < 0 else end + 2)
        cost = lines * _FIELD_COST
        if cost > self._budget.limit:
            return SmtpError(
                552,
                "5.3.4",
                "Message header has too many lines",
                reason=f"{lines} header lines, over what clients.max_bytes_in_flight allows",
                label="too_big",
            )
        if self._over_budget or not self._budget.take(cost):
            return _budget_spent(f"{lines} header lines over the in-flight budget")
        self._budget_held += cost
        return None

    def _past_deadline(self) -> bool:
        return self._deadline is not None and self.loop.time() >= self._deadline - 0.05

    @contextlib.contextmanager
    def _waiting_for_upstream(self) -> Iterator[None]:
        """While the relay waits for the upstream's answer, the client waits for ours: it is
        not idle, so `session_timeout` does not run (the upstream's `command_timeout`
        bounds the wait). Otherwise, with session_timeout <= command_timeout, a slow
        upstream would cost the client its connection with no reply at all. Nor is the
        wait counted against the client's hold on the upstream (_hold_upstream)."""
        assert self._timeout_handle is not None
        self._timeout_handle.cancel()
        started = self.loop.time()
        try:
            yield
        finally:
            if self._hold_expiry is not None:
                self._hold_expiry += self.loop.time() - started
            self._reset_timeout()

    def _hold_upstream(self) -> None:
        """Once a RCPT has begun the upstream transaction, a pooled upstream connection waits
        on this client until DATA. Commands that do not move the transaction on (NOOP, HELP,
        VRFY, a refused RCPT) would reset the idle timer for ever, and `max_connections`
        such clients would leave everyone else 451 4.4.5. So the client's own time from
        here to DATA, all its pauses together (not the waits for the upstream), is bounded
        by session_timeout, the server timeout for the next command of RFC 5321
        §4.5.3.2.7; then 421 4.4.2, and the upstream transaction is reset (RSET) and its
        connection goes back to the pool."""
        if self._hold_expiry is None and self.client.holds_upstream:
            self._hold_expiry = self.loop.time() + self._timeout_duration
            self._reset_timeout()

    async def _read_data(self) -> tuple[bytes | None, int]:
        """Read up to CRLF.CRLF (RFC 5321 §4.1.1.4). Returns (content, size); the content
        keeps the CRLF before the final dot, and is None when the size limit was exceeded
        (the rest is still read, RFC 5321 §4.2.5: reply after the end).

        DATA is read in blocks of whatever has arrived and scanned for the end in C. Reading
        up to each ".\r\n" instead cost a Python round per line ending in a dot: a 25 MB
        message of "." lines, 9 million of them."""
        reader = self._reader
        limit = self.data_size_limit or 0
        parts: list[bytes] = []
        read = 0  # bytes read: the content, and at the end the final ".\r\n"
        # The last bytes read, to find an end split across blocks; the DATA command's CRLF
        # comes before the first line (an empty message is just ".\r\n").
        seen = b"\r\n"
        try:
            while True:
                block = await reader.read(_DATA_BLOCK)
                if not block:
                    raise ConnectionResetError("client closed the connection during DATA")
                self._reset_timeout()
                at = _find_end(seen, block)
                if at >= 0:
                    past = at + len(_END_OF_DATA) - len(seen)  # in `block`, just after the end
                    _unread(reader, block[past:])  # a pipelined command (RFC 2920) comes next
                    block = block[:past]
                read += len(block)
                if not self._over_budget and not self._budget.take(len(block)):
                    self._over_budget = True
                elif not self._over_budget:
                    self._budget_held += len(block)
                # Up to 3 bytes read may be the end's ".\r\n" (or the "." and "\r" of an end
                # split across blocks), not content.
                if (limit and read - 3 > limit) or self._over_budget:
                    parts.clear()
                else:
                    parts.append(block)
                if at >= 0:
                    # The content ends after the end's CRLF (for an empty message, the DATA
                    # command's own: `seen` starts with it, and then size is 0).
                    size = read - len(block) + at + 2 - len(seen)
                    break
                seen = (seen + block[-4:])[-4:]
        except BaseException:
            # The client gone mid-DATA (or the time up, a stop): aiosmtpd keeps the exception
            # on the session's task, which the session holds, and its traceback holds this
            # frame: a reference cycle, which only the cyclic GC frees, much later once it
            # has been promoted to an older generation. What was read is let go now.
            parts.clear()
            raise
        if limit and size > limit:
            return None, size
        # The blocks end with the end's ".\r\n": drop it before joining (one copy).
        extra = read - size
        while extra and parts:
            last = parts.pop()
            if len(last) > extra:
                parts.append(last[:-extra])
            extra -= min(extra, len(last))
        return b"".join(parts), size


async def _read_line(reader: asyncio.StreamReader) -> bytes | None:
    """One line, or None for a line longer than the reader's buffer, read to its end and
    dropped (as aiosmtpd does for command lines)."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as error:
        return error.partial  # the client closed: what it sent is the answer
    except asyncio.LimitOverrunError as error:
        await reader.read(error.consumed)
    while True:
        try:
            await reader.readuntil(b"\n")
            return None
        except asyncio.IncompleteReadError:
            return None
        except asyncio.LimitOverrunError as error:
            await reader.read(error.consumed)


def _find_end(seen: bytes, block: bytes) -> int:
    """Where CRLF.CRLF starts in `seen + block` (-1: not there), without copying the block:
    an end that starts in `seen` (at most 4 bytes) ends within the block's first 4."""
    at = (seen + block[:4]).find(_END_OF_DATA)
    if at >= 0:
        return at
    at = block.find(_END_OF_DATA)
    return at + len(seen) if at >= 0 else -1


def _unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Put bytes read past the end of DATA back in front of the reader's buffer, where
    aiosmtpd's command loop reads them next (relay.listen.patches checks `_buffer`)."""
    if data:
        reader._buffer[:0] = data  # type: ignore[attr-defined]


def _budget_spent(reason: str) -> SmtpError:
    # RFC 3463 X.3.1 mail system full; see relay.listen.budget.
    return SmtpError(452, "4.3.1", "Insufficient system storage, try again later", reason=reason, label="data_budget")


def _writable(transport: asyncio.BaseTransport | None) -> asyncio.WriteTransport | None:
    """The transport, to write to. uvloop's transports (TCP, and TLS since STARTTLS uses the
    loop's own) do not subclass asyncio's, so `isinstance(t, asyncio.WriteTransport)` is
    False for them: what matters is that the session still has one."""
    return cast(asyncio.WriteTransport, transport) if transport is not None else None


class _Linger(asyncio.Protocol):
    """A closed session's socket, half-closed: the relay's last reply is followed by FIN, and
    what the client still sends is read and dropped until it closes too, or CLOSE_GRACE ends
    it. RFC 1122 §4.2.2.13: closing with input unread, or input arriving after the close,
    sends RST, and a client reading its reply late then sees "connection reset" in its place
    (a PROXY header refused unread; a command crossing the final 421, a drain's among them).
    It stays among the open connections until then: a drain waits for it (within
    drain_timeout) rather than exit with the socket still taking input.

    Under TLS there is no half-close: close_notify ends the relay's side (RFC 8446 §6.1), and
    asyncio's TLS shutdown fails on application data that arrives after it (a command
    crossing the 421) and aborts the connection. So the TLS session sends close_notify only
    once the client has closed (its close_notify or FIN), or at CLOSE_GRACE, and the
    connection is aborted if the shutdown is not done another CLOSE_GRACE later."""

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        connections: Connections,
        writer: asyncio.StreamWriter,
    ) -> None:
        self._transport = transport
        self._connections = connections
        # The session's StreamWriter closes its transport when it is collected (asyncio's
        # StreamWriter.__del__): held until the socket is closed, or the GC cuts this short.
        self._writer: asyncio.StreamWriter | None = writer
        self._loop = loop
        connections.add(self)  # before the session leaves them: a drain never sees none
        self._tls = not transport.can_write_eof()
        if not self._tls:
            transport.write_eof()  # after the reply still buffered, if any
        if not transport.is_reading():  # paused by the session's full buffer
            transport.resume_reading()
        self._deadline = loop.call_later(CLOSE_GRACE, self._grace_over)

    def _grace_over(self) -> None:
        if self._tls and not self._transport.is_closing():
            self._transport.close()  # close_notify, then the client's (or its FIN)
            self._deadline = self._loop.call_later(CLOSE_GRACE, self._transport.abort)
        else:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        pass  # nothing more is answered

    def eof_received(self) -> bool:
        return False  # the client is done too: close

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline.cancel()
        self._connections.discard(self)
        self._writer = None

    # -- as one of the open connections (relay.listen.connections) ------------------------
    def shutdown(self) -> None:
        pass  # closing already

    def close(self) -> None:
        self._transport.abort()  # the drain's time is up


class _HandedOver:
    """aiosmtpd's writer once the socket is _Linger's: closing it, or writing to it, is the
    session's no longer."""

    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


def _ascii(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return folded if folded.strip() else text.encode("ascii", "replace").decode("ascii")


class _Session(Session):
    """aiosmtpd's Session without its deprecated `login_data`, which aiosmtpd itself sets on
    every successful AUTH and which then logs a warning each time (the relay keeps the user
    in `ClientSession`)."""

    @property
    def login_data(self) -> Any:
        return None

    @login_data.setter
    def login_data(self, value: Any) -> None:
        pass


class _Hooks:
    """aiosmtpd's handler: each hook only translates to the connection's `ClientSession`.
    Stateless, so one instance serves every connection."""

    async def handle_PROXY(self, server: RelaySMTP, session: Session, envelope: Envelope, proxy_data: Any) -> bool:
        # The network check runs on the address the PROXY header carries (RelaySMTP._greet).
        return True

    # -- AUTH (RFC 4954; PLAIN RFC 4616, LOGIN) -----------------------------------------
    async def auth_PLAIN(self, server: RelaySMTP, args: list[str]) -> AuthResult:
        blob: Any
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            blob = _b64(args[1])
            if blob is None:
                await server.push("501 5.5.2 Cannot decode base64")
                return AuthResult(success=False, handled=True)
        assert isinstance(blob, bytes)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await server.push("501 5.5.2 Cannot split AUTH PLAIN response")
            return AuthResult(success=False, handled=True)
        return await self._check(server, "PLAIN", parts[1], parts[2])

    async def auth_LOGIN(self, server: RelaySMTP, args: list[str]) -> AuthResult:
        login: Any
        if len(args) == 2:
            login = _b64(args[1])
            if login is None:
                await server.push("501 5.5.2 Cannot decode base64")
                return AuthResult(success=False, handled=True)
        else:
            login = await server.challenge_auth("Username:")
            if login is MISSING:
                return AuthResult(success=False, handled=True)
        password = await server.challenge_auth("Password:")
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        assert isinstance(login, bytes) and isinstance(password, bytes)
        return await self._check(server, "LOGIN", login, password)

    async def _check(self, server: RelaySMTP, mechanism: str, login: bytes, password: bytes) -> AuthResult:
        outcome = await server.client.authenticate(mechanism, login, password)
        if isinstance(outcome, Reply):
            return AuthResult(success=False, handled=False, message=str(outcome))
        if outcome == "accepted":
            return AuthResult(
                success=True, auth_data=LoginPassword(login, b""), message="235 2.7.0 Authentication successful"
            )
        if outcome == "closing":
            await server.push("535 5.7.8 Authentication credentials invalid")
            await server.push("421 4.7.0 Too many failed authentications, closing connection")
            server.close()
            return AuthResult(success=False, handled=True)
        if outcome == "throttled":
            await server.push("421 4.7.0 Too many failed authentications, try again later")
            server.close()
            return AuthResult(success=False, handled=True)
        # aiosmtpd 1.4.6 defaults a failed AuthResult to handled=True and then sends nothing.
        return AuthResult(success=False, handled=False, message="535 5.7.8 Authentication credentials invalid")


_HOOKS = _Hooks()


def _b64(text: str | bytes) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
