#!/usr/bin/env bash
# Download the wheels of the image's lock files (requirements/image.txt, build.txt), checked
# against their hashes, for the image test: its `docker build` runs inside the tests'
# loopback-only namespace and installs from these, served on loopback, instead of PyPI.
#
#   deploy/image/wheelhouse.sh CACHE_DIR [PYTHON]   prints the wheel directory (made if missing)
#   deploy/image/wheelhouse.sh --check CACHE_DIR    prints it, or exits 3 if it is not made yet
#
# The directory's name carries a hash of this script and the lock files: a new lock (or recipe)
# makes a new directory.
set -euo pipefail
cd "$(dirname "$0")/../.."

check_only=false
if [ "${1:-}" = --check ]; then check_only=true; shift; fi
cache=${1:?usage: $0 [--check] CACHE_DIR [PYTHON]}
python=${2:-python3}
key=$(cat "$0" requirements/image.txt requirements/build.txt | sha256sum | cut -c1-16)
wheels="$cache/wheels-$key"
if [ -f "$wheels/.complete" ]; then
  echo "$wheels"
  exit 0
fi
if $check_only; then
  echo "wheelhouse: $wheels is not made yet: run \`make image-cache\` (PyPI)" >&2
  exit 3
fi
rm -rf "$wheels"
mkdir -p "$wheels"
# The same platform as the local base (Debian bookworm's CPython 3.11 on this architecture),
# but pip evaluates the lock's environment markers for the Python that runs this script, not
# for the base's: bookworm's python3 is 3.11.2, so a pin such as
# `async-timeout ; python_full_version < '3.11.3'` is needed in the image and skipped here.
# Keep every pin whose marker holds for either interpreter (extra wheels are harmless: the
# image's pip picks by its own markers) and download those without markers.
"$python" - requirements/image.txt requirements/build.txt >"$wheels/.requirements" <<'PY'
import platform, re, sys
from pip._vendor.packaging.markers import Marker, default_environment

environments = [default_environment(), {**default_environment(), "python_full_version": "3.11.2",
                                        "python_version": "3.11", "implementation_version": "3.11.2"}]
for path in sys.argv[1:]:
    text = re.sub(r"\\\n\s*", " ", open(path).read())  # join continuation lines
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        spec, hashes = line.split(" --hash", 1) if " --hash" in line else (line, "")
        requirement, _, marker = spec.partition(";")
        if marker.strip() and not any(Marker(marker).evaluate(env) for env in environments):
            continue
        print(requirement.strip(), ("--hash" + hashes) if hashes else "")
PY
"$python" -m pip download --quiet --disable-pip-version-check --no-deps \
  --require-hashes -r "$wheels/.requirements" -d "$wheels" >&2
touch "$wheels/.complete"
# Older wheelhouses (other locks) are not needed any more.
find "$cache" -maxdepth 1 -name 'wheels-*' ! -name "wheels-$key" -exec rm -rf {} +
echo "$wheels"
