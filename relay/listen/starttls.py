"""STARTTLS (RFC 3207) on the event loop's own TLS transport.

aiosmtpd 1.4's `smtp_STARTTLS` builds `asyncio.sslproto.SSLProtocol` itself and splices it
under the protocol: every reply then goes through asyncio's pure-Python TLS layer, even on
uvloop, whose TLS transport is native code (the implicit-TLS listener already uses it). When
applications open a session per message, that layer was about a third of the relay's CPU.
`loop.start_tls()` is the public way to the same upgrade, on whichever loop runs.

The stream's reader and writer are then pointed at the TLS transport, as aiosmtpd itself
does after its own STARTTLS (`StreamReader._transport`, `StreamWriter._transport`: asyncio
has no public setter for a server-side stream; `relay.listen.patches` checks they exist).
"""

from __future__ import annotations

import asyncio
import logging
import ssl

log = logging.getLogger("relay.listen")

READY = b"220 2.0.0 Ready to start TLS\r\n"


async def upgrade(
    protocol: asyncio.BaseProtocol,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    context: ssl.SSLContext,
    handshake_timeout: float,
) -> asyncio.Transport | None:
    """Answer STARTTLS and run the server side of the handshake. Returns the TLS transport,
    or None when the handshake did not complete (the connection is then closed)."""
    plain = writer.transport
    # Written without awaiting: no byte from the client can be read as plaintext between
    # this reply and the switch below (a ClientHello would be, if the loop ran in between).
    writer.write(READY)
    # RFC 3207 §5, the command injection of CVE-2011-0411: whatever the client pipelined
    # after STARTTLS arrived in the clear and must not be read as if it came through TLS.
    # Bytes still in the socket go to the handshake, which they break.
    reader._buffer.clear()  # type: ignore[attr-defined]
    loop = asyncio.get_running_loop()
    try:
        tls = await loop.start_tls(plain, protocol, context, server_side=True, ssl_handshake_timeout=handshake_timeout)
    except OSError as error:  # ssl.SSLError, a reset, ConnectionAbortedError on the timeout
        log.debug("STARTTLS handshake failed", extra={"error": f"{type(error).__name__}: {error}"})
        tls = None
    if tls is None:
        # asyncio returns None when the connection closed cleanly during the handshake.
        plain.close()
        return None
    reader._transport = tls  # type: ignore[attr-defined]
    writer._transport = tls  # type: ignore[attr-defined]
    return tls
