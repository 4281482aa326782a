"""Peak memory of the relay for many concurrent large messages (issue 12, item 8).

N clients (default 100) each send one message of SIZE bytes (default 10 MB) at the same
time through one relay process to Postfix's `smtp-sink` on loopback; the relay's peak RSS
(VmHWM), its RSS before and after, and the replies are printed. `--code DIR` runs the relay
from another checkout (e.g. the code before a change) with this checkout's virtualenv.

    .venv/bin/python bench/memory.py --pool 8
    .venv/bin/python bench/memory.py --pool 32 --code /path/to/old/checkout --no-budget

Bounded: one message per client, every wait has a timeout; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiosmtplib
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.procs import wait_port  # noqa: E402

SINK = ("127.0.0.1", 2536)
RELAY_PORT = 2539
METRICS_PORT = 9489


def require(tool: str) -> str:
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if not path:
        sys.exit(f"bench: {tool} not found; install Debian's postfix package (it ships smtp-sink)")
    return path


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def config(workdir: Path, pool: int, budget: str | None, size: int) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_path = workdir / "dkim.key"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    clients: dict[str, object] = {"max_message_size": size + 1024 * 1024}
    if budget:
        clients["max_bytes_in_flight"] = budget
    cfg = {
        "hostname": "bench.relay.test",
        "listeners": [{"name": "bench", "bind": f"127.0.0.1:{RELAY_PORT}", "tls": "none", "auth": "none"}],
        "clients": clients,
        "dkim": {"keys": [{"domain": "example.com", "selector": "s1", "key": f"file://{key_path}"}]},
        "upstream": {
            "host": SINK[0],
            "port": SINK[1],
            "tls": "none",
            "command_timeout": "120s",
            "pool": {"max_connections": pool, "acquire_timeout": "300s"},
        },
        "dns": {"nameservers": ["127.0.0.1"], "port": 5399, "timeout": "1s", "attempts": 1},
        "spf": {"egress_ip": ["192.0.2.1"]},
        "metrics": {"bind": f"127.0.0.1:{METRICS_PORT}"},
        "logging": {"format": "json", "level": "info"},
        "data_dir": str(workdir),
    }
    path = workdir / "relay.yaml"
    path.write_text(json.dumps(cfg))
    return path


def message(size: int) -> bytes:
    head = b"From: <bench@example.com>\r\nTo: <sink@example.net>\r\nSubject: big\r\nMessage-ID: <b@example.com>\r\n\r\n"
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n"  # 78 bytes
    return head + line * ((size - len(head)) // len(line))


async def send_all(clients: int, size: int, timeout: float) -> dict[str, int]:
    data = message(size)
    outcomes: dict[str, int] = {}

    async def one() -> None:
        try:
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=RELAY_PORT, timeout=timeout, start_tls=False)
            async with smtp:
                await smtp.sendmail("bench@example.com", ["sink@example.net"], data)
            key = "250"
        except aiosmtplib.SMTPResponseException as exc:
            key = f"{exc.code}"
        except (aiosmtplib.SMTPException, OSError) as exc:
            key = type(exc).__name__
        outcomes[key] = outcomes.get(key, 0) + 1

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(clients))), timeout)
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--size", type=int, default=10 * 1000 * 1000)
    parser.add_argument("--pool", type=int, default=8)
    parser.add_argument("--budget", default="4GiB", help="clients.max_bytes_in_flight (default: out of the way)")
    parser.add_argument("--no-budget", action="store_true", help="leave the key out (code before it existed)")
    parser.add_argument("--code", type=Path, default=REPO, help="the checkout whose relay/ runs")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="relay-memory-"))
    sink = subprocess.Popen(
        [require("smtp-sink"), "-u", "postfix", f"{SINK[0]}:{SINK[1]}", "1024"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {**os.environ, "PYTHONPATH": str(args.code.resolve())}
    relay = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relay",
            "serve",
            "-c",
            str(config(workdir, args.pool, None if args.no_budget else args.budget, args.size)),
        ],
        stdout=open(workdir / "relay.log", "wb"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=workdir,
    )
    try:
        wait_port("127.0.0.1", SINK[1], 30)
        wait_port("127.0.0.1", RELAY_PORT, 30)
        time.sleep(2.0)
        before = status_kib(relay.pid, "VmRSS")
        started = time.monotonic()
        outcomes = asyncio.run(send_all(args.clients, args.size, args.timeout))
        elapsed = time.monotonic() - started
        peak = status_kib(relay.pid, "VmHWM")
        time.sleep(3.0)
        after = status_kib(relay.pid, "VmRSS")
    finally:
        relay.terminate()
        relay.wait(30)
        sink.terminate()
        sink.wait(10)
    load = os.getloadavg()
    mib = 1024
    total = args.clients * args.size / 1024 / 1024
    print(
        f"code={args.code} clients={args.clients} size={args.size} pool={args.pool} "
        f"budget={'unset' if args.no_budget else args.budget}"
    )
    grown = (peak - before) / mib
    print(
        f"  peak RSS {peak / mib:.0f} MiB ({grown:.0f} MiB over the idle {before / mib:.0f} MiB = "
        f"{grown / total:.2f}x the {total:.0f} MiB in flight), RSS after {after / mib:.0f} MiB; "
        f"{elapsed:.1f} s; replies {outcomes}; load {load[0]:.1f}"
    )
    refusals = [line for line in (workdir / "relay.log").read_text().splitlines() if '"refused"' in line]
    for line in refusals[:3]:
        print("  refused: " + line[:400])
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
