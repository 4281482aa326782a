"""Keep the lock files in step with pyproject.toml.

pyproject.toml declares ranges (for people who install relay as a library); the files here pin
every package with its hashes, and the image, CI and `make test` install from them only. Each
lock file carries a stamp: the SHA-256 of what pyproject.toml declared when it was made. A
dependency added to pyproject.toml without `make lock` then fails every install, naming the
fix, instead of building something nobody locked.

    python3 requirements/lock.py check         exit 1 if a lock file is stale or missing
    python3 requirements/lock.py build-requires  print [build-system].requires (make lock)
    python3 requirements/lock.py image-extras  print --extra X for every extra but test
    python3 requirements/lock.py stamp          stamp the lock files (make lock, after uv)

Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYPROJECT = HERE.parent / "pyproject.toml"
LOCK_FILES = ("build.txt", "image.txt", "test.txt")
STAMP = "# pyproject-sha256: "


def declared_digest() -> str:
    """The digest of everything in pyproject.toml that decides what a lock file holds."""
    data = tomllib.loads(PYPROJECT.read_text())
    project = data["project"]
    declared = {
        "build-system.requires": sorted(data["build-system"]["requires"]),
        "requires-python": project.get("requires-python"),
        "dependencies": sorted(project.get("dependencies", [])),
        "optional-dependencies": {k: sorted(v) for k, v in project.get("optional-dependencies", {}).items()},
    }
    return hashlib.sha256(json.dumps(declared, sort_keys=True).encode()).hexdigest()


def stamp_of(path: Path) -> str | None:
    for line in path.read_text().splitlines():
        if line.startswith(STAMP):
            return line[len(STAMP) :].strip()
    return None


def check(names: list[str]) -> int:
    expected = declared_digest()
    stale = []
    for name in names or LOCK_FILES:
        path = HERE / name
        if not path.is_file():
            stale.append(f"{path.name} (missing)")
        elif stamp_of(path) != expected:
            stale.append(path.name)
    if stale:
        print(
            "pyproject.toml and the lock files disagree: the dependencies declared in pyproject.toml "
            f"changed since requirements/{', requirements/'.join(stale)} were made.\n"
            "Run `make lock` (needs PyPI) and commit pyproject.toml with requirements/*.txt.",
            file=sys.stderr,
        )
        return 1
    return 0


def stamp() -> int:
    line = STAMP + declared_digest() + "\n"
    for name in LOCK_FILES:
        path = HERE / name
        kept = [text for text in path.read_text().splitlines(keepends=True) if not text.startswith(STAMP)]
        path.write_text(line + "".join(kept))
    return 0


def main(argv: list[str]) -> int:
    command = argv[0] if argv else ""
    if command == "check":
        return check(argv[1:])
    if command == "stamp":
        return stamp()
    if command == "build-requires":
        print("\n".join(tomllib.loads(PYPROJECT.read_text())["build-system"]["requires"]))
        return 0
    if command == "image-extras":
        # The image installs every extra except the test tools: a new extra ships by default.
        extras = tomllib.loads(PYPROJECT.read_text())["project"].get("optional-dependencies", {})
        print(" ".join(f"--extra {name}" for name in sorted(extras) if name != "test"))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
