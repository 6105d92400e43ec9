#!/usr/bin/env bash
# timeout: 900
# husk-vmm snapshots a running Linux guest and restores it into new VMM
# processes. The guest (husk.test=snapshot in tests/guest-init.sh) keeps a
# random value in a tmpfs file and prints a tick a second with a counter,
# its uptime and the value; it answers vsock port 5000. A host connection
# is left open across the snapshot: the restored VMM resets the guest's
# vsock transport, so that connection ends in the guest and a new one is
# answered. Then: two clones restored from the same snapshot at once, both
# running; a restore with another memory size and one from a corrupted
# state file, both refused. Prints the restore-to-responsive time next to
# the cold boot's. Last, a VM with virtio-fs restored through --restore-fds
# (see part 6).
set -euo pipefail
source "$HUSK_REPO/tests/lib/common.sh"
[ -c /dev/kvm ] || fail "no /dev/kvm"
work=$(mktemp -d /tmp/vmm-snapshot.XXXXXX)
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
truncate -s 8M "$work/disk.img"

# config NAME MEMORY_MIB: vm.json of VM NAME (its own console, control
# socket and vsock socket in $work/NAME.*).
config() {
  cat >"$work/$1.json" <<JSON
{
  "vcpus": 1,
  "memory_mib": $2,
  "kernel": {
    "path": "$HUSK_GUEST_KERNEL/bzImage",
    "initrd": "$HUSK_TEST_INITRD",
    "cmdline": "console=ttyS0 panic=-1 husk.test=snapshot"
  },
  "serial": { "output": "file", "path": "$HUSK_OUT/vmm-snapshot-$1.console" },
  "control_socket": "$work/$1.ctl",
  "block": [ { "id": "data", "path": "$work/disk.img", "read_only": false } ],
  "vsock": { "guest_cid": 3, "uds_path": "$work/$1.vsock" },
  "rng": true
}
JSON
}
console() { echo "$HUSK_OUT/vmm-snapshot-$1.console"; }
ctl() {
  python3 - "$work/$1.ctl" "$2" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(300)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
print(s.makefile("rb").readline().decode().strip())
PY
}
# start NAME [ARGS...]: starts VM NAME's VMM in the background ($vmm_pid).
start() {
  local name=$1
  shift
  : >"$(console "$name")"
  "$HUSK_VMM" --config "$work/$name.json" "$@" 2>"$work/$name.log" &
  vmm_pid=$!
  pids+=("$vmm_pid")
}
# wait_line NAME PID PATTERN SECS: waits for a console line of VM NAME.
wait_line() {
  local c deadline=$(( $(now_ms) + $4 * 1000 ))
  c=$(console "$1")
  until tr -d '\r' <"$c" | grep -a -q -E "$3"; do
    kill -0 "$2" 2>/dev/null || { indent "    $1 guest| " <"$c"; indent "    $1 vmm| " <"$work/$1.log"; fail "$1: husk-vmm ended waiting for /$3/"; }
    [ "$(now_ms)" -lt "$deadline" ] || { indent "    $1 guest| " <"$c"; indent "    $1 vmm| " <"$work/$1.log"; fail "$1: no /$3/ in $4 s"; }
    sleep 0.1
  done
}
# A complete tick line: the console file also holds a line the guest is
# still printing (the VMM writes out a partial line when the event loop
# wakes), which must not be read as a tick with a changed value.
tick_re='^HUSK_TEST snapshot tick [0-9]+ uptime=[0-9.]+ value=[0-9a-f]{32}$'
last_tick() { tr -d '\r' <"$(console "$1")" | grep -a -E "$tick_re" | tail -n 1; }
tick_n() { sed -n 's/^HUSK_TEST snapshot tick \([0-9]*\) .*/\1/p' <<<"$1"; }
tick_uptime() { sed -n 's/.* uptime=\([0-9.]*\) .*/\1/p' <<<"$1"; }
# probe NAME: a new host connection to guest port 5000 answers.
probe() {
  timeout 120 python3 "$HUSK_REPO/tests/lib/vsock_host.py" connect "$work/$1.vsock" 5000 "ping-$1" >"$work/$1.probe" 2>&1 &&
    grep -q "host got reply 'pong:ping-$1'" "$work/$1.probe"
}

# 1. Cold boot to the first tick.
config a 128
boot_t0=$(now_ms)
start a
a=$vmm_pid
set +e
await_console "$a" "$(console a)"
rc=$?
set -e
if [ "$rc" -ne 0 ]; then
  [ "$rc" -eq "$STALLED" ] && exit "$STALLED"
  indent "    vmm| " <"$work/a.log"
  fail "husk-vmm ended before its guest printed anything"
fi
wait_line a "$a" '^HUSK_TEST snapshot tick 1 ' 300
cold_ms=$(( $(now_ms) - boot_t0 ))
value=$(tr -d '\r' <"$(console a)" | sed -n 's/^HUSK_TEST snapshot value \([0-9a-f]*\)$/\1/p')
[ ${#value} -eq 32 ] || fail "no value line in the guest's console"
probe a || { cat "$work/a.probe"; fail "vsock probe of the booted guest"; }
wait_line a "$a" '^HUSK_TEST snapshot tick 3 ' 120
echo "cold boot to the first tick: $cold_ms ms; the guest's value is $value"

# 2. A host connection left open, then the snapshot (the VM stays paused).
python3 "$HUSK_REPO/tests/lib/vsock_host.py" open "$work/a.vsock" 5000 >"$work/open.out" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q '^open' "$work/open.out" && break; sleep 0.1; done
grep -q '^open' "$work/open.out" || { cat "$work/open.out"; fail "the held vsock connection did not open"; }
sleep 1
reply=$(ctl a "{\"op\":\"snapshot\",\"path\":\"$work/snap\"}")
echo "snapshot reply: $reply"
[[ "$reply" == *'"ok":true'* && "$reply" == *'"state":"paused"'* ]] || { indent "    vmm| " <"$work/a.log"; fail "snapshot failed: $reply"; }
snap_ms=$(sed -n 's/.*"duration_ms":\([0-9]*\).*/\1/p' <<<"$reply")
[ "$(stat -c %a "$work/snap")" = 700 ] || fail "snapshot folder mode $(stat -c %a "$work/snap")"
for f in state memory; do
  [ "$(stat -c %a "$work/snap/$f")" = 600 ] || fail "snapshot $f mode $(stat -c %a "$work/snap/$f")"
done
state_bytes=$(stat -c %s "$work/snap/state")
mem_bytes=$(stat -c %s "$work/snap/memory")
mem_disk=$(( $(stat -c %b "$work/snap/memory") * $(stat -c %B "$work/snap/memory") ))
before=$(last_tick a)
sleep 2
[ "$(last_tick a)" = "$before" ] || fail "the guest ticked while paused"
kill -KILL "$a"
wait "$a" 2>/dev/null || true
echo "snapshot: ${snap_ms} ms; state file $state_bytes bytes; memory file $mem_bytes bytes ($mem_disk on disk, sparse)"
echo "last tick before the snapshot: $before"

# 3. Restore into a new process: the guest carries on.
rm -f "$work/a.ctl" "$work/a.vsock"
config b 128
restore_t0=$(now_ms)
start b --restore "$work/snap"
b=$vmm_pid
n_before=$(tick_n "$before")
# The snapshot may have paused the guest in the middle of printing the next
# tick; the restored guest then prints that line's rest, and its first
# whole tick is the one after.
n_first=$((n_before + 1))
if [ -n "$(tail -c 1 "$(console a)")" ] && tr -d '\r' <"$(console a)" | tail -n 1 | grep -a -q '^HUSK_TEST snapshot tick'; then
  n_first=$((n_before + 2))
  echo "the snapshot caught tick $((n_before + 1)) half printed"
fi
wait_line b "$b" "^HUSK_TEST snapshot tick $n_first " 120
tick_ms=$(( $(now_ms) - restore_t0 ))
grep -q "VM state restored from the snapshot" "$work/b.log" || fail "b: no restore line in the VMM log"
grep -q "vsock: transport reset sent to the guest" "$work/b.log" || { indent "    vmm| " <"$work/b.log"; fail "b: no vsock transport reset"; }
if grep -a -q -E 'HUSK_GUEST_READY|Linux version' "$(console b)"; then fail "b: the guest booted again"; fi
after=$(tr -d '\r' <"$(console b)" | grep -a -m1 -E "$tick_re")
echo "first tick after the restore: $after"
[ "$(tick_n "$after")" -eq "$n_first" ] || fail "tick counter went from $n_before to $(tick_n "$after")"
[[ "$after" == *"value=$value" ]] || fail "the tmpfs value changed: $after"
awk -v a="$(tick_uptime "$before")" -v b="$(tick_uptime "$after")" 'BEGIN { exit !(b >= a && b - a < 30) }' ||
  fail "guest uptime went from $(tick_uptime "$before") to $(tick_uptime "$after")"
probe b || { cat "$work/b.probe"; indent "    guest| " <"$(console b)"; fail "b: vsock probe after the restore"; }
# The connection held open across the snapshot was reset in the guest.
grep -a -q '^HUSK_TEST snapshot vsock connection ended in an error' "$(console b)" ||
  { indent "    guest| " <"$(console b)"; fail "b: the guest's open vsock connection was not reset"; }
if grep -a -q 'vsock connection ended' "$(console a)"; then fail "a: a vsock connection failed before the snapshot"; fi
responsive_ms=$(( $(now_ms) - restore_t0 ))
echo "restore: next tick after $tick_ms ms, vsock answered after $responsive_ms ms (cold boot to first tick: $cold_ms ms)"
kill "$b"
wait "$b" 2>/dev/null || true

# 4. Two clones of the same snapshot at once.
config c1 128
config c2 128
start c1 --restore "$work/snap"
c1=$vmm_pid
start c2 --restore "$work/snap"
c2=$vmm_pid
for c in c1 c2; do
  pid=$c1
  [ "$c" = c2 ] && pid=$c2
  wait_line "$c" "$pid" "^HUSK_TEST snapshot tick $((n_before + 3)) " 120
  probe "$c" || { cat "$work/$c.probe"; fail "$c: vsock probe"; }
  tick=$(last_tick "$c")
  [[ "$tick" == *"value=$value" ]] || fail "$c: the value changed: $tick"
done
rss() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }
echo "two clones run: RSS c1 $(rss "$c1") kB, c2 $(rss "$c2") kB (guest memory 128 MiB, mapped copy-on-write from one file)"
kill "$c1" "$c2"
wait "$c1" "$c2" 2>/dev/null || true

# 5. Refusals: another memory size; a corrupted state file.
config big 256
set +e
"$HUSK_VMM" --config "$work/big.json" --restore "$work/snap" 2>"$work/big.log"
rc=$?
set -e
[ "$rc" -eq 1 ] || fail "a 256 MiB restore of a 128 MiB snapshot exited $rc"
grep -q "memory_mib: 128 in the snapshot, 256 in the config" "$work/big.log" || { cat "$work/big.log"; fail "no shape error"; }
echo "refused: $(grep -o 'cannot start the VM.*' "$work/big.log")"
mkdir "$work/bad"
cp "$work/snap/state" "$work/bad/state"
ln -s "$work/snap/memory" "$work/bad/memory"
size=$(stat -c %s "$work/bad/state")
printf '\x5a' | dd of="$work/bad/state" bs=1 seek=$((size / 2)) conv=notrunc 2>/dev/null
config bad 128
set +e
"$HUSK_VMM" --config "$work/bad.json" --restore "$work/bad" 2>"$work/bad.log"
rc=$?
set -e
[ "$rc" -eq 1 ] || fail "a corrupted snapshot restore exited $rc"
grep -q "checksum mismatch" "$work/bad.log" || { cat "$work/bad.log"; fail "no checksum error"; }
echo "refused: $(grep -o 'cannot start the VM.*' "$work/bad.log")"
for s in bad big; do [ ! -e "$work/$s.ctl" ] || fail "the refused restore $s left its control socket"; done

# 6. virtio-fs: a VM whose guest has not mounted its share yet
# (husk.test=snapshot-fs) is snapshotted, and restored from inherited file
# descriptors (--restore-fds, as the jailed shim does) against a fresh
# virtiofsd on another folder; the guest then mounts and reads the new
# folder's file. A snapshot after the mount is refused, and the VM runs on.
virtiofsd=/usr/local/bin/virtiofsd
[ -x "$virtiofsd" ] || fail "$virtiofsd is missing (scripts/setup.sh installs it)"
# vfsd NAME: virtiofsd sharing $work/NAME.share (a file "hello" holding
# NAME) on $work/NAME.vfsd ($vfsd_pid).
vfsd() {
  mkdir -p "$work/$1.share"
  echo "$1" >"$work/$1.share/hello"
  "$virtiofsd" --socket-path "$work/$1.vfsd" --shared-dir "$work/$1.share" \
    --sandbox none --cache never --log-level warn 2>"$work/$1.vfsd.log" &
  vfsd_pid=$!
  pids+=("$vfsd_pid")
  for _ in $(seq 100); do [ -S "$work/$1.vfsd" ] && return 0; sleep 0.1; done
  cat "$work/$1.vfsd.log"
  fail "virtiofsd $1 did not start"
}
# config_fs NAME SHARE: vm.json of VM NAME with a virtio-fs device served
# by virtiofsd SHARE.
config_fs() {
  cat >"$work/$1.json" <<JSON
{
  "vcpus": 1,
  "memory_mib": 128,
  "kernel": {
    "path": "$HUSK_GUEST_KERNEL/bzImage",
    "initrd": "$HUSK_TEST_INITRD",
    "cmdline": "console=ttyS0 panic=-1 husk.test=snapshot-fs"
  },
  "serial": { "output": "file", "path": "$HUSK_OUT/vmm-snapshot-$1.console" },
  "control_socket": "$work/$1.ctl",
  "fs": [ { "tag": "husk-fs", "socket": "$work/$2.vfsd" } ],
  "vsock": { "guest_cid": 3, "uds_path": "$work/$1.vsock" }
}
JSON
}
trigger() {
  timeout 120 python3 "$HUSK_REPO/tests/lib/vsock_host.py" connect "$work/$1.vsock" 5001 go >"$work/$1.trigger" 2>&1 || true
}
vfsd old
config_fs f old
fs_t0=$(now_ms)
start f
f=$vmm_pid
wait_line f "$f" '^HUSK_TEST snapshot-fs waiting' 300
fs_cold_ms=$(( $(now_ms) - fs_t0 ))
sleep 1
reply=$(ctl f "{\"op\":\"snapshot\",\"path\":\"$work/fsnap\",\"resume\":false}")
echo "virtio-fs snapshot (share not mounted) reply: $reply"
[[ "$reply" == *'"ok":true'* ]] || { indent "    vmm| " <"$work/f.log"; fail "virtio-fs snapshot failed: $reply"; }
kill -KILL "$f" "$vfsd_pid"
wait "$f" "$vfsd_pid" 2>/dev/null || true
vfsd new
config_fs g new
fs_restore_t0=$(now_ms)
: >"$(console g)"
"$HUSK_VMM" --config "$work/g.json" --restore-fds 3,4 3<"$work/fsnap/state" 4<"$work/fsnap/memory" 2>"$work/g.log" &
g=$!
pids+=("$g")
trigger g
wait_line g "$g" '^HUSK_TEST snapshot-fs (hello|mount)' 120
fs_restore_ms=$(( $(now_ms) - fs_restore_t0 ))
line=$(tr -d '\r' <"$(console g)" | grep -a -m1 '^HUSK_TEST snapshot-fs (hello|mount)' -E)
echo "after the restore and the trigger: $line"
[ "$line" = "HUSK_TEST snapshot-fs hello=new" ] || { indent "    guest| " <"$(console g)"; indent "    vmm| " <"$work/g.log"; fail "the restored guest did not read the new share"; }
if grep -a -q 'Linux version' "$(console g)"; then fail "g: the guest booted again"; fi
reply=$(ctl g "{\"op\":\"snapshot\",\"path\":\"$work/fsnap2\"}")
echo "virtio-fs snapshot after the mount: $reply"
[[ "$reply" == *'"ok":false'* && "$reply" == *'the guest has used the virtio-fs device'* && "$reply" == *'virtiofsd'* ]] ||
  fail "a snapshot after the mount was not refused as expected: $reply"
[ ! -e "$work/fsnap2" ] || fail "the refused snapshot left $work/fsnap2"
status=$(ctl g '{"op":"status"}')
[[ "$status" == *'"state":"running"'* ]] || fail "after the refused snapshot: $status"
kill -0 "$g" || fail "g ended after the refused snapshot"
echo "virtio-fs: cold boot to waiting $fs_cold_ms ms; restore (--restore-fds, shared memfd) to the guest reading the new share $fs_restore_ms ms"
kill "$g"
wait "$g" 2>/dev/null || true

cleanup
trap - EXIT
no_leftovers husk-vmm "$work/b.ctl" "$work/b.vsock" "$work/c1.ctl" "$work/c2.ctl"
echo "numbers: cold boot to first tick $cold_ms ms; snapshot $snap_ms ms (state $state_bytes B, memory $mem_disk B on disk of $mem_bytes); restore to next tick $tick_ms ms, to a vsock answer $responsive_ms ms"
rm -rf "$work"
echo "PASS vmm-snapshot"
