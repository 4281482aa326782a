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


def validate(path: Path, *options: str) -> subprocess.CompletedProcess:
    """`relay config validate -c PATH`, through the CLI's own entry point in this process
    (the process-level runs are the e2e tests below)."""
    args = ["config", "validate", "-c", str(path), *options]
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


def _shipped_configs() -> list[tuple[str, str]]:
    """Every config the repository ships: config/, the Kubernetes ConfigMaps, the ECS template."""
    shipped = [(f"config/{p.name}", p.read_text()) for p in sorted((REPO / "config").glob("*.yaml"))]
    for manifest in sorted((REPO / "deploy" / "kubernetes").rglob("*.yaml")):
        for doc in yaml.safe_load_all(manifest.read_text()):
            if doc and doc.get("kind") == "ConfigMap" and "relay.yaml" in doc.get("data", {}):
                shipped.append((str(manifest.relative_to(REPO)), doc["data"]["relay.yaml"]))
    template = REPO / "deploy" / "terraform" / "examples" / "vpc-service" / "relay.yaml.tftpl"
    values = {"region": "eu-west-1", "proxy_url": "socks5h://10.0.250.10:1080", "nameserver": "10.0.0.2"}
    rendered = re.sub(r"\$\{(\w+)\}", lambda m: values[m[1]], template.read_text())
    shipped.append((str(template.relative_to(REPO)), rendered))
    return shipped


@pytest.mark.parametrize("name,text", _shipped_configs(), ids=[name for name, _ in _shipped_configs()])
def test_shipped_configs_pass_offline_validation(tmp_path, name, text):
    """As shipped: their TLS files and secrets exist only where they are deployed."""
    path = tmp_path / "relay.yaml"
    path.write_text(text)
    result = validate(path, "--offline")
    assert result.returncode == 0, result.stderr
    assert "configuration is valid (offline" in result.stdout


def test_full_validation_names_every_file_and_secret_it_cannot_read_without_values(tmp_path, pki, monkeypatch):
    from relay.sign.keys import generate_private_key, private_key_pem

    key = tmp_path / "dkim.key"
    key.write_bytes(private_key_pem(generate_private_key("ed25519-sha256", 0)))
    monkeypatch.setenv("RELAY_TEST_UPSTREAM_PW", "Upstream-Pa55-QX81")
    monkeypatch.delenv("RELAY_TEST_MISSING_PW", raising=False)
    config = {
        "listeners": [{"name": "submission", "bind": "127.0.0.1:2587", "tls": "starttls", "auth": "required"}],
        "tls": {"cert_file": str(tmp_path / "absent.crt"), "key_file": str(pki.key_file)},
        "clients": {"users": [{"username": "app", "password": "env://RELAY_TEST_MISSING_PW", "senders": ["a.test"]}]},
        "dkim": {
            "keys": [
                {"domain": "a.test", "selector": "s1", "key": f"file://{key}", "algorithm": "ed25519-sha256"},
                {"domain": "a.test", "selector": "s2", "key": f"file://{tmp_path / 'absent.key'}"},
            ]
        },
        "upstream": {"host": "smtp.a.test", "username": "relay", "password": "env://RELAY_TEST_UPSTREAM_PW"},
    }
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    assert validate(path, "--offline").returncode == 0
    result = validate(path)
    assert result.returncode == 2
    problems = [line.strip() for line in result.stderr.splitlines()[1:]]
    assert [p.split(":")[0] for p in problems] == ["tls.cert_file", "dkim.keys[1].key", "clients.users[0].password"]
    assert "Upstream-Pa55-QX81" not in result.stderr + result.stdout and "PRIVATE KEY" not in result.stderr


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


def test_a_backend_whose_extra_is_not_installed_is_named_with_the_fix(monkeypatch):
    import importlib.util

    from relay.config.load import ConfigError, settings_from_mapping

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "aiobotocore" else real(name, *a))
    config = {
        "listeners": [{"name": "local", "bind": "127.0.0.1:2525", "tls": "none", "auth": "none"}],
        "dkim": {"keys": [{"domain": "a.test", "selector": "s1", "key": "aws-sm://relay/dkim"}]},
        "upstream": {"host": "smtp.a.test"},
    }
    with pytest.raises(ConfigError) as err:
        settings_from_mapping(config, offline=True)
    assert err.value.problems == [("dkim.keys[0].key", "aws-sm:// needs relay's aws extra: pip install 'relay[aws]'")]


def _load_text(tmp_path: Path, text: str):
    from relay.config.load import load_settings

    path = tmp_path / "relay.yaml"
    path.write_text(text)
    return load_settings(path, offline=True)


def test_an_unquoted_tls_version_is_the_version_meant(tmp_path):
    listener = 'listeners: [{name: side, bind: "127.0.0.1:2525", tls: none, auth: none}]\n'
    settings = _load_text(tmp_path, listener + "upstream: {host: smtp.example.com}\ntls: {min_version: 1.3}\n")
    assert settings.tls.min_version == "1.3"


def test_yaml_merge_keys_may_still_override(tmp_path):
    # Only a key written twice is refused; `<<:` merging is for overriding.
    settings = _load_text(
        tmp_path,
        "listeners:\n"
        '  - &side {name: side, bind: "127.0.0.1:2525", tls: none, auth: none}\n'
        '  - {<<: *side, name: other, bind: "127.0.0.1:2526"}\n'
        "upstream: {host: smtp.example.com}\n",
    )
    assert [(lst.name, lst.bind.port) for lst in settings.listeners] == [("side", 2525), ("other", 2526)]


@pytest.mark.parametrize(
    ("one", "other", "clash"),
    [
        (("0.0.0.0", 587), ("10.0.0.1", 587), True),
        (("::", 587), ("::1", 587), True),
        (("localhost", 25), ("127.0.0.1", 25), True),
        (("0.0.0.0", 2525), ("127.0.0.1", 2526), False),
        (("::", 2525), ("127.0.0.1", 2525), False),  # asyncio binds IPv6 sockets V6ONLY
        (("127.0.0.1", 2525), ("127.0.0.2", 2525), False),
    ],
)
def test_binds_clash_on_one_port_of_one_address_or_its_wildcard(one, other, clash):
    from relay.config.load import _bind_clash
    from relay.config.units import HostPort

    assert (_bind_clash(HostPort(*other), [("listeners[0]", HostPort(*one))]) is not None) is clash


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\xff\xfe\x00l\x00i\x00", "not UTF-8 text: byte 0xff on line 1"),  # UTF-16
        (b"hostname: relay\nlisteners: []\nupstream: {host: caf\xe9.example}\n", "not UTF-8 text: byte 0xe9 on line 3"),
    ],
    ids=["utf-16", "latin-1"],
)
def test_a_config_that_is_not_utf8_text_is_named_without_a_traceback(tmp_path, content, problem):
    path = tmp_path / "relay.yaml"
    path.write_bytes(content)
    result = validate(path, "--offline")
    assert result.returncode == 2
    assert result.stderr.splitlines()[1:] == [f"  (top level): {problem}"]


def test_validating_the_dev_default_writes_nothing(tmp_path, monkeypatch):
    dev = tmp_path / "dev"
    monkeypatch.setenv("RELAY_DEV_DIR", str(dev))
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    for options in ([], ["--offline"]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["config", "validate", *options]) == 0
        assert "embedded dev default: configuration is valid" in out.getvalue()
        assert not dev.exists()
    # Once `serve` has made the folder, its files are checked as any config's.
    from relay.config.dev import prepare_dev_dir

    prepare_dev_dir(dev)
    (dev / "tls.crt").write_text("not a certificate")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(["config", "validate"]) == 2
    assert "tls.cert_file:" in err.getvalue()


def test_full_validation_names_a_key_that_is_no_key_and_a_password_that_is_not_text(tmp_path, monkeypatch):
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"\x00\x01 not a key")
    password = tmp_path / "upstream.pw"
    password.write_bytes(b"\xff\xfe")
    monkeypatch.setenv("RELAY_TEST_PROXY_PW", b"\xff".decode("utf-8", "surrogateescape"))
    config = {
        "listeners": [{"name": "side", "bind": "127.0.0.1:2525", "tls": "none", "auth": "none"}],
        "dkim": {"keys": [{"domain": "a.test", "selector": "s1", "key": f"file://{junk}"}]},
        "upstream": {
            "host": "smtp.a.test",
            "username": "relay",
            "password": f"file://{password}",
            "proxy": "socks5://relay@127.0.0.1:1080",
            "proxy_password": "env://RELAY_TEST_PROXY_PW",
        },
    }
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    result = validate(path)
    assert result.returncode == 2, result.stdout
    assert [line.strip() for line in result.stderr.splitlines()[1:]] == [
        "upstream[0].password: not UTF-8 text",
        "upstream[0].proxy_password: not UTF-8 text",
        "dkim.keys[0].key: not a usable key: not a PEM key and not a base64 Ed25519 seed",
    ]
    assert "Traceback" not in result.stderr


def _bounded_validate(path: Path) -> subprocess.CompletedProcess:
    """`relay config validate --offline -c PATH` as a process, its memory bounded (1 GiB)."""
    import resource

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    return subprocess.run(
        [sys.executable, "-m", "relay", "config", "validate", "--offline", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit_memory,
    )


@pytest.mark.e2e
def test_a_config_path_that_is_a_device_a_fifo_or_huge_is_refused_unread(tmp_path):
    fifo = tmp_path / "relay.fifo"
    os.mkfifo(fifo)  # no writer: the read used to wait for one for ever
    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"#" * (16 * 1024 * 1024 + 1))
    for path, problem in (
        (Path("/dev/zero"), "cannot read: not a regular file"),  # was read without end
        (fifo, "the file must hold a mapping of settings"),
        (huge, "larger than 16 MiB: not a relay config"),
    ):
        result = _bounded_validate(path)
        assert result.returncode == 2, result.stderr[-500:]
        assert result.stderr.splitlines()[1:] == [f"  (top level): {problem}"]


@pytest.mark.parametrize("command", [["queue", "list"], ["dkim", "status"], ["dkim", "rotate", "-d", "example.test"]])
def test_commands_that_only_read_write_nothing_for_the_dev_default(tmp_path, monkeypatch, command):
    dev = tmp_path / "dev"
    monkeypatch.setenv("RELAY_DEV_DIR", str(dev))
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main(command)
    assert not dev.exists()


def test_unknown_limit_users_among_many_users_are_named_with_a_bounded_number_of_guesses(monkeypatch):
    """2,000 limits for users not in a list of 50,000: a "did you mean" for each compared with
    every user name (442 s). The first ten get a guess; every one is named (here 200 and 300)."""
    import difflib

    from relay.config.load import ConfigError, settings_from_mapping

    guesses = []
    real = difflib.get_close_matches
    monkeypatch.setattr(difflib, "get_close_matches", lambda *a, **k: guesses.append(1) or real(*a, **k))
    config = {
        "listeners": [{"name": "side", "bind": "127.0.0.1:2525", "tls": "none", "auth": "none"}],
        "upstream": {"host": "smtp.example.com"},
        "clients": {
            "users": [{"username": f"u{i}", "password": "env://PW", "senders": ["a.test"]} for i in range(300)]
        },
        "limits": {"users": {f"x{i}": {"daily": 10} for i in range(200)}},
    }
    with pytest.raises(ConfigError) as err:
        settings_from_mapping(config, offline=True)
    assert len(err.value.problems) == 200 and len(guesses) <= 10
    assert err.value.problems[0] == ("limits.users.x0", "no user named 'x0' in clients.users")
