#!/usr/bin/env bash
# Builds a husk kernel from Debian's linux-source-6.1: `make tinyconfig`, then
# the fragments, then a check that Kconfig kept every symbol the fragments ask
# for. Outputs vmlinux (ELF with the PVH note) and bzImage.
#
#   guest-kernel/build.sh guest    # the micro-VM guest kernel (guest.config)
#   guest-kernel/build.sh testvm   # the test-machine kernel (guest + testvm.config)
#
# Progress and timings go to stderr; stdout gets one line, the output folder.
# The build is cached under $HUSK_CACHE (default ~/.cache/husk), keyed by the
# fragments, the source package version and the compiler, so a second run
# costs a hash.
set -euo pipefail

flavor=${1:-guest}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${HUSK_CACHE:-$HOME/.cache/husk}
log() { echo "[kernel:$flavor] $*" >&2; }

case "$flavor" in
  guest) fragments=("$here/guest.config") ;;
  testvm) fragments=("$here/guest.config" "$here/testvm.config") ;;
  *) echo "usage: $0 guest|testvm" >&2; exit 2 ;;
esac

tarball=/usr/src/linux-source-6.1.tar.xz
[ -f "$tarball" ] || { echo "missing $tarball: run scripts/setup.sh" >&2; exit 1; }
srcver=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( { echo "$flavor $srcver $(gcc -dumpfullversion)"; cat "${fragments[@]}"; } \
  | sha256sum | cut -c1-16)
out="$cache/kernel/$flavor-$key"
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
  log "cached: $out"
  echo "$out"
  exit 0
fi

start=$(date +%s)
src="$cache/src/linux-source-$srcver"
if [ ! -f "$src/.husk-extracted" ]; then
  log "extracting $tarball"
  rm -rf "$src" && mkdir -p "$src.tmp"
  tar -xf "$tarball" -C "$src.tmp" --strip-components=1
  touch "$src.tmp/.husk-extracted"
  mv "$src.tmp" "$src"
fi

obj="$cache/build/$flavor-$key"
rm -rf "$obj" && mkdir -p "$obj"
export KBUILD_BUILD_USER=husk KBUILD_BUILD_HOST=husk \
  KBUILD_BUILD_TIMESTAMP="$srcver" KBUILD_BUILD_VERSION=1
kmake() { make -C "$src" O="$obj" ARCH=x86_64 "$@"; }

kmake tinyconfig >"$obj/config.log" 2>&1
"$src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "${fragments[@]}" \
  >>"$obj/config.log" 2>&1
kmake olddefconfig >>"$obj/config.log" 2>&1

# Kconfig drops a symbol whose dependencies are unmet without a word: check
# that the final .config holds the last value each fragment line asked for.
missing=$(python3 - "$obj/.config" "${fragments[@]}" <<'EOF'
import re, sys
final = {}
for line in open(sys.argv[1]):
    m = re.match(r'(CONFIG_\w+)=(.*)', line)
    if m: final[m.group(1)] = m.group(2)
want = {}
for frag in sys.argv[2:]:
    for line in open(frag):
        m = re.match(r'(CONFIG_\w+)=(.*)', line.strip())
        n = re.match(r'# (CONFIG_\w+) is not set', line.strip())
        if m: want[m.group(1)] = m.group(2)
        elif n: want[n.group(1)] = None
for sym, val in want.items():
    if final.get(sym) != val:
        print(f"{sym}: wanted {val or 'unset'}, got {final.get(sym) or 'unset'}")
EOF
)
if [ -n "$missing" ]; then
  echo "kernel config check failed (unmet Kconfig dependencies?):" >&2
  echo "$missing" >&2
  exit 1
fi

jobs=$(( $(nproc) + 1 ))
log "building vmlinux and bzImage with -j$jobs (log: $obj/build.log)"
kmake -j"$jobs" vmlinux bzImage >"$obj/build.log" 2>&1 &
pid=$!
while kill -0 "$pid" 2>/dev/null; do
  sleep 20
  log "$(( $(date +%s) - start ))s: $(grep -c '^  CC' "$obj/build.log" || true) files compiled"
done
if ! wait "$pid"; then
  tail -n 40 "$obj/build.log" >&2
  echo "kernel build failed; full log: $obj/build.log" >&2
  exit 1
fi

mkdir -p "$out.tmp"
cp "$obj/vmlinux" "$obj/arch/x86/boot/bzImage" "$obj/.config" \
  "$obj/include/config/kernel.release" "$out.tmp/"
strip --strip-debug "$out.tmp/vmlinux" 2>/dev/null || true
rm -rf "$out" && mv "$out.tmp" "$out"
rm -rf "$obj"
log "built $(cat "$out/kernel.release") in $(( $(date +%s) - start ))s: $out"
echo "$out"
