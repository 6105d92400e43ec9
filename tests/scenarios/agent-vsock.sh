#!/usr/bin/env bash
# timeout: 900
# End to end in the test machine: QEMU with -accel kvm boots the guest
# kernel with the product initramfs (husk-agent as /init) and a vhost-vsock
# device (microvm without ACPI, so that QEMU names its virtio-mmio devices
# on the kernel command line); agent-client, in the L1, reaches the agent over vsock, runs a
# busybox container in the guest and checks that its `uname -r` is the
# guest kernel's. DestroySandbox then ends the VM. Run from the host:
#
#   cargo build --release -p husk-agent --example agent-client
#   tests/run.sh agent-vsock
set -euo pipefail
source "$HUSK_REPO/tests/lib/common.sh"
repo=${HUSK_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
client="$repo/target/release/examples/agent-client"
[ -x "$client" ] || { echo "FAIL: no $client"; exit 1; }
[ -c /dev/kvm ] || { echo "FAIL: no /dev/kvm"; exit 1; }
[ -c /dev/vhost-vsock ] || modprobe vhost_vsock 2>/dev/null || true
[ -c /dev/vhost-vsock ] || { echo "FAIL: no /dev/vhost-vsock"; exit 1; }
out=${HUSK_OUT:-$(mktemp -d)}
console="$out/guest-vsock.console"
cid=3
boot() {
  exec qemu-system-x86_64 -accel kvm -M microvm,acpi=off -cpu host -smp 1 -m 256 \
    -nodefaults -no-user-config -display none -no-reboot -serial "file:$console" \
    -kernel "$HUSK_GUEST_KERNEL/vmlinux" -initrd "$HUSK_INITRD" \
    -append "console=ttyS0 panic=-1 reboot=t husk.agent_port=1024" \
    -device "vhost-vsock-device,guest-cid=$cid" </dev/null
}
for attempt in $(seq "${HUSK_STALL_ATTEMPTS:-1}"); do
  rm -f "$console"
  boot &
  qemu=$!
  trap 'kill $qemu 2>/dev/null || true' EXIT
  rc=0
  await_console "$qemu" "$console" || rc=$?
  [ "$rc" -eq "$STALLED" ] || break
  echo "RETRY: boot attempt $attempt stalled"
done
[ "$rc" -ne "$STALLED" ] || { echo "FAIL: every boot stalled"; exit "$STALLED"; }
[ "$rc" -eq 0 ] || { echo "FAIL: the VM did not start (await_console $rc)"; exit 1; }
set +e
timeout 600 "$client" "vsock://$cid:1024" /bin/busybox
rc=$?
set -e
# DestroySandbox resets the guest, which ends QEMU.
for _ in $(seq 100); do kill -0 "$qemu" 2>/dev/null || break; sleep 0.1; done
sed 's/^/    guest| /' "$console" | tail -n 20
[ "$rc" -eq 0 ] || { echo "FAIL: agent-client exit $rc"; exit 1; }
kill -0 "$qemu" 2>/dev/null && { echo "FAIL: the VM did not end after DestroySandbox"; exit 1; }
echo "PASS agent-vsock"
