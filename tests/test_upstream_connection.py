"""One upstream SMTP connection (relay.deliver.connection) against a real upstream, in the
test's event loop: what happens to the socket when the session fails."""

from __future__ import annotations

import asyncio

import aiosmtplib
import pytest

from relay.deliver.base import DsnRequest, Envelope
from relay.deliver.connection import UpstreamConnector, UpstreamEndpoint, upstream_tls_context
from relay.deliver.dial import DirectDialer
from relay.dns.addresses import AddressResolver
from relay.errors import SmtpError
from tests.support.upstream import Upstream


def connector(port: int, ca_file: str, password: str) -> UpstreamConnector:
    endpoint = UpstreamEndpoint(
        label="up",
        host="localhost",
        port=port,
        tls="starttls",
        tls_context=upstream_tls_context(ca_file, True),
        helo_name="relay.test",
        username="relayuser",
        password=lambda: password,
        connect_timeout=5,
        command_timeout=5,
    )
    return UpstreamConnector(endpoint, DirectDialer(connect_timeout=5), AddressResolver(None))


async def test_a_failed_session_leaves_its_socket_to_the_transport(pki):
    """AUTH refused after STARTTLS: the TLS transport is still shutting down when the
    session gives up. Closing the socket under it freed its descriptor for the next dial,
    which then failed with asyncio's "file descriptor is used by transport" RuntimeError
    (a 451 4.3.0 internal error for the client) instead of the upstream's AUTH refusal."""
    with Upstream(tls="starttls", server_context=pki.server_context(), users={"relayuser": "right"}) as up:
        wrong = connector(up.port, str(pki.ca_file), "wrong")
        for _ in range(20):
            with pytest.raises(SmtpError) as err:
                await wrong.open()
            assert (err.value.code, err.value.label) == (451, "upstream_auth")
        right = await connector(up.port, str(pki.ca_file), "right").open()
        assert right.alive
        await right.quit()


class _RecordingServer:
    """A raw SMTP server that keeps every command line as sent and answers `codes` (MAIL and
    RCPT) or 250: what aiosmtplib and the relay put on the wire, byte for byte."""

    def __init__(self, mail_code: int = 250, rcpt_code: int = 250) -> None:
        self.lines: list[bytes] = []
        self.codes = {b"MAIL": mail_code, b"RCPT": rcpt_code}

    async def __aenter__(self) -> _RecordingServer:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 upstream.test ESMTP\r\n")
        while line := await reader.readline():
            self.lines.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-upstream.test\r\n250-SMTPUTF8\r\n250-8BITMIME\r\n250 DSN\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                code = self.codes.get(verb, 250)
                writer.write(b"%d %s\r\n" % (code, b"ok" if code < 400 else b"refused"))
            await writer.drain()
        writer.close()


def _plain_endpoint(port: int) -> UpstreamEndpoint:
    return UpstreamEndpoint(
        label="up", host="127.0.0.1", port=port, tls="none", tls_context=None, helo_name="relay.test"
    )


ADDRESSES = [
    "app@example.com",
    "first.last+tag@sub.example.com",
    "o'neil=x#y@example.com",
    "jörg@bücher.example",  # RFC 6531
    '"quoted local"@example.com',  # not plain: aiosmtplib's own quoting
    "user@[192.0.2.1]",  # an address literal: aiosmtplib's own quoting
]


async def test_mail_and_rcpt_put_the_same_bytes_on_the_wire_as_aiosmtplib():
    """MAIL and RCPT with an address the listener already checked skip aiosmtplib's second
    parse of it (email.utils.parseaddr): what reaches the upstream must not change."""
    async with _RecordingServer() as server:
        connection = await UpstreamConnector(_plain_endpoint(server.port), DirectDialer(connect_timeout=5)).open()
        for address in ADDRESSES:
            dsn = DsnRequest(notify="SUCCESS,FAILURE", orcpt="rfc822;" + address.encode().hex())
            await connection.mail(Envelope(address, smtputf8=True, body_8bit=True, ret="HDRS", envid="e1"))
            await connection.rcpt(address, dsn)
            await connection.reset()
        await connection.quit()
        ours = [line for line in server.lines if line[:4] in (b"MAIL", b"RCPT")]
        server.lines.clear()
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port, local_hostname="relay.test")
        await smtp.connect()
        for address in ADDRESSES:
            dsn = DsnRequest(notify="SUCCESS,FAILURE", orcpt="rfc822;" + address.encode().hex())
            options = ["BODY=8BITMIME", "SMTPUTF8", "RET=HDRS", "ENVID=e1"]
            await smtp.mail(address, options=options, encoding="utf-8")
            await smtp.rcpt(address, options=dsn.params(), encoding="utf-8")
            await smtp.rset()
        await smtp.quit()
        theirs = [line for line in server.lines if line[:4] in (b"MAIL", b"RCPT")]
    assert len(ours) == 2 * len(ADDRESSES) and ours == theirs


async def test_plain_addresses_are_not_parsed_again(monkeypatch):
    parsed: list[str] = []
    original = aiosmtplib.smtp.quote_address
    monkeypatch.setattr(aiosmtplib.smtp, "quote_address", lambda a: parsed.append(a) or original(a))
    async with _RecordingServer() as server:
        connection = await UpstreamConnector(_plain_endpoint(server.port), DirectDialer(connect_timeout=5)).open()
        for address in ADDRESSES:
            await connection.mail(Envelope(address, smtputf8=True))
            await connection.rcpt(address)
            await connection.reset()
        await connection.quit()
    assert parsed == [address for address in ADDRESSES[4:] for _ in "mail rcpt".split()]


@pytest.mark.parametrize(("mail_code", "rcpt_code"), [(550, 250), (451, 250), (250, 550), (250, 452)])
async def test_upstream_refusals_at_mail_and_rcpt_are_the_clients_reply(mail_code, rcpt_code):
    async with _RecordingServer(mail_code, rcpt_code) as server:
        connection = await UpstreamConnector(_plain_endpoint(server.port), DirectDialer(connect_timeout=5)).open()
        mail = await connection.mail(Envelope("app@example.com"))
        rcpt = await connection.rcpt("user@example.net")
        await connection.quit()
    assert (mail.code, rcpt.code) == (mail_code, rcpt_code)
