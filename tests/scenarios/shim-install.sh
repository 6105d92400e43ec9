#!/usr/bin/env bash
# timeout: 900
# configs/install.sh for real, in the test machine (whose root is a throwaway
# overlay): install husk with --kata and --containerd-config into /, start
# containerd on the installed /etc/containerd/config.toml (Debian's, plus what
# install.sh added) with a PATH that holds only the installed shim and no
# HUSK_CONFIG (so the shim reads /etc/husk/configuration.toml, as shipped),
# then run containers with runtime io.containerd.husk.v2 and, through the
# --kata alias, io.containerd.kata.v2: each must run in a VM with the guest
# kernel. Nothing may be left behind in the default state folder /run/husk.
# (Its own containerd, not tests/shim/containerd.sh's; want and
# husk_wait_clean are tests/shim/lib.sh's.)
set -uo pipefail
repo=${HUSK_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
# shellcheck source=../shim/containerd.sh
source "$repo/tests/shim/containerd.sh"
# shellcheck source=../shim/lib.sh
source "$repo/tests/shim/lib.sh"
# shellcheck source=../lib/common.sh
source "$repo/tests/lib/common.sh"
out=${HUSK_OUT:-$(mktemp -d)}
export HUSK_OUT=$out
img=localhost/husk-busybox:latest

if [ "${HUSK_TEST_MODE:-}" != nested ] && [ -z "${HUSK_INSTALL_FOR_REAL:-}" ]; then
  # Outside the throwaway test machine this would install into the host.
  echo "SKIP shim-install: it installs into /; runs only in the nested test machine (or with HUSK_INSTALL_FOR_REAL=1)"
  exit 0
fi
guest_release=$(cat "$HUSK_GUEST_KERNEL/kernel.release")
l1_boot=$(cat /proc/sys/kernel/random/boot_id)

echo "==== configs/install.sh --kata --containerd-config /etc/containerd/config.toml"
"$repo/configs/install.sh" --kata --containerd-config /etc/containerd/config.toml
want "install.sh exits 0" [ $? = 0 ]
cp /etc/containerd/config.toml "$out/containerd-config.toml"
# The installed shim alone: containerd's PATH has no HUSK_BIN.
path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
want "PATH finds the installed shim" [ "$(PATH=$path command -v containerd-shim-husk-v2)" = /usr/local/bin/containerd-shim-husk-v2 ]

# containerd's own config; its root on a tmpfs (the overlayfs snapshotter
# cannot stack on the test machine's overlay root).
d=/var/lib/husk-install-test
mkdir -p "$d"
mount -t tmpfs tmpfs "$d"
export CONTAINERD_ADDRESS=$d/containerd.sock CONTAINERD_NAMESPACE=default HUSK_CTRD_ADDR=$d/containerd.sock HUSK_CTRD_NS=default
env -u HUSK_CONFIG PATH=$path containerd --config /etc/containerd/config.toml --root "$d/root" --state "$d/state" \
  --address "$d/containerd.sock" </dev/null >"$out/containerd.log" 2>&1 &
ctrd=$!
cleanup() {
  stall_unwatch
  for id in $(ctr tasks ls -q 2>/dev/null); do ctr tasks kill -s SIGKILL "$id" >/dev/null 2>&1; ctr tasks delete -f "$id" >/dev/null 2>&1; done
  kill "$ctrd" 2>/dev/null
  wait "$ctrd" 2>/dev/null
  findmnt -rn -o TARGET | grep "^$d" | sort -r | xargs -r -n1 umount -l
}
trap cleanup EXIT
for _ in $(seq 300); do ctr version >/dev/null 2>&1 && break; sleep 0.1; done
want "containerd answers" bash -c "ctr version >/dev/null"
want "its CRI plugin loaded (husk's registration did not break it)" \
  bash -c "ctr plugins ls | grep -E '\\bcri\\b' | grep -qw ok"
want "the CRI plugin knows the runtime handler husk" \
  grep -q 'husk:{Type:io.containerd.husk.v2 .*ConfigPath:/etc/husk/configuration.toml' "$out/containerd.log"
tar=$("$repo/tests/shim/make-image.sh")
ctr images import "$tar" >/dev/null
want "busybox image imported" bash -c "ctr images ls -q | grep -qx $img"

export HUSK_SHIM_STATE_DIR=/run/husk
# The guest console, so that a silent guest (the nested machine's stall) is
# told from a failure: exit 75 and a fresh test machine (tests/lib/common.sh).
sed -i 's/^#* *debug_console *=.*/debug_console = true/' /etc/husk/configuration.toml
stall_watch /run/husk
for rt in io.containerd.husk.v2 io.containerd.kata.v2; do
  echo "==== ctr run --rm --runtime $rt"
  o=$(timeout 240 ctr run --rm --runtime "$rt" "$img" "t-${rt//./-}" sh -c 'uname -r; cat /proc/sys/kernel/random/boot_id' 2>&1)
  rc=$?
  indent '      out| ' <<<"$o"
  want "exit 0" [ "$rc" = 0 ]
  want "uname -r is the guest kernel's ($guest_release)" [ "$(sed -n 1p <<<"$o")" = "$guest_release" ]
  want "boot id is not this machine's: it ran in a VM" [ -n "$(sed -n 2p <<<"$o")" -a "$(sed -n 2p <<<"$o")" != "$l1_boot" ]
  want "nothing left behind" husk_wait_clean /run/husk 30
done

if [ "$want_failed" != 0 ]; then
  echo "---- containerd log (last 60 lines without debug):"
  grep -v 'level=debug' "$out/containerd.log" | tail -n 60 | cut -c1-600 | indent '    log| '
  echo "FAIL shim-install: $want_failed failed"
  exit 1
fi
echo "PASS shim-install"
