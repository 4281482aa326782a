"""The listening sockets: one asyncio server per configured listener.

STARTTLS listeners (587-style) and plain ones run the SMTP protocol on the raw socket;
implicit-TLS listeners (465-style, RFC 8314 §3.3) wrap it in TLS before the greeting.
The server TLS context is shared and reloaded in place on SIGHUP, so a renewed
certificate is used by new connections without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

from relay.config.schema import ListenerSettings, Settings, TlsSettings
from relay.listen.budget import DataBudget
from relay.listen.connections import Connections
from relay.listen.session import ClientSession, SessionContext
from relay.listen.smtp import TLS_HANDSHAKE_TIMEOUT, RelaySMTP
from relay.policy.senders import ClientNetworks

log = logging.getLogger("relay.listen")

# aiosmtpd waits this long for a PROXY header before giving up on the connection.
PROXY_PROTOCOL_TIMEOUT = 10.0


class ServerTls:
    """The server-side TLS context, reloadable in place."""

    def __init__(self, settings: TlsSettings, *, context: ssl.SSLContext | None = None) -> None:
        self.context = context or ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.verify_mode = ssl.CERT_NONE  # clients authenticate with AUTH, not certs
        self.context.options |= ssl.OP_NO_COMPRESSION
        # RFC 8446 §4.6.1: after each TLS 1.3 handshake the server sends session tickets;
        # OpenSSL sends two, so that a client can resume two connections at once. A
        # submission client resumes one connection at a time and gets a new ticket with each
        # handshake, resumed or not, so one is enough; each ticket costs an encryption and a
        # record (about 0.07 ms of the relay's CPU per connection, most clients never resume).
        self.context.num_tickets = 1
        self.load(settings)

    def load(self, settings: TlsSettings) -> None:
        self.context.minimum_version = (
            ssl.TLSVersion.TLSv1_3 if settings.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
        )
        if settings.cert_file and settings.key_file:
            self.context.load_cert_chain(str(settings.cert_file), str(settings.key_file))


def check_tls_files(settings: TlsSettings) -> str | None:
    """Load the certificate and key once, to report a bad pair at config validation."""
    if not (settings.cert_file and settings.key_file):
        return None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            str(settings.cert_file), str(settings.key_file)
        )
    except (ssl.SSLError, OSError) as exc:
        return f"cannot load certificate/key ({getattr(exc, 'reason', None) or exc})"
    return None


class ListenerServer:
    """One listening socket; every connection it accepts gets a `RelaySMTP` edge and a
    `ClientSession` for the listener's current settings."""

    def __init__(
        self,
        settings: ListenerSettings,
        context: SessionContext,
        connections: Connections,
        tls: ServerTls,
        global_settings: Settings,
        *,
        reuse_port: bool = False,
        budget: DataBudget | None = None,
    ) -> None:
        self.settings = settings
        self.context = context
        self.connections = connections
        self.tls = tls
        self.global_settings = global_settings
        self.reuse_port = reuse_port
        self.budget = budget or DataBudget(global_settings.clients.max_bytes_in_flight)
        self._server: asyncio.Server | None = None

    @property
    def name(self) -> str:
        return self.settings.name

    def update(self, global_settings: Settings, settings: ListenerSettings) -> None:
        """Apply a reloaded config to new connections (same bind, other options)."""
        self.global_settings = global_settings
        self.settings = settings

    def _protocol(self) -> RelaySMTP:
        lst, cfg = self.settings, self.global_settings
        return RelaySMTP(
            ClientSession(lst, self.context),
            self.connections,
            implicit_tls=lst.tls == "implicit",
            bare_newline=cfg.clients.bare_newline,
            data_timeout=cfg.clients.data_timeout,
            max_session_duration=cfg.clients.max_session_duration,
            max_connections=cfg.clients.max_connections,
            max_connections_per_address=cfg.clients.max_connections_per_address,
            proxy_from=ClientNetworks(lst.proxy_protocol_from) if lst.proxy_protocol_from is not None else None,
            advertise_auth=lst.auth != "none",
            budget=self.budget,
            hostname=cfg.hostname,
            ident="ESMTP relay",
            data_size_limit=cfg.clients.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=self.tls.context if lst.tls == "starttls" else None,
            timeout=cfg.clients.session_timeout,
            # Our own checks decide AUTH/TLS (see RelaySMTP.smtp_AUTH and the pipeline).
            auth_required=False,
            auth_require_tls=False,
            proxy_protocol_timeout=PROXY_PROTOCOL_TIMEOUT if lst.proxy_protocol else None,
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> None:
        host, port = self.settings.bind
        loop = asyncio.get_running_loop()
        implicit = self.settings.tls == "implicit"
        self._server = await loop.create_server(
            self._protocol,
            host=host,
            port=port,
            ssl=self.tls.context if implicit else None,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if implicit else None,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
            backlog=1024,
        )
        log.info(
            "listening",
            extra={
                "listener": self.name,
                "bind": str(self.settings.bind),
                "tls": self.settings.tls,
                "auth": self.settings.auth,
            },
        )

    def stop_accepting(self) -> None:
        """Close the listening socket; sessions already open carry on."""
        if self._server is not None:
            self._server.close()
            self._server = None

    @property
    def bound(self) -> bool:
        return self._server is not None and self._server.is_serving()

    def sockets(self) -> list[socket.socket]:
        return list(self._server.sockets) if isinstance(self._server, asyncio.Server) else []
