#!/usr/bin/env python3
"""SMTP load client that records per-message latency: connect → 250 after the final dot.

Same dialogue as Postfix's smtp-source (HELO, MAIL, RCPT, DATA, QUIT, one connection per
message) with the same kind of message (From/To/Date/Message-Id/Subject, then 78-character
lines). Prints one JSON line: ok, errors, msgs_per_s, p50_ms, p90_ms, p99_ms, max_ms.
Bounded by --count and --limit seconds; loopback targets only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time


def make_message(size: int, n: int) -> bytes:
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    head = (
        f"From: <a@example.com>\r\nTo: <b@example.net>\r\nDate: {date}\r\n"
        f"Message-Id: <{n}.{time.time_ns()}@bench.example.com>\r\nSubject: bench\r\n\r\n"
    ).encode()
    line = b"X" * 78 + b"\r\n"
    body = line * max(1, size // len(line))
    return head + body + b".\r\n"


async def expect(reader: asyncio.StreamReader, code: bytes) -> None:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            if not line.startswith(code):
                raise RuntimeError(line.decode(errors="replace").strip())
            return


async def one(host: str, port: int, size: int, n: int) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await expect(reader, b"220")
        for command, code in (
            (b"HELO bench.example.com", b"250"),
            (b"MAIL FROM:<a@example.com>", b"250"),
            (b"RCPT TO:<b@example.net>", b"250"),
            (b"DATA", b"354"),
        ):
            writer.write(command + b"\r\n")
            await expect(reader, code)
        writer.write(make_message(size, n))
        await expect(reader, b"250")
        elapsed = time.perf_counter() - started
        writer.write(b"QUIT\r\n")
        await expect(reader, b"221")
        return elapsed
    finally:
        writer.close()


async def main(args) -> None:
    host, _, port = args.target.rpartition(":")
    assert host.startswith("127."), "loopback only"
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(args.count):
        queue.put_nowait(n)
    latencies: list[float] = []
    errors = 0

    async def worker() -> None:
        nonlocal errors
        while not queue.empty():
            n = queue.get_nowait()
            try:
                latencies.append(await one(host, int(port), args.size, n))
            except Exception:
                errors += 1

    started = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(args.sessions))), args.limit)
    except TimeoutError:
        pass
    wall = time.perf_counter() - started
    ms = sorted(x * 1000 for x in latencies)

    def pct(p: float) -> float:
        return round(ms[min(len(ms) - 1, int(p * len(ms)))], 2) if ms else 0.0

    print(
        json.dumps(
            {
                "ok": len(ms),
                "errors": errors,
                "msgs_per_s": round(len(ms) / wall, 1),
                "p50_ms": round(statistics.median(ms), 2) if ms else 0.0,
                "p90_ms": pct(0.90),
                "p99_ms": pct(0.99),
                "max_ms": round(ms[-1], 2) if ms else 0.0,
            }
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--size", type=int, default=10240)
    parser.add_argument("--limit", type=float, default=180)
    parser.add_argument("target")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(args))
