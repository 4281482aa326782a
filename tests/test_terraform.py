"""The Terraform module, initialized, validated and planned by terraform itself, offline.

`terraform init` takes the AWS provider from a local mirror (a directory holding
registry.terraform.io/hashicorp/aws); the module's own `terraform test` files (deploy/terraform/
tests/) plan it against a mocked provider and check what it promises: the NLB listeners, the
tasks' egress, the IAM policies' resources, the EFS spool, and the inputs it refuses. Nothing
here needs credentials or the network. A machine without terraform or the mirror fails these
tests, naming what is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.binaries

ROOT = Path(__file__).resolve().parent.parent
TERRAFORM = ROOT / "deploy" / "terraform"
PROVIDER = Path("registry.terraform.io") / "hashicorp" / "aws"
# Where a provider mirror is usually kept; $RELAY_TF_PLUGIN_DIR comes first.
MIRROR_CANDIDATES = (
    "/opt/tf-plugins",
    "/usr/local/share/terraform/plugins",
    "/usr/share/terraform/plugins",
    "~/.terraform.d/plugins",
    "~/.local/share/terraform/plugins",
)


def _terraform() -> str:
    found = shutil.which("terraform")
    if found is None:
        pytest.fail(
            "terraform is not installed (not on PATH): these tests validate and plan deploy/terraform with it",
            pytrace=False,
        )
    return found


def _plugin_dir() -> Path:
    candidates = [os.environ.get("RELAY_TF_PLUGIN_DIR", ""), *MIRROR_CANDIDATES]
    for candidate in filter(None, candidates):
        directory = Path(candidate).expanduser()
        if (directory / PROVIDER).is_dir():
            return directory
    pytest.fail(
        f"no Terraform provider mirror with {PROVIDER} found (looked in $RELAY_TF_PLUGIN_DIR and "
        f"{', '.join(MIRROR_CANDIDATES)}): set RELAY_TF_PLUGIN_DIR to the directory that holds it",
        pytrace=False,
    )


ENV = {
    **os.environ,
    "CHECKPOINT_DISABLE": "1",  # no version check against HashiCorp's servers
    "TF_IN_AUTOMATION": "1",
    "TF_INPUT": "0",
    "TF_CLI_CONFIG_FILE": os.devnull,  # no user config (mirrors, credentials) changes the result
}


def _run(*args: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [_terraform(), *map(str, args), "-no-color"], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"terraform {' '.join(map(str, args))} in {cwd} exited {result.returncode}:\n"
        f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A copy of deploy/terraform, initialized from the mirror (init writes .terraform/ and a
    lock file into each directory: not into the repository)."""
    copy = tmp_path_factory.mktemp("terraform") / "terraform"
    shutil.copytree(TERRAFORM, copy, ignore=shutil.ignore_patterns(".terraform", ".terraform.lock.hcl"))
    plugin_dir = _plugin_dir()
    for directory in _roots(copy):
        _run("init", "-backend=false", f"-plugin-dir={plugin_dir}", cwd=directory)
    return copy


def _roots(base: Path) -> list[Path]:
    return [base, *sorted(path.parent for path in (base / "examples").glob("*/main.tf"))]


def test_terraform_files_are_formatted() -> None:
    _run("fmt", "-check", "-recursive", "-diff", cwd=TERRAFORM)


@pytest.mark.parametrize("root", _roots(TERRAFORM), ids=lambda p: str(p.relative_to(TERRAFORM)) or "module")
def test_terraform_validates(workdir: Path, root: Path) -> None:
    _run("validate", cwd=workdir / root.relative_to(TERRAFORM))


def test_terraform_test_plans_what_the_module_promises(workdir: Path) -> None:
    result = _run("test", cwd=workdir)
    assert re.search(r"Success! [1-9]\d* passed, 0 failed", result.stdout), result.stdout[-3000:]


def test_every_egress_rule_is_checked_by_the_terraform_tests() -> None:
    # "The tasks reach only the proxy and DNS" holds only if no egress rule escapes the plan tests.
    declared = set(
        re.findall(
            r'resource "aws_vpc_security_group_egress_rule" "(\w+)"',
            "".join(p.read_text() for p in TERRAFORM.glob("*.tf")),
        )
    )
    tests = "".join(p.read_text() for p in (TERRAFORM / "tests").glob("*.tftest.hcl"))
    unchecked = {name for name in declared if f"aws_vpc_security_group_egress_rule.{name}" not in tests}
    assert declared and not unchecked, f"egress rules no terraform test looks at: {sorted(unchecked)}"
