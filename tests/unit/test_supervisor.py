"""relay.supervisor: the exit code of `relay serve --workers N` when a worker reports a
config error while another is still starting."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# In a process of its own: supervise() forks and installs signal handlers.
SUPERVISED = textwrap.dedent(
    """
    import sys
    import time

    from relay import startup_signals
    from relay.supervisor import supervise

    def worker(index: int) -> int:
        if index == 0:
            return 2  # a config error
        # Still starting: the SIGTERM that stops the others is recorded, acted on once started.
        deadline = time.monotonic() + 120
        while not startup_signals.take().stop and time.monotonic() < deadline:
            time.sleep(0.05)
        return 0

    sys.exit(supervise(2, worker))
    """
)


def test_a_config_error_is_the_exit_code_when_another_worker_dies_of_the_stop():
    result = subprocess.run([sys.executable, "-c", SUPERVISED], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
