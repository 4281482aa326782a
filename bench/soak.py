"""Soak: many concurrent sessions for minutes, clients misbehaving at random (issue 12).

One relay process (STARTTLS + AUTH, as in production) between SESSIONS concurrent clients
and a recording upstream (aiosmtpd in a process of its own that writes the Message-ID of
every message it accepts). Each client loops until the end: connect, STARTTLS, AUTH, a few
messages with pauses, QUIT; and at random it instead disconnects in the middle of DATA,
stalls mid-session (the relay's session_timeout ends it), or tries wrong passwords (from
addresses of their own, 127.0.0.2-9, so the AUTH throttle meets them and not the others).

Printed: the relay's RSS over time (flat after warm-up?), the pool gauges once the load
has stopped (back to idle?), every outcome, and the check that every message that got 250
is at the upstream (250s without delivery: must be 0). Loopback only; bounded by
--duration and --sessions; stops by itself.

    .venv/bin/python bench/soak.py                          # 1,000 sessions, 10 minutes
    .venv/bin/python bench/soak.py --sessions 50 --duration 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import aiosmtplib
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.procs import wait_port  # noqa: E402

UPSTREAM_PORT = 2546
RELAY_PORT = 2549
METRICS_PORT = 9499
PASSWORD = "soak-password"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def metrics() -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def upstream_main(path: str) -> None:
    """The recording upstream (run as a process of its own)."""
    from aiosmtpd.controller import Controller

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # noqa: ANN001, ANN201
            content = envelope.original_content or b""
            start = content.find(b"Message-ID: <")
            ident = content[start + 13 : content.find(b">", start)] if start != -1 else b"?"
            with open(path, "ab") as fh:
                fh.write(ident + b"\n")
            return "250 2.0.0 Ok: queued"

    controller = Controller(Handler(), hostname="127.0.0.1", port=UPSTREAM_PORT, data_size_limit=2**24)
    controller.start()
    try:
        while True:
            time.sleep(3600)
    finally:
        controller.stop()


def relay_config(workdir: Path, pki: trustme.CA) -> Path:
    cert = pki.issue_cert("relay.soak.test", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(workdir / "tls.pem"))
    key = ed25519.Ed25519PrivateKey.generate()
    (workdir / "dkim.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (workdir / "dkim.key").chmod(0o600)
    from relay.auth.passwords import hash_password

    cfg = {
        "hostname": "relay.soak.test",
        "listeners": [{"name": "submission", "bind": f"127.0.0.1:{RELAY_PORT}", "tls": "starttls"}],
        "tls": {"cert_file": str(workdir / "tls.pem"), "key_file": str(workdir / "tls.pem")},
        "clients": {
            "networks": ["127.0.0.0/8"],
            "users": [{"username": "app", "password_hash": hash_password(PASSWORD), "senders": ["example.com"]}],
            "session_timeout": "20s",
        },
        "dkim": {
            "keys": [
                {
                    "domain": "example.com",
                    "selector": "ed1",
                    "key": f"file://{workdir / 'dkim.key'}",
                    "algorithm": "ed25519-sha256",
                }
            ]
        },
        "upstream": {
            "host": "127.0.0.1",
            "port": UPSTREAM_PORT,
            "tls": "none",
            "command_timeout": "30s",
            "pool": {"max_connections": 32, "acquire_timeout": "30s"},
        },
        "dns": {"nameservers": ["127.0.0.1"], "port": 5399, "timeout": "1s", "attempts": 1},
        "spf": {"egress_ip": ["192.0.2.1"]},
        "metrics": {"bind": f"127.0.0.1:{METRICS_PORT}"},
        "logging": {"format": "json", "level": "warning"},
        "data_dir": str(workdir),
    }
    path = workdir / "relay.yaml"
    path.write_text(json.dumps(cfg))
    return path


class Load:
    def __init__(self, deadline: float, context: ssl.SSLContext, seed: int) -> None:
        self.deadline = deadline
        self.context = context
        self.random = random.Random(seed)
        self.outcomes: Counter[str] = Counter()
        self.accepted: list[str] = []  # Message-IDs that got 250
        self.serial = 0

    def message(self) -> tuple[str, bytes]:
        self.serial += 1
        ident = f"soak-{self.serial}-{self.random.getrandbits(32):08x}@example.com"
        body = "x" * self.random.choice([200, 2_000, 20_000, 200_000])
        data = (
            f"From: <app@example.com>\r\nTo: <u@example.net>\r\nSubject: soak {self.serial}\r\n"
            f"Message-ID: <{ident}>\r\n\r\n" + "\r\n".join(body[i : i + 76] for i in range(0, len(body), 76)) + "\r\n"
        )
        return ident, data.encode()

    async def client(self, number: int) -> None:
        while time.monotonic() < self.deadline:
            behaviour = self.random.choices(["good", "vanish", "stall", "wrong_password"], [80, 8, 6, 6])[0]
            try:
                await asyncio.wait_for(self.session(number, behaviour), timeout=120)
            except (aiosmtplib.SMTPException, OSError, TimeoutError, ssl.SSLError) as exc:
                self.outcomes[f"{behaviour}: {type(exc).__name__}"] += 1
            await asyncio.sleep(self.random.uniform(1, 5))

    async def session(self, number: int, behaviour: str) -> None:
        source = f"127.0.0.{2 + number % 8}" if behaviour == "wrong_password" else f"127.0.1.{number % 250 + 1}"
        smtp = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=RELAY_PORT,
            start_tls=True,
            tls_context=self.context,
            timeout=60,
            source_address=(source, 0),
        )
        await smtp.connect()
        try:
            if behaviour == "wrong_password":
                try:
                    await smtp.login("app", "wrong-" + str(self.random.getrandbits(16)))
                except aiosmtplib.SMTPAuthenticationError as exc:
                    self.outcomes[f"wrong_password: {exc.code}"] += 1
                return
            await smtp.login("app", PASSWORD)
            for _ in range(self.random.randint(1, 4)):
                ident, data = self.message()
                if behaviour == "vanish" and self.random.random() < 0.5:
                    await smtp.mail("app@example.com")
                    await smtp.rcpt("u@example.net")
                    await smtp.execute_command(b"DATA")
                    assert smtp.transport is not None
                    smtp.transport.write(data[: len(data) // 2])
                    smtp.transport.abort()
                    self.outcomes["vanish: mid-DATA"] += 1
                    return
                if behaviour == "stall" and self.random.random() < 0.5:
                    await smtp.mail("app@example.com")
                    await asyncio.sleep(30)  # past session_timeout (20 s): the relay ends it
                    self.outcomes["stall: slept"] += 1
                    return
                try:
                    response = await smtp.sendmail("app@example.com", ["u@example.net"], data)
                except aiosmtplib.SMTPResponseException as exc:
                    self.outcomes[f"{behaviour}: {exc.code}"] += 1
                    continue
                if response[1].startswith("2.0.0 Ok: relayed"):
                    self.accepted.append(ident)
                    self.outcomes[f"{behaviour}: 250"] += 1
                await asyncio.sleep(self.random.uniform(1, 4))
            await smtp.quit()
        finally:
            smtp.close()


async def run_load(args: argparse.Namespace, context: ssl.SSLContext, relay_pid: int) -> tuple[Load, list[str]]:
    started = time.monotonic()
    load = Load(started + args.duration, context, args.seed)
    samples: list[str] = []

    async def sample() -> None:
        while time.monotonic() < load.deadline:
            await asyncio.sleep(args.sample)
            elapsed = time.monotonic() - started
            samples.append(
                f"{elapsed:6.0f} s  RSS {rss_mib(relay_pid):6.1f} MiB  load {os.getloadavg()[0]:.1f}  "
                f"250s so far {len(load.accepted)}"
            )

    async def ramp(number: int) -> None:
        await asyncio.sleep(number * args.ramp / args.sessions)  # spread the connects
        await load.client(number)

    await asyncio.gather(sample(), *(ramp(n) for n in range(args.sessions)))
    return load, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--ramp", type=float, default=30.0, help="seconds over which sessions start")
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between RSS samples")
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args()
    if len(sys.argv) > 1 and sys.argv[1] == "--upstream":
        return

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    workdir = Path(tempfile.mkdtemp(prefix="relay-soak-"))
    pki = trustme.CA()
    context = ssl.create_default_context()
    pki.configure_trust(context)
    ids = workdir / "upstream-ids"
    upstream = subprocess.Popen([sys.executable, __file__, "--upstream-at", str(ids)], cwd=REPO)
    relay = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "-c", str(relay_config(workdir, pki))],
        stdout=open(workdir / "relay.log", "wb"),
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    try:
        wait_port("127.0.0.1", UPSTREAM_PORT, 30)
        wait_port("127.0.0.1", RELAY_PORT, 30)
        time.sleep(3)
        idle_rss = rss_mib(relay.pid)
        load, samples = asyncio.run(run_load(args, context, relay.pid))
        # The load has stopped; let the relay settle (stalled sessions time out, pools idle).
        deadline = time.monotonic() + 90
        gauges: dict[str, float] = {}
        while time.monotonic() < deadline:
            gauges = {
                k: v for k, v in metrics().items() if k.startswith(("relay_upstream_pool", "relay_sessions_active"))
            }
            if not any(v for k, v in gauges.items() if "busy" in k or "sessions_active" in k):
                break
            time.sleep(2)
        final = metrics()
        final_rss = rss_mib(relay.pid)
    finally:
        relay.terminate()
        relay.wait(60)
        upstream.terminate()
        upstream.wait(10)
    delivered = set(ids.read_bytes().decode().split()) if ids.exists() else set()
    missing = [i for i in load.accepted if i not in delivered]
    print(f"soak: {args.sessions} sessions, {args.duration:.0f} s, seed {args.seed}; relay idle RSS {idle_rss:.1f} MiB")
    for line in samples:
        print("  " + line)
    print(f"  after the load: RSS {final_rss:.1f} MiB; gauges {json.dumps(gauges, sort_keys=True)}")
    print(
        f"  messages: 250 {len(load.accepted)}, at the upstream {len(delivered)}, 250 without delivery {len(missing)}"
    )
    throttled = {k: v for k, v in final.items() if k.startswith("relay_auth_throttled_total")}
    print(f"  auth throttle {json.dumps(throttled, sort_keys=True)}")
    print("  outcomes:")
    for key, count in sorted(load.outcomes.items()):
        print(f"    {key}: {count}")
    errors = [line for line in (workdir / "relay.log").read_text().splitlines() if '"level": "error"' in line]
    print(f"  error lines in the relay log: {len(errors)}")
    for line in errors[:5]:
        print("    " + line[:300])
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--upstream-at":
        upstream_main(sys.argv[2])
    else:
        main()
