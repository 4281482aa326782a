"""The `relay` command's first step (the console script, `python -m relay`, the image's
ENTRYPOINT): for `relay serve`, SIGHUP, SIGTERM and SIGINT are recorded from here on
(relay.startup_signals), before the command line and what it loads are imported (a tenth
of a second and more, during which a signal's default action would kill the process). What
is left before this point is the interpreter's own start."""

import sys


def main() -> int:
    if _command(sys.argv[1:]) == "serve":
        from relay import startup_signals

        startup_signals.hold()
    from relay.cli import main as run

    return run()


def _command(args: list[str]) -> str | None:
    """The command named on the command line: its first word that is not an option (the
    only options before it, -h and --version, end the process at once)."""
    return next((arg for arg in args if not arg.startswith("-")), None)


if __name__ == "__main__":
    sys.exit(main())
