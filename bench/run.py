#!/usr/bin/env python3
"""Load benchmark: relay between a load generator and Postfix's smtp-sink, on loopback.

    python bench/run.py                       # the matrix: 1/10/100 KB × 1/20/100 sessions
    python bench/run.py --sizes 10240 --concs 20 --reps 3 --workers 2
    python bench/run.py --anchor              # also run ../shared/bench/anchor side by side
    python bench/run.py --sizes 10240 --concs 20 --reps 5 --limits none,local,redis

For each point it runs Postfix's `smtp-source` (throughput) and a latency client (per-message
latency, connect → 250 after the final dot, one connection per message) against the relay,
and prints msgs/s end to end, p50/p99 latency, the relay's CPU (cores: CPU-seconds of its
process tree / wall time) and memory (peak PSS of the tree). The relay acknowledges only
after the upstream accepted, so the client's rate is the end-to-end rate; the sink's counter
is read to confirm every message arrived.

Bounded: a fixed message count per run, a wall-clock limit per run (the generator is killed
past it), loopback addresses only. Needs `smtp-source` and `smtp-sink` (Debian: postfix).
"""

from __future__ import annotations

import argparse
import json
import os
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
ANCHOR = REPO.parent / "shared" / "bench" / "anchor"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from procstat import ProcessTree  # noqa: E402

from tests.support.procs import wait_port  # noqa: E402

SINK = ("127.0.0.1", 2526)
RELAY_PORT = 2529
METRICS_PORT = 9479
ANCHOR_KEY = Path("/tmp/bench/keys/s1.private")
COUNTS = {1: 150, 20: 2000, 100: 2000}
RUN_LIMIT = 180.0


def require(tool: str) -> str:
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if not path:
        sys.exit(f"bench: {tool} not found; install Debian's postfix package (it ships smtp-source/smtp-sink)")
    return path


def bench_config(workdir: Path, key: Path, pool: int, spool: bool = False, limits: dict | None = None) -> Path:
    """The relay as a platform team would run it, minus TLS/AUTH (loopback bench client):
    JSON logs at info, one line per message, the default Received: header. With `spool`,
    store-and-forward (`queue.mode: spool`, the spool in the work directory): the client's
    250 comes once the message is synced; the sink's counter gives the end-to-end rate.
    `limits`: a `limits` section."""
    config: dict = {
        "hostname": "bench.relay.test",
        "listeners": [{"name": "bench", "bind": f"127.0.0.1:{RELAY_PORT}", "tls": "none", "auth": "none"}],
        "dkim": {"keys": [{"domain": "example.com", "selector": "s1", "key": f"file://{key}"}]},
        "upstream": {
            "host": SINK[0],
            "port": SINK[1],
            "tls": "none",
            "pool": {"max_connections": pool, "max_messages_per_connection": 1000},
        },
        # Loopback only, DNS included: the posture checks ask a port where nothing answers.
        "dns": {"nameservers": ["127.0.0.1"], "port": 5399, "timeout": "1s", "attempts": 1},
        "spf": {"egress_ip": ["192.0.2.1"]},
        "metrics": {"bind": f"127.0.0.1:{METRICS_PORT}"},
        "logging": {"format": "json", "level": "info"},
        "data_dir": str(workdir),
    }
    if spool:
        config["queue"] = {"mode": "spool", "dir": str(workdir / "spool")}
    if limits is not None:
        config["limits"] = limits
    path = workdir / "relay.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


class Sink:
    def __init__(self, workdir: Path) -> None:
        self.out = workdir / "sink.out"
        self.proc = subprocess.Popen(
            [require("smtp-sink"), "-c", "-u", "postfix", f"{SINK[0]}:{SINK[1]}", "1024"],
            stdout=open(self.out, "wb"),
            stderr=subprocess.STDOUT,
        )
        wait_port("127.0.0.1", SINK[1], 30)

    def count(self) -> int:
        # smtp-sink -c rewrites "sess=N quit=N mesg=N" on one line; the last counter wins.
        text = self.out.read_bytes()[-200:].decode(errors="replace")
        marks = [p for p in text.replace("\r", " ").split() if p.startswith("mesg=")]
        return int(marks[-1][5:]) if marks else 0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def start_relay(config: Path, workers: int, log: Path) -> subprocess.Popen:
    relay = REPO / ".venv" / "bin" / "relay"
    proc = subprocess.Popen(
        [str(relay), "serve", "-c", str(config), "--workers", str(workers)],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    wait_port("127.0.0.1", RELAY_PORT, 30)
    wait_port("127.0.0.1", METRICS_PORT, 30)
    time.sleep(1.0)  # let every worker bind
    return proc


def run_point(tool: str, size: int, conc: int, count: int, relay_pid: int, sink: Sink) -> dict:
    if tool == "smtp-source":
        cmd = [
            require("smtp-source"),
            "-M",
            "bench.example.com",
            "-s",
            str(conc),
            "-m",
            str(count),
            "-l",
            str(size),
            "-S",
            "bench",
            "-f",
            "a@example.com",
            "-t",
            "b@example.net",
            f"127.0.0.1:{RELAY_PORT}",
        ]
    else:
        cmd = [
            sys.executable,
            str(HERE / "latency.py"),
            "--sessions",
            str(conc),
            "--count",
            str(count),
            "--size",
            str(size),
            "--limit",
            str(RUN_LIMIT),
            f"127.0.0.1:{RELAY_PORT}",
        ]
    tree = ProcessTree(relay_pid)
    before_sink = sink.count()
    tree.start()
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=RUN_LIMIT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate()
    wall = time.monotonic() - started
    usage = tree.stop()
    deadline = time.monotonic() + 10
    while sink.count() - before_sink < count and time.monotonic() < deadline:
        time.sleep(0.05)
    delivered = sink.count() - before_sink
    row = {
        "tool": tool,
        "size": size,
        "conc": conc,
        "count": count,
        "delivered": delivered,
        "wall_s": round(wall, 3),
        "msgs_per_s": round(delivered / wall, 1),
        "rc": proc.returncode,
        "relay_cores": round(usage["cpu_s"] / wall, 2),
        "relay_cpu_ms_per_msg": round(1000 * usage["cpu_s"] / max(delivered, 1), 2),
        "relay_pss_mib": round(usage["peak_pss"] / 2**20, 1),
    }
    if tool == "latency":
        stats = json.loads(out.decode().strip().splitlines()[-1])
        row.update(p50_ms=stats["p50_ms"], p99_ms=stats["p99_ms"], errors=stats["errors"])
    elif proc.returncode != 0:
        row["stderr"] = err.decode(errors="replace")[-300:]
    return row


def signing_key(workdir: Path) -> Path:
    """The anchor's DKIM key when the anchor harness made one (both sign alike), else a new
    one in `workdir`."""
    if ANCHOR_KEY.exists():
        return ANCHOR_KEY
    key = workdir / "s1.key"
    if not key.exists():
        relay = str(REPO / ".venv" / "bin" / "relay")
        subprocess.run(
            [relay, "keygen", "-d", "example.com", "-s", "s1", "--store", f"file://{key}"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return key


def matrix(args) -> list[dict]:
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    key = signing_key(workdir)
    config = bench_config(workdir, key, pool=args.pool, spool=args.spool)
    sink = Sink(workdir)
    relay = start_relay(config, args.workers, workdir / "relay.log")
    rows = []
    try:
        # Warm up: pools, caches and the first posture check out of the way.
        run_point("smtp-source", 1024, 20, 300, relay.pid, sink)
        for size in args.sizes:
            for conc in args.concs:
                for rep in range(args.reps):
                    for tool in args.tools:
                        row = run_point(tool, size, conc, COUNTS.get(conc, 2000), relay.pid, sink)
                        row["rep"] = rep
                        rows.append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(60)
        sink.stop()
    return rows


def limits_config(mode: str, redis_url: str | None) -> dict | None:
    """Limits every bench message passes (the cost measured is the counting). smtp-source
    does not authenticate, so the From domain is the entity counted: one `take` per
    message; an authenticated user would add its RCPT check and a second entity."""
    if mode == "none":
        return None
    quota = {"rate": "1000000/s", "daily": 10**9, "daily_recipients": 10**9}
    config: dict = {"domains": {"example.com": quota}, "backend": mode}
    if mode == "redis":
        config["redis"] = {"url": redis_url}
    return config


def limits_comparison(args) -> list[dict]:
    """The same point with each `--limits` mode, interleaved rep by rep (the machine is
    shared: alternating spreads its noise over every mode alike); a fresh relay per run."""
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-limits-"))
    key = signing_key(workdir)
    redis = None
    if "redis" in args.limits:
        redis = subprocess.Popen(
            [require("redis-server"), "--bind", "127.0.0.1", "--port", "6389", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            cwd=workdir,
        )
        wait_port("127.0.0.1", 6389, 30)
    sink = Sink(workdir)
    rows = []
    try:
        for rep in range(args.reps):
            for mode in args.limits:
                run_dir = workdir / f"{mode}-{rep}"
                run_dir.mkdir()
                config = bench_config(run_dir, key, args.pool, limits=limits_config(mode, "redis://127.0.0.1:6389/0"))
                relay = start_relay(config, args.workers, run_dir / "relay.log")
                try:
                    run_point("smtp-source", 1024, 20, 300, relay.pid, sink)  # warm up
                    for size in args.sizes:
                        for conc in args.concs:
                            row = run_point("smtp-source", size, conc, COUNTS.get(conc, 2000), relay.pid, sink)
                            row.update(rep=rep, limits=mode, loadavg=round(os.getloadavg()[0], 1))
                            rows.append(row)
                            print(json.dumps(row), file=sys.stderr, flush=True)
                finally:
                    relay.send_signal(signal.SIGTERM)
                    relay.wait(60)
    finally:
        sink.stop()
        if redis is not None:
            redis.terminate()
            redis.wait(10)
    return rows


def summarize_limits(rows: list[dict]) -> str:
    lines = [
        "| size | sessions | limits | msgs/s median (each run) | CPU ms/msg median (each run) | vs none |",
        "|---:|---:|---|---|---|---:|",
    ]
    for size, conc in sorted({(r["size"], r["conc"]) for r in rows}):
        base = None
        for mode in dict.fromkeys(r["limits"] for r in rows):
            point = [r for r in rows if (r["size"], r["conc"], r["limits"]) == (size, conc, mode)]
            rates = [r["msgs_per_s"] for r in point]
            cpu = [r["relay_cpu_ms_per_msg"] for r in point]
            median = statistics.median(rates)
            base = median if mode == "none" else base
            delta = f"{(median / base - 1) * 100:+.1f} %" if base and mode != "none" else "–"
            lines.append(
                f"| {size // 1024} KB | {conc} | {mode} | {median:g} ({'/'.join(f'{v:g}' for v in rates)}) "
                f"| {statistics.median(cpu):g} ({'/'.join(f'{v:g}' for v in cpu)}) | {delta} |"
            )
    return "\n".join(lines)


COLUMNS = [  # (heading, tool, field)
    ("msgs/s (smtp-source)", "smtp-source", "msgs_per_s"),
    ("msgs/s (latency client)", "latency", "msgs_per_s"),
    ("p50 ms", "latency", "p50_ms"),
    ("p99 ms", "latency", "p99_ms"),
    ("relay cores", "smtp-source", "relay_cores"),
    ("CPU ms/msg", "smtp-source", "relay_cpu_ms_per_msg"),
]


def summarize(rows: list[dict]) -> str:
    """Median of the reps per cell, every rep in brackets; peak PSS over all runs of a point."""
    lines = [
        "| size | sessions | " + " | ".join(h for h, _, _ in COLUMNS) + " | peak PSS MiB |",
        "|---:|---:|" + "---|" * len(COLUMNS) + "---:|",
    ]
    for size, conc in sorted({(r["size"], r["conc"]) for r in rows}):
        point = [r for r in rows if r["size"] == size and r["conc"] == conc]
        cells = []
        for _, tool, field in COLUMNS:
            values = [r[field] for r in point if r["tool"] == tool and field in r]
            cells.append(f"{statistics.median(values):g} ({'/'.join(f'{v:g}' for v in values)})" if values else "–")
        pss = max(r["relay_pss_mib"] for r in point)
        lines.append(f"| {size // 1024} KB | {conc} | " + " | ".join(cells) + f" | {pss:g} |")
    return "\n".join(lines)


def run_anchor(args) -> None:
    """Run the shared anchor harness with relay as an extra target, in the same run."""
    if not (ANCHOR / "run_load.sh").exists():
        sys.exit(f"bench: the anchor harness is not at {ANCHOR}")
    subprocess.run([str(ANCHOR / "setup_anchor.sh"), "inet"], check=True)  # makes the shared key
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    config = bench_config(workdir, ANCHOR_KEY, pool=args.pool, spool=args.spool)
    subprocess.run([str(ANCHOR / "sink_ctl.sh"), "stop"], check=False)
    relay = start_relay(config, args.workers, workdir / "relay.log")
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "SIZES": ",".join(map(str, args.sizes)),
        "CONCS": ",".join(map(str, args.concs)),
        "REPS": str(args.reps),
        "EXTRA_TARGETS": f"relay=127.0.0.1:{RELAY_PORT}",
        "EXTRA_PIDS": f"relay={relay.pid}",
        "RESULTS_DIR": str(results),
    }
    try:
        subprocess.run([str(ANCHOR / "run_load.sh")], check=True, env=env)
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(60)
    raws = sorted(results.glob("raw-*.jsonl"))
    print(ratios([json.loads(line) for line in raws[-1].read_text().splitlines() if line.strip()]))
    print(f"\nraw results: {raws[-1]}")


def ratios(records: list[dict]) -> str:
    """relay's figure over each anchor variant's, pair by pair (same size, sessions, tool, rep)."""
    out = [
        "| size | sessions | tool | figure | relay | anchor | ratio | anchor_unix | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    index = {(r["target"], r["size"], r["conc"], r["tool"], r["rep"]): r for r in records}
    for (target, size, conc, tool, rep), rec in sorted(index.items()):
        if target != "relay":
            continue
        for figure in ("e2e_msgs_per_s", "lat_p99_ms", "peak_pss_mib", "target_cores"):
            if figure not in rec:
                continue
            cells = [f"{rec[figure]:g}"]
            for anchor in ("anchor", "anchor_unix"):
                other = index.get((anchor, size, conc, tool, rep), {}).get(figure)
                cells += [f"{other:g}" if other else "–", f"{rec[figure] / other:.2f}×" if other else "–"]
            out.append(f"| {size // 1024} KB | {conc} | {tool} r{rep} | {figure} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spool", action="store_true", help="run relay in spool mode (queue.mode: spool)")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 10240, 102400])
    parser.add_argument("--concs", type=lambda s: [int(x) for x in s.split(",")], default=[1, 20, 100])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tools", type=lambda s: s.split(","), default=["smtp-source", "latency"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pool", type=int, default=64, help="upstream.pool.max_connections")
    parser.add_argument("--anchor", action="store_true", help="run the shared anchor harness side by side")
    parser.add_argument("--json", type=Path, help="also write the raw rows here")
    parser.add_argument(
        "--limits",
        type=lambda s: s.split(","),
        help="compare sending-limit backends, e.g. none,local,redis (smtp-source only, interleaved)",
    )
    args = parser.parse_args()
    if args.anchor:
        run_anchor(args)
        return
    if args.limits:
        rows = limits_comparison(args)
        if args.json:
            args.json.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        loads = [r["loadavg"] for r in rows]
        print(
            f"relay --workers {args.workers}, {time.strftime('%Y-%m-%d')}, {args.reps} runs per mode, interleaved; "
            f"1-min load average during the runs: {min(loads)}-{max(loads)}\n"
        )
        print(summarize_limits(rows))
        return
    rows = matrix(args)
    if args.json:
        args.json.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    print(
        f"relay --workers {args.workers}, {time.strftime('%Y-%m-%d')}, "
        f"medians of {args.reps} reps (each rep in brackets)\n"
    )
    print(summarize(rows))


if __name__ == "__main__":
    main()
