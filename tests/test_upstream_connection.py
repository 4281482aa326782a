"""One upstream SMTP connection (relay.deliver.connection) against a real upstream, in the
test's event loop: what happens to the socket when the session fails."""

from __future__ import annotations

import pytest

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
