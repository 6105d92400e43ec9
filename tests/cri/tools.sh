#!/usr/bin/env bash
# Prints the folder that holds crictl and critest (cri-tools v1.26.1):
# the folder of those on PATH when both are there, else a build of them
# from the source archive the project keeps beside its checkouts
# (../shared/tools/cri-tools, built by its build.sh, offline, with Debian's
# golang-go from scripts/setup.sh), cached under
# $HUSK_CACHE/cri-tools-<sha256 of the archive> (default ~/.cache/husk).
#
#   tests/cri/tools.sh            # prints DIR; DIR/crictl and DIR/critest
#
# HUSK_CRI_TOOLS_DIR names the folder with build.sh and the archive
# (default: shared/tools/cri-tools beside the repository's folder). The build
# goes to a temporary folder that is renamed into place when done, so two
# runs at once, or one cut short, never leave a half-built cache.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

crictl=$(command -v crictl || true)
critest=$(command -v critest || true)
if [ -n "$crictl" ] && [ -n "$critest" ] && [ "$(dirname "$crictl")" = "$(dirname "$critest")" ]; then
  dirname "$crictl"
  exit 0
fi

src=${HUSK_CRI_TOOLS_DIR:-$(dirname "$repo")/shared/tools/cri-tools}
archive=$(find "$src" -maxdepth 1 -name 'cri-tools-*.tar.gz' 2>/dev/null | sort | tail -n 1 || true)
if [ -z "$archive" ] || [ ! -x "$src/build.sh" ]; then
  echo "tools.sh: no crictl/critest on PATH and no cri-tools archive with build.sh in $src (HUSK_CRI_TOOLS_DIR)" >&2
  exit 1
fi
cache=${HUSK_CACHE:-$HOME/.cache/husk}
out="$cache/cri-tools-$(sha256sum "$archive" | cut -d' ' -f1)"
if [ -x "$out/crictl" ] && [ -x "$out/critest" ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$cache"
tmp=$(mktemp -d "$out.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
t0=$(date +%s)
echo "[cri-tools] building crictl and critest from $archive (2-3 min)" >&2
"$src/build.sh" "$tmp" >&2
if [ ! -x "$tmp/crictl" ] || [ ! -x "$tmp/critest" ]; then
  echo "tools.sh: $src/build.sh made no crictl/critest" >&2
  exit 1
fi
chmod 755 "$tmp"
# Another run may have finished first: its result is as good as ours.
if ! mv -T "$tmp" "$out" 2>/dev/null; then
  [ -x "$out/critest" ] || { echo "tools.sh: could not move the build to $out" >&2; exit 1; }
fi
echo "[cri-tools] built in $(( $(date +%s) - t0 )) s: $out" >&2
echo "$out"
