"""A real `redis-server` (Debian's) on a loopback port, that a test can kill and restart.

with RedisServer(tmp_path) as redis:
    redis.url                     # redis://127.0.0.1:PORT/0
    redis.kill()                  # SIGKILL: an outage, nothing saved
    redis.freeze(); redis.thaw()  # SIGSTOP / SIGCONT: no answer meanwhile
    redis.start()                 # back on the same port, empty
    redis.cli("INFO", "commandstats")
    redis.password = "..."         # what cli() authenticates with (after CONFIG SET requirepass)

RedisServer(tmp_path, tls=(cert_file, key_file)) serves TLS only (rediss://).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from tests.support.procs import free_port, require_binary, wait_port


class RedisServer:
    def __init__(self, workdir: Path, *, tls: tuple[Path, Path] | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.log_path = workdir / f"redis-{self.port}.log"
        self.tls = tls
        self.password: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        # No persistence: a restart is an empty Redis, the hardest case for the relay.
        argv = [
            require_binary("redis-server"),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--protected-mode",
            "yes",
        ]
        if self.tls is not None:
            cert, key = self.tls
            argv[3:5] = ["--port", "0", "--tls-port", str(self.port)]
            argv += ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-auth-clients", "no"]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_port("127.0.0.1", self.port, 10, proc=self._proc)
        return self

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(10)
        self._proc = None

    def freeze(self) -> None:
        """SIGSTOP: Redis answers nothing until `thaw` (a busy or unreachable Redis whose
        connections stay open)."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def cli(self, *args: str) -> str:
        tls = ["--tls", "--insecure"] if self.tls else []
        # The password through the environment, not the command line (ps shows that).
        env = {**os.environ, "REDISCLI_AUTH": self.password} if self.password else None
        result = subprocess.run(
            [require_binary("redis-cli"), "-h", "127.0.0.1", "-p", str(self.port), *tls, *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
            env=env,
        )
        return result.stdout

    def command_calls(self, command: str) -> int:
        """How many times `command` ran since start (INFO commandstats)."""
        for line in self.cli("INFO", "commandstats").splitlines():
            if line.startswith(f"cmdstat_{command.lower()}:"):
                fields = dict(item.split("=", 1) for item in line.split(":", 1)[1].split(","))
                return int(fields["calls"])
        return 0

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.kill()
