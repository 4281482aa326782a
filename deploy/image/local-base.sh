#!/usr/bin/env bash
# Make a Debian bookworm root filesystem with python3, venv and the machine's CA certificates,
# as a tarball for `docker import`: the base the image test builds on where no image registry
# is reachable. Needs root, debootstrap and the network to the Debian mirror apt already uses,
# so it runs before the tests (`make image-base`), outside their loopback-only namespace.
#
#   deploy/image/local-base.sh CACHE_DIR           prints the tarball's path (made if missing)
#   deploy/image/local-base.sh --check CACHE_DIR   prints it, or exits 3 if it is not made yet
#
# The tarball's name carries a hash of its recipe (this script, the mirror, the local CA
# certificates): an unchanged recipe reuses it, a changed one builds a new one.
set -euo pipefail

check_only=false
if [ "${1:-}" = --check ]; then check_only=true; shift; fi
cache=${1:?usage: $0 [--check] CACHE_DIR}
suite=bookworm
packages=python3,python3-venv,ca-certificates

# The mirror apt uses for bookworm (deb822 .sources first, then one-line sources.list).
mirror=$(
  { awk '/^URIs:/ {uri=$2} /^Suites:/ && / bookworm( |$)/ && uri ~ /\/debian\/?$/ {print uri; exit}' \
      /etc/apt/sources.list.d/*.sources 2>/dev/null || true
    awk '$1 == "deb" && $3 == "bookworm" && $2 ~ /\/debian\/?$/ {print $2; exit}' \
      /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true
  } | head -n1 || true
)
if [ -z "$mirror" ]; then
  echo "local-base: no bookworm Debian mirror found in /etc/apt/sources.list*" >&2
  exit 1
fi
for tool in debootstrap chroot tar sha256sum; do
  command -v "$tool" >/dev/null || { echo "local-base: $tool is missing (apt-get install debootstrap)" >&2; exit 1; }
done

# Extra CA certificates the machine trusts (those update-ca-certificates installs): the
# package index inside an image build may be reached through them.
shopt -s nullglob
local_cas=(/usr/local/share/ca-certificates/*.crt)
recipe=$( { cat "$0"; echo "$mirror $suite $packages"; cat /dev/null "${local_cas[@]}"; } | sha256sum | cut -c1-16)
tarball="$cache/base-$suite-$recipe.tar"
if [ -s "$tarball" ]; then
  echo "$tarball"
  exit 0
fi
if $check_only; then
  echo "local-base: $tarball is not made yet: run \`make image-cache\` (root, debootstrap, the Debian mirror)" >&2
  exit 3
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/rootfs.XXXXXX")
rootfs="$work/rootfs"
cleanup() {
  # debootstrap mounts /proc and /sys (and may bind /dev) inside the root while it works: never
  # let rm follow a mount that a failed run left behind.
  findmnt -rn -o TARGET | grep -F "$rootfs/" | sort -r | xargs -r umount -l || true
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT
echo "local-base: debootstrap $suite from $mirror (a few minutes, once)" >&2
debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 30 "$work/debootstrap.log" >&2
  exit 1
}
if [ ${#local_cas[@]} -gt 0 ]; then
  cp "${local_cas[@]}" "$rootfs/usr/local/share/ca-certificates/"
  chroot "$rootfs" update-ca-certificates >/dev/null
fi
echo "deb $mirror $suite main" >"$rootfs/etc/apt/sources.list"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log
tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" .
mv "$tarball.tmp" "$tarball"
echo "$tarball"
