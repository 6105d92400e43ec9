#!/usr/bin/env bash
# timeout: 600
# husk-vmm's virtio devices against the real guest kernel: a disk written in
# the guest reads back on the host, a read-only disk refuses writes, the guest
# reads entropy from virtio-rng, and host and guest programs talk over vsock
# both ways (Firecracker's hybrid vsock: CONNECT on the VMM's Unix socket for
# host-to-guest, <socket>_PORT for guest-to-host), and the guest pings the
# host through virtio-net on a tap. Every thread of the running VMM is under
# its seccomp filter, and serves all of that. Nothing is left behind. The
# bzImage boots here (vmm-boot covers the PVH entry, which can stall when
# nested).
set -euo pipefail
source "$HUSK_REPO/tests/lib/common.sh"
[ -c /dev/kvm ] || fail "no /dev/kvm"
work=$(mktemp -d /tmp/vmm-devices.XXXXXX)
console="$HUSK_OUT/vmm-devices.console"
truncate -s 16M "$work/disk.img"
printf 'husk-readonly-bytes\n' | dd of="$work/ro.img" bs=512 conv=sync 2>/dev/null
truncate -s 1M "$work/ro.img"
ro_sum=$(sha256sum <"$work/ro.img")
uds="$work/vsock.sock"
tap=husktap$$
ip tuntap add dev "$tap" mode tap
ip addr add 169.254.100.1/24 dev "$tap"
ip link set "$tap" up
trap 'ip link del "$tap" 2>/dev/null || true' EXIT
cat >"$work/vm.json" <<JSON
{
  "vcpus": 1,
  "memory_mib": 128,
  "kernel": {
    "path": "$HUSK_GUEST_KERNEL/bzImage",
    "initrd": "$HUSK_TEST_INITRD",
    "cmdline": "console=ttyS0 panic=-1 husk.test=disk,disk-ro,rng,vsock,net"
  },
  "serial": { "output": "file", "path": "$console" },
  "block": [
    { "id": "data", "path": "$work/disk.img", "read_only": false, "serial": "husk-data" },
    { "id": "ro", "path": "$work/ro.img", "read_only": true }
  ],
  "vsock": { "guest_cid": 3, "uds_path": "$uds" },
  "net": [ { "id": "eth0", "tap": "$tap", "mac": "06:00:ac:10:00:02" } ],
  "rng": true
}
JSON

python3 "$HUSK_REPO/tests/lib/vsock_host.py" serve "$uds" 6000 >"$work/serve.out" 2>&1 &
server=$!
start=$(now_ms)
: >"$console"
"$HUSK_VMM" --config "$work/vm.json" 2>"$work/vmm.log" &
vmm=$!
set +e
# A guest that stays silent is the nested machine's stall (exit 75: the
# runner boots a fresh test machine).
await_console "$vmm" "$console"
rc=$?
if [ "$rc" -ne 0 ]; then
  kill "$server" 2>/dev/null
  [ "$rc" -eq "$STALLED" ] && exit "$STALLED"
  sed 's/^/    vmm| /' "$work/vmm.log"
  fail "husk-vmm ended before its guest printed anything"
fi
# seccomp: the guest runs, so the main thread and vcpu0 have installed
# their filters; every thread must be in filter mode (Seccomp: 2).
threads=0
for status in /proc/"$vmm"/task/*/status; do
  mode=$(awk '/^Seccomp:/ { print $2 }' "$status" 2>/dev/null)
  name=$(awk '/^Name:/ { print $2 }' "$status" 2>/dev/null)
  if [ "$mode" != 2 ]; then
    kill "$server" "$vmm" 2>/dev/null
    fail "husk-vmm thread ${name:-?} ($status) has Seccomp: ${mode:-none}, not 2"
  fi
  threads=$((threads + 1))
done
[ "$threads" -ge 2 ] || { kill "$server" "$vmm" 2>/dev/null; fail "husk-vmm has $threads threads, not main + vcpu0"; }
echo "seccomp: all $threads husk-vmm threads in filter mode"
timeout 300 python3 "$HUSK_REPO/tests/lib/vsock_host.py" connect "$uds" 5000 ping >"$work/connect.out" 2>&1
connect_rc=$?
timeout 300 tail --pid="$vmm" -f /dev/null
wait "$vmm"
rc=$?
wait "$server"
server_rc=$?
set -e
echo "VM ran $(( $(now_ms) - start )) ms"
sed 's/^/    guest| /' "$console"
sed 's/^/    host| /' "$work/serve.out" "$work/connect.out"
[ "$rc" -eq 0 ] || { sed 's/^/    vmm| /' "$work/vmm.log"; fail "husk-vmm exited $rc"; }

expect_line "$console" '^HUSK_GUEST_DONE' >/dev/null
# virtio-blk: the guest's bytes on the host, the read-only disk untouched.
expect_line "$console" '^HUSK_TEST disk written' >/dev/null
got=$(dd if="$work/disk.img" bs=512 skip=8 count=1 2>/dev/null | tr -d '\0' | head -n1)
[ "$got" = "husk-disk-ok $(cat "$HUSK_GUEST_KERNEL/kernel.release")" ] || fail "disk sector 8 holds '$got'"
expect_line "$console" '^HUSK_TEST disk-ro read: husk-readonly-bytes$' >/dev/null
[ "$(sha256sum <"$work/ro.img")" = "$ro_sum" ] || fail "the read-only disk image changed"
# virtio-rng: the guest's hw_random uses it and reads 16 bytes, not all zero.
rng=$(expect_line "$console" '^HUSK_TEST rng ')
[[ "$rng" =~ ^HUSK_TEST\ rng\ virtio_rng\.[0-9]+\ ([0-9a-f]{32})$ ]] || fail "rng line: $rng"
[ "${BASH_REMATCH[1]}" != "00000000000000000000000000000000" ] || fail "rng gave zeros"
# virtio-vsock both ways.
[ "$server_rc" -eq 0 ] || fail "the host listener saw no guest connection"
expect_line "$console" '^HUSK_TEST vsock guest->host reply: pong:hello-from-guest$' >/dev/null
[ "$connect_rc" -eq 0 ] || fail "host-to-guest vsock connection failed"
grep -q "host got reply 'pong:ping'" "$work/connect.out" || fail "host-to-guest reply missing"
expect_line "$console" '^HUSK_TEST vsock host->guest done' >/dev/null

# virtio-net: the guest reached the host's tap address, with the MAC we gave.
expect_line "$console" '^HUSK_TEST net ping ok 06:00:ac:10:00:02$' >/dev/null

no_leftovers husk-vmm "$uds"
ip link del "$tap"
trap - EXIT
rm -rf "$work"
echo "PASS vmm-devices"
