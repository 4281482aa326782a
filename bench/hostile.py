"""Hostile clients and upstreams against one relay process: the relay's CPU seconds and peak
RSS per case, and what the client and the upstream saw.

Each case is one SMTP session (or a message through a misbehaving upstream). Before each,
the relay's peak RSS is reset (/proc/PID/clear_refs); after it, the CPU it used and its
peak are read. Figures of a shared machine are noisy: compare cases of one run, and look
for what grows faster than the input (run twice with `--size`).

    .venv/bin/python bench/hostile.py                       # every case, 10 MB inputs
    .venv/bin/python bench/hostile.py --size 2MiB --only header_unfolded,subject_signed
    .venv/bin/python bench/hostile.py --code /tmp/base      # another checkout's relay

The upstream is this script's own (asyncio, in a thread): it takes every message, and can
answer a line per TCP segment, send a reply of thousands of lines, never end its greeting,
or close right after its 250 to DATA. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from procstat import cpu_seconds  # noqa: E402

from tests.support.procs import wait_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RELAY_PORT = 2559
UPSTREAM_PORT = 2558
METRICS_PORT = 9499


# -- the upstream ----------------------------------------------------------------------------
class Upstream:
    """mode: normal | lines_per_segment | long_reply | endless_greeting | close_after_data"""

    def __init__(self, port: int) -> None:
        self.port = port
        self.mode = "normal"
        self.messages = 0
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(10)

    async def _serve(self) -> None:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", self.port, limit=64 * 1024 * 1024)

    async def _send(self, writer: asyncio.StreamWriter, text: bytes, by_line: bool) -> None:
        if not by_line:
            writer.write(text)
            await writer.drain()
            return
        for line in text.splitlines(keepends=True):
            writer.write(line)
            await writer.drain()
            await asyncio.sleep(0.0002)  # its own segment (TCP_NODELAY), read on its own

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mode = self.mode
        by_line = mode == "lines_per_segment"
        # 1,500 lines: about 24 KiB, under aiosmtplib's 32 KiB bound on a reply.
        many = (
            b"".join(b"250-filler %d\r\n" % i for i in range(1500))
            if mode in ("lines_per_segment", "long_reply")
            else b""
        )
        try:
            if mode == "endless_greeting":
                async with asyncio.timeout(60):
                    while True:
                        writer.write(b"220-still greeting\r\n")
                        await writer.drain()
                        await asyncio.sleep(0.01)
            await self._send(writer, b"220 upstream.test ESMTP\r\n", by_line)
            while True:
                line = await asyncio.wait_for(reader.readline(), 120)
                if not line:
                    return
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    await self._send(
                        writer, b"250-upstream.test\r\n" + many + b"250-8BITMIME\r\n250 PIPELINING\r\n", by_line
                    )
                elif verb == b"DATA":
                    await self._send(writer, b"354 go on\r\n", by_line)
                    await asyncio.wait_for(reader.readuntil(b"\r\n.\r\n"), 120)
                    self.messages += 1
                    await self._send(writer, b"250 2.0.0 queued\r\n", by_line)
                    if mode == "close_after_data":
                        return
                elif verb == b"QUIT":
                    await self._send(writer, b"221 bye\r\n", by_line)
                    return
                elif verb in (b"MAIL", b"RCPT") and mode == "long_reply":
                    await self._send(writer, many + b"250 ok\r\n", by_line)
                else:
                    await self._send(writer, b"250 ok\r\n", by_line)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        finally:
            writer.close()


# -- the relay -------------------------------------------------------------------------------
def relay_config(workdir: Path, size: int) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_path = workdir / "dkim.key"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    config = {
        "hostname": "bench.relay.test",
        "listeners": [{"name": "bench", "bind": f"127.0.0.1:{RELAY_PORT}", "tls": "none", "auth": "none"}],
        "clients": {"max_message_size": 3 * size, "max_recipients": 10_000, "session_timeout": "60s"},
        "dkim": {"keys": [{"domain": "example.com", "selector": "s1", "key": f"file://{key_path}"}]},
        "upstream": {
            "host": "127.0.0.1",
            "port": UPSTREAM_PORT,
            "tls": "none",
            "connect_timeout": "5s",
            "command_timeout": "30s",
            # A connection per message: each case meets the upstream's greeting and EHLO.
            "pool": {"max_connections": 4, "max_messages_per_connection": 1},
        },
        "dns": {"nameservers": ["127.0.0.1"], "port": 5399, "timeout": "1s", "attempts": 1},
        "spf": {"egress_ip": ["192.0.2.1"]},
        "metrics": {"bind": f"127.0.0.1:{METRICS_PORT}"},
        "logging": {"format": "json", "level": "info"},
        "data_dir": str(workdir),
    }
    path = workdir / "relay.yaml"
    path.write_text(json.dumps(config))
    return path


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# -- the client ------------------------------------------------------------------------------
class Session:
    def __init__(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", RELAY_PORT), timeout=120)
        self.file = self.sock.makefile("rb")
        self.replies: list[str] = []
        self.read()

    def read(self) -> str:
        lines = []
        while True:
            line = self.file.readline(1 << 20)
            if not line:
                self.replies.append("EOF")
                return "EOF"
            lines.append(line)
            if line[3:4] != b"-":
                break
        text = lines[-1].decode(errors="replace").strip()[:60]
        self.replies.append(text)
        return text

    def send(self, data: bytes, replies: int = 1) -> None:
        self.sock.sendall(data)
        for _ in range(replies):
            if self.read() == "EOF":
                return

    def message(self, content: bytes, rcpts: int = 1) -> None:
        self.send(b"EHLO client.test\r\n")
        self.send(b"MAIL FROM:<app@example.com>\r\n")
        self.send(b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(rcpts)), rcpts)
        self.send(b"DATA\r\n")
        if self.replies[-1].startswith("354"):
            self.send(content + b".\r\n")

    def close(self) -> None:
        try:
            self.send(b"QUIT\r\n")
        except OSError:
            pass
        self.sock.close()


def msg(header: bytes = b"", body: bytes = b"Hi.\r\n", frm: bytes = b"From: <app@example.com>\r\n") -> bytes:
    return frm + b"To: <r0@example.net>\r\nSubject: hostile\r\n" + header + b"\r\n" + body


def nested_mime(depth: int) -> bytes:
    head = b"".join(
        b'--b%d\r\nContent-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % (i, i + 1) for i in range(depth)
    )
    tail = b"".join(b"--b%d--\r\n" % i for i in reversed(range(depth)))
    return b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b0"\r\n\r\n' + head + b"x\r\n" + tail


def client_cases(size: int) -> dict[str, Callable[[Session], None]]:
    n = size
    return {
        "baseline": lambda s: s.message(msg(body=(b"x" * 76 + b"\r\n") * (n // 78))),
        "header_unfolded": lambda s: s.message(msg(header=b"X-Long: " + b"a" * n + b"\r\n")),
        "subject_signed": lambda s: s.message(
            msg(frm=b"From: <app@example.com>\r\nSubject: " + b"a " * (n // 2) + b"\r\n")
        ),
        "body_line_no_crlf": lambda s: s.message(msg(body=b"y" * n + b"\r\n")),
        "to_headers_20000": lambda s: s.message(msg(header=b"To: <r@example.net>\r\n" * 20_000)),
        "tiny_header_fields": lambda s: s.message(msg(header=b"a:x\r\n" * (n // 5))),
        "from_5000_addresses": lambda s: s.message(
            msg(frm=b"From: " + b", ".join(b"<a%d@example.com>" % i for i in range(5000)) + b"\r\n")
        ),
        "from_5000_encoded_words": lambda s: s.message(
            msg(frm=b"From: " + b" ".join([b"=?utf-8?q?=C3=A9t=C3=A9?="] * 5000) + b" <app@example.com>\r\n")
        ),
        "from_nested_comments": lambda s: s.message(msg(frm=b"From: " + b"(" * 5000 + b"<app@example.com>\r\n")),
        "mime_nested_10000": lambda s: s.message(msg(frm=b"From: <app@example.com>\r\n" + nested_mime(10_000))),
        "rcpt_10000": lambda s: s.message(msg(), rcpts=10_000),
        "rcpt_10001": lambda s: s.message(msg(), rcpts=10_001),
        "ehlo_1MB": lambda s: s.send(b"EHLO " + b"h" * (1 << 20) + b"\r\n"),
        "mail_params_100KB": lambda s: s.send(
            b"EHLO c\r\nMAIL FROM:<app@example.com> " + b"X=1 " * 25_000 + b"\r\n", 2
        ),
        "noop_10000_pipelined": lambda s: s.send(b"NOOP\r\n" * 10_000, 10_000),
    }


UPSTREAM_CASES = ("lines_per_segment", "long_reply", "endless_greeting", "close_after_data")


def run_case(name: str, pid: int, upstream: Upstream, work: Callable[[Session], None]) -> dict:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak RSS (VmHWM)
    rss0 = status_kib(pid, "VmRSS")
    cpu0 = cpu_seconds(pid)
    delivered0 = upstream.messages
    started = time.monotonic()
    session = Session()
    try:
        work(session)
    except OSError as exc:
        session.replies.append(f"client: {type(exc).__name__}")
    finally:
        session.close()
    time.sleep(0.5)  # what the relay does after its reply (the upstream's QUIT)
    return {
        "case": name,
        "cpu_s": round(cpu_seconds(pid) - cpu0, 2),
        "wall_s": round(time.monotonic() - started, 1),
        "rss_mb": round(rss0 / 1024, 1),
        "peak_mb": round(status_kib(pid, "VmHWM") / 1024, 1),
        "delivered": upstream.messages - delivered0,
        "replies": sorted(set(session.replies[-4:])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="10MiB", help="input size of the size cases (KiB/MiB suffixes)")
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument("--code", default=str(REPO), help="checkout whose relay package runs")
    args = parser.parse_args()
    units = {"KiB": 1024, "MiB": 1024 * 1024}
    size = next((int(args.size[: -len(u)]) * m for u, m in units.items() if args.size.endswith(u)), None)
    size = size or int(args.size)
    only = set(filter(None, args.only.split(",")))
    upstream = Upstream(UPSTREAM_PORT)
    upstream.start()
    with tempfile.TemporaryDirectory(prefix="relay-hostile-") as tmp:
        workdir = Path(tmp)
        env = dict(os.environ, PYTHONPATH=args.code)
        log = open(workdir / "relay.log", "wb")
        relay = subprocess.Popen(
            [str(REPO / ".venv/bin/python"), "-m", "relay", "serve", "-c", str(relay_config(workdir, size))],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
        try:
            wait_port("127.0.0.1", RELAY_PORT, 30, proc=relay)
            time.sleep(1.0)
            rows = []
            for name, work in client_cases(size).items():
                if not only or name in only:
                    rows.append(run_case(name, relay.pid, upstream, work))
                    print(json.dumps(rows[-1]), flush=True)
            for mode in UPSTREAM_CASES:
                if only and mode not in only:
                    continue
                upstream.mode = mode
                rows.append(run_case(f"upstream_{mode}", relay.pid, upstream, lambda s: s.message(msg())))
                print(json.dumps(rows[-1]), flush=True)
                upstream.mode = "normal"
                rows.append(run_case(f"after_{mode}", relay.pid, upstream, lambda s: s.message(msg())))
                print(json.dumps(rows[-1]), flush=True)
            errors = [line for line in (workdir / "relay.log").read_text().splitlines() if '"level": "error"' in line]
            print(f"relay log: {len(errors)} error lines", *errors[:5], sep="\n")
        finally:
            relay.terminate()
            relay.wait(30)


if __name__ == "__main__":
    main()
