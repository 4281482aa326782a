"""Hostile clients and unlucky timing (issue 12): one message must not freeze the relay, and
a client that vanishes, a slow upstream or a drain must not leak, duplicate or lose."""

from __future__ import annotations

import asyncio
import gc
import select
import smtplib
import socket
import time
from collections.abc import Callable

import pytest

from relay.deliver import connection
from tests.support.dkim import verify_all
from tests.support.inloop import in_thread
from tests.support.proxies import microsocks
from tests.support.smtp import connect, message, reply, submit
from tests.support.upstream import Upstream


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


def vanish(client: smtplib.SMTP) -> None:
    """The client is gone: no QUIT, the connection just ends."""
    client.sock.shutdown(socket.SHUT_RDWR)
    client.close()


def busy_upstream_connections(relay) -> float:
    return relay.metric("relay_upstream_pool_connections", state="busy")


@pytest.mark.parametrize("stage", ["MAIL", "RCPT", "DATA"])
@in_thread
def test_a_client_gone_while_the_upstream_answers_frees_the_pool_slot(make_loop_relay, upstream, pki, stage):
    """The client vanishes while the relay waits for the upstream's reply to MAIL, RCPT or
    DATA: the upstream connection is ended (QUIT) and its pool slot freed, so with a pool
    of one the next message still goes through (before: 451 4.4.5 Upstream busy)."""
    setattr(upstream.behaviour, f"{stage.lower()}_delay", 3.0)
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["upstream"]["pool"] = {"max_connections": 1, "acquire_timeout": "5s"}
    relay.start()
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    if stage == "DATA":
        assert reply(client, "RCPT TO:<u@example.net>")[0] == 250
        assert reply(client, "DATA")[0] == 354
        client.send(message() + b".\r\n")
    else:
        client.send(b"RCPT TO:<u@example.net>\r\n")
    wait_until(lambda: stage in upstream.commands)  # the relay now waits for the reply
    vanish(client)
    wait_until(lambda: "QUIT" in upstream.commands or "RSET" in upstream.commands[upstream.commands.index(stage) :])
    wait_until(lambda: busy_upstream_connections(relay) == 0)
    setattr(upstream.behaviour, f"{stage.lower()}_delay", 0.0)
    assert submit(relay, pki) == {}


@in_thread
def test_session_timeout_equal_to_command_timeout_gets_a_reply_and_frees_the_slot(make_loop_relay, upstream, pki):
    """With session_timeout == command_timeout and an upstream slower than both, the client
    got EOF and no reply, and the slot leaked. The session's idle timer does not run while
    the relay itself waits for the upstream: the client gets 451 and the slot is free."""
    upstream.behaviour.rcpt_delay = 4.0
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["upstream"]["command_timeout"] = "2s"
    relay.config["upstream"]["pool"] = {"max_connections": 1, "acquire_timeout": "5s"}
    relay.config["clients"]["session_timeout"] = "2s"
    relay.start()
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    code, text = reply(client, "RCPT TO:<u@example.net>")
    assert (code, text[:5]) == (451, "4.4.2")
    wait_until(lambda: busy_upstream_connections(relay) == 0)
    upstream.behaviour.rcpt_delay = 0.0
    assert submit(relay, pki) == {}
    assert len(upstream.wait_for(1)) == 1


def greeting(relay) -> bytes:
    with socket.create_connection(("127.0.0.1", relay.port("submission")), timeout=20) as sock:
        return sock.recv(512)


@in_thread
def test_sessions_past_max_connections_get_421_at_the_greeting(make_loop_relay, upstream, pki):
    """Nothing bounded the sessions one process holds: one allowed client could open tens of
    thousands (memory, file descriptors; the upstream connections and spool writes then fail
    with EMFILE). RFC 5321 §3.1: 421 instead of the greeting."""
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["clients"]["max_connections"] = 2
    relay.start()
    first, second = connect(relay, pki), connect(relay, pki)
    assert greeting(relay) == b"421 4.3.2 Too many connections, try again later\r\n"
    assert relay.metric("relay_sessions_refused_total", listener="submission", reason="too_many_connections") == 1
    second.quit()
    wait_until(lambda: greeting(relay).startswith(b"220 "))
    assert first.noop()[0] == 250  # the sessions in place are untouched


@in_thread
def test_sessions_past_max_connections_per_address_get_421(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["clients"]["max_connections_per_address"] = 1
    relay.start()
    held = connect(relay, pki)
    assert greeting(relay) == b"421 4.7.0 Too many connections from your address, try again later\r\n"
    held.quit()
    wait_until(lambda: greeting(relay).startswith(b"220 "))
    assert submit(relay, pki) == {}


@pytest.mark.parametrize("listener", ["submission", "submissions"])
@in_thread
def test_an_idle_session_gets_421_before_the_close(make_loop_relay, upstream, pki, listener):
    """session_timeout used to close an idle session with no reply: the client saw the
    connection drop with nothing to log. RFC 5321 §3.8: 421 first (over TLS too)."""
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["clients"]["session_timeout"] = "1s"
    relay.start()
    client = connect(relay, pki, listener=listener)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    assert client.getreply() == (421, b"4.4.2 Timeout exceeded, closing connection")
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.noop()


def reply_when_pending(client: smtplib.SMTP) -> tuple[int, bytes] | None:
    """The reply the relay sent without being asked (a 421 before it closes), if any."""
    sock = client.sock
    assert sock is not None
    if getattr(sock, "pending", lambda: 0)() or select.select([sock], [], [], 0)[0]:
        return client.getreply()
    return None


@pytest.mark.parametrize("listener", ["submission", "submissions"])
@in_thread
def test_a_transaction_kept_open_with_noops_ends_and_frees_the_upstream(make_loop_relay, upstream, pki, listener):
    """MAIL and RCPT take a pooled upstream connection for the transaction; NOOPs (or any
    command that does not move it on) kept resetting the idle timer, so the connection
    stayed taken until the upstream dropped it or max_session_duration: `max_connections`
    such clients and everyone else got 451 4.4.5. The client's time from the first RCPT
    to DATA is now bounded by session_timeout (RFC 5321 §4.5.3.2.7): 421 4.4.2, the
    upstream transaction is reset and its connection serves the next client."""
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["upstream"]["pool"] = {"max_connections": 1, "acquire_timeout": "1s"}
    relay.config["clients"]["session_timeout"] = "2s"
    relay.start()
    dawdler = connect(relay, pki, listener=listener)
    assert reply(dawdler, "MAIL FROM:<app@example.com>")[0] == 250
    assert reply(dawdler, "RCPT TO:<u@example.net>")[0] == 250
    ended = None
    for _ in range(150):  # NOOPs well inside session_timeout, for up to 30 s
        ended = reply_when_pending(dawdler)
        if ended is not None:
            break
        assert dawdler.noop()[0] == 250
        time.sleep(0.2)
    assert ended == (421, b"4.4.2 Transaction not completed in time, closing connection")
    with pytest.raises(smtplib.SMTPServerDisconnected):
        dawdler.noop()
    line = relay.wait_log(lambda e: e.get("event") == "message")
    assert (line["msg"], line["code"], line["enhanced"]) == ("refused", 421, "4.4.2")
    assert "session_timeout" in line["reason"]
    assert relay.metric("relay_messages_rejected_total", reason="timeout") == 1
    wait_until(lambda: busy_upstream_connections(relay) == 0)
    assert submit(relay, pki) == {}
    assert len(upstream.wait_for(1)) == 1
    transactions = [c for c in upstream.commands if c in ("MAIL", "RCPT", "RSET")]
    assert transactions == ["MAIL", "RCPT", "RSET", "MAIL", "RCPT"]  # the held one was reset


@in_thread
def test_a_slow_upstream_does_not_count_against_the_clients_time_in_a_transaction(make_loop_relay, upstream, pki):
    """The bound above is on the client's own pauses: recipients the upstream takes long to
    answer, together longer than session_timeout, still make one message."""
    upstream.behaviour.rcpt_delay = 0.8
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["clients"]["session_timeout"] = "2s"
    relay.start()
    rcpts = [f"u{i}@example.net" for i in range(5)]
    assert submit(relay, pki, rcpts=rcpts) == {}
    assert upstream.wait_for(1)[0].rcpt_tos == rcpts


@in_thread
def test_drain_while_the_upstream_answers_data_gives_the_real_reply_then_421(make_loop_relay, upstream, pki):
    """SIGTERM's drain while the upstream is answering DATA: the client gets the upstream's
    answer (250: delivered once), then 421; before, it got 421 at once and retried a
    message the upstream had accepted (a duplicate)."""
    upstream.behaviour.data_delay = 2.0
    relay = make_loop_relay(upstream.port)
    client = connect(relay, pki)
    assert reply(client, "MAIL FROM:<app@example.com>")[0] == 250
    assert reply(client, "RCPT TO:<u@example.net>")[0] == 250
    assert reply(client, "DATA")[0] == 354
    client.send(message() + b".\r\n")
    wait_until(lambda: "DATA" in upstream.commands)
    drained = asyncio.run_coroutine_threadsafe(relay.running.drain(), relay.loop)
    code, text = client.getreply()
    assert code == 250, text
    assert client.getreply() == (421, b"4.3.2 Service shutting down, closing connection")
    drained.result(timeout=30)
    assert len(upstream.wait_for(1)) == 1
    assert busy_upstream_connections(relay) == 0


@pytest.mark.binaries
@in_thread
def test_a_rotated_proxy_password_is_used_without_a_reload(make_loop_relay, upstream, pki, tmp_path):
    """The proxy password is read at every dial, like the upstream's: before, it was read
    once at start, so after a rotation every message got 451 until a reload."""
    secret = tmp_path / "proxy-password"
    secret.write_text("old-secret")
    secret.chmod(0o600)
    with microsocks(tmp_path, user="relay", password="new-secret") as proxy_port:
        relay = make_loop_relay(upstream.port, start=False, wait_ready=False)
        relay.config["upstream"]["proxy"] = f"socks5://relay@127.0.0.1:{proxy_port}"
        relay.config["upstream"]["proxy_password"] = f"file://{secret}"
        relay.config["secrets"] = {"refresh": "1s"}
        relay.start(wait_ready=False)
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            submit(relay, pki)
        assert refused.value.recipients["user@example.net"][0] == 451
        rotated = tmp_path / "proxy-password.new"
        rotated.write_text("new-secret")
        rotated.chmod(0o600)
        rotated.replace(secret)
        # The secret store refreshes every second; no reload, no restart.
        delivered = None
        for _ in range(40):
            try:
                delivered = submit(relay, pki)
                break
            except smtplib.SMTPRecipientsRefused:
                time.sleep(0.5)
        assert delivered == {}
        [received] = upstream.wait_for(1)
        assert received.peer[0] == "127.0.0.2"  # through the proxy


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 64 * 1024])
@in_thread
def test_the_message_reaches_the_upstream_byte_for_byte_whatever_the_write_size(
    make_loop_relay, upstream, pki, dkim_keys, monkeypatch, piece
):
    """The upstream DATA is written in pieces and dot-stuffed piece by piece: lines that
    start with a dot, a CRLF split between two writes, a last line without CRLF."""
    monkeypatch.setattr(connection, "_DATA_PIECE", piece)
    relay = make_loop_relay(upstream.port)
    body = b".\r\n..\r\n.a\r\nb.\r\n\r\n.\r\n x\r\n" * 3 + b"end"
    client = connect(relay, pki)
    client.sendmail("app@example.com", ["u@example.net"], message(body=body.decode()))
    [received] = upstream.wait_for(1)
    assert received.content.endswith(b"\r\n\r\n" + body + b"\r\n")
    assert verify_all(received.content, dkim_keys.dns()) == [True, True]


@in_thread
def test_data_over_the_in_flight_budget_gets_452_and_the_budget_comes_back(make_loop_relay, upstream, pki):
    upstream.behaviour.data_delay = 3.0  # the first message is held while the second arrives
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["clients"]["max_bytes_in_flight"] = "200KiB"
    relay.start()
    first = connect(relay, pki)
    for command in ("MAIL FROM:<app@example.com>", "RCPT TO:<u@example.net>", "DATA"):
        first.putcmd(command)
        first.getreply()
    first.send(message(body=("a" * 70 + "\r\n") * 2100) + b".\r\n")
    wait_until(lambda: "DATA" in upstream.commands)
    assert relay.metric("relay_data_bytes_in_flight") > 150_000
    # A second message does not fit beside it: read to its end, then 452 4.3.1 (retry later).
    with pytest.raises(smtplib.SMTPDataError) as full:
        connect(relay, pki).sendmail("app@example.com", ["u@example.net"], message(body=("b" * 70 + "\r\n") * 1400))
    assert (full.value.smtp_code, full.value.smtp_error) == (452, b"4.3.1 Insufficient system storage, try again later")
    assert first.getreply()[0] == 250
    wait_until(lambda: relay.metric("relay_data_bytes_in_flight") == 0)
    assert relay.metric("relay_messages_rejected_total", reason="data_budget") == 1
    # Once the first is answered, its bytes are back: the same message now passes.
    assert submit(relay, pki, data=message(body=("b" * 70 + "\r\n") * 1400)) == {}
    assert len(upstream.wait_for(2)) == 2


@pytest.mark.parametrize("listener", ["submission", "submissions"])
@in_thread
def test_drain_does_not_wait_for_an_idle_tls_client_that_never_reads(make_loop_relay, upstream, pki, listener):
    """An idle TLS session (STARTTLS or implicit) whose client reads nothing: the drain's 421
    and close used to wait for the client's TLS close_notify (asyncio's 30 s TLS shutdown
    timeout), so the drain ran to drain_timeout and left the session open. Now the
    connection is aborted after a short grace once our close_notify is out."""
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["drain_timeout"] = "20s"  # under asyncio's 30 s, far over the grace
    relay.start()
    client = connect(relay, pki, listener=listener)  # then reads nothing until the drain ends
    drained = asyncio.run_coroutine_threadsafe(relay.running.drain(), relay.loop)
    drained.result(timeout=60)
    assert not [e for e in relay.logs() if e.get("msg", "").startswith("drain timeout")]
    assert len(relay.running.connections) == 0
    assert client.getreply() == (421, b"4.3.2 Service shutting down, closing connection")


def _described(obj: object) -> str:
    """What an object of a cycle is: a frame by its code, a dict or cell by who holds it."""
    code = getattr(obj, "f_code", None)
    if code is not None:
        return f"frame {code.co_qualname} ({code.co_filename.rsplit('/', 2)[-2]})"
    owners = [
        type(o).__name__ + (f" {o.f_code.co_qualname}" if hasattr(o, "f_code") else "")
        for o in gc.get_referrers(obj)
        if o is not gc.garbage and not isinstance(o, list)
    ]
    return f"{type(obj).__name__} of {owners[:3]}"


def _cycles_holding(min_size: int) -> list[str]:
    """The objects of unreachable reference cycles (what only the cyclic GC frees) that
    hold a bytes object of at least `min_size` (a message, or a piece of one), described;
    the GC must be disabled and in DEBUG_SAVEALL mode. (asyncio's SSLProtocol is such a
    cycle and holds its 256 KiB read buffer, a bytearray: that is asyncio's, not a message.)"""
    gc.collect()
    held = []
    for obj in gc.garbage:
        # One large bytes object (a message), or many pieces of one (the chunks DATA is read in).
        if sum(len(ref) for ref in gc.get_referents(obj) if isinstance(ref, bytes)) >= min_size:
            held.append(_described(obj))
    return held


@in_thread
def test_large_messages_on_failure_paths_are_freed_without_the_cyclic_gc(make_loop_relay, pki):
    """What waits for the cyclic GC waits long once promoted to an older generation: a
    message held by a reference cycle on a failure path (refused by the upstream at DATA, a
    client gone mid-DATA) made the relay's memory grow with every such message (the chunks
    of an abandoned DATA were held by the traceback aiosmtpd keeps on the session's task).
    With the GC off, none of their bytes may be in unreachable cycles: reference counting
    frees them."""
    size = 900_000  # under the test config's message size limit (1 MiB)
    body = ("x" * 998 + "\r\n") * (size // 1000)
    with Upstream(tls="starttls", server_context=pki.server_context()) as up:
        up.behaviour.data_reply = "554 5.7.1 Content refused"
        relay = make_loop_relay(up.port)
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(3):
                with pytest.raises(smtplib.SMTPDataError):
                    submit(relay, pki, data=message(body=body))
            for _ in range(3):
                client = connect(relay, pki)
                client.mail("app@example.com")
                client.rcpt("user@example.net")
                assert client.docmd("DATA")[0] == 354
                client.send(message(body=body)[: size // 2])
                client.close()
            deadline = time.monotonic() + 30
            while len([e for e in relay.logs() if e.get("event") == "message" and e.get("msg") == "cancelled"]) < 3:
                assert time.monotonic() < deadline, "the relay did not end the abandoned transactions"
                time.sleep(0.05)
            relay.settle()
            held = _cycles_holding(size // 4)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert held == [], "\n".join(held)
