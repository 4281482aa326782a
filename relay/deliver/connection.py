"""One SMTP connection to an upstream, and the mapping of its failures to SMTP replies.

The connection is opened through a `Dialer` (direct or an egress proxy), so TLS always
runs end to end with the upstream: SNI and certificate checks use the upstream's own host
name, never the proxy's (RFC 3207 §4.1, RFC 8314).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import aiosmtplib
from aiosmtplib import SMTPResponse
from aiosmtplib.protocol import SMTPProtocol
from aiosmtplib.typing import SMTPStatus
from prometheus_client import Counter, Histogram

from relay.deliver.base import NO_DSN, DsnRequest, Envelope
from relay.deliver.dial import Dialer
from relay.deliver.dsn import xtext_encode
from relay.deliver.pipelining import Pipelined, discard_buffered
from relay.dns.addresses import AddressResolver
from relay.errors import Reply, SmtpError
from relay.message import WireMessage

log = logging.getLogger("relay.deliver")

# A mailbox the listener accepted that needs no quoting or parsing on the command line: a
# dot-atom-like local part and a domain (UTF-8 allowed, RFC 6531), no quotes, spaces, angle
# brackets or address literals (those go through aiosmtplib's own quoting).
_PLAIN_MAILBOX = re.compile(
    r'[^\s<>()\[\]\\,;:@"\x00-\x1f\x7f\ud800-\udfff]+@[^\s<>()\[\]\\,;:@"\x00-\x1f\x7f\ud800-\udfff]+\Z'
)
_SENDER_OK = frozenset({250})  # as aiosmtplib's mail()
_RECIPIENT_OK = frozenset({250, 251})  # as aiosmtplib's rcpt()

# The message goes upstream in writes of this size (see UpstreamConnection._stream_data).
_DATA_PIECE = 64 * 1024

UPSTREAM_REPLIES = Counter(
    "relay_upstream_replies_total",
    "Final replies from upstreams to DATA and refusals at MAIL/RCPT, by reply class.",
    ["upstream", "stage", "class"],
)
UPSTREAM_LATENCY = Histogram(
    "relay_upstream_latency_seconds",
    "Time an upstream took to answer the end of DATA (message transfer included).",
    ["upstream"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
UPSTREAM_CONNECTS = Counter(
    "relay_upstream_connections_total",
    "Upstream connections opened, by result (ok, or the failure label).",
    ["upstream", "result"],
)


# The label children, looked up once per label values: labels() checks and locks on every
# call, and each message makes two of these. It returns the same child for the same values
# (none is ever removed), so one evicted past maxsize is only looked up again.
_replies = functools.lru_cache(maxsize=1024)(UPSTREAM_REPLIES.labels)
_latencies = functools.lru_cache(maxsize=256)(UPSTREAM_LATENCY.labels)


class SessionAuth(Protocol):
    """Authenticates an upstream session after EHLO (and STARTTLS) by other means than a
    password, e.g. an OAuth 2.0 access token (`relay.oauth.upstream_auth`). Raises
    `SmtpError` (4xx) when the credentials fail, and aiosmtplib's errors when the connection
    does."""

    async def authenticate(self, smtp: aiosmtplib.SMTP, host: str, port: int) -> None: ...


@dataclass(frozen=True, slots=True)
class UpstreamEndpoint:
    """Where and how to speak SMTP: host/port, TLS mode and credentials."""

    label: str
    host: str
    port: int
    tls: str  # starttls | implicit | none | opportunistic | require
    tls_context: ssl.SSLContext | None
    helo_name: str
    username: str | None = None
    password: Callable[[], str | None] | None = None  # read at connect time (rotation)
    # SASL mechanism for the password: plain | login, or None for aiosmtplib's choice.
    password_mechanism: str | None = None
    # Token authentication instead of the password (upstream.auth with a provider).
    auth: SessionAuth | None = None
    connect_timeout: float = 30.0
    command_timeout: float = 300.0


def upstream_tls_context(ca_file: str | None, verify: bool) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_file:
        # An extra bundle (a private CA for an internal smarthost), on top of the system's.
        context.load_verify_locations(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class UpstreamConnection:
    """An open, greeted, (TLS'd, authenticated) connection; one transaction at a time."""

    def __init__(
        self, endpoint: UpstreamEndpoint, smtp: aiosmtplib.SMTP, banner: str = "", *, authenticated: bool = False
    ) -> None:
        self.endpoint = endpoint
        self.smtp = smtp
        self.banner = banner  # greeting and first EHLO reply text
        self.authenticated = authenticated  # the relay logged in (AUTH) on this connection
        self.messages = 0
        self.created = time.monotonic()
        self.last_used = self.created
        self.fresh = True

    @property
    def alive(self) -> bool:
        return self.smtp.is_connected

    def watch_loss(self, on_lost: Callable[[], None] | None) -> None:
        """Call `on_lost` when the upstream drops the connection (None: stop watching). A
        transaction holds its connection (and pool slot) between client commands: without
        this, an upstream that closes an idle session (RFC 5321 §4.5.3.2.7, 5 minutes) left
        the slot taken until the client's next command, however long the client dawdled."""
        protocol = self.smtp.protocol
        if protocol is None:
            return
        owner = self.smtp._on_connection_lost  # aiosmtplib's own (relay.listen.patches)

        def lost(closed: SMTPProtocol) -> None:
            owner(closed)
            if on_lost is not None:
                on_lost()

        protocol._connection_lost_callback = lost if on_lost is not None else owner

    def supports(self, extension: str) -> bool:
        return self.smtp.supports_extension(extension)

    async def mail(self, envelope: Envelope) -> Reply:
        """MAIL FROM with the client's parameters that this upstream offers (see
        relay.listen.esmtp for what each one means)."""
        options = self._mail_options(envelope)
        sender = envelope.mail_from
        self._drop_unasked()
        if self._greeted and _PLAIN_MAILBOX.match(sender):
            return await self._command("MAIL", self._path_command(b"MAIL FROM:", sender, options, _SENDER_OK))
        return await self._command("MAIL", self.smtp.mail(sender, options=options, encoding="utf-8"))

    def _mail_options(self, envelope: Envelope) -> list[str]:
        options = []
        if envelope.body_8bit and self.supports("8bitmime"):
            options.append("BODY=8BITMIME")
        if envelope.smtputf8:
            if self.supports("smtputf8"):
                options.append("SMTPUTF8")
            elif not envelope.mail_from.isascii():
                # RFC 6531 §3.4: no internationalized address to a server without SMTPUTF8.
                raise no_smtputf8(self.endpoint.label)
            # An ASCII sender goes without it: a client may ask for SMTPUTF8 whether or not
            # the message needs it (Go's net/smtp does on every MAIL); the recipients and
            # the header are checked as they come (relay.deliver.smarthost).
        if self.supports("dsn"):
            options += envelope.dsn_params()  # RFC 3461 §5.2.1
        if envelope.auth is not None and self.authenticated and self.supports("auth"):
            # RFC 4954 §5: the submitter the relay vouches for, else AUTH=<>, and only to
            # an upstream the relay authenticated to (the upstream trusts the relay, not
            # the client). An unauthenticated hop gets neither.
            options.append("AUTH=" + (xtext_encode(envelope.auth) if envelope.auth else "<>"))
        return options

    def can_pipeline(self, envelope: Envelope, recipient: str) -> bool:
        """MAIL and the first RCPT can go in one write (RFC 2920): the upstream offers
        PIPELINING, and both commands are ones `_path_command` would send."""
        return (
            self.supports("pipelining")
            and self._greeted
            and self.smtp.protocol is not None
            and _PLAIN_MAILBOX.match(envelope.mail_from) is not None
            and _PLAIN_MAILBOX.match(recipient) is not None
        )

    async def mail_and_rcpt(
        self, envelope: Envelope, recipient: str, dsn: DsnRequest
    ) -> tuple[Reply, Reply | SmtpError | None]:
        """MAIL FROM and the first RCPT TO in one write, their replies read in order (RFC
        2920 §3.1: the client reads every reply, in order). Each reply means what it means
        after `mail()` / `rcpt()`: the same commands, replies, errors, metrics and timeout
        per reply. After a refused MAIL the RCPT's reply is read and ignored (None): the
        refusal is MAIL's. A failure of the path while reading the RCPT's reply is returned,
        not raised: MAIL began the transaction. Only where `can_pipeline()`."""
        smtp = self.smtp
        protocol = smtp.protocol
        if protocol is None:
            raise _broken(
                self.endpoint.label, "MAIL", "connection lost (Server not connected)", "upstream_disconnected"
            )
        mail_options = self._mail_options(envelope)
        rcpt_options = dsn.params() if self.supports("dsn") else []
        commands = [
            _path_line(b"MAIL FROM:", envelope.mail_from, mail_options),
            _path_line(b"RCPT TO:", recipient, rcpt_options),
        ]
        exchange = Pipelined(protocol, commands, smtp.timeout)
        try:
            mail = await self._command("MAIL", self._reply(exchange, _SENDER_OK, envelope.mail_from, start=True))
            if not mail.positive:
                await self._ignore_reply(exchange)
                return mail, None
            try:
                rcpt: Reply | SmtpError = await self._command("RCPT", self._reply(exchange, _RECIPIENT_OK, recipient))
            except SmtpError as exc:
                # MAIL was accepted: as with `mail()` then `rcpt()`, the transaction began
                # and the RCPT failed; the caller raises this at the first add_recipient.
                rcpt = exc
        finally:
            exchange.close()
        return mail, rcpt

    async def _reply(
        self, exchange: Pipelined, ok: frozenset[int], address: str, *, start: bool = False
    ) -> SMTPResponse:
        """The next reply (the commands written first if `start`), as `_path_command` returns
        or raises it; and, as aiosmtplib's `SMTP.execute_command`, the connection closed
        after a timeout, a loss or a 421."""
        try:
            if start:
                await exchange.start()
            response = await exchange.next()
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
            self.smtp.close()
            raise
        if response.code == SMTPStatus.domain_unavailable:
            self.smtp.close()
        return _accepted(response, ok, address)

    async def _ignore_reply(self, exchange: Pipelined) -> None:
        """The RCPT reply after a refused MAIL: read so the next command is answered by its
        own reply; a connection that fails meanwhile is closed (the abort finds it gone)."""
        if not self.alive:
            return
        try:
            await exchange.next()
        except (aiosmtplib.SMTPException, ConnectionError):
            self.smtp.close()

    async def rcpt(self, address: str, dsn: DsnRequest = NO_DSN) -> Reply:
        options = dsn.params() if self.supports("dsn") else []
        self._drop_unasked()
        if self._greeted and _PLAIN_MAILBOX.match(address):
            return await self._command("RCPT", self._path_command(b"RCPT TO:", address, options, _RECIPIENT_OK))
        return await self._command("RCPT", self.smtp.rcpt(address, options=options, encoding="utf-8"))

    def _drop_unasked(self) -> None:
        """Before a command of the transaction no reply is due (each one is read before the
        next command goes): what aiosmtplib has buffered came unasked, in the same read as
        the last reply (it drops only what arrives between commands). Left there, it would
        be this command's reply, and every later reply would be the one before it."""
        protocol = self.smtp.protocol
        if protocol is not None and protocol._buffer:
            discard_buffered(protocol)

    @property
    def _greeted(self) -> bool:
        return self.smtp.last_ehlo_response is not None or self.smtp.last_helo_response is not None

    async def _path_command(self, verb: bytes, address: str, options: list[str], ok: frozenset[int]) -> SMTPResponse:
        """MAIL or RCPT with an address the listener has already parsed and checked, the way
        aiosmtplib's `mail()`/`rcpt()` send it, without its second parse of the address
        (`email.utils.parseaddr`, which returns such an address unchanged): the same command
        bytes, the same exceptions. Only for a greeted connection (aiosmtplib would send EHLO
        first otherwise) and a plain `local@domain` (anything else goes through aiosmtplib)."""
        response = await self.smtp.execute_command(_path_line(verb, address, options))
        return _accepted(response, ok, address)

    async def data(self, message: WireMessage) -> Reply:
        started = time.perf_counter()
        reply = await self._command("DATA", self._stream_data(message))
        _latencies(self.endpoint.label).observe(time.perf_counter() - started)
        self.messages += 1
        return reply

    async def _stream_data(self, message: WireMessage) -> SMTPResponse:
        """DATA with the message written in pieces of at most `_DATA_PIECE` bytes, dot-stuffed
        piece by piece (RFC 5321 §4.5.2), each write waiting until the socket has taken the
        last (flow control): the message is never copied whole. aiosmtplib's `data()` makes
        up to three copies of it (line endings, dot-stuffing, the final dot) and hands the
        transport all of it at once (another copy in the send buffer); for 100 concurrent
        10 MB messages that was most of the relay's memory. Replies and errors are
        aiosmtplib's own (the same exceptions `_command` maps)."""
        smtp = self.smtp
        protocol = smtp.protocol
        timeout = self.endpoint.command_timeout
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self._drop_unasked()
        start = await smtp.execute_command(b"DATA", timeout=timeout)
        if start.code != 354:
            raise aiosmtplib.SMTPDataError(start.code, start.message)
        tail = b"\r\n"  # the last two bytes of the content so far: a line starts after CRLF
        for piece in message.pieces:
            view = memoryview(piece)
            for offset in range(0, len(view), _DATA_PIECE):
                chunk = bytes(view[offset : offset + _DATA_PIECE])
                sent = chunk
                if tail == b"\r\n" and chunk.startswith(b"."):
                    sent = b"." + chunk
                elif tail.endswith(b"\r") and chunk.startswith(b"\n."):
                    sent = b"\n." + chunk[1:]  # a CRLF split between two writes
                if b"\r\n." in sent:
                    sent = sent.replace(b"\r\n.", b"\r\n..")
                await self._write(protocol, sent, timeout)
                tail = (tail + chunk)[-2:]
        # The content ends with CRLF before the final dot (RFC 5321 §4.1.1.4).
        ending = b".\r\n" if tail == b"\r\n" else b"\r\n.\r\n"
        protocol._response_pending = True  # the reply may come before read_response() is awaited
        await self._write(protocol, ending, timeout)
        response = await protocol.read_response(timeout=timeout)
        if response.code != 250:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
        return response

    @staticmethod
    async def _write(protocol: SMTPProtocol, data: bytes, timeout: float) -> None:
        protocol.write(data)
        if not getattr(protocol, "_paused", True):
            # The transport has not asked to pause (aiosmtplib's flow control flag; absent,
            # the wait below): nothing to wait for, so no timer to arm and cancel.
            # _drain_helper still raises if the connection was lost meanwhile.
            await protocol._drain_helper()
            return
        try:
            async with asyncio.timeout(timeout):
                await protocol._drain_helper()
        except TimeoutError:
            raise aiosmtplib.SMTPTimeoutError("Timed out writing the message") from None

    async def reset(self) -> bool:
        self._drop_unasked()
        try:
            response = await self.smtp.rset()
            return response.code == 250
        except aiosmtplib.SMTPException:
            return False

    async def quit(self) -> None:
        try:
            if self.smtp.is_connected:
                await self.smtp.quit(timeout=5)
        except (aiosmtplib.SMTPException, OSError):
            pass
        finally:
            self.smtp.close()

    def close(self) -> None:
        self.smtp.close()

    async def _command(self, stage: str, call: Awaitable[SMTPResponse]) -> Reply:
        """Run one command; the upstream's refusal becomes a Reply, a broken path an SmtpError."""
        label = self.endpoint.label
        try:
            response = await call
        except aiosmtplib.SMTPResponseException as exc:
            # SMTPSenderRefused / SMTPRecipientRefused / SMTPDataError carry the upstream's
            # own reply; pass it through.
            if not 400 <= exc.code < 600:
                # RFC 5321 §4.2.1: a refusal is 4yz or 5yz. Anything else (a 2yz where
                # the command wants 250, or 6yz-9yz, which no client knows how to take)
                # leaves the transaction unknown: closed, and 451 for the client.
                self.close()
                raise _broken(label, stage, f"unexpected reply {exc.code}") from None
            reply = Reply.from_upstream(exc.code, exc.message)
            _replies(label, stage.lower(), f"{exc.code // 100}xx").inc()
            return reply
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
            self.close()
            raise _broken(label, stage, f"connection lost ({exc})", label="upstream_disconnected") from None
        except aiosmtplib.SMTPTimeoutError:
            self.close()
            raise _broken(label, stage, "timed out waiting for a reply", label="upstream_timeout") from None
        except aiosmtplib.SMTPException as exc:
            self.close()
            raise _broken(label, stage, str(exc)) from None
        finally:
            self.last_used = time.monotonic()
        if stage == "DATA":
            _replies(label, "data", f"{response.code // 100}xx").inc()
        return Reply.from_upstream(response.code, response.message)


def no_smtputf8(upstream: str) -> SmtpError:
    """RFC 6531 §3.4, §3.7.1: an internationalized address for a server without SMTPUTF8."""
    return SmtpError(
        553,
        "5.6.7",
        "Upstream does not support SMTPUTF8 addresses",
        reason=f"{upstream}: no SMTPUTF8",
        label="smtputf8",
    )


def _path_line(verb: bytes, address: str, options: list[str]) -> bytes:
    """A MAIL or RCPT command line as aiosmtplib's `mail()`/`rcpt()` send it: the path, then
    the parameters, joined with spaces."""
    return b" ".join([verb + b"<" + address.encode("utf-8") + b">", *(option.encode("ascii") for option in options)])


def _accepted(response: SMTPResponse, ok: frozenset[int], address: str) -> SMTPResponse:
    """The reply to MAIL (`ok` is _SENDER_OK) or RCPT, or aiosmtplib's exception for a refusal."""
    if response.code not in ok:
        refused = aiosmtplib.SMTPSenderRefused if ok is _SENDER_OK else aiosmtplib.SMTPRecipientRefused
        raise refused(response.code, response.message, address)
    return response


def _broken(upstream: str, stage: str, why: str, label: str = "upstream_error") -> SmtpError:
    # RFC 3463 §3.5: 4.4.2 "bad connection" — the path, not the message, failed.
    return SmtpError(
        451,
        "4.4.2",
        "Upstream connection failed, try again later",
        reason=f"upstream {upstream} during {stage}: {why}",
        label=label,
    )


class UpstreamConnector:
    """Opens connections to one endpoint through one dialer.

    With an `AddressResolver`, names are resolved through the configured DNS and each
    address is tried in turn, unless the proxy resolves names itself. TLS always checks the
    name, never the address."""

    def __init__(self, endpoint: UpstreamEndpoint, dialer: Dialer, resolver: AddressResolver | None = None) -> None:
        self.endpoint = endpoint
        self.dialer = dialer
        self.resolver = resolver

    def describe(self) -> str:
        via = self.dialer.describe()
        where = f"{self.endpoint.host}:{self.endpoint.port}"
        return where if via == "direct" else f"{where} via {via}"

    async def open(self, host: str | None = None, tls: str | None = None) -> UpstreamConnection:
        """Connect to `host` (default: the endpoint's); `tls` overrides the endpoint's mode."""
        ep = self.endpoint
        host = host or ep.host
        try:
            connection = await self._open(host, tls or ep.tls)
        except SmtpError as exc:
            UPSTREAM_CONNECTS.labels(ep.label, exc.label).inc()
            raise
        UPSTREAM_CONNECTS.labels(ep.label, "ok").inc()
        return connection

    async def _open(self, host: str, tls: str) -> UpstreamConnection:
        ep = self.endpoint
        where = f"{host}:{ep.port}" + ("" if self.dialer.describe() == "direct" else f" via {self.dialer.describe()}")
        if self.resolver is None or self.dialer.resolves_remotely:
            targets = [host]
        else:
            targets = await self.resolver.addresses(host)
        error: SmtpError | None = None
        reasons: list[str] = []
        for target in targets:
            try:
                sock = await self.dialer.connect(target, ep.port)
            except SmtpError as exc:
                reasons.append(exc.reason)
                if target != host:
                    # Every address tried, in order, so the log shows the whole attempt.
                    exc.reason = f"{host}: " + "; ".join(reasons)
                error = exc
                continue
            # From here the session owns the socket (see _session).
            return await self._session(host, where, sock, tls)
        assert error is not None
        raise error

    async def _session(self, host: str, where: str, sock: socket.socket, tls: str) -> UpstreamConnection:
        """Greet, TLS, authenticate over `sock`. On any failure the connection is closed:
        once `smtp.connect` has the socket, its transport closes it (closing the socket here
        too would free its descriptor while the transport, e.g. in a TLS shutdown, still
        polls it, and the next socket could get the same number)."""
        ep = self.endpoint
        try:
            smtp = aiosmtplib.SMTP(
                hostname=host,
                port=None,
                sock=sock,
                use_tls=tls == "implicit",
                start_tls=False,
                tls_context=ep.tls_context,
                local_hostname=ep.helo_name,
                timeout=ep.command_timeout,
            )
        except BaseException:
            sock.close()  # nothing has taken the socket yet
            raise
        try:
            greeting = await smtp.connect(timeout=ep.connect_timeout)
            ehlo = await smtp.ehlo()
            banner = f"{greeting.message}\n{ehlo.message}"
            wants_tls = tls in ("starttls", "require") or (
                tls == "opportunistic" and smtp.supports_extension("starttls")
            )
            if wants_tls:
                if not smtp.supports_extension("starttls"):
                    raise SmtpError(
                        451,
                        "4.7.5",
                        "Upstream does not offer TLS, try again later",
                        reason=f"upstream {where} does not offer STARTTLS (tls: {tls})",
                        label="upstream_tls",
                    )
                context = ep.tls_context
                if tls == "opportunistic":
                    # RFC 7435: opportunistic encryption does not authenticate the server;
                    # a certificate it cannot verify is still better than plaintext.
                    context = _unverified_context()
                await smtp.starttls(tls_context=context, server_hostname=host)
                # RFC 3207 §4.2: what the server offered before TLS is void; ask again now,
                # before anything looks at the extensions (SMTPUTF8, 8BITMIME, DSN, AUTH).
                # aiosmtplib would only re-send EHLO lazily, at the next command.
                await smtp.ehlo()
            if ep.auth is not None:
                await ep.auth.authenticate(smtp, host, ep.port)
            elif ep.username:
                password = ep.password() if ep.password else None
                if password is None:
                    raise SmtpError(
                        451,
                        "4.7.0",
                        "Upstream credentials unavailable, try again later",
                        reason=f"upstream {where}: password secret not loaded",
                        label="upstream_auth",
                    )
                await _login(smtp, ep.username, password, ep.password_mechanism)
        except SmtpError:
            smtp.close()
            raise
        except aiosmtplib.SMTPAuthenticationError as exc:
            smtp.close()
            raise SmtpError(
                451,
                "4.7.0",
                "Upstream refused the relay's credentials, try again later",
                reason=f"upstream {where}: AUTH refused ({exc.code})",
                label="upstream_auth",
            ) from None
        except aiosmtplib.SMTPConnectResponseError as exc:
            smtp.close()
            raise SmtpError(
                451,
                "4.4.0",
                "Upstream refused the connection, try again later",
                reason=f"upstream {where}: greeting {exc.code} {_first_line(exc.message)}",
                label="upstream_refused",
            ) from None
        except (ssl.SSLError, ssl.CertificateError) as exc:
            smtp.close()
            raise SmtpError(
                451,
                "4.7.5",
                "TLS with the upstream failed, try again later",
                reason=f"upstream {where}: TLS failed ({_tls_reason(exc)})",
                label="upstream_tls",
            ) from None
        except aiosmtplib.SMTPTimeoutError:
            smtp.close()
            raise SmtpError(
                451,
                "4.4.2",
                "Upstream timed out, try again later",
                reason=f"upstream {where}: timed out during greeting/EHLO/TLS",
                label="upstream_timeout",
            ) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ssl.SSLError | ssl.CertificateError):
                raise SmtpError(
                    451,
                    "4.7.5",
                    "TLS with the upstream failed, try again later",
                    reason=f"upstream {where}: TLS failed ({_tls_reason(cause)})",
                    label="upstream_tls",
                ) from None
            raise SmtpError(
                451,
                "4.4.2",
                "Upstream connection failed, try again later",
                reason=f"upstream {where}: {_first_line(str(exc))}",
                label="upstream_error",
            ) from None
        except BaseException:
            smtp.close()  # cancelled (a client gone, a stop): nothing may stay open
            raise
        return UpstreamConnection(ep, smtp, banner, authenticated=ep.auth is not None or bool(ep.username))


async def _login(smtp: aiosmtplib.SMTP, username: str, password: str, mechanism: str | None) -> None:
    """AUTH with a password: the configured mechanism, or the best the server offers."""
    if mechanism is None:
        await smtp.login(username, password)
        return
    if smtp.is_ehlo_or_helo_needed:
        await smtp.ehlo()  # after STARTTLS (RFC 3207 §4.2)
    if mechanism not in smtp.server_auth_methods:
        offered = " ".join(m.upper() for m in smtp.server_auth_methods) or "none"
        raise aiosmtplib.SMTPException(f"upstream does not offer AUTH {mechanism.upper()} (offers: {offered})")
    if mechanism == "plain":
        await smtp.auth_plain(username, password)
    else:
        await smtp.auth_login(username, password)


_UNVERIFIED: ssl.SSLContext | None = None


def _unverified_context() -> ssl.SSLContext:
    global _UNVERIFIED
    if _UNVERIFIED is None:
        _UNVERIFIED = ssl.create_default_context()
        _UNVERIFIED.check_hostname = False
        _UNVERIFIED.verify_mode = ssl.CERT_NONE
        _UNVERIFIED.minimum_version = ssl.TLSVersion.TLSv1_2
    return _UNVERIFIED


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0][:200] if text and text.strip() else ""


def _tls_reason(exc: BaseException) -> str:
    return getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or type(exc).__name__
