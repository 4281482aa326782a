"""relay.supervisor: the exit code of `relay serve --workers N` when a worker reports a
config error while another is still starting."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

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


FORK_REFUSED = textwrap.dedent(
    """
    import os
    import sys
    import time

    from relay import startup_signals
    from relay.supervisor import supervise

    real_fork, forks = os.fork, []

    def fork():
        forks.append(1)
        if len(forks) == 3:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real_fork()

    os.fork = fork

    def worker(index: int) -> int:
        deadline = time.monotonic() + 20  # bounded: an orphan (the bug) ends by itself
        while not startup_signals.take().stop and time.monotonic() < deadline:
            time.sleep(0.05)
        print(f"worker {index} stopped by the supervisor" if time.monotonic() < deadline else "orphan", flush=True)
        return 0

    sys.exit(supervise(4, worker))
    """
)


def test_a_worker_that_cannot_be_forked_stops_the_others_and_fails():
    """fork() refused (a process limit) for the third worker: a traceback, and the two workers
    already serving were left running without their supervisor."""
    result = subprocess.run([sys.executable, "-c", FORK_REFUSED], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "relay: cannot start worker 2: Resource temporarily unavailable; stopping" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(result.stdout.split("\n")[:2]) == [
        "worker 0 stopped by the supervisor",
        "worker 1 stopped by the supervisor",
    ]


ORPHANS = textwrap.dedent(
    """
    import os
    import sys
    import time

    from relay import startup_signals
    from relay.supervisor import supervise

    def worker(index: int) -> int:
        with open(os.path.join(sys.argv[1], f"worker-{index}.pid"), "w") as fh:
            fh.write(str(os.getpid()))
        deadline = time.monotonic() + 60  # bounded: an orphan (the bug) ends by itself
        while not startup_signals.take().stop and time.monotonic() < deadline:
            time.sleep(0.05)
        return 0

    sys.exit(supervise(2, worker))
    """
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_workers_stop_when_their_supervisor_is_killed(tmp_path):
    """SIGKILL to the supervisor (an OOM kill, `kill -9`) left its workers serving, unsupervised,
    on ports a restarted relay then shares with them (SO_REUSEPORT)."""
    supervisor = subprocess.Popen([sys.executable, "-c", ORPHANS, str(tmp_path)])
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("worker-*.pid"))) < 2:
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.05)
        time.sleep(0.2)  # the pid files are written whole
        pids = [int(p.read_text()) for p in tmp_path.glob("worker-*.pid")]
        supervisor.kill()
        supervisor.wait(30)
        deadline = time.monotonic() + 30  # a bound, not a measure: they drain and exit
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in pids if _alive(pid)]
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
