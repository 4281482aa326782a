"""Run the real relay (`python -m relay serve -c FILE`) as a subprocess for tests (e2e).

The relay is driven strictly from outside, as a user would: a YAML file, SMTP on its
ports, its metrics endpoint, its log lines on stderr, and signals. The process is run by
`tests.support.procs.running` (its own session, log file, stopped with its children).
"""

from __future__ import annotations

import contextlib
import json
import signal as signals
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.config import loopback_bind
from tests.support.procs import ProcessError, log_tail, running, wait_port


class RelayProcess:
    def __init__(
        self, workdir: Path, config: dict[str, Any], *, env: dict[str, str] | None = None, args: list[str] | None = None
    ) -> None:
        self.workdir = workdir
        self.config = config
        self.config_path = workdir / "relay.yaml"
        self.log_path = workdir / "relay.log"
        self.env = env or {}
        self.args = args or []
        # How relay is run: the console script (`relay`, the image's ENTRYPOINT) or this.
        self.command = [sys.executable, "-m", "relay"]
        self.proc: subprocess.Popen | None = None
        self._stack: contextlib.ExitStack | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def write_config(self, config: dict[str, Any] | None = None) -> None:
        if config is not None:
            self.config = config
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def start(self, *, wait_ready: bool = True, timeout: float = 20.0) -> RelayProcess:
        self.launch()
        return self.wait_started(wait_ready=wait_ready, timeout=timeout)

    def launch(self) -> RelayProcess:
        """Start the process and return at once (`wait_started` waits for its ports)."""
        self.write_config()
        self._stack = contextlib.ExitStack()
        self.proc = self._stack.enter_context(
            running(
                [*self.command, "serve", "-c", str(self.config_path), *self.args],
                ready=None,
                log_path=self.log_path,
                env={"PYTHONUNBUFFERED": "1", **self.env},
                cwd=self.workdir,
            )
        )
        return self

    def wait_started(self, *, wait_ready: bool = True, timeout: float = 20.0) -> RelayProcess:
        try:
            for listener in self.config["listeners"]:
                host, port = split_bind(listener["bind"])
                wait_port(host, port, timeout, proc=self.proc)
            host, port = self.metrics_addr
            wait_port(host, port, timeout, proc=self.proc)
            if wait_ready:
                self.wait_ready(timeout)
        except (ProcessError, TimeoutError) as exc:
            self.kill()
            raise ProcessError(f"relay did not start: {exc}\n--- relay log ---\n{log_tail(self.log_path)}") from None
        return self

    def wait_ready(self, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        body: dict = {}
        while time.monotonic() < deadline:
            status, body = self.http_json("/readyz")
            if status == 200:
                return body
            time.sleep(0.1)
        raise TimeoutError(f"relay not ready: {body}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signals.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signals.SIGKILL)
            self.proc.wait(10)
        if self._stack is not None:
            self._stack.__exit__(*exc)  # reaps what the relay left in its session
            self._stack = None

    # -- observation -------------------------------------------------------------------------
    @property
    def metrics_addr(self) -> tuple[str, int]:
        return split_bind(self.config["metrics"]["bind"])

    def port(self, listener_name: str) -> int:
        for listener in self.config["listeners"]:
            if listener["name"] == listener_name:
                return split_bind(listener["bind"])[1]
        raise KeyError(listener_name)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def logs(self) -> list[dict]:
        out = []
        for line in self.log_text().splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def message_logs(self) -> list[dict]:
        return [e for e in self.logs() if e.get("event") == "message"]

    def wait_log(self, predicate, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.logs():
                if predicate(entry):
                    return entry
            time.sleep(0.05)
        raise AssertionError(f"no matching log line; log tail:\n{log_tail(self.log_path)}")

    def http(self, path: str) -> tuple[int, str]:
        host, port = self.metrics_addr
        try:
            with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def http_json(self, path: str) -> tuple[int, dict]:
        try:
            status, text = self.http(path)
        except OSError:
            return 0, {}
        try:
            return status, json.loads(text)
        except ValueError:
            return status, {"raw": text}

    def scrape(self) -> str:
        status, text = self.http("/metrics")
        assert status == 200
        return text

    def metric(self, name: str, /, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 if none)."""
        total = 0.0
        for family in text_string_to_metric_families(self.scrape()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total


def split_bind(bind: str) -> tuple[str, int]:
    host, _, port = bind.rpartition(":")
    return host.strip("[]"), int(port)


__all__ = ["RelayProcess", "loopback_bind", "split_bind"]
