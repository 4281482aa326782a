"""A real SMTP upstream for tests: aiosmtpd on a loopback port, in its own thread.

It records every message it accepts (envelope, bytes, the peer it came from, whether TLS
was on) and can be told to refuse at MAIL/RCPT/DATA, to stall, or to require AUTH. With
`dsn=True` it offers the DSN extension (RFC 3461) and records the DSN parameters it got.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from relay.deliver.connection import UpstreamConnector, UpstreamEndpoint
from relay.deliver.dial import DirectDialer
from relay.deliver.pool import ConnectionPool
from relay.dns.addresses import AddressResolver
from tests.support.procs import free_port


@dataclass
class ReceivedMessage:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    peer: tuple
    tls: bool
    user: str | None
    # MAIL parameters as sent (e.g. ["BODY=8BITMIME", "RET=HDRS"]) and RCPT parameters per
    # recipient; DSN parameters keep their case.
    mail_options: list[str] = field(default_factory=list)
    rcpt_options: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class UpstreamBehaviour:
    mail_reply: str | None = None  # e.g. "451 4.3.0 try later"
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # address → reply
    # Recipients taken per transaction; beyond: 452 4.5.3 (RFC 5321 §4.5.3.1.10).
    max_recipients: int | None = None
    data_reply: str | None = None
    data_delay: float = 0.0
    rcpt_delay: float = 0.0
    mail_delay: float = 0.0
    # DATA's reply waits until the test sets it (a slow upstream, without a timing margin).
    data_gate: threading.Event | None = None
    queue_id_prefix: str = "Q"


class _Handler:
    def __init__(self, upstream: Upstream) -> None:
        self.up = upstream

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.up.dsn:
            responses.insert(-1, "250-DSN")
        if self.up.pipelining:
            # aiosmtpd reads commands one by one from its stream, so it takes pipelined
            # ones (RFC 2920) as they come; it just does not say so.
            responses.insert(-1, "250-PIPELINING")
        if not self.up.eightbit:
            responses = [r for r in responses if r[4:] != "8BITMIME"]
        return responses

    async def handle_MAIL(self, server, session, envelope, address, options):
        self.up.mail_commands += 1
        self.up.commands.append("MAIL")
        # The next command already read, before this MAIL has its reply: the client sent it
        # with MAIL (RFC 2920). A client that waits for each reply cannot have sent it yet.
        ahead = bytes(server._reader._buffer[:4]).upper() == b"RCPT"
        self.up.mails.append((address, ahead))
        if self.up.behaviour.mail_delay:
            await asyncio.sleep(self.up.behaviour.mail_delay)
        if self.up.behaviour.mail_reply:
            return self.up.behaviour.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(getattr(server, "dsn_mail_params", []) + options)
        envelope.rcpt_params = {}
        return "250 2.1.0 OK"

    async def handle_RSET(self, server, session, envelope):
        self.up.commands.append("RSET")
        return "250 2.0.0 OK"

    async def handle_QUIT(self, server, session, envelope):
        self.up.commands.append("QUIT")
        return "221 2.0.0 Bye"

    async def handle_RCPT(self, server, session, envelope, address, options):
        self.up.commands.append("RCPT")
        if self.up.behaviour.rcpt_delay:
            await asyncio.sleep(self.up.behaviour.rcpt_delay)
        reply = self.up.behaviour.rcpt_replies.get(address)
        limit = self.up.behaviour.max_recipients
        if not reply and limit is not None and len(envelope.rcpt_tos) >= limit:
            reply = "452 4.5.3 Too many recipients"
        if reply:
            if reply.startswith("421"):
                # RFC 5321 §3.8: 421, then the server closes the channel (once the reply is out).
                asyncio.get_running_loop().call_soon(server.transport.close)
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_params[address] = getattr(server, "dsn_rcpt_params", []) + options
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        self.up.commands.append("DATA")
        b = self.up.behaviour
        if b.data_delay or b.data_gate is not None:
            await asyncio.sleep(b.data_delay)
            if b.data_gate is not None:
                await asyncio.to_thread(b.data_gate.wait, 120)
            if server.transport is None or server.transport.is_closing():
                # The client gave up waiting: no 250 can reach it, so nothing is committed.
                return "421 4.4.2 client gone"
        if b.data_reply:
            return b.data_reply
        login = session.auth_data.login if session.auth_data is not None else None
        with self.up.lock:
            self.up.messages.append(
                ReceivedMessage(
                    # aiosmtpd keeps the null reverse-path as "<>"; recorded as "" (no sender).
                    mail_from="" if envelope.mail_from == "<>" else envelope.mail_from,
                    rcpt_tos=list(envelope.rcpt_tos),
                    content=bytes(envelope.original_content),
                    peer=session.peer,
                    tls=session.ssl is not None or self.up.implicit,
                    user=login.decode() if isinstance(login, bytes) else login,
                    mail_options=list(envelope.mail_options),
                    rcpt_options=dict(getattr(envelope, "rcpt_params", {})),
                )
            )
            n = len(self.up.messages)
        return f"250 2.0.0 Ok: queued as {b.queue_id_prefix}{n:06d}"


class _ParamSMTP(SMTP):
    """aiosmtpd refuses every MAIL/RCPT parameter it does not know (555); this one takes the
    DSN parameters (when it offers DSN) and AUTH= (when it offers AUTH, RFC 4954 §5) off
    the command first and keeps them for the handler."""

    mail_params: tuple[str, ...] = ()
    rcpt_params: tuple[str, ...] = ()

    async def smtp_MAIL(self, arg):
        arg, self.dsn_mail_params = _take_params(arg, self.mail_params)
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg):
        arg, self.dsn_rcpt_params = _take_params(arg, self.rcpt_params)
        await super().smtp_RCPT(arg)


def _take_params(arg: str | None, names: tuple[str, ...]) -> tuple[str | None, list[str]]:
    if not arg:
        return arg, []
    words = arg.split(" ")
    taken = [w for w in words if w.partition("=")[0].upper() in names]
    return " ".join(w for w in words if w not in taken), taken


class _Controller(Controller):
    def __init__(self, *args, dsn: bool, auth: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mail_params = ("RET", "ENVID") * dsn + ("AUTH",) * auth
        self.rcpt_params = ("NOTIFY", "ORCPT") * dsn

    def factory(self):
        server = _ParamSMTP(self.handler, **self.SMTP_kwargs)
        server.mail_params, server.rcpt_params = self.mail_params, self.rcpt_params
        return server


class Upstream:
    """`tls`: none | starttls | implicit. `users`: {username: password} to require AUTH
    (and take AUTH= on MAIL). `dsn`: offer the DSN extension (RFC 3461). `eightbit=False`:
    do not offer 8BITMIME (RFC 6152). `idle_timeout`: drop a session idle that long.
    `pipelining`: offer PIPELINING (RFC 2920); `mails` records whether each MAIL came with
    its first RCPT. `smtputf8=False`: do not offer SMTPUTF8 (RFC 6531)."""

    def __init__(
        self,
        *,
        tls: str = "none",
        server_context: ssl.SSLContext | None = None,
        users: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        hostname: str = "upstream.test",
        dsn: bool = False,
        eightbit: bool = True,
        idle_timeout: float | None = None,
        pipelining: bool = False,
        smtputf8: bool = True,
    ) -> None:
        self.host = host
        self.dsn = dsn
        self.pipelining = pipelining
        self.eightbit = eightbit
        self.port = port or free_port(host)
        self.implicit = tls == "implicit"
        self.behaviour = UpstreamBehaviour()
        self.messages: list[ReceivedMessage] = []
        self.mail_commands = 0
        self.commands: list[str] = []  # MAIL, RCPT, RSET, QUIT as they arrive
        # Per MAIL: its address, and whether the RCPT after it had come before MAIL's reply
        # (sent with it, RFC 2920).
        self.mails: list[tuple[str, bool]] = []
        self.lock = threading.Lock()
        kwargs: dict = {"data_size_limit": 60 * 1024 * 1024}
        if not smtputf8:
            kwargs["enable_SMTPUTF8"] = False  # aiosmtpd's Controller offers it by default
        if idle_timeout is not None:
            kwargs["timeout"] = idle_timeout  # 421 and close after this long without a command
        if tls == "starttls":
            kwargs["tls_context"] = server_context
            kwargs["require_starttls"] = False
        if users is not None:

            def authenticator(server, session, envelope, mechanism, auth_data):
                ok = (
                    isinstance(auth_data, LoginPassword)
                    and users.get(auth_data.login.decode()) == auth_data.password.decode()
                )
                return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

            kwargs["authenticator"] = authenticator
            kwargs["auth_required"] = True
            kwargs["auth_require_tls"] = tls != "none"
        self._make_controller = lambda: _Controller(
            _Handler(self),
            dsn=dsn,
            auth=users is not None,
            hostname=host,
            port=self.port,
            ssl_context=server_context if self.implicit else None,
            server_hostname=hostname,
            ready_timeout=10,
            **kwargs,
        )
        self._controller = self._make_controller()

    def start(self) -> Upstream:
        """Start (again: a stopped upstream restarts on the same port)."""
        if self._controller.loop.is_closed():
            self._controller = self._make_controller()
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop(no_assert=True)

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.02)
        raise AssertionError(f"upstream got {len(self.messages)} messages, expected {count}")


def plain_upstream_pool(
    port: int, *, timeout: float = 30.0, max_connections: int = 4, idle_timeout: float = 60.0
) -> tuple[UpstreamConnector, ConnectionPool]:
    """relay's own connector and pool to a plain-SMTP upstream on 127.0.0.1:`port`, without
    the wiring: for tests of the pool and the spool runner."""
    endpoint = UpstreamEndpoint(
        label="up",
        host="127.0.0.1",
        port=port,
        tls="none",
        tls_context=None,
        helo_name="relay.test",
        username=None,
        password=None,
        connect_timeout=timeout,
        command_timeout=timeout,
    )
    connector = UpstreamConnector(endpoint, DirectDialer(connect_timeout=timeout), AddressResolver(None))
    pool = ConnectionPool(
        "up",
        connector.open,
        max_connections=max_connections,
        max_messages=100,
        idle_timeout=idle_timeout,
        acquire_timeout=timeout,
    )
    return connector, pool
