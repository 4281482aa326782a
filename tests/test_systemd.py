"""deploy/systemd/relay.service: checked by systemd's own tools (`systemd-analyze verify`, and the
offline security review), and kept in step with the relay's defaults."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import defaults
from tests.support.procs import require_binary

pytestmark = pytest.mark.binaries

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "systemd" / "relay.service"


def _installed_copy(tmp_path: Path) -> Path:
    # verify checks that ExecStart's program exists: point it at this test's own relay.
    relay = Path(sys.executable).parent / "relay"
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/opt/relay/bin/relay", str(relay)))
    return copy


def _service_section() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    section = None
    for line in UNIT.read_text().splitlines():
        if re.fullmatch(r"\[\w+\]", line.strip()):
            section = line.strip()
        elif section == "[Service]" and "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_analyze_verify_finds_nothing(tmp_path):
    result = subprocess.run(
        [require_binary("systemd-analyze"), "verify", _installed_copy(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr.strip()) == (0, ""), result.stderr


def test_systemd_security_review_rates_the_unit_ok(tmp_path):
    result = subprocess.run(
        [require_binary("systemd-analyze"), "security", "--offline=yes", "--no-pager", _installed_copy(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    # systemd's scale: 0-10, "OK" below 2 (10 is an unprotected service).
    assert float(match[1]) < 2.0, result.stdout


def test_unit_runs_the_relay_unprivileged_with_its_defaults():
    service = _service_section()
    assert service["DynamicUser"] == ["yes"] and service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["CapabilityBoundingSet"] == service["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    # StateDirectory=relay is /var/lib/relay: the relay's data_dir default, the only writable path.
    assert service["StateDirectory"] == ["relay"] and defaults.IMAGE_DATA_DIR == "/var/lib/relay"
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # reload = SIGHUP
    [exec_start] = service["ExecStart"]
    assert exec_start.split()[1:] == ["serve", "-c", defaults.IMAGE_CONFIG_PATH]
