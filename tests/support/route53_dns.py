"""A Route 53 hosted zone (moto's server) served over real DNS by NSD on loopback.

    with moto_server(tmp_path / "moto.log") as (endpoint, _):
        with Route53Zone(endpoint, "example.com", tmp_path) as zone:
            zone.host, zone.port, zone.zone_id      # NSD, and the hosted zone's id
            zone.sync()                             # NSD now serves what Route 53 holds
            zone.override("s1._domainkey.example.com", ['"v=DKIM1; p=..."'])   # a wrong record

Route 53 changes are not visible in DNS until `sync()`: that is how a test makes a DNS that
serves a new record only after a delay, and decides when the delay ends. `override` makes
NSD serve other values at a name than Route 53 holds (a stale or wrong record), until
`clear_overrides()` and the next sync. Every sync writes a zone file with a higher SOA
serial, sends NSD SIGHUP (which reloads changed zone files) and returns once NSD answers
with that serial. Record values are copied exactly as Route 53 stores them (a TXT value is
its quoted character-strings), so what NSD serves is what the UPSERT said.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import boto3
import dns.message
import dns.query
import dns.rdatatype

from tests.support.aws import REGION
from tests.support.dns import HOST, _answers_soa, _config
from tests.support.procs import ProcessError, free_port, log_tail, require_binary, running


class Route53Zone:
    def __init__(self, endpoint: str, zone_name: str, tmp_path: Path) -> None:
        self.zone_name = zone_name.rstrip(".").lower()
        self.route53 = boto3.client(
            "route53",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        reply = self.route53.create_hosted_zone(Name=self.zone_name + ".", CallerReference=f"test-{time.time_ns()}")
        self.zone_id = reply["HostedZone"]["Id"].rsplit("/", 1)[-1]
        self.workdir = Path(tmp_path) / f"route53-nsd-{time.monotonic_ns()}"
        self.workdir.mkdir(parents=True)
        self.zone_file = self.workdir / f"{self.zone_name}.zone"
        self.serial = 2026010100
        self.overrides: dict[str, list[str]] = {}
        self.host, self.port = HOST, free_port(HOST)
        self._running = None
        self._proc = None

    # -- what Route 53 holds ----------------------------------------------------------------

    def records(self) -> list[dict]:
        out, kwargs = [], {"HostedZoneId": self.zone_id}
        while True:
            reply = self.route53.list_resource_record_sets(**kwargs)
            out += reply["ResourceRecordSets"]
            if not reply.get("IsTruncated"):
                return out
            kwargs.update(StartRecordName=reply["NextRecordName"], StartRecordType=reply["NextRecordType"])

    def txt(self, name: str) -> list[str] | None:
        """The TXT values Route 53 holds at `name` (as stored), or None."""
        for rrset in self.records():
            if rrset["Type"] == "TXT" and rrset["Name"].rstrip(".").lower() == name.rstrip(".").lower():
                return [r["Value"] for r in rrset["ResourceRecords"]]
        return None

    # -- what NSD serves ---------------------------------------------------------------------

    def _zone_text(self) -> str:
        lines = [
            f"$ORIGIN {self.zone_name}.",
            "$TTL 60",
            f"@ IN SOA ns1.{self.zone_name}. hostmaster.{self.zone_name}. {self.serial} 3600 600 86400 60",
            f"@ IN NS ns1.{self.zone_name}.",
            "ns1 IN A 127.0.0.1",
        ]
        served: dict[tuple[str, str], tuple[int, list[str]]] = {}
        for rrset in self.records():
            if rrset["Type"] in ("SOA", "NS"):
                continue  # NSD's own
            name = rrset["Name"].rstrip(".").lower()
            served[(name, rrset["Type"])] = (rrset.get("TTL", 60), [r["Value"] for r in rrset["ResourceRecords"]])
        for name, values in self.overrides.items():
            served[(name.rstrip(".").lower(), "TXT")] = (60, values)
        for (name, rtype), (ttl, values) in sorted(served.items()):
            lines += [f"{name}. {ttl} IN {rtype} {value}" for value in values]
        return "\n".join(lines) + "\n"

    def _serial_served(self) -> int | None:
        query = dns.message.make_query(self.zone_name, dns.rdatatype.SOA)
        try:
            reply = dns.query.udp(query, self.host, port=self.port, timeout=0.5)
        except (OSError, dns.exception.DNSException):
            return None
        for rrset in reply.answer:
            return rrset[0].serial
        return None

    def sync(self, timeout: float = 15.0) -> None:
        """Make NSD serve what Route 53 holds now (plus overrides); return once it does."""
        self.serial += 1
        self.zone_file.write_text(self._zone_text())
        # NSD reloads a zone file whose mtime changed: make it change, in whole seconds.
        stamp = 1_700_000_000 + (self.serial - 2026010100)
        os.utime(self.zone_file, (stamp, stamp))
        if self._proc is None:
            return
        # NSD reloads by forking new server processes; the old ones answer from the same
        # socket until they exit. Seeing the new serial once is not enough: a next query
        # could still meet an old server, with the old zone.
        old_servers = _leaf_descendants(self._proc.pid)
        os.kill(self._proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self._serial_served() != self.serial or any(_alive(pid) for pid in old_servers):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise ProcessError(f"nsd does not serve serial {self.serial}\n{log_tail(self.workdir / 'nsd.log')}")
            time.sleep(0.05)

    def override(self, name: str, values: list[str]) -> None:
        self.overrides[name] = values
        self.sync()

    def clear_overrides(self) -> None:
        self.overrides.clear()
        self.sync()

    def __enter__(self) -> Route53Zone:
        nsd = require_binary("nsd")
        self.sync()
        config = self.workdir / "nsd.conf"
        config.write_text(_config(self.workdir, self.port, {self.zone_name: self.zone_file}))
        self._running = running([nsd, "-d", "-c", config], ready=None, log_path=self.workdir / "nsd.log")
        self._proc = self._running.__enter__()
        deadline = time.monotonic() + 15
        while not _answers_soa(self.port, self.zone_name):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise ProcessError(f"nsd does not serve {self.zone_name}\n{log_tail(self.workdir / 'nsd.log')}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        if self._running is not None:
            self._running.__exit__(*exc)
            self._running = self._proc = None


def _children() -> dict[int, list[int]]:
    """Parent pid → its children's pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The command name (field 2) may hold spaces: the parent pid is second after its ')'.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(parent, []).append(int(entry.name))
    return tree


def _leaf_descendants(pid: int) -> list[int]:
    """The processes under `pid` that have none of their own: NSD's server processes."""
    tree, leaves, todo = _children(), [], [pid]
    while todo:
        kids = tree.get(todo.pop(), [])
        for kid in kids:
            if kid in tree:
                todo.append(kid)
            else:
                leaves.append(kid)
    return leaves


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie serves nothing
