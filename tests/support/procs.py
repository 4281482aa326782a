"""Run real helper programs (proxies, servers) for tests, on loopback only.

    from tests.support.procs import free_port, require_binary, running

    port = free_port()
    argv = [require_binary("microsocks"), "-i", "127.0.0.1", "-p", str(port)]
    with running(argv, ready=("127.0.0.1", port), log_path=tmp_path / "microsocks.log"):
        ...  # the server accepts connections here; it is stopped on exit

A test that needs a program fails (never skips) when the program is missing: CI installs
every program the tests use, so a missing one is a broken environment, not an optional
feature. `require_binary` says how to get it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

__all__ = [
    "MissingBinaryError",
    "ProcessError",
    "dead_port",
    "free_port",
    "holding_dead_ports",
    "log_tail",
    "require_binary",
    "running",
    "wait_port",
]

# Daemons (danted, sshd...) live in sbin, which is not on every user's PATH.
_EXTRA_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class MissingBinaryError(RuntimeError):
    """A program a test needs is not installed."""


class ProcessError(RuntimeError):
    """A helper process did not start, or died; the message ends with its log's tail."""


def require_binary(name: str) -> str:
    """The absolute path of program `name` (PATH, then the sbin directories).

    Raises `MissingBinaryError` telling how to install it: tests that need a program fail
    when it is missing rather than skip.
    """
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_EXTRA_DIRS))
    if path is None:
        raise MissingBinaryError(
            f"program {name!r} is not installed, and this test needs it. Run `bash .ci/run` "
            "once (it installs the Debian packages the tests use), or install the package "
            f"that provides {name!r} (`apt-get install -y <package>`)."
        )
    return path


# The port numbers handed out lately, by any of the functions below. The kernel may give a
# number just released to the next bind to port 0: a `free_port()` given to a relay's metrics,
# then a `dead_port()` for its DNS, could be the same number, and the relay then fails to bind
# the port the test holds. No number is handed out twice while it is in this window.
_RECENT_LIMIT = 4096
_recent: dict[int, None] = {}


def _bound_fresh(family: int, make: Callable[[], socket.socket], host: str) -> socket.socket:
    """A socket from `make()` bound to a port on `host` not handed out lately (see `_recent`).

    Sockets bound to a recent number stay open while the search goes on, so the kernel
    cannot offer that number again; they are closed when a fresh one is found.
    """
    rejected: list[socket.socket] = []
    try:
        for _ in range(200):
            sock = make()
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
            if port not in _recent:
                _recent[port] = None
                while len(_recent) > _RECENT_LIMIT:
                    del _recent[next(iter(_recent))]
                return sock
            rejected.append(sock)
        raise RuntimeError(f"no port on {host} that was not handed out lately")
    finally:
        for sock in rejected:
            sock.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now.

    The port is released before returning, so another listener (the relay's own port-0
    ones among them) can take it before the caller binds it: use it only for a port the
    caller listens on at once, and `dead_port()` for a port where nothing must listen.
    Prefer binding port 0 directly when the server is in-process. No other call here hands
    out the same number while it is recent.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with _bound_fresh(family, lambda: socket.socket(family, socket.SOCK_STREAM), host) as sock:
        return int(sock.getsockname()[1])


# The sockets that hold dead ports, innermost `holding_dead_ports()` block last.
_dead_sockets: list[socket.socket] = []


def dead_port(host: str = "127.0.0.1", *, udp: bool = False) -> int:
    """A TCP port on `host` where nothing listens, until the test (or the fixture in a
    `holding_dead_ports()` block) that asked for it ends.

    The port stays bound by a socket that never listens: a connect there is refused
    (ECONNREFUSED) at once, and no other socket can bind it meanwhile, so no listener
    started later (with port 0 or a `free_port()`) can take it. `udp=True` holds the same
    port number for UDP too, with a socket connected elsewhere, so a datagram sent there
    is refused as well (ICMP port unreachable, as for a port nobody holds): for a DNS
    server that must not answer.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        # No SO_REUSEADDR: nobody shares it.
        holder = _bound_fresh(family, lambda: socket.socket(family, socket.SOCK_STREAM), host)
        port = int(holder.getsockname()[1])
        if not udp:
            _dead_sockets.append(holder)
            return port
        datagrams = socket.socket(family, socket.SOCK_DGRAM)
        try:
            datagrams.bind((host, port))
        except OSError:  # that UDP port is in use: try another number
            datagrams.close()
            holder.close()
            continue
        # A connected UDP socket takes datagrams from its peer only; the others are refused.
        datagrams.connect((host, 9))
        _dead_sockets.extend((holder, datagrams))
        return port
    raise RuntimeError(f"no port on {host} free for both TCP and UDP")


def reserved_port(host: str = "127.0.0.1") -> int:
    """A TCP port held, like a `dead_port()`, for a server in this process that listens there
    later (a module's upstream, set up once, serving some of its tests; its number written
    into a proxy's config before). Until it listens, and after, a connect is refused and no
    other listener (port 0, a `free_port()`) can take the number: the holder never listens,
    and it shares the port only with sockets that set SO_REUSEPORT too (asyncio:
    `reuse_port=True`), as the server must.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def make() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return sock

    holder = _bound_fresh(family, make, host)
    _dead_sockets.append(holder)
    return int(holder.getsockname()[1])


@contextlib.contextmanager
def holding_dead_ports() -> Iterator[None]:
    """The ports `dead_port()` gives inside the block are released when it ends.

    tests/conftest.py runs every test in one; a module-scoped fixture that makes dead ports
    yields inside its own.
    """
    held_before = len(_dead_sockets)
    try:
        yield
    finally:
        while len(_dead_sockets) > held_before:
            _dead_sockets.pop().close()


def wait_port(
    host: str,
    port: int,
    timeout: float = 10.0,
    *,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Block until a TCP connect to (host, port) succeeds.

    Raises `TimeoutError` after `timeout` seconds, or `ProcessError` as soon as `proc`
    (the server expected to listen there, if given) has exited.
    """
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        if proc is not None and proc.poll() is not None:
            raise ProcessError(
                f"process exited with status {proc.returncode} before {host}:{port} accepted connections"
            )
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(1.0, timeout))):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing accepted connections on {host}:{port} within {timeout:g}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def log_tail(path: str | os.PathLike[str], lines: int = 40, max_chars: int = 4000) -> str:
    """The last `lines` lines of a log file (at most `max_chars`), or a note if unreadable."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"<log {path} unreadable: {exc}>"
    tail = "\n".join(text.splitlines()[-lines:])
    return tail[-max_chars:] if tail else "<log is empty>"


@contextlib.contextmanager
def running(
    argv: Sequence[str | os.PathLike[str]],
    *,
    ready: tuple[str, int] | None,
    log_path: str | os.PathLike[str],
    ready_timeout: float = 10.0,
    stop_timeout: float = 5.0,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `argv` for the duration of the block; yield its `Popen`.

    - stdout and stderr go to `log_path` (appended), stdin is /dev/null;
    - `ready=(host, port)`: the block starts once a TCP connect there succeeds (None: at once);
      if the process exits first or the port stays closed for `ready_timeout` seconds,
      `ProcessError` is raised with the tail of the log;
    - on exit the process (and its process group: it runs in a session of its own, so the
      children it forks go too) gets SIGTERM, then SIGKILL after `stop_timeout` seconds;
    - an exception from the block gets the log's tail attached as a note (PEP 678), which
      pytest shows with the failure.

    `env` entries are added to the current environment.
    """
    argv = [os.fspath(arg) for arg in argv]
    full_env = {**os.environ, **env} if env is not None else None
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    name = Path(argv[0]).name
    try:
        if ready is not None:
            try:
                wait_port(ready[0], ready[1], ready_timeout, proc=proc)
            except (ProcessError, TimeoutError) as exc:
                raise ProcessError(
                    f"{name} did not start ({exc}); command: {' '.join(argv)}\n"
                    f"--- last lines of {log_path} ---\n{log_tail(log_path)}"
                ) from None
        try:
            yield proc
        except BaseException as exc:
            status = "running" if proc.poll() is None else f"exited with {proc.returncode}"
            exc.add_note(f"--- {name} ({status}), last lines of {log_path} ---\n{log_tail(log_path)}")
            raise
    finally:
        _stop(proc, stop_timeout)


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM `proc` and wait for it (a daemon then stops and reaps its own workers), SIGKILL
    it after `timeout` seconds; then SIGKILL whatever is left in the process group created
    for it (children that outlived it)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group of proc's own session only
    proc.wait(timeout)
