"""A real Postfix on loopback, in the role of an application host's MTA that relays through
the relay (`relayhost = [127.0.0.1]:PORT`), as a user would set it up.

    with PostfixClient(base_dir, relay_port=587, ca_file=ca, username="app", password="pw") as mta:
        mta.sendmail(message, sender="app@example.com", recipients=["u@example.net"])
        mta.wait_until_idle()          # the queue is empty: everything was sent or bounced

Each instance has its own configuration directory, queue, data directory and log file under
`base_dir`; nothing of the system's Postfix (`/etc/postfix`, `/var/spool/postfix`) is used
or changed. Postfix takes mail only from the `sendmail` command (no listener of its own),
and it delivers nothing locally: every message, bounces included, goes to the relay.
`stop()` (or leaving the `with` block) stops the master and every process it started.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.support.procs import ProcessError, log_tail, require_binary

# The daemons the client side of Postfix needs; no smtpd, no local delivery.
_MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixClient:
    """`wrapper_mode`: speak implicit TLS (`smtp_tls_wrappermode = yes`, port 465 style)
    instead of STARTTLS. Both authenticate with SASL PLAIN/LOGIN only under TLS."""

    def __init__(
        self,
        base_dir: Path,
        *,
        relay_port: int,
        ca_file: Path,
        username: str,
        password: str,
        wrapper_mode: bool = False,
        myhostname: str = "app.example.com",
        mydomain: str = "example.com",
    ) -> None:
        self.postfix = require_binary("postfix")
        self.sendmail_bin = require_binary("sendmail")
        self.postqueue = require_binary("postqueue")
        # Postfix's daemons run as the `postfix` user and must reach their files: the
        # instance lives in its own world-traversable directory, not under pytest's
        # private temporary tree.
        base_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(base_dir, 0o755)
        self.base = base_dir
        self.config_dir = base_dir / "etc"
        self.queue_dir = base_dir / "queue"
        self.data_dir = base_dir / "data"
        self.log_path = base_dir / "maillog"
        self.relayhost = f"[127.0.0.1]:{relay_port}"
        for directory in (self.config_dir, self.queue_dir, self.data_dir):
            directory.mkdir(exist_ok=True)
        shutil.chown(self.data_dir, "postfix", "postfix")
        sasl = self.config_dir / "sasl_passwd"
        sasl.write_text(f"{self.relayhost} {username}:{password}\n")
        os.chmod(sasl, 0o600)
        (self.config_dir / "master.cf").write_text(_MASTER_CF)
        (self.config_dir / "main.cf").write_text(
            "\n".join(
                [
                    "compatibility_level = 3.6",
                    f"queue_directory = {self.queue_dir}",
                    f"data_directory = {self.data_dir}",
                    "mail_owner = postfix",
                    "setgid_group = postdrop",
                    f"maillog_file = {self.log_path}",
                    f"maillog_file_prefixes = {base_dir}",
                    # The host's names; myorigin = $mydomain so that bounces say
                    # From: MAILER-DAEMON@<mydomain>, a domain the relay lets this user use.
                    f"myhostname = {myhostname}",
                    f"mydomain = {mydomain}",
                    "myorigin = $mydomain",
                    "mydestination =",
                    "local_recipient_maps =",
                    "alias_maps =",
                    "alias_database =",
                    "inet_interfaces = loopback-only",
                    "inet_protocols = ipv4",
                    "smtp_host_lookup = native",
                    # Everything goes to the relay, with SASL, under TLS only.
                    f"relayhost = {self.relayhost}",
                    "smtp_sasl_auth_enable = yes",
                    f"smtp_sasl_password_maps = texthash:{sasl}",
                    "smtp_sasl_security_options = noanonymous",
                    "smtp_sasl_tls_security_options = noanonymous",
                    "smtp_tls_security_level = encrypt",
                    f"smtp_tls_CAfile = {ca_file}",
                    f"smtp_tls_wrappermode = {'yes' if wrapper_mode else 'no'}",
                    "smtp_tls_loglevel = 1",
                    # Retry deferred mail quickly; never warn about delays.
                    "queue_run_delay = 1s",
                    "minimal_backoff_time = 1s",
                    "maximal_backoff_time = 2s",
                    "delay_warning_time = 0",
                    "biff = no",
                    "",
                ]
            )
        )
        self._master_pid: int | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.postfix, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=check,
        )

    def start(self) -> PostfixClient:
        # `postfix check` creates the queue's subdirectories with their owners and modes.
        self._postfix("check", check=False)
        result = self._postfix("start", check=False)
        if result.returncode != 0:
            raise ProcessError(
                f"postfix did not start: {result.stdout}{result.stderr}\n"
                f"--- {self.log_path} ---\n{log_tail(self.log_path)}"
            )
        pid_file = self.queue_dir / "pid" / "master.pid"
        deadline = time.monotonic() + 20
        while not pid_file.exists() or not pid_file.read_text().strip():
            if time.monotonic() > deadline:
                raise ProcessError(f"postfix master wrote no pid file\n{log_tail(self.log_path)}")
            time.sleep(0.05)
        self._master_pid = int(pid_file.read_text().split()[0])
        return self

    def stop(self) -> None:
        """Stop the master and its children; leave nothing running."""
        pid = self._master_pid
        if pid is None:
            return
        self._master_pid = None
        with contextlib.suppress(subprocess.SubprocessError):
            self._postfix("stop", check=False)
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        # The master is its own process group leader: whatever it left goes with the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)

    def __enter__(self) -> PostfixClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- mail ------------------------------------------------------------------------------
    def sendmail(
        self,
        message: bytes,
        *,
        sender: str,
        recipients: list[str],
        notify: str | None = None,
        ret: str | None = None,
        envid: str | None = None,
    ) -> None:
        """Submit through Postfix's sendmail command (`-N` NOTIFY, `-R` RET, `-V` ENVID)."""
        argv = [self.sendmail_bin, "-C", str(self.config_dir), "-i", "-f", sender]
        if notify:
            argv += ["-N", notify]
        if ret:
            argv += ["-R", ret]
        if envid:
            argv += ["-V", envid]
        result = subprocess.run([*argv, "--", *recipients], input=message, capture_output=True, timeout=60, check=False)
        if result.returncode != 0:
            raise ProcessError(f"sendmail failed: {result.stderr.decode(errors='replace')}")
        self.flush()

    def flush(self) -> None:
        subprocess.run([self.postqueue, "-c", str(self.config_dir), "-f"], capture_output=True, timeout=60, check=False)

    def queue(self) -> str:
        result = subprocess.run(
            [self.postqueue, "-c", str(self.config_dir), "-p"], capture_output=True, text=True, timeout=60
        )
        return result.stdout

    def wait_until_idle(self, timeout: float = 60.0) -> None:
        """Block until the queue is empty: every message was sent or bounced for good."""
        deadline = time.monotonic() + timeout
        while "Mail queue is empty" not in self.queue():
            if time.monotonic() > deadline:
                raise AssertionError(f"postfix queue not empty:\n{self.queue()}\n{log_tail(self.log_path)}")
            time.sleep(0.2)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def statuses(self) -> list[tuple[str, str, str]]:
        """(recipient, status, relay's reply) for every delivery attempt in the log."""
        return [
            (m.group(1), m.group(3), m.group(4))
            for m in re.finditer(
                r"to=<([^>]*)>,(?: orig_to=<[^>]*>,)? relay=([^,]*),.*? status=(\w+) \((.*)\)$",
                self.log_text(),
                re.MULTILINE,
            )
        ]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False
