"""Two relays at the same time on the applications' workload: a before/after that the machine's drift cannot fake.

    git archive 2408f70 relay | tar -x -C /tmp/base
    tests/loopback-only .venv/bin/python bench/tls_ab.py --base-src /tmp/base                 # 10 rounds, STARTTLS
    tests/loopback-only .venv/bin/python bench/tls_ab.py --base-src /tmp/base --mode implicit --rounds 16

This tree's relay (`relay`) and the relay of the source tree DIR (`relay_base`, run with this
tree's venv) both serve the same cell as in tls_run.py (certificate, mode, TLS 1.3, no
resumption, CONC clients of bench/bin/tls_load, one TLS connection, AUTH PLAIN and one 10 KB
message per connection, behind the same smtp-sink). Each round loads both at once with COUNT
messages each, so whatever else happens on the machine, and its speed (which drifts by ±20 %
between minutes on a shared VM), hits both alike; half the rounds run each tree on the other's
ports and folders, and the clients' start order alternates, so no slot favours a tree. The
figure is each round's ratio of CPU per message (relay / relay_base; CPU-seconds of each
process tree from /proc over the messages its client got 250 for), printed per round, then the
median, the geometric mean and the standard error of the mean log ratio. Sequential A/B runs
(tls_run.py --base-src) need many quiet reps to resolve a 5 % change; this resolves it in a few
minutes.

Bounded: COUNT messages per client per round, a time limit per round; loopback only;
everything started here is stopped here, by PID. Uses tls_run.py's set-up (sink, keys,
certificates) under TLS_BENCH_TMP: do not run it beside another tls_run.py/tls_ab.py with
the same TLS_BENCH_TMP.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import tls_run as bench
from procstat import cpu_seconds

TARGETS = ("relay", "relay_base")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-src", type=Path, required=True, metavar="DIR", help="source tree of relay_base")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--count", type=int, default=500, help="messages per client per round")
    parser.add_argument("--mode", choices=("starttls", "implicit"), default="starttls")
    parser.add_argument("--cert", choices=("ecdsa", "rsa"), default="ecdsa")
    parser.add_argument("--conc", type=int, default=20, help="concurrent clients per relay")
    parser.add_argument("--workers", type=int, default=1, help="relay serve --workers (each relay)")
    parser.add_argument("--limit", type=float, default=120.0, help="seconds per round")
    args = parser.parse_args()

    client = bench.tool("tls_load")
    cell = {"cert": args.cert, "mode": args.mode, "tls": "1.3", "resume": "off", "conc": args.conc}
    results = bench.HERE / "results"
    results.mkdir(exist_ok=True)
    raw = results / f"tls-ab-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    bench.sh("setup")
    bench.sh("stop")
    bench.sh("sink", "start", "count")
    workdir = Path(tempfile.mkdtemp(prefix="relay-tls-ab-"))
    base = args.base_src.resolve()
    sources = {"relay": bench.REPO, "relay_base": base}
    rows: list[dict] = [{"meta": vars(args) | {"base_src": str(base)}}]
    try:
        # Half the rounds with each tree on each of the two slots (ports, data folders,
        # start order): whatever favours a slot favours both trees alike.
        first = (args.rounds + 1) // 2
        for phase, rounds in enumerate((first, args.rounds - first)):
            slots = dict(zip(TARGETS, TARGETS if phase == 0 else TARGETS[::-1], strict=True))  # tree -> slot
            rows += run_phase(args, client, cell, workdir, sources, slots, rounds, len(rows) - 1)
    finally:
        bench.sh("stop")
        raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ratios = [r["ratio"] for r in rows if "ratio" in r]
    if ratios:
        logs = [math.log(r) for r in ratios]
        se = statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else float("nan")
        print(
            f"{args.cert} {args.mode}, {args.conc} clients, {len(ratios)} rounds: CPU per message relay / relay_base "
            f"median {statistics.median(ratios):.3f}, geometric mean {math.exp(statistics.mean(logs)):.3f} "
            f"(SE of the mean log ratio {se:.3f}); lower in {sum(r < 1 for r in ratios)} of {len(ratios)} rounds; "
            f"relay median {statistics.median(r['cpu_ms_per_msg']['relay'] for r in rows if 'ratio' in r):.2f} ms/msg, "
            f"relay_base {statistics.median(r['cpu_ms_per_msg']['relay_base'] for r in rows if 'ratio' in r):.2f}"
        )
    print(f"raw: {raw.relative_to(bench.REPO)}")


def run_phase(
    args: argparse.Namespace,
    client: str,
    cell: dict,
    workdir: Path,
    sources: dict[str, Path],
    slots: dict[str, str],
    rounds: int,
    numbered: int,
) -> list[dict]:
    """`rounds` rounds with each tree's relay on its slot (a tls_run.py target's ports)."""
    port = {t: bench.BASE_PORT[slots[t]] + bench.CERT_OFFSET[args.cert] + bench.MODE_OFFSET[args.mode] for t in TARGETS}
    relays: dict[str, subprocess.Popen] = {}
    rows = []
    try:
        for tree in TARGETS:
            relays[tree] = bench.start_relay(workdir, args.cert, args.workers, slots[tree], sources[tree])
        for tree in TARGETS:  # warm up: first connections, imports, key loading
            bench.run_load(bench.load_cmd(client, cell, port[tree], 200, 30), 30)
        for n in range(rounds):
            cpu_before = {t: cpu_seconds(relays[t].pid) for t in TARGETS}
            load_before = bench.loadavg()
            # The two clients start one after the other; which one first alternates.
            order = TARGETS if n % 2 == 0 else TARGETS[::-1]
            clients = {
                t: subprocess.Popen(
                    bench.load_cmd(client, cell, port[t], args.count, args.limit),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for t in order
            }
            stats = {}
            for t, proc in clients.items():
                try:
                    out, _ = proc.communicate(timeout=args.limit + 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, _ = proc.communicate()
                lines = out.strip().splitlines()
                stats[t] = json.loads(lines[-1]) if lines else {"ok": 0, "errors": -1}
            ok = {t: stats[t].get("ok", 0) for t in TARGETS}
            ms = {t: 1000 * (cpu_seconds(relays[t].pid) - cpu_before[t]) / max(ok[t], 1) for t in TARGETS}
            row = {
                "round": numbered + len(rows),
                "cell": cell,
                "slots": slots,
                "cpu_ms_per_msg": ms,
                "ok": ok,
                "errors": {t: stats[t].get("errors") for t in TARGETS},
                "msgs_per_s": {t: stats[t].get("msgs_per_s") for t in TARGETS},
                "lat_p99_ms": {t: stats[t].get("lat_p99_ms") for t in TARGETS},
                "ratio": ms["relay"] / ms["relay_base"],
                "loadavg": [load_before, bench.loadavg()],
            }
            rows.append(row)
            print(
                f"round {row['round']} (this tree on {slots['relay']}'s ports): relay {ms['relay']:.2f} ms/msg, "
                f"relay_base {ms['relay_base']:.2f} ms/msg, ratio {row['ratio']:.3f}; ok {ok}, "
                f"errors {row['errors']}, load {row['loadavg'][1]}",
                flush=True,
            )
    finally:
        for proc in relays.values():
            bench.stop(proc)
    return rows


if __name__ == "__main__":
    main()
