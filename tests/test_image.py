"""The container image, built and run for real.

A Docker engine of the test's own (containerd and dockerd with their own roots, sockets and
pidfiles, no iptables, no bridge) runs inside the tests' loopback-only network namespace, so
the container uses host networking: it sees the namespace's loopback and nothing else. No
image registry is reachable, so the image builds on a local base (Debian bookworm made with
debootstrap, `docker import`ed) and pip installs the locked wheels from an index served on
loopback. Both come from `make image-cache`, which runs before the tests, outside the
namespace, because it needs the Debian mirror and PyPI.

The container then runs the way production runs it: read-only root, uid 10001, every
capability dropped, STARTTLS + AUTH on 587 and implicit TLS on 465, a mounted DKIM key and TLS
key owned by 10001, an upstream on loopback. A message relays and its signature verifies,
the image's HEALTHCHECK turns healthy, and `docker stop` ends it with exit status 0.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from relay.config import defaults
from tests.support.config import APP_PASSWORD
from tests.support.dkim import DkimKeys, verify_all
from tests.support.procs import require_binary, running, wait_port
from tests.support.upstream import Upstream

pytestmark = [pytest.mark.binaries, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "relay:image-test"
CONTAINER = "relay-image-test"
INDEX_PORT = 3141


def _cache_dir() -> Path:
    return Path(os.environ.get("RELAY_IMAGE_CACHE") or ROOT / ".cache" / "image")


def _cached(script: str) -> Path:
    """The path `deploy/image/<script> --check` prints; fail naming the step that makes it."""
    result = subprocess.run(
        [ROOT / "deploy" / "image" / script, "--check", _cache_dir()], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.fail(f"the image test's input is missing: {result.stderr.strip()}", pytrace=False)
    return Path(result.stdout.strip())


def _require_own_network_namespace() -> None:
    # Host networking is only harmless inside the loopback-only namespace: outside it the
    # container would share the machine's real network.
    interfaces = sorted(name for _, name in socket.if_nameindex())
    if interfaces != ["lo"]:
        pytest.fail(
            f"network interfaces {interfaces}: the image test runs only inside tests/loopback-only "
            "(as root), where loopback is the only one: `make test` does it",
            pytrace=False,
        )


class Docker:
    def __init__(self, client: str, host: str) -> None:
        self.client, self.host = client, host

    def __call__(
        self, *args: str | os.PathLike[str], check: bool = True, timeout: float = 120, **env: str
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.client, *map(os.fspath, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "DOCKER_HOST": self.host, "DOCKER_CONFIG": "/nonexistent", **env},
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(map(str, args))} exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result


def _wait_for_socket(path: Path, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_socket():
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with status {proc.returncode} before it listened")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not create {path} within {timeout:g}s")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    """containerd + dockerd of this test only; both stopped by their PIDs afterwards."""
    _require_own_network_namespace()
    for program in ("dockerd", "containerd", "runc"):
        require_binary(program)  # apt-get install docker.io
    # The client of the same package as the engine; another one on PATH would do too.
    client = "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else require_binary("docker")
    data_root = _cache_dir() / "docker"  # kept: the imported base and the build cache
    data_root.mkdir(parents=True, exist_ok=True)
    # Runtime state in a short path: unix socket paths are limited to 108 bytes.
    run_dir = Path(tempfile.mkdtemp(prefix="relay-docker-", dir="/tmp"))
    try:
        containerd_sock = run_dir / "containerd.sock"
        with running(
            [
                "containerd",
                "--address",
                containerd_sock,
                "--root",
                run_dir / "containerd-root",
                "--state",
                run_dir / "containerd-state",
            ],
            ready=None,
            log_path=run_dir / "containerd.log",
            stop_timeout=20,
        ) as containerd:
            _wait_for_socket(containerd_sock, containerd, "containerd")
            docker_sock = run_dir / "docker.sock"
            # An engine of its own containerd: dockerd would otherwise use a system containerd
            # if one runs, and its containers would share that containerd's network namespace.
            with running(
                [
                    "dockerd",
                    "--iptables=false",
                    "--ip6tables=false",
                    "--bridge=none",
                    "--data-root",
                    data_root,
                    "--exec-root",
                    run_dir / "exec",
                    "--pidfile",
                    run_dir / "docker.pid",
                    "--host",
                    f"unix://{docker_sock}",
                    "--containerd",
                    containerd_sock,
                ],
                ready=None,
                log_path=run_dir / "dockerd.log",
                stop_timeout=60,
            ) as dockerd:
                _wait_for_socket(docker_sock, dockerd, "dockerd")
                engine = Docker(client, f"unix://{docker_sock}")
                deadline = time.monotonic() + 60
                while engine("version", check=False).returncode != 0:
                    assert time.monotonic() < deadline, "dockerd does not answer on its socket"
                    time.sleep(0.2)
                yield engine
                engine("rm", "--force", CONTAINER, check=False)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def local_base(docker: Docker) -> str:
    """The debootstrap base, imported once per recipe (kept in the engine's data root)."""
    tarball = _cached("local-base.sh")
    tag = "relay-local-base:" + tarball.name.removesuffix(".tar").removeprefix("base-")
    if docker("image", "inspect", tag, check=False).returncode != 0:
        docker("import", tarball, tag, timeout=300)
    return tag


def _simple_index(wheels: Path, root: Path) -> Path:
    """A PEP 503 index (one folder per project) of the files in `wheels`, as symlinks."""
    for file in wheels.iterdir():
        if file.name.endswith(".whl"):
            project = file.name.split("-")[0]
        elif file.name.endswith(".tar.gz"):
            project = file.name.removesuffix(".tar.gz").rsplit("-", 1)[0]
        else:
            continue
        folder = root / "simple" / re.sub(r"[-_.]+", "-", project).lower()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / file.name).symlink_to(file)
    return root


@contextlib.contextmanager
def _serve(directory: Path) -> Iterator[int]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *args: None
    # A fixed port (devpi's): the index URL is a build argument, and a new value would miss the
    # build cache of every layer after it. The namespace is the test run's own.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", INDEX_PORT), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def image(docker: Docker, local_base: str, tmp_path_factory) -> str:
    index = _simple_index(_cached("wheelhouse.sh"), tmp_path_factory.mktemp("index"))
    with _serve(index) as port:
        # The classic builder: BuildKit would fetch the `# syntax=` frontend from a registry.
        docker(
            "build",
            "--network",
            "host",
            "--build-arg",
            f"BASE_IMAGE={local_base}",
            "--build-arg",
            f"PIP_INDEX_URL=http://127.0.0.1:{port}/simple/",
            "--tag",
            IMAGE,
            ROOT,
            timeout=900,
            DOCKER_BUILDKIT="0",
        )
    return IMAGE


@contextlib.contextmanager
def _unprivileged_ports_from_zero() -> Iterator[None]:
    # Docker sets this sysctl in a container's own network namespace; with host networking the
    # container shares ours (the tests' private one), so set it here, as production's runtime does.
    knob = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
    before = knob.read_text()
    knob.write_text("0")
    try:
        yield
    finally:
        knob.write_text(before)


def _owned_by_image_user(path: Path, mode: int = 0o400) -> Path:
    os.chown(path, defaults.IMAGE_UID, defaults.IMAGE_UID)
    path.chmod(mode)
    return path


def test_image_relays_signed_mail_read_only_as_uid_10001(
    docker, image, pki, dkim_keys: DkimKeys, app_password_hash, tmp_path
):
    # What an operator mounts: the config, the listeners' TLS pair, a DKIM key, the upstream's CA.
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for source, name in (
        (pki.cert_file, "tls.crt"),
        (pki.key_file, "tls.key"),
        (dkim_keys.rsa_path, "dkim.key"),
        (pki.ca_file, "upstream-ca.pem"),
    ):
        shutil.copy(source, secrets / name)
        _owned_by_image_user(secrets / name)
    upstream = Upstream(tls="starttls", server_context=pki.server_context())
    config = {
        "hostname": "relay.test",
        "listeners": [
            {
                "name": "submission",
                "bind": f"0.0.0.0:{defaults.SUBMISSION_PORT}",
                "tls": "starttls",
                "auth": "required",
            },
            {
                "name": "submissions",
                "bind": f"0.0.0.0:{defaults.SUBMISSIONS_PORT}",
                "tls": "implicit",
                "auth": "required",
            },
        ],
        "tls": {"cert_file": "/run/secrets/relay/tls.crt", "key_file": "/run/secrets/relay/tls.key"},
        "clients": {
            "networks": ["127.0.0.0/8"],
            "users": [{"username": "app", "password_hash": app_password_hash, "senders": ["example.com"]}],
        },
        "dkim": {"keys": [{"domain": "example.com", "selector": "s1", "key": "file:///run/secrets/relay/dkim.key"}]},
        "upstream": {
            "host": "localhost",
            "port": upstream.port,
            "tls": "starttls",
            "ca_file": "/run/secrets/relay/upstream-ca.pem",
        },
        "dns": {"nameservers": ["127.0.0.1"], "timeout": "1s"},
        "metrics": {"bind": f"0.0.0.0:{defaults.METRICS_PORT}"},
        "logging": {"format": "json", "level": "info"},
    }
    config_file = tmp_path / "relay.yaml"
    config_file.write_text(yaml.safe_dump(config))
    config_file.chmod(0o644)

    with upstream, _unprivileged_ports_from_zero():
        docker(
            "run",
            "--detach",
            "--name",
            CONTAINER,
            "--network",
            "host",
            "--read-only",
            "--user",
            f"{defaults.IMAGE_UID}:{defaults.IMAGE_UID}",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            # The image's own HEALTHCHECK command, polled every second rather than every 30.
            "--health-interval",
            "1s",
            "--volume",
            f"{config_file}:{defaults.IMAGE_CONFIG_PATH}:ro",
            "--volume",
            f"{secrets}:/run/secrets/relay:ro",
            image,
        )
        try:
            wait_port("127.0.0.1", defaults.SUBMISSION_PORT, 60)
            context = ssl.create_default_context(cafile=str(pki.ca_file))
            message = (
                b"From: app@example.com\r\nTo: someone@example.net\r\nSubject: from the image\r\n"
                b"Message-ID: <image-test@example.com>\r\n\r\nhello from the container\r\n"
            )
            with smtplib.SMTP("localhost", defaults.SUBMISSION_PORT, timeout=30) as client:
                client.starttls(context=context)
                client.login("app", APP_PASSWORD)
                client.sendmail("app@example.com", ["someone@example.net"], message)
            [received] = upstream.wait_for(1, timeout=30)
            assert received.tls and received.rcpt_tos == ["someone@example.net"]
            assert verify_all(received.content, dkim_keys.dns()) == [True]
            with smtplib.SMTP_SSL("localhost", defaults.SUBMISSIONS_PORT, timeout=30, context=context) as client:
                client.login("app", APP_PASSWORD)

            deadline = time.monotonic() + 90
            while (health := _inspect(docker)["State"]["Health"]["Status"]) != "healthy":
                assert health == "starting" and time.monotonic() < deadline, f"health: {health}"
                time.sleep(0.5)

            docker("stop", "--time", "60", CONTAINER, timeout=90)
            state = _inspect(docker)["State"]
            # 0: relay drained and exited on SIGTERM; docker's SIGKILL after --time would be 137.
            assert (state["Status"], state["ExitCode"], state["OOMKilled"]) == ("exited", 0, False)
            logs = docker("logs", CONTAINER).stderr
            assert "Traceback" not in logs
            lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
            assert any(entry.get("code") == 250 and entry.get("user") == "app" for entry in lines), logs[-3000:]
        except BaseException as exc:
            exc.add_note("--- container log ---\n" + docker("logs", CONTAINER, check=False).stderr[-4000:])
            raise
        finally:
            docker("rm", "--force", CONTAINER, check=False)


def _inspect(docker: Docker) -> dict:
    return json.loads(docker("inspect", CONTAINER).stdout)[0]
