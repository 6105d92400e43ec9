#!/usr/bin/env bash
# timeout: 600
# Proves the test machine: /dev/kvm works here, and QEMU with -accel kvm
# boots husk's guest kernel and initramfs to the init's marker line, whose
# kernel release must be the one guest-kernel/build.sh produced.
set -euo pipefail
source "$HUSK_REPO/tests/lib/common.sh"

[ -c /dev/kvm ] || { echo "FAIL: no /dev/kvm"; exit 1; }
want=$(cat "$HUSK_GUEST_KERNEL/kernel.release")
console="$HUSK_OUT/boot-guest.console"

# QEMU's microvm has no i8042 and the guest kernel no ACPI: reboot=t makes the
# guest's reset a triple fault, which -no-reboot turns into QEMU's exit.
boot() {
  exec timeout 300 qemu-system-x86_64 -accel kvm -M microvm -cpu host -smp 1 -m 256 \
    -nodefaults -no-user-config -display none -no-reboot -serial stdio \
    -kernel "$HUSK_GUEST_KERNEL/vmlinux" -initrd "$HUSK_INITRD" \
    -append "console=ttyS0 panic=-1 reboot=t" </dev/null >"$console" 2>&1
}
# Watch the console for the marker to time it while the guest runs on.
vm_tick() {
  if [ -z "$marker_ms" ] && grep -q '^HUSK_GUEST_READY' "$console"; then
    marker_ms=$(( $(now_ms) - boot_start ))
  fi
}
marker_ms=
rc=0
boot_retrying "$console" boot || rc=$?
total_ms=$(( $(now_ms) - boot_start ))
sed 's/^/    guest| /' "$console"

# Every boot stalled: this test machine runs no guest (the runner reruns it).
[ "$rc" -ne "$STALLED" ] || exit "$STALLED"
line=$(grep -a '^HUSK_GUEST_READY' "$console" | tr -d '\r' || true)
[ -n "$line" ] || { echo "FAIL: no marker line on the guest console (qemu exit $rc)"; exit 1; }
got=$(sed -n 's/.*release=\([^ ]*\).*/\1/p' <<<"$line")
[ "$got" = "$want" ] || { echo "FAIL: guest kernel release '$got', expected '$want'"; exit 1; }
[ "$rc" -eq 0 ] || { echo "FAIL: qemu exited $rc after the guest reset (expected 0)"; exit 1; }
guest_uptime=$(sed -n 's/.*uptime=\([^ ]*\).*/\1/p' <<<"$line")
echo "nested guest: boot-to-marker ${marker_ms:-?} ms wall clock (guest uptime at marker ${guest_uptime}s), VM ended after ${total_ms} ms; release $got"
echo "PASS boot-guest"
