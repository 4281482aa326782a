#!/usr/bin/env python3
"""Hold many idle client sessions open against a running relay; report refusals and the
relay's memory.

    python bench/idle.py --sessions 1000 --pid $(pgrep -of 'relay serve') 127.0.0.1:2529

Each session connects, reads the greeting and says EHLO, then stays idle. The relay must
greet every one (none refused) while its process tree stays small (RSS and PSS reported).
Bounded by --sessions and --hold seconds; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procstat import descendants, pss_bytes  # noqa: E402


def rss_bytes(root: int) -> int:
    total = 0
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


async def session(host: str, port: int, held: list, failures: list) -> None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
        greeting = await asyncio.wait_for(reader.readline(), 30)
        if not greeting.startswith(b"220"):
            failures.append(greeting.decode(errors="replace").strip())
            writer.close()
            return
        writer.write(b"EHLO idle.example.com\r\n")
        while (await asyncio.wait_for(reader.readline(), 30))[3:4] == b"-":
            pass
        held.append(writer)
    except (OSError, TimeoutError) as exc:
        failures.append(type(exc).__name__)


async def main(args) -> None:
    host, _, port = args.target.rpartition(":")
    assert host.startswith("127."), "loopback only"
    base_rss, base_pss = rss_bytes(args.pid), pss_bytes(args.pid)
    held: list = []
    failures: list = []
    await asyncio.gather(*(session(host, int(port), held, failures) for _ in range(args.sessions)))
    await asyncio.sleep(args.hold)
    result = {
        "sessions": args.sessions,
        "held": len(held),
        "refused_or_failed": len(failures),
        "failures": sorted(set(failures))[:5],
        "relay_rss_mib": round(rss_bytes(args.pid) / 2**20, 1),
        "relay_pss_mib": round(pss_bytes(args.pid) / 2**20, 1),
        "relay_rss_idle_mib": round(base_rss / 2**20, 1),
        "relay_pss_idle_mib": round(base_pss / 2**20, 1),
    }
    for writer in held:
        writer.write(b"QUIT\r\n")
        writer.close()
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--hold", type=float, default=5.0)
    parser.add_argument("--pid", type=int, required=True, help="the relay's (supervisor's) PID")
    parser.add_argument("target")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.sessions + 100)), hard))
    asyncio.run(main(args))
