#!/usr/bin/env bash
# Builds a husk guest initramfs.
#
#   rootfs-image/build.sh [agent]   # the product image: the static agent as /init
#                                   # plus the few nodes the kernel needs first, and
#                                   # Debian's static busybox with its applet links:
#                                   # the shell and tools of `husk exec` (the debug
#                                   # console, off unless debug_console = true)
#   rootfs-image/build.sh test      # the VMM test image: busybox, the vsock probe,
#                                   # the hostile guest and tests/guest-init.sh as /init
# Reproducible: the same agent
# binary and manifest give the same bytes (mkcpio.py fixes times, owners and
# inode numbers; gzip -n drops the name and time).
#
# Progress goes to stderr; stdout gets one line, the image's path, under
# $HUSK_CACHE (default ~/.cache/husk)/image/<hash of the inputs>/.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
cache=${HUSK_CACHE:-$HOME/.cache/husk}
flavor=${1:-agent}
case "$flavor" in agent | test) ;; *) echo "usage: $0 [agent|test]" >&2; exit 2 ;; esac
log() { echo "[rootfs-image:$flavor] $*" >&2; }

target=x86_64-unknown-linux-gnu
packages=(-p husk-agent)
[ "$flavor" = test ] && packages+=(-p husk-guest-tools)
log "building ${packages[*]} (static)"
# --target keeps these flags off build scripts and proc-macros, and keeps the
# static build in its own target folder. The path remap keeps the checkout's
# location out of the binary.
RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=$repo=/husk" \
  cargo build --quiet --release --locked "${packages[@]}" --target "$target" \
  --manifest-path "$repo/Cargo.toml"
bin="$repo/target/$target/release"
agent="$bin/husk-agent"
for b in "$agent" "$bin/husk-vsock-probe" "$bin/husk-hostile"; do
  if [ -f "$b" ] && readelf -d "$b" | grep -q NEEDED; then
    echo "$b is not static" >&2
    exit 1
  fi
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/manifest" <<MANIFEST
dir /dev 0755
nod /dev/console 0600 c 5 1
nod /dev/null 0666 c 1 3
dir /proc 0555
dir /sys 0555
dir /run 0755
dir /tmp 1777
MANIFEST
if [ "$flavor" = agent ]; then
  echo "file /init $agent 0755" >>"$work/manifest"
  # busybox-static (scripts/setup.sh); its applet list is the binary's own,
  # so the same binary gives the same links.
  [ -x /bin/busybox ] || { echo "/bin/busybox is missing: apt-get install busybox-static" >&2; exit 1; }
  if readelf -d /bin/busybox | grep -q NEEDED; then
    echo "/bin/busybox is not static (install busybox-static)" >&2
    exit 1
  fi
  {
    printf 'dir /%s 0755\n' bin sbin usr usr/bin usr/sbin
    echo "file /bin/busybox /bin/busybox 0755"
    /bin/busybox --list-full | LC_ALL=C sort | while read -r applet; do
      [ "$applet" = bin/busybox ] || echo "slink /$applet /bin/busybox 0777"
    done
  } >>"$work/manifest"
else
  cat >>"$work/manifest" <<MANIFEST
dir /bin 0755
file /bin/busybox /bin/busybox 0755
file /bin/husk-vsock-probe $bin/husk-vsock-probe 0755
file /bin/husk-hostile $bin/husk-hostile 0755
file /init $repo/tests/guest-init.sh 0755
MANIFEST
fi
python3 "$here/mkcpio.py" "$work/manifest" "$work/initramfs.cpio"
gzip -n -9 "$work/initramfs.cpio"

key=$(sha256sum "$work/initramfs.cpio.gz" | cut -c1-16)
out="$cache/image/$flavor-$key"
mkdir -p "$out"
cp "$work/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
log "initramfs: $(stat -c %s "$out/initramfs.cpio.gz") bytes (agent $(stat -c %s "$agent") bytes), sha256 $(sha256sum "$out/initramfs.cpio.gz" | cut -c1-16)"
echo "$out/initramfs.cpio.gz"
