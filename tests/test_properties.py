"""Properties of the SMTP edge and the message parser, checked on generated input (hypothesis).

The suite runs a modest number of examples per property; `make fuzz` runs the same
properties with the `fuzz` profile (many more examples, no deadline). The properties:

- the edge, over a real socket to the relay in the test's loop: no sequence of commands
  yields more upstream messages than 250 replies to message content (nothing doubled, and
  nothing delivered that the client was not told about); every reply carries an enhanced
  status code (RFC 2034) except the greeting, EHLO lines, 334 and 354; no exception escapes
  a session (no error line in the relay's log);
- the parser and signer: any bytes either parse or are refused with an SmtpError; a parsed
  message can always be signed; the relaxed body is dkimpy's;
- linear work: for a unit of input repeated n and 8n times, CPU time grows by a bounded
  ratio (linear: about 8; quadratic: about 64), never compared with a time.
"""

from __future__ import annotations

import hashlib
import re
import socket
import time

import hypothesis.strategies as st
from dkim.canonicalization import Relaxed
from hypothesis import HealthCheck, given, settings

from relay.errors import SmtpError
from relay.message import Message
from relay.sign.dkim import DkimSigner, relaxed_body, relaxed_body_hash
from relay.sign.keys import generate_private_key, load_signing_key, private_key_pem
from tests.support.config import loopback_bind
from tests.support.inloop import in_thread
from tests.unit.test_linear import LINEAR, cpu_ratio

# -- the SMTP edge ------------------------------------------------------------------------

FIXED_COMMANDS = [
    b"EHLO client.test",
    b"HELO client.test",
    b"MAIL FROM:<app@example.com>",
    b"MAIL FROM:<app@example.com> BODY=8BITMIME",
    b"MAIL FROM:<x@other.example>",
    b"MAIL FROM:<app@example.com",
    b"RCPT TO:<u@example.net>",
    b"RCPT TO:<v@example.net>",
    b"RCPT TO:<bad",
    b"RSET",
    b"NOOP",
    b"VRFY someone",
    b"DATA",
    b"AUTH PLAIN AGFwcABub3Bl",
    b"AUTH LOGIN",
    b"STARTTLS",
    b"BDAT 12 LAST\r\nRSET\r\nNOOP",  # not offered; its chunk ("RSET\r\nNOOP\r\n") is dropped
    b"",
]

line_text = st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
content_line = st.one_of(
    line_text,
    st.sampled_from([b".", b"..", b".x", b"From: <app@example.com>", b"From: <x@other.example>", b"Subject: s"]),
    st.builds(lambda t: t + b"\n" + t, line_text),  # a bare LF
    st.builds(lambda t: t + b"\r" + t, line_text),  # a bare CR
    st.builds(lambda t: t + b"\x00", line_text),
    st.builds(lambda n: b"X-Big: " + b"a" * n, st.integers(0, 20_000)),
    st.builds(lambda n: b"DKIM-Signature: v=1; d=example.com; s=s1; b=x" * 1 + b"\r\n x" * n, st.integers(0, 50)),
)
payload = st.lists(content_line, max_size=30).map(lambda lines: b"\r\n".join(lines))
step = st.one_of(
    st.sampled_from(FIXED_COMMANDS).map(lambda c: ("command", c)),
    line_text.map(lambda c: ("command", c)),
    payload.map(lambda p: ("message", p)),
)
session = st.lists(step, max_size=25)

_REPLY_LINE = re.compile(rb"^(\d{3})([ -])(.*)$", re.DOTALL)
_ENHANCED = re.compile(rb"^([245])\.\d{1,3}\.\d{1,3}(?: |$)")


class Closed(Exception):
    pass


def read_reply(sock: socket.socket, buffer: bytearray) -> list[bytes]:
    """One complete reply (its lines), or Closed."""
    lines: list[bytes] = []
    while True:
        end = buffer.find(b"\r\n")
        while end == -1:
            data = sock.recv(65536)
            if not data:
                raise Closed
            buffer += data
            end = buffer.find(b"\r\n")
        line = bytes(buffer[:end])
        del buffer[: end + 2]
        lines.append(line)
        match = _REPLY_LINE.match(line)
        assert match, f"not a reply line: {line!r}"
        if match.group(2) == b" ":
            return lines


def check_enhanced(lines: list[bytes], after: bytes) -> int:
    code = int(lines[-1][:3])
    if code in (220, 334, 354) or after.upper().startswith((b"EHLO", b"HELO")):
        return code
    for line in lines:
        text = line[4:]
        match = _ENHANCED.match(text)
        assert match and match.group(1) == line[:1], f"no enhanced code in {line!r} (after {after!r})"
    return code


def run_session(port: int, steps: list[tuple[str, bytes]]) -> int:
    """Play `steps`; the number of 250 replies to message content."""
    accepted = 0
    buffer = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        try:
            check_enhanced(read_reply(sock, buffer), b"greeting")
            for kind, data in steps:
                if kind == "command":
                    sock.sendall(data + b"\r\n")
                    code = check_enhanced(read_reply(sock, buffer), data)
                    if code == 354:  # DATA accepted as a plain command: end it at once
                        sock.sendall(b".\r\n")
                        accepted += check_enhanced(read_reply(sock, buffer), b"end of data") == 250
                    if code == 221:
                        break
                    continue
                sock.sendall(b"DATA\r\n")
                if check_enhanced(read_reply(sock, buffer), b"DATA") != 354:
                    continue
                sock.sendall(data + b"\r\n.\r\n")
                accepted += check_enhanced(read_reply(sock, buffer), b"end of data") == 250
        except (Closed, ConnectionResetError, BrokenPipeError):
            pass  # the relay ended the session (421, or too many bad commands): allowed
    return accepted


@in_thread
def test_the_edge_never_doubles_always_gives_enhanced_codes_and_never_raises(make_loop_relay, upstream, pki):
    relay = make_loop_relay(upstream.port, start=False)
    relay.config["listeners"].append({"name": "plain", "bind": loopback_bind(), "tls": "none", "auth": "none"})
    relay.config["clients"]["max_recipients"] = 3
    relay.start()
    port = relay.port("plain")

    @settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], deadline=None)
    @given(session)
    def edge(steps: list[tuple[str, bytes]]) -> None:
        before = len(upstream.messages)
        accepted = run_session(port, steps)
        # Every 250 to content is one message upstream, and nothing else got there.
        assert len(upstream.messages) - before == accepted
        errors = [e for e in relay.logs() if e.get("level") in ("error", "critical")]
        assert errors == []

    edge()


# -- the parser and the signer ----------------------------------------------------------

_SIGNER = DkimSigner(["from", "to", "subject", "date"], ["from", "subject"])
_KEY = load_signing_key(
    private_key_pem(generate_private_key("ed25519-sha256")),
    domain="example.com",
    selector="ed1",
    algorithm="ed25519-sha256",
)
header_line = st.one_of(
    st.sampled_from([b"From: <app@example.com>", b"From: a@b, c@d", b"To: x@y", b"Subject: hi", b" folded", b"\tf"]),
    st.builds(lambda name, value: name + b":" + value, st.binary(min_size=1, max_size=12), line_text),
)
raw_message = st.one_of(
    st.binary(max_size=2000),
    st.builds(
        lambda head, body: b"\r\n".join(head) + b"\r\n\r\n" + b"\r\n".join(body),
        st.lists(header_line, max_size=20),
        st.lists(line_text, max_size=20),
    ),
)


@settings(deadline=None)
@given(raw_message)
def test_any_bytes_parse_or_are_refused_and_a_parsed_message_can_be_signed(raw: bytes) -> None:
    try:
        message = Message.parse(raw)
        message.from_domain()
    except SmtpError as refusal:
        assert refusal.code in (550, 553, 554) and refusal.reply.enhanced.startswith("5.")
        return
    signature = _SIGNER.sign(message, [_KEY], now=0)
    assert signature.startswith(b"DKIM-Signature: ") and signature.endswith(b"\r\n")
    assert bytes(message.wire(signature)).endswith(bytes(message.body))


crlf_body = st.lists(
    st.lists(st.sampled_from([b"a", b" ", b"\t", b"bb", b"  "]), max_size=12).map(b"".join), max_size=30
).map(lambda lines: b"\r\n".join(lines))


@settings(deadline=None)
@given(crlf_body, st.binary(max_size=3))
def test_the_relaxed_body_is_dkimpys(body: bytes, head: bytes) -> None:
    expected = Relaxed.canonicalize_body(body)
    assert relaxed_body(body) == expected
    assert relaxed_body_hash(head + body, len(head)) == hashlib.sha256(expected).digest()


# -- linear work ---------------------------------------------------------------------------

unit = st.binary(min_size=1, max_size=8)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(unit)
def test_parsing_and_signing_are_linear_in_repeated_input(piece: bytes) -> None:
    header = b"X-Rep: " + piece.replace(b"\r", b"").replace(b"\n", b"")
    folded = header + b"\r\n "

    def work(n: int) -> object:
        raw = b"From: <app@example.com>\r\n" + folded * n + b"x\r\n" + (header + b"\r\n") * n + b"\r\n"
        raw += (piece + b"\r\n") * n
        try:
            message = Message.parse(raw)
        except SmtpError:
            return None
        return _SIGNER.sign(message, [_KEY], now=0)

    started = time.process_time()
    work(2000)
    if time.process_time() - started < 0.002:
        return  # too small to time
    assert cpu_ratio(work, 2000) < LINEAR
