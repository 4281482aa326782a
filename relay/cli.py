"""The `relay` command: serve, check, keygen, dkim rotate|status, hash-password, config validate.

Exit codes: 0 success; 1 a runtime failure (cannot bind, a check failed); 2 a bad config
or bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import logging
import os
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from relay import __version__

if TYPE_CHECKING:
    from collections.abc import Callable

    from relay.config.schema import Settings
    from relay.server import Relay

# Commands import what they need when they run: `relay serve --workers N` keeps its
# supervisor process small, and `relay hash-password` starts fast.

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
MAX_WORKERS = 1024  # each is a whole relay process; far more than any machine has cores
_CONFIG_HELP = "config file (default: $RELAY_CONFIG, else the dev default)"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_CONFIG
    try:
        code: int = args.func(args)
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `relay queue list | head`: the reader went away, which is no error of ours. Point
        # stdout at /dev/null so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="SMTP relay proxy for private subnets.")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the relay (no config: the embedded dev default)")
    serve.add_argument("-c", "--config", help=_CONFIG_HELP)
    serve.add_argument(
        "--workers",
        type=_worker_count,
        # A string: argparse converts it with `type` only when `serve` runs, so a bad
        # $RELAY_WORKERS is a usage error of `relay serve`, not a traceback of every command.
        default=os.environ.get("RELAY_WORKERS") or "1",
        help="worker processes sharing the listeners, one core each (default 1, or $RELAY_WORKERS)",
    )
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check", help="preflight of the DNS posture and the path out")
    check.add_argument("-c", "--config", help=_CONFIG_HELP)
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(func=cmd_check)

    keygen = sub.add_parser("keygen", help="make a DKIM key pair and print the DNS record")
    keygen.add_argument("-d", "--domain", required=True, help="the signing domain (d=)")
    keygen.add_argument(
        "-s", "--selector", required=True, help="the selector (s=): the record is SELECTOR._domainkey.DOMAIN"
    )
    keygen.add_argument("--algorithm", choices=["rsa-sha256", "ed25519-sha256"], default="rsa-sha256")
    keygen.add_argument("--bits", type=int, choices=[2048, 3072, 4096], default=2048)
    keygen.add_argument("--store", metavar="REF", help="write the private key to file:///path or aws-sm://ID")
    keygen.add_argument("--out", metavar="FILE", help="write the private key to FILE (mode 0600), like --store file://")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key file")
    keygen.add_argument(
        "--print-private-key", action="store_true", help="print the private key (PEM) on stdout, after the record"
    )
    keygen.add_argument("--aws-region")
    keygen.add_argument("--aws-endpoint-url")
    keygen.set_defaults(func=cmd_keygen)

    dkim = sub.add_parser("dkim", help="DKIM key rotation: rotate, status")
    dkim.set_defaults(func=_usage(dkim))
    dkim_sub = dkim.add_subparsers(metavar="SUBCOMMAND")
    rotate = dkim_sub.add_parser(
        "rotate",
        help="rotate one domain's key: new selector, published, verified, "
        "switched, retired (resumable: run it again to continue)",
    )
    rotate.add_argument("-c", "--config", help=_CONFIG_HELP)
    rotate.add_argument("-d", "--domain", required=True, help="the key-set domain (dkim.key_sets[].domain)")
    rotate.add_argument(
        "--algorithm",
        choices=["rsa-sha256", "ed25519-sha256"],
        help="of the new key (default: the key set's algorithm)",
    )
    rotate.add_argument(
        "--publish", metavar="route53:ZONE_ID|print", help="where the TXT record goes (default: the key set's publish)"
    )
    rotate.add_argument(
        "--overlap", metavar="DURATION", help="how long both keys sign (default: dkim.rotation.overlap, 7d)"
    )
    rotate.add_argument("--dry-run", action="store_true", help="say what the remaining steps are and when")
    rotate.add_argument(
        "--continue",
        dest="continue_only",
        action="store_true",
        help="only continue a rotation in progress, never start one (for a daily job)",
    )
    rotate.set_defaults(func=cmd_dkim_rotate)
    dkim_status = dkim_sub.add_parser("status", help="each domain's selectors, ages, states and next step")
    dkim_status.add_argument("-c", "--config", help=_CONFIG_HELP)
    dkim_status.add_argument("--json", action="store_true", help="machine-readable output")
    dkim_status.set_defaults(func=cmd_dkim_status)

    hashpw = sub.add_parser("hash-password", help="read a password on stdin, print its hash")
    hashpw.set_defaults(func=cmd_hash_password)

    config = sub.add_parser("config", help="configuration commands")
    config.set_defaults(func=_usage(config))
    config_sub = config.add_subparsers(metavar="SUBCOMMAND")
    validate = config_sub.add_parser(
        "validate",
        help="validate the config; also read every file and secret it names, unless --offline",
    )
    validate.add_argument(
        "--offline",
        action="store_true",
        help="syntax and meaning only: no files, no secrets (for a config checked away from where it runs)",
    )
    validate.add_argument("-c", "--config", help=_CONFIG_HELP)
    validate.set_defaults(func=cmd_config_validate)

    from relay.queue.commands import add_queue_commands

    add_queue_commands(sub, lambda path_arg: _load(path_arg, prepare=False))  # they only read
    return parser


def _worker_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"expected a number of processes, 1 to {MAX_WORKERS}, got {text[:20]!r}")
    return count


def _usage(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """A command group run without its subcommand: its own help, on stderr, exit 2."""

    def usage(_args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return EXIT_CONFIG

    return usage


def _load(path_arg: str | None, *, offline: bool = False, prepare: bool = True) -> tuple[Settings, Path | None]:
    """The settings and the config file, None for the dev default. `prepare`: make the dev
    default's folder if it is missing (a command that only reads passes False)."""
    from relay.config.load import config_path, load_settings

    path = config_path(path_arg)
    if path is None:
        from relay.config.dev import dev_settings

        return dev_settings(prepare=prepare), None
    return load_settings(path, offline=offline), path


def _full_check(settings: Settings, path: Path | None) -> None:
    """Everything `serve` checks before it binds: the schema, plus loadable TLS files."""
    from relay.config.load import ConfigError
    from relay.listen.listeners import check_tls_files

    problem = check_tls_files(settings.tls)
    if problem:
        raise ConfigError(str(path or "embedded dev default"), [("tls.cert_file", problem)])


def cmd_config_validate(args: argparse.Namespace) -> int:
    from relay.config.dev import dev_dir, dev_dir_is_prepared
    from relay.config.load import ConfigError, file_problems

    try:
        # A validation writes nothing: the dev default's folder is made by `serve`.
        settings, path = _load(args.config, offline=True, prepare=False)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_CONFIG
    source = str(path) if path else "embedded dev default"
    note = " (offline: files and secrets not checked)" if args.offline else ""
    if path is None and not args.offline and not dev_dir_is_prepared(dev_dir()):
        note = f" (its files in {dev_dir()} are made by `relay serve`)"
    elif not args.offline:
        # What `serve` would need here: the files it names, and every secret it references.
        problems = file_problems(settings)
        if not problems:
            try:
                _full_check(settings, path)
            except ConfigError as exc:
                problems += exc.problems
        problems += asyncio.run(_unreadable_secrets(settings))
        if problems:
            print(ConfigError(source, problems).render(), file=sys.stderr)
            return EXIT_CONFIG
    keys = ", ".join(f"{k.domain}/{k.selector}" for k in settings.dkim.keys) or "none"
    print(f"{source}: configuration is valid{note}")
    listeners = ", ".join(f"{lst.name} {lst.bind} tls={lst.tls} auth={lst.auth}" for lst in settings.listeners)
    print(f"  listeners: {listeners}")
    key_sets = ", ".join(ks.domain for ks in settings.dkim.key_sets)
    key_sets = f"; key sets: {key_sets}" if key_sets else ""
    print(f"  users: {len(settings.clients.users)}; DKIM keys: {keys}{key_sets}")
    print(f"  upstream: {', '.join(u.label + ' (' + u.mode + ')' for u in settings.upstream)}")
    return EXIT_OK


async def _unreadable_secrets(settings: Settings) -> list[tuple[str, str]]:
    """Fetch every secret reference once, as `serve` would; the ones that fail, by key path.
    Only the backends' reasons are reported, never a value."""
    from relay.config.load import secret_references
    from relay.sign.keys import KeyMaterialError, load_signing_key
    from relay.wiring import load_secrets, new_secret_store

    store = new_secret_store(settings)
    logging.disable(logging.WARNING)  # the store's own warnings: reported below instead
    try:
        await load_secrets(store, settings)
        problems: list[tuple[str, str]] = []
        dkim_refs = {key.key for key in settings.dkim.keys}
        for key_path, ref in secret_references(settings):
            value = store.get(ref)
            if value is None:
                problems.append((key_path, f"cannot read: {store.error(ref)}"))
            elif ref not in dkim_refs and not _is_utf8(value.data):
                # Passwords and tokens are sent as text; such bytes would fail at every use.
                problems.append((key_path, "not UTF-8 text"))
        # A DKIM key that is read but is no key: `serve` would start and answer 451 to
        # every message from its domain.
        for i, key in enumerate(settings.dkim.keys):
            value = store.get(key.key)
            if value is None:
                continue
            try:
                load_signing_key(
                    value.data,
                    domain=key.domain,
                    selector=key.selector,
                    algorithm=key.algorithm,
                    allow_weak_rsa=settings.dkim.allow_weak_rsa,
                )
            except KeyMaterialError as exc:
                problems.append((f"dkim.keys[{i}].key", f"not a usable key: {exc}"))
        return problems
    finally:
        logging.disable(logging.NOTSET)
        await store.close()


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def cmd_serve(args: argparse.Namespace) -> int:
    from relay import startup_signals

    # Done already by `relay` and `python -m relay` (relay.__main__), before the slow imports;
    # kept here for a `main(["serve", ...])` called otherwise (the record is kept).
    startup_signals.hold()
    config = args.config or os.environ.get("RELAY_CONFIG") or None
    if args.workers > 1:
        # Before anything imports prometheus-client: the supervisor must switch it to
        # multiprocess mode first. Each worker validates the config itself; a config error
        # (exit 2) stops them all.
        from relay.supervisor import supervise

        # One server TLS context made before the fork: OpenSSL draws the session-ticket key
        # when the context is created, so every worker then decrypts every worker's tickets
        # (a resuming client lands on any worker, SO_REUSEPORT picks which). Each worker
        # loads the certificate into its copy, and reloads it in place on SIGHUP.
        tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        return supervise(
            args.workers,
            lambda index: serve_worker(config, index=index, reuse_port=True, tls_context=tls_context),
        )
    return serve_worker(config, index=0, reuse_port=False)


def serve_worker(config: str | None, *, index: int, reuse_port: bool, tls_context: ssl.SSLContext | None = None) -> int:
    """Run one relay process: the only one, or worker `index` of `relay serve --workers N`
    (which share the listening ports with SO_REUSEPORT)."""
    # One series per counter, not two: the *_created timestamps add nothing to dashboards.
    from prometheus_client import disable_created_metrics

    from relay import startup_signals
    from relay.config.load import ConfigError
    from relay.observe.logs import setup_logging
    from relay.server import serve

    disable_created_metrics()  # type: ignore[no-untyped-call]
    startup_signals.config_read()
    try:
        settings, path = _load(config)
        _full_check(settings, path)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(settings.logging.format, settings.logging.level)
    reload_settings: Callable[[], Settings] | None = None
    on_started: Callable[[Relay], None] | None = None
    if path is None:
        from relay.config.dev import dev_settings

        reload_settings = dev_settings
        if index == 0:  # the banner once, from the first worker
            on_started = _print_dev_banner
    _install_uvloop()
    _raise_open_file_limit()
    code = asyncio.run(
        serve(
            settings,
            config_path=path,
            reload_settings=reload_settings,
            on_started=on_started,
            reuse_port=reuse_port,
            tls_context=tls_context,
        )
    )
    # The loop has closed (the signals waited meanwhile: serve()); a signal now must not
    # change how a finished stop ends.
    startup_signals.ignore_until_exit()
    return code


def _raise_open_file_limit() -> None:
    """Every session is a socket (two with its upstream connection): take the hard limit
    on open files, not the usual soft 1024, so a thousand clients are not refused."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 65536 if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _print_dev_banner(relay: Relay) -> None:
    from relay.config.dev import DEV_DOMAIN, DEV_SELECTOR

    settings = relay.settings
    base = settings.data_dir
    outbox = settings.upstream[0].outbox_dir
    binds = {lst.name: lst.bind for lst in settings.listeners}
    print(
        f"""
relay {__version__} is running on its embedded dev default (loopback only).

  SMTP       {binds["dev-plain"]} (plain + STARTTLS), {binds["dev-submission"]} (STARTTLS),
             {binds["dev-submissions"]} (implicit TLS)
             no AUTH needed from loopback; send as anything@{DEV_DOMAIN}
  outbox     {outbox}/   (each signed message lands here as an .eml file)
  DKIM key   {base}/{DEV_SELECTOR}.{DEV_DOMAIN}.key
             (selector {DEV_SELECTOR}; the TXT record to publish is in {DEV_SELECTOR}.{DEV_DOMAIN}.txt)
  TLS cert   {base}/tls.crt  (self-signed)
  metrics    http://{settings.metrics.bind}/metrics   health: /healthz  /readyz

Try it:
  swaks --server 127.0.0.1:2525 --from app@{DEV_DOMAIN} --to someone@example.net
  python3 -c "import smtplib; smtplib.SMTP('127.0.0.1', 2525).sendmail('app@{DEV_DOMAIN}', \\
    ['someone@example.net'], 'From: app@{DEV_DOMAIN}\\r\\nSubject: hello\\r\\n\\r\\nhi\\r\\n')"

Stop with Ctrl-C.
""",
        flush=True,
    )


def cmd_hash_password(args: argparse.Namespace) -> int:
    from relay.auth.passwords import MAX_PASSWORD_OCTETS, hash_password

    if sys.stdin is None:  # started with standard input closed
        print("no password given: pipe it on stdin", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if sys.stdin.isatty():
            password = getpass.getpass("Password: ")
            if getpass.getpass("Again: ") != password:
                print("passwords differ", file=sys.stderr)
                return EXIT_CONFIG
            raw = password.encode("utf-8", "surrogateescape")
        else:
            # The first line, as bytes, read no further than a password can be long.
            raw = sys.stdin.buffer.readline(MAX_PASSWORD_OCTETS + 3).rstrip(b"\r\n")
    except EOFError:
        # Ctrl-D at the prompt: no password given, which is not a crash.
        print("\nno password given", file=sys.stderr)
        return EXIT_CONFIG
    problem = _password_problem(raw, MAX_PASSWORD_OCTETS)
    if problem:
        print(problem, file=sys.stderr)
        return EXIT_CONFIG
    print(hash_password(raw.decode("utf-8")))
    return EXIT_OK


def _password_problem(raw: bytes, limit: int) -> str | None:
    """Why a client could never log in with `raw`, or None."""
    if not raw:
        return "empty password"
    if len(raw) > limit:
        return f"password longer than {limit} octets: AUTH could not carry it (RFC 4954 §4)"
    if b"\0" in raw:
        return "password holds a NUL character, which AUTH PLAIN cannot carry (RFC 4616 §2)"
    if not _is_utf8(raw):
        return "password is not UTF-8 text"
    return None


def cmd_keygen(args: argparse.Namespace) -> int:
    from relay.keygen import keygen

    return keygen(args)


def _dkim_settings(path_arg: str | None) -> Settings | None:
    """The settings `relay dkim` works on, or None once the config errors are printed."""
    from relay.config.load import ConfigError

    try:
        settings, _ = _load(path_arg, prepare=False)  # the dev default has no key sets to rotate
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return None
    logging.basicConfig(level=logging.ERROR)  # the commands print their own lines
    return settings


def cmd_dkim_rotate(args: argparse.Namespace) -> int:
    from relay.rotate.command import rotate_command

    settings = _dkim_settings(args.config)
    if settings is None:
        return EXIT_CONFIG
    return asyncio.run(
        rotate_command(
            settings,
            domain=args.domain,
            algorithm=args.algorithm,
            publish=args.publish,
            overlap=args.overlap,
            dry_run=args.dry_run,
            start=not args.continue_only,
            out=lambda line: print(line, flush=True),
            err=lambda line: print(line, file=sys.stderr, flush=True),
        )
    )


def cmd_dkim_status(args: argparse.Namespace) -> int:
    from relay.rotate.command import status_command

    settings = _dkim_settings(args.config)
    if settings is None:
        return EXIT_CONFIG
    return asyncio.run(status_command(settings, as_json=args.json))


def cmd_check(args: argparse.Namespace) -> int:
    from relay.config.load import ConfigError

    try:
        settings, path = _load(args.config)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_CONFIG
    from relay.wiring import preflight

    logging.basicConfig(level=logging.ERROR)
    report = asyncio.run(preflight(settings))
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        print(report.render())
    return EXIT_OK if report.ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
