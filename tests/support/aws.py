"""moto's server mode (a real AWS Secrets Manager API on loopback) for tests.

No AWS endpoint is ever contacted: clients point at `http://127.0.0.1:PORT`, credentials are
dummy values from the environment (so the credential chain stops there and never probes
instance metadata), and shared config files are disabled.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.support.procs import free_port, running

REGION = "us-east-1"

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_REGION": REGION,
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


@contextlib.contextmanager
def moto_server(log_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """moto in server mode, a real process on a free loopback port."""
    port = free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with running(argv, ready=("127.0.0.1", port), log_path=log_path, ready_timeout=30, env=AWS_ENV) as proc:
        yield f"http://127.0.0.1:{port}", proc


def stop(proc: subprocess.Popen) -> None:
    """Stop the server now (`running` finds it gone on exit, which is fine)."""
    proc.terminate()
    proc.wait(timeout=10)
