"""A real authoritative DNS server on loopback for tests: NSD serving zone files.

    from tests.support.dns import black_hole, dns_server

    with dns_server(Path("tests/data/dns"), tmp_path) as (host, port):
        resolver = DnsResolver([host], port=port, timeout=2)     # relay.dns.resolver
        ...

    with black_hole() as (host, port):
        ...  # a resolver pointed here times out: nothing ever answers, over UDP or TCP

`zones` is one of:
- a directory: every `*.zone` file in it, the zone's name being the file name without
  `.zone` (`example.com.zone` serves `example.com`);
- an iterable of such files;
- a mapping `{zone name: zone text}` for zones a test writes on the fly.

A zone file is an ordinary RFC 1035 master file with an SOA; relative names are relative to
the zone (NSD sets `$ORIGIN` from the zone name). Names outside every served zone get
REFUSED, which the relay's resolver reports as a temporary error, like a real outage.

The server listens on 127.0.0.1 (UDP and TCP) on a free port, runs in the foreground
(`nsd -d`) as the current user without chroot, keeps everything under `tmp_path`, and is
ready when it answers an authoritative SOA for every zone. A missing `nsd` fails the test
(Debian package `nsd`); a zone NSD refuses to load fails it with NSD's log.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from tests.support.procs import ProcessError, free_port, log_tail, require_binary, running

__all__ = ["black_hole", "dns_server", "zone_files"]

HOST = "127.0.0.1"


def zone_files(zones: Path | Iterable[Path] | Mapping[str, str], workdir: Path) -> dict[str, Path]:
    """Zone name → zone file; a mapping's texts are written into `workdir`."""
    if isinstance(zones, Mapping):
        workdir.mkdir(parents=True, exist_ok=True)
        out = {}
        for name, text in zones.items():
            name = name.rstrip(".").lower()
            path = workdir / f"{name}.zone"
            path.write_text(text)
            out[name] = path
        return out
    paths = sorted(Path(zones).glob("*.zone")) if isinstance(zones, Path) else [Path(p) for p in zones]
    out = {}
    for path in paths:
        if not path.name.endswith(".zone"):
            raise ValueError(f"{path}: zone files are named <zone>.zone")
        out[path.name[: -len(".zone")].lower()] = path.resolve()
    if not out:
        raise ValueError(f"no *.zone files in {zones}")
    return out


def _config(workdir: Path, port: int, zones: Mapping[str, Path]) -> str:
    lines = [
        "server:",
        f"  ip-address: {HOST}",
        f"  port: {port}",
        "  do-ip4: yes",
        "  do-ip6: no",
        '  username: ""',
        '  chroot: ""',
        '  database: ""',
        f'  zonesdir: "{workdir}"',
        f'  zonelistfile: "{workdir}/zone.list"',
        f'  xfrdfile: "{workdir}/xfrd.state"',
        f'  xfrdir: "{workdir}"',
        f'  pidfile: "{workdir}/nsd.pid"',
        f'  cookie-secret-file: "{workdir}/cookiesecrets.txt"',
        "  server-count: 1",
        "  reuseport: no",
        "  hide-version: yes",
        "  verbosity: 1",
        "remote-control:",
        "  control-enable: no",
    ]
    for name, path in zones.items():
        lines += ["zone:", f"  name: {name}", f'  zonefile: "{path}"']
    return "\n".join(lines) + "\n"


def _answers_soa(port: int, zone: str) -> bool:
    query = dns.message.make_query(zone, dns.rdatatype.SOA)
    try:
        response = dns.query.udp(query, HOST, port=port, timeout=0.3)
    except (OSError, dns.exception.DNSException):
        return False
    return response.rcode() == dns.rcode.NOERROR and bool(response.flags & dns.flags.AA)


@contextlib.contextmanager
def dns_server(
    zones: Path | Iterable[Path] | Mapping[str, str],
    tmp_path: Path,
    *,
    ready_timeout: float = 15.0,
) -> Iterator[tuple[str, int]]:
    """Run NSD serving `zones` on 127.0.0.1; yield `(host, port)` once every zone answers."""
    nsd = require_binary("nsd")
    workdir = Path(tmp_path) / f"nsd-{time.monotonic_ns()}"
    workdir.mkdir(parents=True)
    files = zone_files(zones, workdir / "zones")
    port = free_port(HOST)
    config = workdir / "nsd.conf"
    config.write_text(_config(workdir, port, files))
    log_path = workdir / "nsd.log"
    with running([nsd, "-d", "-c", config], ready=None, log_path=log_path) as proc:
        deadline = time.monotonic() + ready_timeout
        waiting = list(files)
        while waiting:
            if proc.poll() is not None:
                raise ProcessError(
                    f"nsd exited with {proc.returncode} before serving its zones\n"
                    f"--- {log_path} ---\n{log_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise ProcessError(
                    f"nsd does not serve zone(s) {', '.join(waiting)} after "
                    f"{ready_timeout:g}s (zone file errors?)\n"
                    f"--- {log_path} ---\n{log_tail(log_path)}"
                )
            waiting = [z for z in waiting if not _answers_soa(port, z)]
            if waiting:
                time.sleep(0.05)
        yield HOST, port


@contextlib.contextmanager
def black_hole() -> Iterator[tuple[str, int]]:
    """A loopback port where nothing ever answers: UDP datagrams are never read and TCP
    connections are never accepted (they sit in the backlog). A resolver pointed here times
    out, which is how a DNS outage looks from the relay."""
    udp, tcp, port = _udp_and_tcp_on_one_port()
    try:
        yield HOST, port
    finally:
        udp.close()
        tcp.close()


def _udp_and_tcp_on_one_port() -> tuple[socket.socket, socket.socket, int]:
    # The UDP port the kernel picks may be in use for TCP (another test's connection, from
    # the same ephemeral range): then another one is picked. Bounded.
    for _ in range(100):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        udp.bind((HOST, 0))
        port = udp.getsockname()[1]
        try:
            tcp.bind((HOST, port))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(1)
        return udp, tcp, port
    raise OSError("no loopback port free for both UDP and TCP after 100 tries")
