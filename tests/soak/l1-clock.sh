#!/usr/bin/env bash
# How the test machine's kernel finds its TSC frequency, over N bare L1 boots
# (no scenario, no nested guest: a few seconds each), on an idle host or with
# LOAD busy loops beside it, with the runner's clock settings and without:
#
#   tests/soak/l1-clock.sh [N] [LOAD]        # default 10 boots, 2 busy loops
#
# An L1 that prints "Marking TSC unstable due to could not calculate TSC khz"
# has no TSC frequency, and its KVM never enters a nested guest (the stall;
# README, "The test machine").
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
n=${1:-10}
load=${2:-2}
# shellcheck source=/dev/null
source "$repo/target/husk-artifacts.env"
work=$(mktemp -d /tmp/husk-l1-clock.XXXXXX)
loops=()
cleanup() {
  [ ${#loops[@]} -eq 0 ] || kill "${loops[@]}" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/root/bin"
cp /bin/busybox "$work/root/bin/"
cat >"$work/root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox dmesg | /bin/busybox grep -E 'tsc:'
/bin/busybox reboot -f
INIT
chmod +x "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc 2>/dev/null | gzip >"$work/initrd.gz")
khz=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)

for _ in $(seq "$load"); do (while :; do :; done) & loops+=($!); done
for append in "" "tsc_early_khz=$khz nohz=off highres=off"; do
  without=0
  for i in $(seq "$n"); do
    o=$(timeout 120 qemu-system-x86_64 -accel tcg,thread=multi -M pc -cpu max -smp 2 -m 1024 \
      -nodefaults -no-user-config -display none -no-reboot -serial stdio \
      -kernel "$HUSK_TESTVM_KERNEL/bzImage" -initrd "$work/initrd.gz" \
      -append "console=ttyS0 panic=-1 $append" </dev/null 2>&1 | tr -d '\r')
    if grep -q 'could not calculate TSC khz' <<<"$o"; then
      without=$((without + 1))
      echo "[l1-clock] '${append:-(none)}' boot $i: NO TSC frequency ($(grep -m1 'Unable to calibrate' <<<"$o"))"
    else
      echo "[l1-clock] '${append:-(none)}' boot $i: $(grep -E 'tsc: Detected' <<<"$o" | tail -n 1)"
    fi
  done
  echo "L1_CLOCK append='${append:-(none)}' load=$load boots=$n without_tsc_frequency=$without"
done
