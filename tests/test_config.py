"""Config validation from outside: `relay config validate` on every file in
tests/data/configs/bad/ must exit 2 and print the error line named in the file's
`# expect:` header (and never what its `# absent:` header names)."""

from __future__ import annotations

import contextlib
import fnmatch
import io
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from relay.cli import main

DATA = Path(__file__).parent / "data" / "configs"
REPO = Path(__file__).parent.parent
BAD = sorted((DATA / "bad").glob("*.yaml"))


def validate(path: Path) -> subprocess.CompletedProcess:
    """`relay config validate -c PATH`, through the CLI's own entry point in this process
    (the process-level runs are the e2e tests below)."""
    args = ["config", "validate", "-c", str(path)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def headers(path: Path, name: str) -> list[str]:
    prefix = f"# {name}: "
    return [line[len(prefix) :].rstrip("\n") for line in path.read_text().splitlines() if line.startswith(prefix)]


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_config_names_the_key(path):
    result = validate(path)
    assert result.returncode == 2, result.stdout + result.stderr
    expected = headers(path, "expect")
    assert expected, f"{path.name} has no '# expect:' line"
    lines = [line.strip() for line in result.stderr.splitlines()]
    for line in expected:
        assert line in lines, f"expected {line!r} in:\n{result.stderr}"
    for secret in headers(path, "absent"):
        assert secret not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.e2e
def test_serve_refuses_a_bad_config_with_the_same_message():
    path = DATA / "bad" / "unknown-key.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "upstream[0].tsl: unknown key (did you mean 'tls'?)" in result.stderr


@pytest.mark.e2e
def test_relay_config_env_var_is_used(tmp_path):
    env = {**os.environ, "RELAY_CONFIG": str(tmp_path / "missing.yaml")}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "config", "validate"], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 2
    assert f"{tmp_path / 'missing.yaml'}: invalid configuration (1 problem)" in result.stderr
    assert "cannot read: No such file or directory" in result.stderr


@pytest.mark.parametrize("name", ["relay.example.yaml", "relay.minimal.yaml", "relay.sidecar.yaml"])
def test_shipped_example_configs_are_valid(tmp_path, pki, name):
    """The examples in config/ validate once their file paths point at real files."""
    text = (REPO / "config" / name).read_text()
    text = text.replace("/etc/relay/tls.crt", str(pki.cert_file)).replace("/etc/relay/tls.key", str(pki.key_file))
    text = text.replace("/etc/relay/upstream-ca.pem", str(pki.ca_file))
    path = tmp_path / name
    path.write_text(text)
    result = validate(path)
    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stdout


def test_example_config_covers_every_key():
    """relay.example.yaml documents every settings key (nested), so nothing is hidden."""
    from relay.config.schema import Settings

    text = (REPO / "config" / "relay.example.yaml").read_text()
    shown = _data_keys(yaml.safe_load(text))
    # Keys that only apply in another mode are shown commented out ("# token: ...").
    commented = set(re.findall(r"#\s*([a-z_]+):", text))
    missing = sorted(
        k
        for k in _model_keys(Settings) - shown
        if k.rpartition(".")[2] not in commented and not any(fnmatch.fnmatchcase(key, k) for key in shown)
    )
    assert not missing, f"keys not shown in config/relay.example.yaml: {missing}"


def _model_keys(model, prefix="") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        keys.add(path)
        # A mapping of models (limits.domains) has data for keys: shown as "*".
        below = path + (".*." if typing.get_origin(field.annotation) is dict else ".")
        for candidate in _models_in(field.annotation):
            keys |= _model_keys(candidate, below)
    return keys


def _models_in(annotation):
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        yield from _models_in(arg)


def _data_keys(data, prefix="") -> set[str]:
    keys = set()
    items = data if isinstance(data, list) else [data]
    for item in items:
        if isinstance(item, dict):
            for key, value in item.items():
                keys.add(f"{prefix}{key}")
                keys |= _data_keys(value, f"{prefix}{key}.")
    return keys


@pytest.mark.e2e
def test_workers_stop_on_a_config_error():
    path = DATA / "bad" / "bad-tls-mode.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "-c", str(path), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "listeners[0].tls: Input should be 'starttls', 'implicit' or 'none' (got 'startls')" in result.stderr
