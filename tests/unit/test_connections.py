"""relay.listen.connections: the session limits count sessions, not lingering sockets."""

from __future__ import annotations

from relay.listen.connections import Connections


class _Conn:
    def shutdown(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_lingering_sockets_are_waited_for_but_not_counted_as_sessions():
    """A refused or ended session's socket lingers up to 5 s (relay.listen.smtp._Linger);
    counted as a session, a burst of refusals kept the limit reached after the sessions
    themselves had closed."""
    connections = Connections()
    session, lingering = _Conn(), _Conn()
    connections.add(session, "192.0.2.1")
    assert connections.refusal("192.0.2.2", 1, None) is not None
    connections.add(lingering)  # the refused one, half-closed
    connections.discard(session)
    assert len(connections) == 1  # a drain still waits for it
    assert connections.refusal("192.0.2.2", 1, 1) is None


def test_per_address_counts_follow_the_sessions():
    connections = Connections()
    first, second = _Conn(), _Conn()
    connections.add(first, "192.0.2.1")
    connections.add(second, "192.0.2.1")
    refusal = connections.refusal("192.0.2.1", 10, 2)
    assert refusal is not None and (refusal.reply.code, refusal.reply.enhanced) == (421, "4.7.0")
    assert connections.refusal("192.0.2.9", 10, 2) is None
    connections.discard(first)
    connections.discard(first)  # twice: no effect
    assert connections.refusal("192.0.2.1", 10, 2) is None
    full = connections.refusal("192.0.2.1", 1, None)
    assert full is not None and (full.reply.code, full.reply.enhanced) == (421, "4.3.2")
