#!/usr/bin/env python3
"""The applications' workload: one TLS connection, AUTH PLAIN and one message per connection.

    tests/loopback-only .venv/bin/python bench/tls_run.py                 # the baseline grids, 3 reps
    tests/loopback-only .venv/bin/python bench/tls_run.py --reps 1 \\
        --grid "cert=ecdsa mode=starttls tls=1.3 resume=off conc=20"      # one cell
    tests/loopback-only .venv/bin/python bench/tls_run.py --client-check  # tls_load against tls_sink
    tests/loopback-only .venv/bin/python bench/tls_run.py --profile 20    # py-spy on relay, 1 worker

Targets, all behind the same smtp-sink (127.0.0.1:2636) with the same DKIM key, the same
test CA and the same two server certificates (ECDSA P-256, RSA-2048):
  relay        `relay serve --workers N`, one process per certificate type, each with a
               STARTTLS listener (587-style) and an implicit-TLS one (465-style), AUTH
               required (scrypt hash, as a platform team would configure it);
  anchor       Postfix 3.7 submission + OpenDKIM milter on TCP (bench/tls_anchor.sh);
  anchor_unix  the same with the milter on a UNIX socket.
The load client is bench/bin/tls_load (C, OpenSSL; `make bench-tools`). For every cell
(certificate, mode, TLS version, resumption, concurrency) and rep, the targets run one after
the other, their order rotated from rep to rep. Each run records the client's figures,
the CPU of the target's process trees from /proc (utime+stime of the live processes plus
cutime+cstime of the reaped ones), the sink's and the client's CPU, the load average before
and after, and the end-to-end count at the sink. Raw JSON lines go to bench/results/.

Bounded: a message count per run, a time limit per run (tls_load stops starting messages
past it; the runner kills it 30 s later), a drain limit for the sink; loopback only.
Everything started here is stopped here, by PID.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from procstat import cpu_seconds  # noqa: E402

from tests.support.procs import wait_port  # noqa: E402

ANCHOR_SH = HERE / "tls_anchor.sh"
TMP = Path(os.environ.get("TLS_BENCH_TMP", "/tmp/relay-tls-bench"))
CERTS = TMP / "certs"
DKIM_KEY = TMP / "keys" / "s1.private"
SINK_PORT = 2636
USER, PASSWORD = "bench", "bench-password-1"  # the same as tls_anchor.sh's sasldb user
# First port of each target: +0 ECDSA STARTTLS, +1 ECDSA implicit, +2 RSA STARTTLS, +3 RSA implicit.
# relay_base: the relay of another source tree (--base-src), for a before/after in one run.
BASE_PORT = {"relay": 2640, "relay_base": 2644, "anchor": 2650, "anchor_unix": 2660, "tls_sink": 2670}
RELAY_METRICS = {
    ("relay", "ecdsa"): 9481,
    ("relay", "rsa"): 9482,
    ("relay_base", "ecdsa"): 9483,
    ("relay_base", "rsa"): 9484,
}
CERT_OFFSET = {"ecdsa": 0, "rsa": 2}
MODE_OFFSET = {"starttls": 0, "implicit": 1}
DEFAULT_COUNTS = {1: 100, 20: 1000, 100: 1000}
DEFAULT_GRIDS = [
    # the main comparison: what most application libraries do
    "cert=ecdsa,rsa mode=starttls tls=1.3 resume=off conc=1,20,100",
    # one axis at a time, at 20 clients
    "cert=ecdsa,rsa mode=implicit tls=1.3 resume=off conc=20",
    "cert=ecdsa,rsa mode=starttls tls=1.2 resume=off conc=20",
    "cert=ecdsa,rsa mode=starttls tls=1.3 resume=on conc=20",
]
DIMS = ("cert", "mode", "tls", "resume", "conc")


def tool(name: str) -> str:
    path = HERE / "bin" / name
    subprocess.run(["make", "-s", "-C", str(REPO), f"bench/bin/{name}"], check=True)
    return str(path)


def sh(*args: str, capture: bool = False) -> str:
    result = subprocess.run([str(ANCHOR_SH), *args], check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return (result.stdout or "").strip()


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def machine_busy() -> tuple[float, float]:
    """(all CPU seconds, idle CPU seconds) of the machine so far, from /proc/stat."""
    ticks = os.sysconf("SC_CLK_TCK")
    values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(values) / ticks, (values[3] + values[4]) / ticks


def parse_grid(text: str) -> list[dict]:
    axes = {}
    for part in text.split():
        key, _, values = part.partition("=")
        if key not in DIMS:
            sys.exit(f"tls_run: unknown grid axis {key!r} (axes: {', '.join(DIMS)})")
        axes[key] = [int(v) if key == "conc" else v for v in values.split(",")]
    missing = set(DIMS) - set(axes)
    if missing:
        sys.exit(f"tls_run: grid {text!r} lacks {', '.join(sorted(missing))}")
    return [dict(zip(DIMS, combo, strict=True)) for combo in itertools.product(*(axes[d] for d in DIMS))]


# ------------------------------------------------------------------------------ relay


def relay_config(workdir: Path, cert: str, target: str = "relay") -> Path:
    """bench/run.py's production shape, with submission listeners: STARTTLS and implicit TLS,
    AUTH required, one user allowed to send as example.com."""
    from relay.auth.passwords import hash_password

    base = BASE_PORT[target] + CERT_OFFSET[cert]
    config = {
        "hostname": "bench.relay.test",
        "listeners": [
            {"name": "submission", "bind": f"127.0.0.1:{base}", "tls": "starttls", "auth": "required"},
            {"name": "submissions", "bind": f"127.0.0.1:{base + 1}", "tls": "implicit", "auth": "required"},
        ],
        "tls": {"cert_file": str(CERTS / f"{cert}.crt"), "key_file": str(CERTS / f"{cert}.key")},
        "clients": {
            "users": [{"username": USER, "password_hash": hash_password(PASSWORD), "senders": ["example.com"]}]
        },
        "dkim": {"keys": [{"domain": "example.com", "selector": "s1", "key": f"file://{DKIM_KEY}"}]},
        "upstream": {
            "host": "127.0.0.1",
            "port": SINK_PORT,
            "tls": "none",
            "pool": {"max_connections": 64, "max_messages_per_connection": 1000},
        },
        # Loopback only, DNS included: the posture checks ask a port where nothing answers.
        "dns": {"nameservers": ["127.0.0.1"], "port": 5399, "timeout": "1s", "attempts": 1},
        "spf": {"egress_ip": ["192.0.2.1"]},
        "metrics": {"bind": f"127.0.0.1:{RELAY_METRICS[target, cert]}"},
        "logging": {"format": "json", "level": "info"},
        "data_dir": str(workdir / f"{target}-{cert}"),
    }
    (workdir / f"{target}-{cert}").mkdir(exist_ok=True)
    path = workdir / f"{target}-{cert}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def start_relay(
    workdir: Path, cert: str, workers: int, target: str = "relay", src: Path | None = None
) -> subprocess.Popen:
    """relay from this tree, or (relay_base) from the source tree `src` with the same venv."""
    config = relay_config(workdir, cert, target)
    env = dict(os.environ, PYTHONPATH=str(src)) if src else None
    proc = subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "python"), "-m", "relay", "serve", "-c", str(config), "--workers", str(workers)],
        stdout=open(workdir / f"{target}-{cert}.log", "wb"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=str(src or REPO),
    )
    base = BASE_PORT[target] + CERT_OFFSET[cert]
    wait_port("127.0.0.1", base, 30)
    wait_port("127.0.0.1", base + 1, 30)
    wait_port("127.0.0.1", RELAY_METRICS[target, cert], 30)
    time.sleep(1.0)  # let every worker bind
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------ sink


def sink_count() -> int:
    text = (TMP / "sink" / "count.out").read_bytes()[-256:].decode(errors="replace")
    marks = re.findall(r"mesg=(\d+)", text)
    return int(marks[-1]) if marks else 0


def sink_pid() -> int:
    return int(sh("sink", "pid", capture=True))


def wait_sink(target: int, limit: float) -> float:
    """Wait until the sink has counted `target` messages; the time it happened (monotonic)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if sink_count() >= target:
            return time.monotonic()
        time.sleep(0.02)
    return time.monotonic()


def wait_quiet(quiet: float = 1.0, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    last, since = sink_count(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = sink_count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


# ------------------------------------------------------------------------------ runs


def load_cmd(client: str, cell: dict, port: int, count: int, limit: float, extra: tuple = ()) -> list[str]:
    cmd = [
        client,
        "-s",
        str(cell["conc"]),
        "-m",
        str(count),
        "-T",
        str(limit),
        "-l",
        "10240",
        "-e",
        cell["mode"],
        "-V",
        cell["tls"],
        "-A",
        str(CERTS / "ca.crt"),
        "-u",
        USER,
        "-p",
        PASSWORD,
        "-f",
        "a@example.com",
        "-t",
        "b@example.net",
        *extra,
    ]
    if cell["resume"] == "on":
        cmd.append("-r")
    return [*cmd, f"127.0.0.1:{port}"]


def run_load(cmd: list[str], limit: float) -> dict:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=limit + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    lines = out.strip().splitlines()
    if not lines:
        return {"ok": 0, "errors": -1, "stderr": err[-300:], "rc": proc.returncode}
    stats = json.loads(lines[-1])
    stats["rc"] = proc.returncode
    return stats


def bad_auth(every: int) -> tuple[str, ...]:
    return ("-b", str(every)) if every else ()


def one_run(
    target: str,
    cell: dict,
    rep: int,
    roots: list[int],
    client: str,
    counts: dict,
    limit: float,
    drain: float,
    bad_every: int = 0,
) -> dict:
    port = BASE_PORT[target] + CERT_OFFSET[cell["cert"]] + MODE_OFFSET[cell["mode"]]
    count = counts.get(cell["conc"], 1500)
    wait_quiet()
    load_before = loadavg()
    sink_root = [sink_pid()]
    cpu0, sink0, machine0 = cpu_seconds_all(roots), cpu_seconds_all(sink_root), machine_busy()
    at_sink = sink_count()
    started = time.monotonic()
    stats = run_load(load_cmd(client, cell, port, count, limit, bad_auth(bad_every)), limit)
    client_done = time.monotonic()
    arrived = wait_sink(at_sink + stats.get("ok", 0), drain)
    delivered = sink_count() - at_sink
    cpu = cpu_seconds_all(roots) - cpu0
    sink_cpu = cpu_seconds_all(sink_root) - sink0
    machine1 = machine_busy()
    e2e_wall = max(arrived, client_done) - started
    ok = stats.get("ok", 0)
    busy = (machine1[0] - machine0[0]) - (machine1[1] - machine0[1])
    row = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "target": target,
        **cell,
        "rep": rep,
        "port": port,
        "count": count,
        "delivered": delivered,
        "e2e_wall_s": round(e2e_wall, 3),
        "e2e_msgs_per_s": round(delivered / e2e_wall, 1) if e2e_wall > 0 else 0.0,
        "server_cpu_s": round(cpu, 3),
        "server_cores": round(cpu / e2e_wall, 2) if e2e_wall > 0 else 0.0,
        "server_cpu_ms_per_msg": round(1000 * cpu / ok, 3) if ok else None,
        "client_cpu_ms_per_msg": round(1000 * stats.get("client_cpu_s", 0) / ok, 3) if ok else None,
        "sink_cpu_s": round(sink_cpu, 3),
        "machine_busy_cores": round(busy / e2e_wall, 2) if e2e_wall > 0 else 0.0,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "client": stats,
    }
    return row


def cpu_seconds_all(roots: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in roots)


# ------------------------------------------------------------------------------ checks


def dkim_check(ports: dict[str, tuple[int, str]], client: str) -> list[str]:
    """One message through every target port with the sink in dump mode; every one must
    carry a valid DKIM signature (the public key from opendkim-genkey's s1.txt, no DNS)."""
    import dkim

    record = "".join(re.findall(r'"([^"]*)"', (TMP / "keys" / "s1.txt").read_text())).encode()
    sh("sink", "stop")
    sh("sink", "start", "dump")
    report = []
    try:
        for label, (port, mode) in ports.items():
            cell = {"conc": 1, "mode": mode, "tls": "1.3", "resume": "off"}
            before = set(os.listdir(TMP / "sink" / "dump"))
            stats = run_load(load_cmd(client, cell, port, 1, 20), 20)
            deadline = time.monotonic() + 30
            new: set[str] = set()
            while time.monotonic() < deadline and not new:
                time.sleep(0.1)
                new = set(os.listdir(TMP / "sink" / "dump")) - before
            time.sleep(0.2)
            valid = False
            for name in new:
                raw = (TMP / "sink" / "dump" / name).read_bytes()
                valid = dkim.verify(strip_sink_headers(raw), dnsfunc=lambda n, timeout=5: record)
            line = f"{label} (port {port}): accepted={stats.get('ok')} arrived={len(new)} dkim_valid={valid}"
            report.append(line)
            print(line, file=sys.stderr)
            if not valid:
                raise RuntimeError(f"DKIM check failed: {line}")
    finally:
        sh("sink", "stop")
    sh("sink", "start", "count")
    return report


def strip_sink_headers(raw: bytes) -> bytes:
    """smtp-sink -d prepends X-Client-*/X-*-Args lines and its own Received: header."""
    lines = raw.replace(b"\r\n", b"\n").split(b"\n")
    i = 0
    while i < len(lines) and re.match(rb"X-(Client-Addr|Client-Proto|Helo-Args|Mail-Args|Rcpt-Args):", lines[i]):
        i += 1
    if i < len(lines) and lines[i].startswith(b"Received:") and b"smtp-sink" in b"".join(lines[i : i + 3]):
        i += 1
        while i < len(lines) and lines[i][:1] in (b"\t", b" "):
            i += 1
    return b"\r\n".join(lines[i:])


def openssl_rsa_signs_per_s() -> float | None:
    """`openssl speed rsa2048` signatures/s on one core: how fast this shared machine is right
    now, to put CPU-per-message figures from different hours side by side."""
    out = subprocess.run(["openssl", "speed", "-seconds", "1", "rsa2048"], capture_output=True, text=True).stdout
    match = re.search(r"^rsa 2048 bits\s+\S+s\s+\S+s\s+([\d.]+)", out, re.M)
    return float(match.group(1)) if match else None


def user_system_seconds(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def perf_instructions_available() -> bool:
    if not shutil.which("perf"):
        return False
    probe = subprocess.run(["perf", "stat", "-x,", "-e", "instructions", "true"], capture_output=True, text=True)
    return probe.returncode == 0 and "<not supported>" not in probe.stderr and "instructions" in probe.stderr


# ------------------------------------------------------------------------------ summary


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(rows: list[dict]) -> str:
    head = (
        "| cert | mode | TLS | resume | clients | target | msgs/s | p50 ms | p99 ms | server CPU ms/msg "
        "| server cores | client CPU ms/msg | failures |"
    )
    lines = [head, "|---|---|---|---|---:|---|---|---|---|---|---:|---:|---|"]
    key = lambda r: tuple(r[d] for d in DIMS)  # noqa: E731
    cells = sorted({key(r) for r in rows}, key=lambda k: (k[4], k[0], k[1], k[2], k[3]))
    for cell in cells:
        for target in ("relay", "relay_base", "anchor", "anchor_unix", "tls_sink"):
            runs = [r for r in rows if key(r) == cell and r["target"] == target]
            if not runs:
                continue

            def fmt(values: list[float], digits: int = 1) -> str:
                values = [v for v in values if v is not None]
                if not values:
                    return "–"
                each = "/".join(f"{v:.{digits}f}" for v in values)
                return f"{median(values):.{digits}f} ({each})" if len(values) > 1 else f"{values[0]:.{digits}f}"

            failures: collections.Counter = collections.Counter()
            for r in runs:
                failures.update(r["client"].get("failures", {}))
                if r["client"].get("bad_auth_refused"):
                    failures["wrong password refused"] += r["client"]["bad_auth_refused"]
                if r["delivered"] < r["client"].get("ok", 0):
                    failures["not at sink"] += r["client"]["ok"] - r["delivered"]
            lines.append(
                f"| {cell[0]} | {cell[1]} | {cell[2]} | {cell[3]} | {cell[4]} | {target} "
                f"| {fmt([r['e2e_msgs_per_s'] for r in runs], 0)} "
                f"| {fmt([r['client'].get('lat_p50_ms') for r in runs])} "
                f"| {fmt([r['client'].get('lat_p99_ms') for r in runs])} "
                f"| {fmt([r['server_cpu_ms_per_msg'] for r in runs], 2)} "
                f"| {median([r['server_cores'] for r in runs]):.2f} "
                f"| {median([r['client_cpu_ms_per_msg'] or 0 for r in runs]):.2f} "
                f"| {', '.join(f'{k} {v}' for k, v in sorted(failures.items())) or '0'} |"
            )
    return "\n".join(lines)


def compare(rows: list[dict]) -> str:
    """relay against the faster anchor variant of each cell (medians over the reps)."""
    lines = [
        "| cert | mode | TLS | resume | clients | relay msgs/s | faster anchor msgs/s | ratio "
        "| relay p99 ms | anchor p99 ms (lower) | relay CPU ms/msg | anchor CPU ms/msg (lower) "
        "| relay_base msgs/s, ratio, p99 ms, CPU ms/msg |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    key = lambda r: tuple(r[d] for d in DIMS)  # noqa: E731
    for cell in sorted({key(r) for r in rows}, key=lambda k: (k[4], k[0], k[1], k[2], k[3])):

        def med(target: str, field: str, client: bool = False, cell: tuple = cell) -> float | None:
            values = [
                (r["client"] if client else r).get(field) for r in rows if key(r) == cell and r["target"] == target
            ]
            values = [v for v in values if v is not None]
            return median(values) if values else None

        relay = med("relay", "e2e_msgs_per_s")
        anchors = [a for a in ("anchor", "anchor_unix") if med(a, "e2e_msgs_per_s") is not None]
        if relay is None or not anchors:
            continue
        best = max(anchors, key=lambda a: med(a, "e2e_msgs_per_s"))
        p99 = min(med(a, "lat_p99_ms", client=True) for a in anchors)
        cpu = min(med(a, "server_cpu_ms_per_msg") for a in anchors)
        base = med("relay_base", "e2e_msgs_per_s")
        before = (
            f"{base:.0f}, {base / med(best, 'e2e_msgs_per_s'):.2f}x, "
            f"{med('relay_base', 'lat_p99_ms', client=True):.1f}, {med('relay_base', 'server_cpu_ms_per_msg'):.2f}"
            if base is not None
            else "–"
        )
        lines.append(
            f"| {cell[0]} | {cell[1]} | {cell[2]} | {cell[3]} | {cell[4]} | {relay:.0f} "
            f"| {med(best, 'e2e_msgs_per_s'):.0f} ({best}) | {relay / med(best, 'e2e_msgs_per_s'):.2f}x "
            f"| {med('relay', 'lat_p99_ms', client=True):.1f} | {p99:.1f} "
            f"| {med('relay', 'server_cpu_ms_per_msg'):.2f} | {cpu:.2f} | {before} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ modes


def client_check(args, client: str, workdir: Path) -> list[dict]:
    """tls_load against tls_sink (a server that does the TLS handshake and nothing else):
    what the client can drive on this machine, and its CPU per message."""
    sink_bin = tool("tls_sink")
    rows = []
    for cert in args.certs:
        base = BASE_PORT["tls_sink"] + CERT_OFFSET[cert]
        procs = [
            subprocess.Popen(
                [
                    sink_bin,
                    "-c",
                    str(CERTS / f"{cert}.crt"),
                    "-k",
                    str(CERTS / f"{cert}.key"),
                    *(["-i"] if implicit else []),
                    "-T",
                    "900",
                    f"127.0.0.1:{base + implicit}",
                ]
            )
            for implicit in (0, 1)
        ]
        try:
            wait_port("127.0.0.1", base, 30)
            wait_port("127.0.0.1", base + 1, 30)
            for conc in args.concs:
                for rep in range(args.reps):
                    cell = {"cert": cert, "mode": "starttls", "tls": "1.3", "resume": "off", "conc": conc}
                    count = args.counts.get(conc, 1500)
                    load_before = loadavg()
                    cpu0 = cpu_seconds_all([p.pid for p in procs])
                    stats = run_load(load_cmd(client, cell, base, count, args.limit), args.limit)
                    cpu = cpu_seconds_all([p.pid for p in procs]) - cpu0
                    ok = stats.get("ok", 0)
                    row = {
                        "ts": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "target": "tls_sink",
                        **cell,
                        "rep": rep,
                        "port": base,
                        "count": count,
                        "delivered": ok,
                        "e2e_wall_s": stats.get("wall_s"),
                        "e2e_msgs_per_s": stats.get("msgs_per_s"),
                        "server_cpu_s": round(cpu, 3),
                        "server_cores": round(cpu / stats["wall_s"], 2) if stats.get("wall_s") else 0.0,
                        "server_cpu_ms_per_msg": round(1000 * cpu / ok, 3) if ok else None,
                        "client_cpu_ms_per_msg": round(1000 * stats.get("client_cpu_s", 0) / ok, 3) if ok else None,
                        "loadavg_before": load_before,
                        "loadavg_after": loadavg(),
                        "client": stats,
                    }
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)
    return rows


def profile(args, client: str, workdir: Path, results: Path, stamp: str) -> None:
    """relay with one worker (one process) at 20 clients, STARTTLS, TLS 1.3, no resumption,
    once per certificate type: a run without the profiler for CPU per message (/proc), then
    a run under py-spy (200 Hz) whose folded stacks (speedscope opens them) are summed into
    categories and a top table."""
    py_spy = shutil.which("py-spy") or str(REPO / ".venv" / "bin" / "py-spy")
    if not Path(py_spy).exists():
        sys.exit("tls_run: --profile needs py-spy (.venv/bin/pip install py-spy)")
    count = args.profile
    report = results / f"tls-profile-{stamp}.txt"
    trees = [("relay", None)] + ([("relay_base", args.base_src.resolve())] if args.base_src else [])
    for cert, mode, (target, src) in itertools.product(args.certs, args.modes, trees):
        relay = start_relay(workdir, cert, 1, target, src)
        try:
            cell = {"cert": cert, "mode": mode, "tls": "1.3", "resume": "off", "conc": 20}
            port = BASE_PORT[target] + CERT_OFFSET[cert] + MODE_OFFSET[mode]
            run_load(load_cmd(client, cell, port, 200, 30), 30)  # warm up
            load_before = loadavg()
            speed = openssl_rsa_signs_per_s()
            cpu0, (user0, sys0) = cpu_seconds(relay.pid), user_system_seconds(relay.pid)
            stats = run_load(load_cmd(client, cell, port, count, args.limit), args.limit)
            ok = max(stats.get("ok", 0), 1)
            cpu_ms = 1000 * (cpu_seconds(relay.pid) - cpu0) / ok
            user1, sys1 = user_system_seconds(relay.pid)
            split = f"user {1000 * (user1 - user0) / ok:.2f} + system {1000 * (sys1 - sys0) / ok:.2f}"
            folded = results / f"tls-profile-{stamp}-{target}-{cert}-{mode}.folded"
            spy = subprocess.Popen(
                [py_spy, "record", "-p", str(relay.pid), "-r", "200", "-F", "-f", "raw", "-o", str(folded)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)
            profiled = run_load(load_cmd(client, cell, port, count, args.limit), args.limit)
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
            native = ""
            if shutil.which("perf"):
                data = workdir / f"perf-{target}-{cert}-{mode}.data"
                rec = subprocess.Popen(
                    [
                        "perf",
                        "record",
                        "-q",
                        "-e",
                        "cpu-clock",
                        "-F",
                        "299",
                        "--call-graph",
                        "dwarf,16384",
                        "-p",
                        str(relay.pid),
                        "-o",
                        str(data),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(1.0)
                run_load(load_cmd(client, cell, port, count, args.limit), args.limit)
                rec.send_signal(signal.SIGINT)
                rec.wait(120)
                native = perf_table(data, cpu_ms) + "\n\n"
                data.unlink(missing_ok=True)
            text = (
                f"## {target} --workers 1, {cert} certificate, {mode}, TLS 1.3, no resumption, 20 clients\n"
                f"without profiler: {stats.get('ok')} msgs, {stats.get('msgs_per_s')} msgs/s, "
                f"relay CPU {cpu_ms:.2f} ms/msg ({split}; load {load_before} -> {loadavg()}; "
                f"openssl speed rsa2048 {speed} signs/s); "
                f"under py-spy: {profiled.get('ok')} msgs, {profiled.get('msgs_per_s')} msgs/s\n"
                f"stacks: {folded.name}\n\n{native}{category_table(folded, cpu_ms)}\n\n{top_table(folded)}\n\n"
            )
            print(text)
            with open(report, "a") as fh:
                fh.write(text)
        finally:
            stop(relay)


# perf samples only when the process is on a CPU (software cpu-clock event; this VM has no
# PMU), so unlike py-spy its shares do not include time spent runnable but waiting for a core.
# Python 3.11 frames are invisible to perf: what is not native below is Python-level code.
NATIVE = [
    ("TLS handshake (OpenSSL, via _ssl do_handshake)", ("_ssl__SSLSocket_do_handshake",)),
    ("TLS records: encrypt/decrypt (OpenSSL, via _ssl read/write)", ("_ssl__SSLSocket_read", "_ssl__SSLSocket_write")),
    ("TLS session objects (SSLContext wrap, SSLObject setup/free)", ("_ssl__SSLContext__wrap_bio", "PySSL_dealloc")),
    ("DKIM RSA signature (cryptography's OpenSSL)", ("_rust.abi3.so",)),
]


def perf_table(data: Path, cpu_ms: float) -> str:
    script = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "ip,sym,dso"], capture_output=True, text=True
    ).stdout
    shares: collections.Counter = collections.Counter()
    for block in script.split("\n\n"):
        frames = [line.strip() for line in block.strip().splitlines()]
        if not frames:
            continue
        chain = "\n".join(frames)
        name = next((c for c, marks in NATIVE if any(m in chain for m in marks)), None)
        if name is None:
            leaf = frames[0]
            if "[kernel.kallsyms]" in leaf:
                name = "kernel (socket syscalls, loopback TCP, scheduling)"
            elif "libcrypto" in leaf or "libssl" in leaf:
                name = "OpenSSL, other"
            elif "uvloop" in leaf:
                name = "uvloop / libuv"
            else:
                name = "Python-level code (interpreter, libc malloc/memcpy)"
        shares[name] += 1
    total = sum(shares.values()) or 1
    out = [f"| on-CPU, native (perf, {total} samples) | share | ≈ ms/msg |", "|---|---:|---:|"]
    for name, n in shares.most_common():
        out.append(f"| {name} | {100 * n / total:.1f} % | {cpu_ms * n / total:.2f} |")
    return "\n".join(out)


# A sample belongs to the first category that any frame of its stack matches (py-spy frames
# read "function (file:line)"), so a log call made while delivering counts as logging.
CATEGORIES = [
    ("TLS handshake (incl. context wrap)", ("do_handshake", "wrap_bio", "start_tls")),
    ("DKIM signing", ("relay/sign/",)),
    ("logging", ("(logging/", "relay/observe/logs")),
    ("AUTH", ("smtp_AUTH", "relay/auth/")),
    ("upstream delivery (aiosmtplib, pool)", ("relay/deliver/", "aiosmtplib/")),
    # uvloop's own TLS transport (implicit TLS) encrypts inside StreamWriter.write.
    (
        "TLS record I/O (encrypt/decrypt, writes to the client)",
        ("(asyncio/sslproto.py", "(ssl.py", "StreamWriter.write"),
    ),
    ("session setup (aiosmtpd SMTP.__init__, connection_made)", ("SMTP.__init__", "connection_made")),
    ("aiosmtpd command loop and parsing", ("aiosmtpd/",)),
    ("relay: other (pipeline, policy, message)", ("relay/",)),
    ("asyncio event loop, sockets", ("asyncio/", "selectors")),
]


def folded_stacks(folded: Path):
    """(stack, samples) from py-spy's folded output, without the default executor's idle
    workers: py-spy reports them as running, but /proc shows they use no CPU here."""
    for line in folded.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and not stack.rsplit(";", 1)[-1].startswith("_worker (concurrent/futures/thread.py"):
            yield stack, int(n)


def category_table(folded: Path, cpu_ms: float) -> str:
    shares: collections.Counter = collections.Counter()
    total = 0
    for stack, samples in folded_stacks(folded):
        total += samples
        name = next((c for c, marks in CATEGORIES if any(m in stack for m in marks)), "other")
        shares[name] += samples
    out = [
        f"| category ({total} samples) | share | ≈ ms/msg |",
        "|---|---:|---:|",
    ]
    for name, samples in shares.most_common():
        out.append(f"| {name} | {100 * samples / total:.1f} % | {cpu_ms * samples / total:.2f} |")
    return "\n".join(out)


def top_table(folded: Path, rows: int = 30) -> str:
    """Inclusive share of samples per function (py-spy -F: one entry per function)."""
    inclusive: collections.Counter = collections.Counter()
    total = 0
    for stack, n in folded_stacks(folded):
        total += n
        for frame in set(stack.split(";")):
            inclusive[frame] += n
    out = [f"{total} samples; inclusive share of the top functions:"]
    for frame, samples in inclusive.most_common(rows):
        out.append(f"{100 * samples / total:6.1f} %  {frame}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", action="append", help=f"cells, e.g. {DEFAULT_GRIDS[0]!r} (repeatable)")
    parser.add_argument("--targets", type=lambda s: s.split(","), default=["relay", "anchor", "anchor_unix"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--counts",
        type=lambda s: {int(k): int(v) for k, v in (p.split(":") for p in s.split(","))},
        default=DEFAULT_COUNTS,
        help="messages per run by clients, e.g. 1:100,20:1000,100:1000",
    )
    parser.add_argument("--limit", type=float, default=60.0, help="seconds per run (no message starts after it)")
    parser.add_argument("--drain", type=float, default=60.0, help="seconds to wait for the sink after a run")
    parser.add_argument("--workers", type=int, default=2, help="relay serve --workers")
    parser.add_argument(
        "--bad-every", type=int, default=0, help="every N-th message authenticates with a wrong password (expects 535)"
    )
    parser.add_argument("--no-check", action="store_true", help="skip the DKIM check of every target port")
    parser.add_argument("--client-check", action="store_true", help="only tls_load against tls_sink")
    parser.add_argument(
        "--profile", type=int, metavar="COUNT", help="only profile relay with py-spy over COUNT messages"
    )
    parser.add_argument(
        "--certs", type=lambda s: s.split(","), default=["ecdsa", "rsa"], help="for --client-check / --profile"
    )
    parser.add_argument(
        "--modes", type=lambda s: s.split(","), default=["starttls"], help="for --profile: starttls,implicit"
    )
    parser.add_argument(
        "--concs", type=lambda s: [int(x) for x in s.split(",")], default=[1, 20, 100], help="for --client-check"
    )
    parser.add_argument("--summarize", type=Path, metavar="RAW", help="only print the tables of a raw file")
    parser.add_argument(
        "--base-src",
        type=Path,
        metavar="DIR",
        help="also run the relay of this source tree (e.g. `git archive main | tar -x -C DIR`) as "
        "target relay_base, interleaved with the others: a before/after in one run",
    )
    args = parser.parse_args()
    if args.base_src and "relay_base" not in args.targets:
        args.targets.insert(1, "relay_base")
    if args.summarize:
        rows = [r for r in map(json.loads, args.summarize.read_text().splitlines()) if "target" in r and r["rep"] >= 0]
        print(summarize(rows) + "\n\n" + compare(rows))
        return

    client = tool("tls_load")
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    sh("setup")
    workdir = Path(tempfile.mkdtemp(prefix="relay-tls-bench-"))

    if args.client_check:
        rows = client_check(args, client, workdir)
        raw = results / f"tls-client-check-{stamp}.jsonl"
        raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(summarize(rows))
        print(f"\nraw: {raw.relative_to(REPO)}")
        return

    sh("stop")
    sh("sink", "start", "count")
    relays: dict[tuple[str, str], subprocess.Popen] = {}
    try:
        if args.profile:
            profile(args, client, workdir, results, stamp)
            print(f"report: {(results / f'tls-profile-{stamp}.txt').relative_to(REPO)}")
            return
        cells = [c for g in (args.grid or DEFAULT_GRIDS) for c in parse_grid(g)]
        certs = sorted({c["cert"] for c in cells})
        roots: dict[str, dict[str, list[int]]] = {}
        for target in ("relay", "relay_base"):
            if target in args.targets:
                for cert in certs:
                    src = args.base_src.resolve() if target == "relay_base" else None
                    relays[target, cert] = start_relay(workdir, cert, args.workers, target, src)
                    roots.setdefault(target, {})[cert] = [relays[target, cert].pid]
        anchors = [t for t in args.targets if t.startswith("anchor")]
        for target in anchors:
            sh("start", "inet" if target == "anchor" else "unix")
        for target in anchors:
            pids = [int(p) for p in sh("pids", "inet" if target == "anchor" else "unix", capture=True).split(",")]
            roots[target] = {cert: pids for cert in certs}
        checks = []
        if not args.no_check:
            ports = {
                f"{t}/{cert}/{mode}": (BASE_PORT[t] + CERT_OFFSET[cert] + MODE_OFFSET[mode], mode)
                for t in args.targets
                for cert in certs
                for mode in ("starttls", "implicit")
            }
            checks = dkim_check(ports, client)
        meta = {
            "stamp": stamp,
            "argv": sys.argv[1:],
            "grids": args.grid or DEFAULT_GRIDS,
            "targets": args.targets,
            "base_src": str(args.base_src) if args.base_src else None,
            "bad_every": args.bad_every,
            "reps": args.reps,
            "counts": args.counts,
            "workers": args.workers,
            "nproc": os.cpu_count(),
            "uname": os.uname().release,
            "dkim_check": checks,
            "perf_instructions": perf_instructions_available(),
            "openssl_rsa2048_signs_per_s_before": openssl_rsa_signs_per_s(),
            "postfix": subprocess.run(
                ["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True
            ).stdout.strip(),
            "openssl": subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip(),
        }
        raw = results / f"tls-raw-{stamp}.jsonl"
        with open(raw, "w") as fh:
            fh.write(json.dumps({"meta": meta}) + "\n")
        # warm-up: process pools, caches and Postfix's first smtpd/cleanup processes
        for target in args.targets:
            for cert in certs:
                warm = {"cert": cert, "mode": "starttls", "tls": "1.3", "resume": "off", "conc": 20}
                one_run(target, warm, -1, roots[target][cert], client, {20: 200}, 30, args.drain)
        rows = []
        for rep in range(args.reps):
            for cell in cells:
                order = args.targets[rep % len(args.targets) :] + args.targets[: rep % len(args.targets)]
                for target in order:
                    row = one_run(
                        target,
                        cell,
                        rep,
                        roots[target][cell["cert"]],
                        client,
                        args.counts,
                        args.limit,
                        args.drain,
                        args.bad_every,
                    )
                    rows.append(row)
                    with open(raw, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    c = row["client"]
                    print(
                        f"rep {rep} {target:11} {cell['cert']:5} {cell['mode']:8} {cell['tls']} "
                        f"resume={cell['resume']:3} conc={cell['conc']:3}: {row['e2e_msgs_per_s']:7.1f} msgs/s "
                        f"p50 {c.get('lat_p50_ms', 0):7.1f} p99 {c.get('lat_p99_ms', 0):7.1f} ms "
                        f"cpu {row['server_cpu_ms_per_msg']} ms/msg err {c.get('errors')} "
                        f"load {row['loadavg_before']}->{row['loadavg_after']}",
                        file=sys.stderr,
                        flush=True,
                    )
        meta_after = {"openssl_rsa2048_signs_per_s_after": openssl_rsa_signs_per_s(), "loadavg": loadavg()}
        with open(raw, "a") as fh:
            fh.write(json.dumps({"meta_after": meta_after}) + "\n")
        table = summarize(rows) + "\n\n" + compare(rows)
        (results / f"tls-summary-{stamp}.md").write_text(
            f"{time.strftime('%Y-%m-%d')}, relay --workers {args.workers}, medians of {args.reps} reps "
            f"(each rep in brackets)\n\n{table}\n"
        )
        print(table)
        print(f"\nraw: {raw.relative_to(REPO)}")
    finally:
        for proc in relays.values():
            stop(proc)
        sh("stop")


if __name__ == "__main__":
    main()
