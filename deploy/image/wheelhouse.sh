#!/usr/bin/env bash
# Download the wheels of the image's lock files (requirements/image.txt, build.txt), checked
# against their hashes, for the image test: its `docker build` runs inside the tests'
# loopback-only namespace and installs from these, served on loopback, instead of PyPI.
#
#   deploy/image/wheelhouse.sh CACHE_DIR [PYTHON]   prints the wheel directory (made if missing)
#   deploy/image/wheelhouse.sh --check CACHE_DIR    prints it, or exits 3 if it is not made yet
#
# The directory's name carries a hash of the lock files: a new lock makes a new directory.
set -euo pipefail
cd "$(dirname "$0")/../.."

check_only=false
if [ "${1:-}" = --check ]; then check_only=true; shift; fi
cache=${1:?usage: $0 [--check] CACHE_DIR [PYTHON]}
python=${2:-python3}
key=$(cat requirements/image.txt requirements/build.txt | sha256sum | cut -c1-16)
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
# The same platform as the local base (Debian bookworm's CPython 3.11 on this architecture).
"$python" -m pip download --quiet --disable-pip-version-check --no-deps \
  --require-hashes -r requirements/image.txt -r requirements/build.txt -d "$wheels" >&2
touch "$wheels/.complete"
echo "$wheels"
