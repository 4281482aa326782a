"""MAIL FROM and the first RCPT TO in one write to an upstream that offers PIPELINING
(RFC 2920), over real sockets: the replies mean exactly what they meant one command at a
time (a MAIL refusal is MAIL's, the RCPT reply after it is read and ignored, a stale pooled
connection is retried once on a fresh one), whether the upstream sends both replies in one
segment or in two; an upstream without PIPELINING gets one command at a time."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import threading
from dataclasses import dataclass, field

import aiosmtplib
import pytest

from relay.deliver.base import DsnRequest, Envelope
from relay.deliver.connection import UpstreamConnector, UpstreamEndpoint
from relay.deliver.dial import DirectDialer
from relay.deliver.failover import FailoverTarget
from relay.deliver.pool import ConnectionPool
from relay.deliver.smarthost import SmarthostTarget
from relay.errors import SmtpError
from relay.message import Message
from tests.support.config import APP_PASSWORD
from tests.support.inloop import in_thread
from tests.support.smtp import message, submit
from tests.support.upstream import Upstream

NO_NOTICE = DsnRequest()


@dataclass
class Script:
    """How the scripted upstream answers. `together`: the MAIL reply is held until the RCPT
    line has come and both go in one write (a client that waited for the MAIL reply would
    wait forever); else each reply is written when its command is read, in a segment of its
    own (TCP_NODELAY, a pause after the MAIL reply)."""

    pipelining: bool = True
    together: bool = True
    mail: bytes = b"250 2.1.0 Ok"
    rcpt: bytes = b"250 2.1.5 Ok"
    # (session, transaction) whose MAIL gets no reply but a closed connection.
    drop_at_mail: tuple[int, int] | None = None
    # (session, transaction) whose RCPT gets no reply but a closed connection.
    drop_at_rcpt: tuple[int, int] | None = None
    # Written unasked, in the same segment, right after the reply to this verb (once).
    extra: dict[bytes, bytes] = field(default_factory=dict)
    # The first RCPT of all gets no reply (an upstream that answers only the first of the
    # pipelined commands); its session waits for the relay's QUIT or EOF, and only then
    # sends the reply, late.
    hold_first_rcpt: bool = False


@dataclass
class Session:
    lines: list[bytes] = field(default_factory=list)
    # Command lines already buffered when the server read MAIL: sent before its reply.
    sent_ahead_of_mail_reply: list[bool] = field(default_factory=list)


class ScriptedUpstream:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.sessions: list[Session] = []
        # Set (from the loop) when the held RCPT has come, and when its session has ended.
        self.rcpt_held = threading.Event()
        self.held_session_ended = threading.Event()

    async def __aenter__(self) -> ScriptedUpstream:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        script, session = self.script, Session()
        self.sessions.append(session)
        number, transaction = len(self.sessions), 0
        held: list[bytes] = []
        mail_ok = False
        holding = False
        writer.write(b"220 upstream.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                session.lines.append(line)
                verb = line[:4].upper()
                if verb == b"EHLO":
                    offers = b"250-PIPELINING\r\n" if script.pipelining else b""
                    writer.write(b"250-upstream.test\r\n" + offers + b"250-8BITMIME\r\n250 DSN\r\n")
                elif verb == b"MAIL":
                    transaction += 1
                    if script.drop_at_mail == (number, transaction):
                        break
                    await asyncio.sleep(0.01)  # let a pipelined RCPT arrive
                    session.sent_ahead_of_mail_reply.append(len(reader._buffer) > 0)  # type: ignore[attr-defined]
                    mail_ok = script.mail.startswith(b"250")
                    if script.mail.startswith(b"421"):  # RFC 5321 §3.8: and close
                        writer.write(script.mail + b"\r\n")
                        break
                    if script.together:
                        held.append(script.mail + b"\r\n")
                        continue
                    writer.write(script.mail + b"\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.01)
                    continue
                elif verb == b"RCPT":
                    if script.drop_at_rcpt == (number, transaction):
                        break
                    reply = script.rcpt if mail_ok else b"503 5.5.1 Error: need MAIL command"
                    if script.hold_first_rcpt and not self.rcpt_held.is_set():
                        writer.write(b"".join(held))
                        held.clear()
                        holding = True
                        self.rcpt_held.set()
                        continue
                    writer.write(b"".join(held) + reply + b"\r\n" + script.extra.pop(b"RCPT", b""))
                    held.clear()
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    while (body := await reader.readline()) and body != b".\r\n":
                        pass
                    writer.write(b"250 2.0.0 Ok: queued as Q%d\r\n" % transaction + script.extra.pop(b"DATA", b""))
                elif holding:  # the relay gave up on the held reply: it comes now, late
                    writer.write(script.rcpt + b"\r\n221 2.0.0 Bye\r\n")
                    break
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    break
                else:  # RSET, NOOP
                    writer.write(b"250 2.0.0 Ok\r\n")
                await writer.drain()
        finally:
            if holding:
                self.held_session_ended.set()
            writer.close()


def _target(port: int, *, max_connections: int = 2, command_timeout: float = 5) -> SmarthostTarget:
    endpoint = UpstreamEndpoint(
        label="up",
        host="127.0.0.1",
        port=port,
        tls="none",
        tls_context=None,
        helo_name="relay.test",
        connect_timeout=5,
        command_timeout=command_timeout,
    )
    connector = UpstreamConnector(endpoint, DirectDialer(connect_timeout=5))
    pool = ConnectionPool(
        "up", connector.open, max_connections=max_connections, max_messages=100, idle_timeout=60, acquire_timeout=5
    )
    return SmarthostTarget("up", connector, pool)


MESSAGE = Message.parse(b"From: a@example.com\r\nSubject: x\r\n\r\n.leading dot\r\nbody\r\n").wire()


async def _deliver(
    target: SmarthostTarget | FailoverTarget, recipient: str = "b@example.net", dsn: DsnRequest = NO_NOTICE
) -> int:
    tx = await target.begin(Envelope("a@example.com"), recipient, dsn)
    reply = await tx.add_recipient(recipient, dsn)
    if not reply.positive:
        await tx.abort()
        return reply.code
    return (await tx.send(MESSAGE)).code


def _commands(session: Session) -> list[bytes]:
    return [line.split(b":")[0].split(b" ")[0].rstrip(b"\r\n") for line in session.lines]


@pytest.mark.parametrize("together", [True, False], ids=["one-segment", "two-segments"])
async def test_mail_and_first_rcpt_go_together_and_both_replies_are_read(together: bool) -> None:
    async with ScriptedUpstream(Script(together=together)) as up:
        target = _target(up.port)
        try:
            assert [await _deliver(target) for _ in range(3)] == [250, 250, 250]
        finally:
            await target.close()
    [session] = up.sessions  # one pooled connection: no reply was left for a later command
    assert session.sent_ahead_of_mail_reply == [True, True, True]
    assert _commands(session) == [b"EHLO"] + [b"MAIL", b"RCPT", b"DATA"] * 3 + [b"QUIT"]


async def test_an_upstream_without_pipelining_gets_one_command_at_a_time() -> None:
    async with ScriptedUpstream(Script(pipelining=False, together=False)) as up:
        target = _target(up.port)
        try:
            assert [await _deliver(target) for _ in range(2)] == [250, 250]
        finally:
            await target.close()
    [session] = up.sessions
    assert session.sent_ahead_of_mail_reply == [False, False]


async def test_the_bytes_on_the_wire_are_those_sent_one_at_a_time() -> None:
    dsn = DsnRequest(notify="SUCCESS,FAILURE", orcpt="rfc822;b@example.net")
    lines = []
    for pipelining in (True, False):
        async with ScriptedUpstream(Script(pipelining=pipelining, together=pipelining)) as up:
            target = _target(up.port)
            try:
                tx = await target.begin(
                    Envelope("a@example.com", body_8bit=True, ret="HDRS", envid="x1"), "b@example.net", dsn
                )
                assert (await tx.add_recipient("b@example.net", dsn)).code == 250
                assert (await tx.add_recipient("c@example.net")).code == 250
                assert (await tx.send(MESSAGE)).code == 250
            finally:
                await target.close()
        lines.append(up.sessions[0].lines)
    assert lines[0] == lines[1]
    assert b"RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.net\r\n" in lines[0]


@pytest.mark.parametrize("together", [True, False], ids=["one-segment", "two-segments"])
@pytest.mark.parametrize("mail", [b"550 5.7.1 Sender refused", b"451 4.3.0 Try later"])
async def test_a_mail_refusal_is_the_mails_and_the_rcpt_reply_after_it_is_ignored(mail: bytes, together: bool) -> None:
    async with ScriptedUpstream(Script(together=together, mail=mail)) as up:
        target = _target(up.port)
        try:
            with pytest.raises(SmtpError) as refused:
                await _deliver(target)
            up.script.mail = b"250 2.1.0 Ok"
            assert await _deliver(target) == 250  # the next transaction, on the same connection
        finally:
            await target.close()
    code, _, text = mail.decode().partition(" ")
    assert (refused.value.code, refused.value.label) == (int(code), "upstream_refused")
    assert f"{refused.value.reply.enhanced} {refused.value.reply.text}" == text
    assert "refused MAIL FROM" in refused.value.reason
    [session] = up.sessions
    assert _commands(session) == [b"EHLO", b"MAIL", b"RCPT", b"RSET", b"MAIL", b"RCPT", b"DATA", b"QUIT"]


@pytest.mark.parametrize("together", [True, False], ids=["one-segment", "two-segments"])
async def test_a_refused_first_recipient_is_the_rcpt_reply(together: bool) -> None:
    async with ScriptedUpstream(Script(together=together, rcpt=b"550 5.1.1 No such user")) as up:
        target = _target(up.port)
        try:
            tx = await target.begin(Envelope("a@example.com"), "b@example.net", NO_NOTICE)
            reply = await tx.add_recipient("b@example.net", NO_NOTICE)
            assert (reply.code, reply.enhanced, reply.text) == (550, "5.1.1", "No such user")
            up.script.rcpt = b"250 2.1.5 Ok"
            assert (await tx.add_recipient("c@example.net")).code == 250  # the transaction goes on
            assert (await tx.send(MESSAGE)).code == 250
        finally:
            await target.close()


async def test_a_421_at_mail_closes_the_connection() -> None:
    async with ScriptedUpstream(Script(mail=b"421 4.3.2 Shutting down")) as up:
        target = _target(up.port)
        try:
            with pytest.raises(SmtpError) as refused:
                await _deliver(target)
            assert (refused.value.code, refused.value.label) == (421, "upstream_refused")
            up.script.mail = b"250 2.1.0 Ok"
            assert await _deliver(target) == 250
        finally:
            await target.close()
    assert len(up.sessions) == 2  # the next message had a new connection


async def test_a_stale_pooled_connection_is_retried_once_on_a_fresh_one() -> None:
    async with ScriptedUpstream(Script(drop_at_mail=(1, 2))) as up:
        target = _target(up.port)
        try:
            assert [await _deliver(target) for _ in range(2)] == [250, 250]
        finally:
            await target.close()
    assert len(up.sessions) == 2


async def test_a_fresh_connection_lost_at_mail_is_not_retried() -> None:
    async with ScriptedUpstream(Script(drop_at_mail=(1, 1))) as up:
        target = _target(up.port)
        try:
            with pytest.raises(SmtpError) as lost:
                await _deliver(target)
        finally:
            await target.close()
    assert (lost.value.code, lost.value.label) == (451, "upstream_disconnected")
    assert "during MAIL" in lost.value.reason and len(up.sessions) == 1


async def test_a_connection_lost_before_the_rcpt_reply_fails_the_first_recipient() -> None:
    """MAIL was accepted: as one command at a time, the transaction began and its first
    RCPT failed (451 for that RCPT), with no second connection tried."""
    async with ScriptedUpstream(Script(together=False, drop_at_rcpt=(1, 1))) as up:
        target = _target(up.port)
        try:
            tx = await target.begin(Envelope("a@example.com"), "b@example.net", NO_NOTICE)
            with pytest.raises(SmtpError) as lost:
                await tx.add_recipient("b@example.net", NO_NOTICE)
            await tx.abort()
        finally:
            await target.close()
    assert (lost.value.code, lost.value.label) == (451, "upstream_disconnected")
    assert "during RCPT" in lost.value.reason and len(up.sessions) == 1


async def test_the_first_recipient_must_be_the_one_sent_with_mail() -> None:
    async with ScriptedUpstream(Script()) as up:
        target = _target(up.port)
        try:
            tx = await target.begin(Envelope("a@example.com"), "b@example.net", NO_NOTICE)
            with pytest.raises(SmtpError) as wrong:
                await tx.add_recipient("other@example.net", NO_NOTICE)
            assert wrong.value.label == "internal"
            assert await _deliver(target) == 250
        finally:
            await target.close()
    assert len(up.sessions) == 2  # the connection with the unwanted recipient was not reused


async def test_without_the_first_recipients_dsn_begin_sends_mail_only() -> None:
    async with ScriptedUpstream(Script(together=False)) as up:
        target = _target(up.port)
        try:
            tx = await target.begin(Envelope("a@example.com"), "b@example.net")
            assert (await tx.add_recipient("b@example.net")).code == 250
            assert (await tx.send(MESSAGE)).code == 250
        finally:
            await target.close()
    assert up.sessions[0].sent_ahead_of_mail_reply == [False]


# -- through the relay, to an upstream (aiosmtpd) that offers PIPELINING ---------------------


@in_thread
def test_the_relay_delivers_to_a_pipelining_upstream(make_loop_relay, pki):
    with Upstream(tls="starttls", server_context=pki.server_context(), pipelining=True, dsn=True) as up:
        up.behaviour.rcpt_replies["nobody@example.net"] = "550 5.1.1 No such user here"
        relay = make_loop_relay(up.port)
        assert submit(relay, pki, rcpts=("a@example.net", "b@example.net")) == {}
        refused = submit(relay, pki, rcpts=("nobody@example.net", "c@example.net"))
        assert refused == {"nobody@example.net": (550, b"5.1.1 No such user here")}
        first, second = up.wait_for(2)
        assert first.rcpt_tos == ["a@example.net", "b@example.net"] and second.rcpt_tos == ["c@example.net"]
        up.behaviour.mail_reply = "550 5.7.1 Sender blocked"
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused_mail:
            submit(relay, pki)
        assert refused_mail.value.recipients == {"user@example.net": (550, b"5.7.1 Sender blocked")}
        line = relay.wait_log(lambda e: e.get("event") == "message" and e.get("code") == 550)
        assert line["reason"].startswith("upstream") and "refused MAIL FROM" in line["reason"]


async def test_a_failover_chain_moves_on_after_a_pipelined_mail_refusal() -> None:
    """The chain sees the first upstream's 451 at MAIL as it saw it one command at a time
    (begin raises it), and opens the next with MAIL and the first RCPT together."""
    async with ScriptedUpstream(Script(mail=b"451 4.3.0 Try later")) as first, ScriptedUpstream(Script()) as second:
        chain = FailoverTarget([_target(first.port), _target(second.port)])
        try:
            assert await _deliver(chain) == 250
        finally:
            await chain.close()
    assert _commands(first.sessions[0])[:4] == [b"EHLO", b"MAIL", b"RCPT", b"RSET"]
    assert _commands(second.sessions[0])[:4] == [b"EHLO", b"MAIL", b"RCPT", b"DATA"]
    assert second.sessions[0].sent_ahead_of_mail_reply == [True]


# -- unasked replies, replies that never come, a caller gone mid-exchange ----------------------


ONE_AT_A_TIME = {"pipelining": False, "together": False}
WAYS = [{"together": True}, {"together": False}, ONE_AT_A_TIME]
WAY_IDS = ["pipelined-one-segment", "pipelined-two-segments", "one-at-a-time"]


@pytest.mark.parametrize("way", WAYS, ids=WAY_IDS)
async def test_an_unasked_reply_after_the_rcpt_reply_answers_no_later_command(way: dict) -> None:
    """A reply the relay did not ask for, in the same segment as the first RCPT's: it was
    left in aiosmtplib's buffer and taken as the next command's reply, so the client heard
    250 for a recipient the upstream refused (and every later reply moved by one)."""
    async with ScriptedUpstream(Script(**way, extra={b"RCPT": b"250 2.0.0 Unasked\r\n"})) as up:
        target = _target(up.port)
        try:
            tx = await target.begin(Envelope("a@example.com"), "b@example.net", NO_NOTICE)
            assert (await tx.add_recipient("b@example.net", NO_NOTICE)).code == 250
            up.script.rcpt = b"550 5.1.1 No such user"
            refused = await tx.add_recipient("c@example.net")
            assert (refused.code, refused.text) == (550, "No such user")
            assert (await tx.send(MESSAGE)).code == 250
            up.script.rcpt = b"250 2.1.5 Ok"
            assert await _deliver(target) == 250
        finally:
            await target.close()
    [session] = up.sessions
    assert _commands(session) == [b"EHLO", b"MAIL", b"RCPT", b"RCPT", b"DATA", b"MAIL", b"RCPT", b"DATA", b"QUIT"]


@pytest.mark.parametrize("way", WAYS, ids=WAY_IDS)
async def test_an_unasked_reply_left_on_a_pooled_connection_answers_no_later_command(way: dict) -> None:
    """An unasked reply after the final DATA reply stays in the buffer of a connection that
    goes back to the pool; the next transaction's MAIL took it as its reply, and its RCPT
    took MAIL's: a refused recipient was told 250."""
    async with ScriptedUpstream(Script(**way, extra={b"DATA": b"250 2.0.0 Unasked\r\n"})) as up:
        target = _target(up.port)
        try:
            assert await _deliver(target) == 250
            up.script.rcpt = b"550 5.1.1 No such user"
            tx = await target.begin(Envelope("a@example.com"), "b@example.net", NO_NOTICE)
            refused = await tx.add_recipient("b@example.net", NO_NOTICE)
            assert (refused.code, refused.text) == (550, "No such user")
            await tx.abort()
        finally:
            await target.close()
    assert len(up.sessions) == 1  # the same connection, reused


@pytest.mark.parametrize("together", [True, False], ids=["one-segment", "two-segments"])
async def test_a_caller_gone_while_the_rcpt_reply_is_awaited_leaves_no_slot_and_no_reply_behind(
    together: bool,
) -> None:
    """The client vanishes (its task is cancelled) while the relay waits for the pipelined
    RCPT's reply: the pool slot is free at once (one slot here: a leak would be a 451 busy),
    and the connection, with a reply still to come, is never used again (it would answer
    the next message's MAIL with this RCPT's reply)."""
    async with ScriptedUpstream(Script(together=together, hold_first_rcpt=True)) as up:
        target = _target(up.port, max_connections=1)
        try:
            begin = asyncio.create_task(target.begin(Envelope("a@example.com"), "b@example.net", NO_NOTICE))
            assert await asyncio.to_thread(up.rcpt_held.wait, 10)
            begin.cancel()
            with pytest.raises(asyncio.CancelledError):
                await begin
            up.script.rcpt = b"550 5.1.1 No such user"
            assert await _deliver(target) == 550
            up.script.rcpt = b"250 2.1.5 Ok"
            assert await _deliver(target) == 250
            assert await asyncio.to_thread(up.held_session_ended.wait, 10)
        finally:
            await target.close()
    assert len(up.sessions) == 2
    assert _commands(up.sessions[0]) == [b"EHLO", b"MAIL", b"RCPT", b"QUIT"]


@pytest.mark.parametrize("mail", [b"250 2.1.0 Ok", b"550 5.7.1 Sender refused"])
async def test_an_upstream_that_answers_only_the_first_pipelined_command(mail: bytes) -> None:
    """RFC 2920 §3.1 wants every reply; an upstream that sends only MAIL's: the missing reply
    is a timeout of its own (command_timeout), after MAIL's 250 a 451 for the first RCPT,
    after a refusal the refusal; either way the connection is closed and its slot free."""
    async with ScriptedUpstream(Script(mail=mail, hold_first_rcpt=True)) as up:
        target = _target(up.port, max_connections=1, command_timeout=0.5)
        try:
            if mail.startswith(b"250"):
                tx = await target.begin(Envelope("a@example.com"), "b@example.net", NO_NOTICE)
                with pytest.raises(SmtpError) as failed:
                    await tx.add_recipient("b@example.net", NO_NOTICE)
                assert (failed.value.code, failed.value.label) == (451, "upstream_timeout")
                assert "during RCPT" in failed.value.reason
            else:
                with pytest.raises(SmtpError) as failed:
                    await _deliver(target)
                assert (failed.value.code, failed.value.label) == (550, "upstream_refused")
            up.script.mail = b"250 2.1.0 Ok"
            assert await _deliver(target) == 250
            assert await asyncio.to_thread(up.held_session_ended.wait, 10)
        finally:
            await target.close()
    assert len(up.sessions) == 2


async def test_a_client_gone_while_the_relay_awaits_the_pipelined_rcpt_reply(make_loop_relay, pki) -> None:
    """Through the relay, with a real client (aiosmtplib) that drops its connection while
    the relay waits for the upstream's reply to the RCPT it pipelined with MAIL: the relay
    gives that upstream connection up (QUIT), its one pool slot is free, and the next
    client's message goes through on a new connection with every reply its own."""
    async with ScriptedUpstream(Script(hold_first_rcpt=True)) as up:
        relay = make_loop_relay(up.port, start=False)
        relay.config["upstream"]["tls"] = "none"
        relay.config["upstream"].pop("ca_file")
        relay.config["upstream"]["pool"]["max_connections"] = 1
        await relay.astart()
        try:
            gone = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=relay.port("submission"), tls_context=pki.client_context(), timeout=20
            )
            await gone.connect(start_tls=True)
            await gone.login("app", APP_PASSWORD)
            await gone.mail("app@example.com")
            rcpt = asyncio.create_task(gone.rcpt("user@example.net"))
            assert await asyncio.to_thread(up.rcpt_held.wait, 10)
            gone.close()
            with pytest.raises(aiosmtplib.SMTPException):
                await rcpt
            assert await asyncio.to_thread(up.held_session_ended.wait, 10)
            client = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=relay.port("submission"), tls_context=pki.client_context(), timeout=20
            )
            await client.connect(start_tls=True)
            try:
                await client.login("app", APP_PASSWORD)
                refused, _ = await client.sendmail("app@example.com", ["user@example.net"], message())
            finally:
                await client.quit()
            assert refused == {}
        finally:
            await relay.astop()
    held, *others = [s for s in up.sessions if b"MAIL" in _commands(s)]
    assert _commands(held) == [b"EHLO", b"MAIL", b"RCPT", b"QUIT"]
    assert [_commands(s)[-4:] for s in others] == [[b"MAIL", b"RCPT", b"DATA", b"QUIT"]]
