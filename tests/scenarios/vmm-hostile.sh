#!/usr/bin/env bash
# timeout: 600
# A hostile guest next to a normal one. VM A runs a hostile guest kernel
# (vmm/tests/guests/hostile.S, assembled here: garbage to every register of
# every virtio-mmio device at every width, descriptor chains that loop,
# overlap, point outside RAM or wrap past 2^64, rings outside RAM, UART
# register garbage, then up to 100 MiB of garbage to the serial port) for
# HUSK_HOSTILE_SECS (default 60) seconds; VM B runs the real kernel and
# answers vsock pings. Asserts: A's VMM keeps answering its control socket
# and stays up, its own memory (RSS outside guest RAM) grows by less than
# 5% from 15 s into the attack to its end, its log and console stay
# under their caps, its status counts the suppressed lines and the dropped
# console bytes; B answers over vsock before, during and after. Prints the
# numbers.
set -euo pipefail
source "$HUSK_REPO/tests/lib/common.sh"
[ -c /dev/kvm ] || fail "no /dev/kvm"
work=$(mktemp -d /tmp/vmm-hostile.XXXXXX)
console_a="$HUSK_OUT/vmm-hostile.console"
console_b="$HUSK_OUT/vmm-hostile-normal.console"
hostile_secs=${HUSK_HOSTILE_SECS:-60}
# A's console limits, small so that both bite within the run; its log
# keeps the VMM's defaults (4 MiB, 10 lines per kind then 1 a second).
console_max=65536
console_rate=4096
log_max=$(( 4 << 20 ))

guests="$HUSK_REPO/vmm/tests/guests"
cc -nostdlib -static -no-pie -Wl,--build-id=none "-Wl,-T,$guests/guest.ld" \
  -DFLOOD_BYTES=$(( 100 << 20 )) -o "$work/hostile" "$guests/hostile.S"
truncate -s 1M "$work/disk.img"

cat >"$work/a.json" <<JSON
{
  "vcpus": 1,
  "memory_mib": 64,
  "kernel": { "path": "$work/hostile" },
  "serial": { "output": "file", "path": "$console_a", "max_bytes": $console_max, "bytes_per_sec": $console_rate },
  "block": [ { "id": "disk0", "path": "$work/disk.img" } ],
  "vsock": { "guest_cid": 3, "uds_path": "$work/a.vsock" },
  "rng": true,
  "balloon": { "free_page_reporting": true },
  "control_socket": "$work/a.ctl"
}
JSON
cat >"$work/b.json" <<JSON
{
  "vcpus": 1,
  "memory_mib": 128,
  "kernel": {
    "path": "$HUSK_GUEST_KERNEL/bzImage",
    "initrd": "$HUSK_TEST_INITRD",
    "cmdline": "console=ttyS0 panic=-1 husk.test=vsock-serve"
  },
  "serial": { "output": "file", "path": "$console_b" },
  "vsock": { "guest_cid": 3, "uds_path": "$work/b.vsock" },
  "control_socket": "$work/b.ctl"
}
JSON

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
# own_kib PID GUEST_KIB: the VMM's RSS outside guest RAM (its one mapping
# of GUEST_KIB), which the guest may fill up to its size.
own_kib() {
  awk -v g="$2" '/^Size:/ { size = $2 } /^Rss:/ { if (size != g) t += $2 } END { print t + 0 }' "/proc/$1/smaps"
}
# ctl SOCKET JSON: one control request; prints the reply line (10 s at most).
ctl() {
  python3 - "$1" "$2" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
print(s.makefile("rb").readline().decode().strip())
PY
}
# field JSON PATH...: a value out of a status reply ("" if absent).
field() {
  python3 -c 'import json, sys
v = json.loads(sys.argv[1])
for k in sys.argv[2:]:
    v = v.get(k, {}) if isinstance(v, dict) else {}
print(v if v != {} else "")' "$@"
}
# ping_b: one vsock round trip to B's guest (60 s at most).
pings=0
ping_b() {
  local out
  out=$(timeout 60 python3 "$HUSK_REPO/tests/lib/vsock_host.py" connect "$work/b.vsock" 5000 "ping$pings" 2>&1) ||
    fail "VM B did not answer over vsock: $out"
  [[ "$out" == *"'pong:ping$pings'"* ]] || fail "VM B answered: $out"
  pings=$(( pings + 1 ))
}
vm_a='' vm_b=''
cleanup() {
  for p in $vm_a $vm_b; do kill -KILL "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

: >"$console_b"
"$HUSK_VMM" --config "$work/b.json" 2>"$work/b.log" &
vm_b=$!
set +e
await_console "$vm_b" "$console_b"
rc=$?
set -e
if [ "$rc" -ne 0 ]; then
  [ "$rc" -eq "$STALLED" ] && exit "$STALLED"
  sed 's/^/    vmm-b| /' "$work/b.log"
  fail "VM B's husk-vmm ended before its guest printed anything"
fi
deadline=$(( $(now_ms) + 300000 ))
until grep -a -q '^HUSK_TEST vsock-serve' "$console_b"; do
  kill -0 "$vm_b" 2>/dev/null || { sed 's/^/    vmm-b| /' "$work/b.log"; fail "VM B ended"; }
  [ "$(now_ms)" -lt "$deadline" ] || { sed 's/^/    guest-b| /' "$console_b"; fail "VM B never served vsock"; }
  sleep 0.2
done
ping_b
rss_b0=$(rss_kib "$vm_b")

: >"$console_a"
"$HUSK_VMM" --config "$work/a.json" 2>"$work/a.log" &
vm_a=$!
set +e
await_console "$vm_a" "$console_a"
rc=$?
set -e
if [ "$rc" -ne 0 ]; then
  [ "$rc" -eq "$STALLED" ] && exit "$STALLED"
  sed 's/^/    vmm-a| /' "$work/a.log"
  fail "the hostile VM's husk-vmm ended before its guest printed anything"
fi
start=$(now_ms)
rss_a0=$(rss_kib "$vm_a")
own_a0=$(own_kib "$vm_a" 65536)
own_a15=
echo "hostile guest started; RSS A ${rss_a0} KiB (own ${own_a0} KiB), B ${rss_b0} KiB"

# The hostile guest runs; A must answer its control socket throughout, B
# its vsock pings.
slowest=0
while [ $(( $(now_ms) - start )) -lt $(( hostile_secs * 1000 )) ]; do
  kill -0 "$vm_a" 2>/dev/null || { sed 's/^/    vmm-a| /' "$work/a.log" | tail -n 40; fail "the hostile VM's husk-vmm ended"; }
  t0=$(now_ms)
  status=$(ctl "$work/a.ctl" '{"op":"status"}') || fail "A's control socket did not answer"
  t=$(( $(now_ms) - t0 ))
  [ "$t" -le "$slowest" ] || slowest=$t
  [ "$(field "$status" state)" = running ] || fail "A's status: $status"
  [ "$(field "$(ctl "$work/b.ctl" '{"op":"status"}')" state)" = running ] || fail "B is not running"
  ping_b
  if [ -z "$own_a15" ] && [ $(( $(now_ms) - start )) -ge 15000 ]; then own_a15=$(own_kib "$vm_a" 65536); fi
  sleep 5
done
rss_a1=$(rss_kib "$vm_a")
own_a1=$(own_kib "$vm_a" 65536)
rss_b1=$(rss_kib "$vm_b")
status=$(ctl "$work/a.ctl" '{"op":"status"}')
echo "after ${hostile_secs} s: RSS A ${rss_a0} -> ${rss_a1} KiB (own ${own_a0} -> ${own_a15} at 15 s -> ${own_a1}), B ${rss_b0} -> ${rss_b1} KiB; slowest status reply ${slowest} ms; B answered ${pings} vsock pings"
echo "A's status: $status"

# A stops cleanly when told to (its guest ignores Ctrl-Alt-Del: forced).
[ "$(field "$(ctl "$work/a.ctl" '{"op":"shutdown","timeout_ms":500}')" ok)" = True ] || fail "A refused shutdown"
set +e
timeout 30 tail --pid="$vm_a" -f /dev/null
wait "$vm_a"
rc_a=$?
set -e
vm_a=
log_a=$(stat -c %s "$work/a.log")
con_a=$(stat -c %s "$console_a")
echo "A: exit $rc_a, vmm.log ${log_a} bytes (cap ${log_max}), console ${con_a} bytes (cap ${console_max})"
echo "A's log, warnings per message:"
grep ' WARN ' "$work/a.log" | sed -E 's/^[^ ]+ +WARN +[^ ]+ +[^ ]+ //; s/ (suppressed|offset|value|len|error|index|head|queue|old|new|addr|port|sel|op|type_|fd)=.*//' |
  sort | uniq -c | sort -rn | sed 's/^/    /' | head -n 30
[ "$rc_a" -eq 0 ] || { tail -n 20 "$work/a.log"; fail "A's husk-vmm exited $rc_a"; }
tail -n 1 "$work/a.log" | grep -q 'VM stopped: Requested' || fail "A's log does not end with why it stopped"

# Bounds.
[ "$log_a" -le "$log_max" ] || fail "A's log is ${log_a} bytes, over its cap"
[ "$con_a" -le "$console_max" ] || fail "A's console is ${con_a} bytes, over its cap"
[ $(( own_a1 * 100 )) -lt $(( ${own_a15:-$own_a0} * 105 )) ] || fail "A's own memory grew from ${own_a15:-$own_a0} to ${own_a1} KiB (5% or more)"
mmio_suppressed=$(field "$status" counters guest_faults mmio suppressed)
[ "${mmio_suppressed:-0}" -gt 0 ] || fail "no suppressed register-fault lines counted: $status"
grep -q 'suppressed=' "$work/a.log" || fail "A's log never says how many lines it suppressed"
for kind in queue request unmapped device; do
  [ "$(field "$status" counters guest_faults "$kind" events)" != "" ] || fail "no $kind faults counted: $status"
done
dropped=$(( $(field "$status" counters console dropped_rate_bytes) + $(field "$status" counters console dropped_cap_bytes) ))
[ "$dropped" -gt 0 ] || fail "A's console dropped nothing: $status"
[ "$(field "$status" counters console written_bytes)" -le "$console_max" ] || fail "console written past the cap: $status"

# B is unharmed and still answers.
ping_b
[ "$(field "$(ctl "$work/b.ctl" '{"op":"shutdown","timeout_ms":500}')" ok)" = True ] || fail "B refused shutdown"
set +e
timeout 30 tail --pid="$vm_b" -f /dev/null
wait "$vm_b"
rc_b=$?
set -e
vm_b=
[ "$rc_b" -eq 0 ] || { tail -n 20 "$work/b.log"; fail "B's husk-vmm exited $rc_b"; }
trap - EXIT
no_leftovers husk-vmm "$work/a.ctl" "$work/b.ctl" "$work/a.vsock" "$work/b.vsock"
rm -rf "$work"
echo "PASS vmm-hostile"
