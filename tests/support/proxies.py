"""Real egress proxies for relay-level tests: microsocks (SOCKS5) and tinyproxy (HTTP
CONNECT), each binding its outgoing side to a distinct loopback address so an upstream can
tell that a connection came through the proxy."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from tests.support.procs import free_port, require_binary, running

LOOP = "127.0.0.1"


@contextlib.contextmanager
def microsocks(workdir: Path, *, user: str, password: str, egress_ip: str = "127.0.0.2") -> Iterator[int]:
    port = free_port()
    argv = [require_binary("microsocks"), "-i", LOOP, "-p", str(port), "-u", user, "-P", password, "-b", egress_ip]
    with running(argv, ready=(LOOP, port), log_path=workdir / "microsocks.log"):
        yield port


@contextlib.contextmanager
def tinyproxy(
    workdir: Path, *, user: str, password: str, connect_ports: Iterable[int], egress_ip: str = "127.0.0.2"
) -> Iterator[int]:
    port = free_port()
    conf = workdir / "tinyproxy.conf"
    lines = [
        f"Listen {LOOP}",
        f"Port {port}",
        f"Bind {egress_ip}",
        f"Allow {LOOP}",
        f"BasicAuth {user} {password}",
        "Timeout 60",
        "LogLevel Info",
        f'PidFile "{workdir / "tinyproxy.pid"}"',
    ]
    # tinyproxy allows CONNECT only to 443 and 563 unless told otherwise.
    lines += [f"ConnectPort {p}" for p in connect_ports]
    conf.write_text("\n".join(lines) + "\n")
    with running(
        [require_binary("tinyproxy"), "-d", "-c", str(conf)], ready=(LOOP, port), log_path=workdir / "tinyproxy.log"
    ):
        yield port
