#!/usr/bin/env bash
# Builds the images critest v1.26.1 pulls, without a registry or the
# internet, as one OCI image layout folder (tests/cri/images.py says what
# each image holds) and prints its path; tests/cri/registry.py serves it.
#
#   tests/cri/make-images.sh
#
# The small programs the images need (the sandbox's pause, nonewprivs' nnp,
# the nginx master over busybox httpd; tests/cri/images/*.c) are compiled
# statically with gcc. The folder is cached under $HUSK_CACHE/images
# (default ~/.cache/husk), keyed by busybox, the sources, this script and
# gcc's version; it is built in a temporary folder and renamed into place.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
busybox=${HUSK_BUSYBOX:-/bin/busybox}
[ -x "$busybox" ] || { echo "make-images: no $busybox (apt-get install busybox-static)" >&2; exit 1; }
! command -v file >/dev/null || ! file -L "$busybox" | grep -q 'dynamically linked' ||
  { echo "make-images: $busybox is dynamically linked; the images need busybox-static" >&2; exit 1; }
command -v gcc >/dev/null || { echo "make-images: no gcc (scripts/setup.sh installs build-essential)" >&2; exit 1; }

cache=${HUSK_CACHE:-$HOME/.cache/husk}/images
key=$( { sha256sum "$busybox" "$here/make-images.sh" "$here/images.py" "$here"/images/*.c | cut -d' ' -f1
  gcc -dumpfullversion; } | sha256sum | cut -c1-16)
out="$cache/cri-images-$key"
if [ -f "$out/index.json" ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$cache"
tmp=$(mktemp -d "$out.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
t0=$(date +%s)
mkdir -p "$tmp/bin" "$tmp/layout/blobs/sha256"
for p in pause nnp nginx; do
  gcc -static -O2 -Wall -Werror -s -o "$tmp/bin/$p" "$here/images/$p.c"
done
python3 "$here/images.py" "$tmp/layout" "$busybox" "$tmp/bin"
chmod 755 "$tmp/layout"
if ! mv -T "$tmp/layout" "$out" 2>/dev/null; then
  [ -f "$out/index.json" ] || { echo "make-images: could not move the images to $out" >&2; exit 1; }
fi
echo "[cri-images] built in $(( $(date +%s) - t0 )) s: $out" >&2
echo "$out"
