"""`relay queue …`: the operator's view of the spool, safe while the relay runs.

    relay queue list [--json]        every entry: state, age, sender, recipients, next try
    relay queue show ID              one entry: envelope, per-recipient state, header fields
    relay queue retry ID | --all     make waiting recipients due now
    relay queue delete ID            remove an entry (waits for a delivery under way)
    relay queue requeue ID           give a dead letter's failed recipients a fresh start

The spool is the one of `queue.dir` in the config (`-c FILE`, else $RELAY_CONFIG). Exit 0 on
success, 1 when the entry cannot be acted on (the message says why), 2 on a config error.
retry, delete and requeue run only as the user who owns the spool directory: a state file
written as another user (`sudo relay queue retry`) could not be read by the relay. The JSON of
`list --json` and `show`, key by key: docs/json.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay.queue.store import Spool

# The parser is built for every command, `relay serve --workers N` included, whose
# supervisor must not import prometheus-client before it sets its multiprocess directory:
# the spool modules are imported only when a queue command runs.

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def add_queue_commands(sub: Any, load_settings: Callable[[str | None], Any]) -> None:
    queue = sub.add_parser("queue", help="inspect and act on the spool (queue.mode: spool)")
    queue_sub = queue.add_subparsers(metavar="SUBCOMMAND")

    def usage(_args: argparse.Namespace) -> int:
        queue.print_help(sys.stderr)
        return EXIT_CONFIG

    queue.set_defaults(func=usage)

    def command(
        name: str, help_text: str, func: Callable[[Spool, argparse.Namespace], int], *, changes: bool = False
    ) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = queue_sub.add_parser(name, help=help_text)
        parser.add_argument("-c", "--config", help="config file (default: $RELAY_CONFIG, else the dev default)")
        parser.set_defaults(func=lambda args: _run(args, load_settings, func, changes=changes))
        return parser

    listing = command("list", "list the entries of the spool", _list)
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    show = command("show", "show one entry", _show)
    show.add_argument("id")
    retry = command("retry", "retry waiting recipients now", _retry, changes=True)
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?")
    which.add_argument("--all", action="store_true", help="every entry with recipients waiting")
    delete = command("delete", "remove an entry from the spool", _delete, changes=True)
    delete.add_argument("id")
    requeue = command("requeue", "put a dead letter back in the queue", _requeue, changes=True)
    requeue.add_argument("id")


def _run(
    args: argparse.Namespace,
    load_settings: Callable[[str | None], Any],
    func: Callable[[Spool, argparse.Namespace], int],
    *,
    changes: bool,
) -> int:
    from relay.config.load import ConfigError
    from relay.queue import admin
    from relay.queue.store import Spool

    try:
        settings, _path = load_settings(args.config)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_CONFIG
    root = settings.queue.dir
    try:
        if not (root / "entries").is_dir():
            print(f"relay queue: no spool at {root} (queue.dir)", file=sys.stderr)
            return EXIT_FAILED
        if changes and (problem := _not_the_owner(root)):
            print(f"relay queue: {problem}", file=sys.stderr)
            return EXIT_FAILED
        # No journal: the command never adds entries, and must not replay a running relay's.
        spool = Spool(root, max_bytes=settings.queue.max_bytes, journal=False)
        entry_id = getattr(args, "id", None)
        if entry_id is not None and not _valid(entry_id):
            print(f"relay queue: not a queue id: {entry_id!r}", file=sys.stderr)
            return EXIT_FAILED
        return func(spool, args)
    except admin.QueueCommandError as exc:
        print(f"relay queue: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        # The spool's directories are the relay's alone (mode 0700): another user cannot
        # even list them. Said so, with the path, never a traceback.
        where = f": {exc.filename}" if exc.filename else ""
        hint = ""
        if isinstance(exc, PermissionError):
            hint = f"; {_owner(root) or 'check the permissions of the spool'}"
        print(f"relay queue: {exc.strerror or exc}{where}{hint}", file=sys.stderr)
        return EXIT_FAILED


def _not_the_owner(root: Any) -> str | None:
    """Why this user must not change the spool, or None: files it writes (state files, mode
    0600) must stay readable by the relay, which runs as the spool directory's owner."""
    owner = _owner(root)
    if owner is None:
        return None
    return f"{owner}, or the relay could not read what it writes"


def _owner(root: Any) -> str | None:
    """Which user to run as (the spool directory's owner), or None when it is this one."""
    import os
    import pwd

    try:
        owner = os.stat(root).st_uid
    except OSError:
        return None
    if os.geteuid() == owner:
        return None
    try:
        name = pwd.getpwuid(owner).pw_name
    except KeyError:
        name = str(owner)
    return (
        f"the spool {root} belongs to {name} (uid {owner}); run this as that user (e.g. sudo -u {name} relay queue ...)"
    )


def _valid(entry_id: str) -> bool:
    from relay.queue.store import valid_id

    return valid_id(entry_id)


def _list(spool: Spool, args: argparse.Namespace) -> int:
    from relay.queue import admin

    entries = admin.list_entries(spool)
    if args.json:
        print(json.dumps(entries, indent=2))
        return EXIT_OK
    if not entries:
        print("the spool is empty")
        return EXIT_OK
    print(f"{'ID':<18} {'STATE':<9} {'AGE':>8} {'SIZE':>9}  FROM → RECIPIENTS (status, last reply)")
    for e in entries:
        sender = e["from"] or "<>"
        print(f"{e['id']:<18} {e['state']:<9} {_age(e['age_seconds']):>8} {e['size']:>9}  {sender}")
        if e.get("problem"):
            print(f"{'':<48}! {e['problem']}")
        for r in e["recipients"]:
            reply = f", {r['last_reply']}" if r["last_reply"] else ""
            print(f"{'':<48}→ {r['address']} ({r['status']}, {r['attempts']} tries{reply})")
    return EXIT_OK


def _show(spool: Spool, args: argparse.Namespace) -> int:
    from relay.queue import admin

    print(json.dumps(admin.show(spool, args.id), indent=2, ensure_ascii=False))
    return EXIT_OK


def _retry(spool: Spool, args: argparse.Namespace) -> int:
    from relay.queue import admin

    if args.all:
        done, problems = admin.retry_all(spool)
        for problem in problems:
            print(f"relay queue: {problem}", file=sys.stderr)
        print(f"{done} entries due now")
        return EXIT_OK if not problems else EXIT_FAILED
    count = admin.retry(spool, args.id)
    print(f"{args.id}: {count} recipients due now")
    return EXIT_OK


def _delete(spool: Spool, args: argparse.Namespace) -> int:
    from relay.queue import admin

    admin.delete(spool, args.id)
    print(f"{args.id}: deleted")
    return EXIT_OK


def _requeue(spool: Spool, args: argparse.Namespace) -> int:
    from relay.queue import admin

    count = admin.requeue(spool, args.id)
    print(f"{args.id}: {count} recipients back in the queue")
    return EXIT_OK


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"
