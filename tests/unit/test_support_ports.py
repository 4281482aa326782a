"""tests.support.procs.dead_port: a port where nothing listens, and nothing can start to."""

from __future__ import annotations

import socket

import pytest

from tests.support.procs import dead_port, free_port, holding_dead_ports, reserved_port


def test_a_connect_to_a_dead_port_is_refused_and_nobody_can_bind_it():
    port = dead_port()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    for option in (socket.SO_REUSEADDR, socket.SO_REUSEPORT):  # what asyncio's servers set
        with socket.socket() as other, pytest.raises(OSError):
            other.setsockopt(socket.SOL_SOCKET, option, 1)
            other.bind(("127.0.0.1", port))


def test_a_dead_udp_port_refuses_datagrams():
    port = dead_port(udp=True)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        client.connect(("127.0.0.1", port))
        client.send(b"query")
        with pytest.raises(ConnectionRefusedError):
            client.recv(512)


def test_the_port_is_released_when_the_block_ends():
    with holding_dead_ports():
        port = dead_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))


def test_a_reserved_port_is_for_the_server_that_binds_it_with_so_reuseport():
    port = reserved_port()
    with socket.socket() as other, pytest.raises(OSError):  # what a port-0 or free_port() listener is
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(("127.0.0.1", port))
    with pytest.raises(ConnectionRefusedError):  # nobody listens yet
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        server.accept()[0].close()
    with pytest.raises(ConnectionRefusedError):  # the server is gone; the port is still held
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_no_port_number_is_handed_out_twice_in_a_row_of_calls():
    """A relay's config takes free ports for its listeners, then a dead port for its DNS: the
    kernel may offer a number just released again, and the relay then cannot bind the port
    the test holds ("address already in use"). With 600 numbers drawn from ~14,000, a
    repeat is all but certain unless the helpers refuse recent numbers."""
    with holding_dead_ports():
        ports = [free_port() for _ in range(300)] + [dead_port(udp=(i % 2 == 0)) for i in range(300)]
    assert len(set(ports)) == len(ports)
