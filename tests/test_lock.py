"""The lock files (requirements/*.txt) that the image, CI and `make test` install from: every
package pinned with its hashes, and in step with what pyproject.toml declares."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ("build.txt", "image.txt", "test.txt")


def _lock_check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, root / "requirements" / "lock.py", "check"], capture_output=True, text=True, timeout=30
    )


def test_lock_files_match_pyproject():
    result = _lock_check(ROOT)
    assert result.returncode == 0, result.stderr


def test_a_dependency_added_without_make_lock_fails_the_install_naming_the_fix(tmp_path):
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    pyproject = (ROOT / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(
        pyproject.replace("dependencies = [\n", 'dependencies = [\n  "redis>=5",\n', 1)
    )
    result = _lock_check(tmp_path)
    assert result.returncode == 1
    assert "make lock" in result.stderr and "requirements/image.txt" in result.stderr


def test_every_pin_carries_hashes():
    for name in LOCKS:
        text = (ROOT / "requirements" / name).read_text()
        requirements = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 1)[1])
        pins = [r for r in requirements if not r.startswith("#") and r.strip()]
        assert pins, name
        for pin in pins:
            assert re.match(r"[A-Za-z0-9._-]+==\S+", pin) and "--hash=sha256:" in pin, f"{name}: {pin[:80]}"


def test_image_lock_holds_every_extra_but_the_test_tools():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    lines = (ROOT / "requirements" / "image.txt").read_text().splitlines()
    header = "\n".join(itertools.takewhile(lambda line: line.startswith("#"), lines))
    assert {name for name in extras if f"--extra {name}" in header} == set(extras) - {"test"}
    assert "pytest==" not in (ROOT / "requirements" / "image.txt").read_text()


def test_unused_vault_client_is_not_declared():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    everything = [*declared["dependencies"], *sum(declared["optional-dependencies"].values(), [])]
    assert not [d for d in everything if d.startswith("hvac")]  # relay talks to Vault over aiohttp
