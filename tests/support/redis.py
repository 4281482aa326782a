"""A real `redis-server` (Debian's) on a loopback port, that a test can kill and restart.

with RedisServer(tmp_path) as redis:
    redis.url                     # redis://127.0.0.1:PORT/0
    redis.kill()                  # SIGKILL: an outage, nothing saved
    redis.freeze(); redis.thaw()  # SIGSTOP / SIGCONT: no answer meanwhile
    redis.start()                 # back on the same port, empty
    redis.cli("INFO", "commandstats")
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from pathlib import Path

from tests.support.procs import free_port, require_binary, wait_port


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.log_path = workdir / f"redis-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

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
        result = subprocess.run(
            [require_binary("redis-cli"), "-h", "127.0.0.1", "-p", str(self.port), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
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
