#!/usr/bin/env bash
# timeout: 600
# husk-vmm boots the project's kernel (the ELF vmlinux through its PVH entry,
# then the bzImage) and initramfs to the init's marker line, and exits 0 when
# the guest resets. Its control socket answers while the VM runs.
set -euo pipefail
source "$HUSK_REPO/tests/lib/common.sh"
[ -c /dev/kvm ] || fail "no /dev/kvm"
want=$(cat "$HUSK_GUEST_KERNEL/kernel.release")
work=$(mktemp -d /tmp/vmm-boot.XXXXXX)

for image in vmlinux bzImage; do
  console="$HUSK_OUT/vmm-boot-$image.console"
  cat >"$work/vm.json" <<JSON
{
  "vcpus": 2,
  "memory_mib": 128,
  "kernel": {
    "path": "$HUSK_GUEST_KERNEL/$image",
    "initrd": "$HUSK_INITRD",
    "cmdline": "console=ttyS0 panic=-1"
  },
  "serial": { "output": "file", "path": "$console" },
  "control_socket": "$work/control.sock"
}
JSON
  boot() { exec timeout 300 "$HUSK_VMM" --config "$work/vm.json" 2>"$work/vmm.log"; }
  rc=0
  boot_retrying "$console" boot || rc=$?
  [ "$rc" -ne "$STALLED" ] || exit "$STALLED"
  total=$(( $(now_ms) - boot_start ))
  sed 's/^/    guest| /' "$console"
  [ "$rc" -eq 0 ] || { sed 's/^/    vmm| /' "$work/vmm.log"; fail "$image: husk-vmm exited $rc (expected 0 after the guest reset)"; }
  line=$(expect_line "$console" '^HUSK_GUEST_READY')
  got=$(sed -n 's/.*release=\([^ ]*\).*/\1/p' <<<"$line")
  [ "$got" = "$want" ] || fail "$image: guest kernel release '$got', expected '$want'"
  grep -q 'smp: Brought up 1 node, 2 CPUs' "$console" || fail "$image: the guest did not bring up both vCPUs"
  echo "husk-vmm $image: marker at guest uptime ${line##*uptime=}s, VMM exited 0 after ${total} ms"
  no_leftovers husk-vmm "$work/control.sock"
done
rm -rf "$work"
echo "PASS vmm-boot"
