"""Hold a Python process at a point of its start or of its exit, to signal it exactly there.

A `sitecustomize` module on the process's PYTHONPATH (Python imports it while it starts,
before the program's first line) holds the process, until the test releases it:

- `at_import="relay.cli"`: just before that module is first imported;
- `at_exit=True`: in the interpreter's exit (the first atexit callback registered, so the
  last to run: after the program and its event loop are done).

`not_installed=("uvloop",)` makes those modules' imports fail, as without the extra.

    hold = HoldPoints(tmp_path, at_import="relay.cli")
    relay = make_relay(upstream.port, start=False, env=hold.env)
    relay.launch()
    hold.wait_held("import", relay.proc)     # the process is at that point now
    relay.signal(signal.SIGHUP)
    hold.release("import")

The program itself is unchanged: the hold is the interpreter's standard start-up hook.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
import time
from pathlib import Path

_SITECUSTOMIZE = textwrap.dedent(
    """
    import os
    import sys
    import time

    _dir = os.environ.get("RELAY_TEST_HOLD_DIR")


    def _hold(point):
        open(os.path.join(_dir, "held-" + point), "w").close()
        go = os.path.join(_dir, "go-" + point)
        deadline = time.monotonic() + 120
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.01)


    class _HoldImport:
        def __init__(self, name):
            self.name = name

        def find_spec(self, fullname, path=None, target=None):
            if fullname == self.name:
                sys.meta_path.remove(self)
                _hold("import")
            return None


    for _name in filter(None, os.environ.get("RELAY_TEST_NO_IMPORT", "").split(",")):
        sys.modules[_name] = None  # its import fails: as if it were not installed


    if _dir and os.environ.get("RELAY_TEST_HOLD_IMPORT"):
        sys.meta_path.insert(0, _HoldImport(os.environ["RELAY_TEST_HOLD_IMPORT"]))
    if _dir and os.environ.get("RELAY_TEST_HOLD_EXIT"):
        import atexit

        atexit.register(_hold, "exit")
    """
)


class HoldPoints:
    def __init__(
        self,
        directory: Path,
        *,
        at_import: str | None = None,
        at_exit: bool = False,
        not_installed: tuple[str, ...] = (),
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        path = os.environ.get("PYTHONPATH")
        self.env = {
            "PYTHONPATH": str(directory) + (os.pathsep + path if path else ""),
            "RELAY_TEST_HOLD_DIR": str(directory),
        }
        if at_import:
            self.env["RELAY_TEST_HOLD_IMPORT"] = at_import
        if at_exit:
            self.env["RELAY_TEST_HOLD_EXIT"] = "1"
        if not_installed:
            self.env["RELAY_TEST_NO_IMPORT"] = ",".join(not_installed)

    def wait_held(self, point: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
        """Until the process is held at `point` ("import" or "exit")."""
        deadline = time.monotonic() + timeout
        while not (self.directory / f"held-{point}").exists():
            assert proc.poll() is None, f"the process exited with {proc.returncode} before it was held at {point}"
            assert time.monotonic() < deadline, f"the process was not held at {point} within {timeout}s"
            time.sleep(0.01)

    def release(self, point: str) -> None:
        (self.directory / f"go-{point}").touch()
