"""Hostile clients and unlucky timing (issue 12): one message must not freeze the relay, and
a client that vanishes, a slow upstream or a drain must not leak, duplicate or lose."""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.support.dkim import verify_all
from tests.support.inloop import in_thread
from tests.support.smtp import connect, message, reply


def wait_until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


STALE_OWN = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=s1; h=from; bh=x; b=y\r\n"


@in_thread
def test_a_message_with_20000_own_signatures_leaves_other_sessions_served(make_loop_relay, upstream, pki, dkim_keys):
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["clients"]["max_message_size"] = "4MiB"
    relay.start()
    big = STALE_OWN * 20_000 + message(subject="many signatures")
    sender = connect(relay, pki)
    other = connect(relay, pki)
    assert reply(sender, "MAIL FROM:<app@example.com>")[0] == 250
    assert reply(sender, "RCPT TO:<u@example.net>")[0] == 250
    assert reply(sender, "DATA")[0] == 354
    sender.send(big + b".\r\n")
    wait_until(lambda: relay.metric("relay_messages_received_total") == 1)
    # The whole message is in: while it is parsed, signed and sent, another session is
    # answered (a loop frozen by quadratic work answered nothing for over a minute; 20 s is
    # generous for a loaded machine).
    other.sock.settimeout(20)
    assert other.noop()[0] == 250
    assert reply(other, "MAIL FROM:<app@example.com>")[0] == 250
    sender.sock.settimeout(120)
    code, text = sender.getreply()
    assert code == 250, text
    [received] = upstream.wait_for(1)
    assert received.content.count(b"DKIM-Signature:") == 2  # ours, fresh; the stale ones gone
    assert verify_all(received.content, dkim_keys.dns()) == [True, True]
    other.quit()
    sender.quit()
