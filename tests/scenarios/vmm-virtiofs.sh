#!/usr/bin/env bash
# timeout: 420
# virtio-fs end to end: husk-vmm's vhost-user-fs device served by a real
# virtiofsd (/usr/local/bin/virtiofsd, scripts/setup.sh) sharing a host
# folder; the real guest kernel mounts it (`husk.test=virtiofs`,
# tests/guest-init.sh). Asserts: the guest reads a file the host wrote
# before boot; 20 files the guest wrote and fsynced are on the host with
# the guest's checksums; a file the host writes after the mount shows in
# the guest; then virtiofsd is killed with SIGKILL while the guest does
# I/O: the guest's I/O fails (within 30 s, no hang) and keeps failing, the
# VMM stays up (its control socket answers "running"), logs the loss once,
# and exits 0 when the guest resets. Prints a sequential-read line: the
# same 16 MiB through virtio-fs and through virtio-blk.
set -euo pipefail
source "$HUSK_REPO/tests/lib/common.sh"
[ -c /dev/kvm ] || fail "no /dev/kvm"
virtiofsd=/usr/local/bin/virtiofsd
[ -x "$virtiofsd" ] || fail "$virtiofsd is missing (scripts/setup.sh installs it)"
work=$(mktemp -d /tmp/vmm-virtiofs.XXXXXX)
share="$work/share"
mkdir -p "$share"
console="$HUSK_OUT/vmm-virtiofs.console"
echo "hello-from-host-$$" >"$share/from-host.txt"
head -c $((16 << 20)) /dev/urandom >"$share/big"
cp "$share/big" "$work/disk.img"

vfsd='' vmm=''
cleanup() {
  for p in $vmm $vfsd; do kill -KILL "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

# virtiofsd in its own namespaces when the test machine allows it.
start_virtiofsd() {
  local sandbox=$1
  rm -f "$work/vfsd.sock"
  "$virtiofsd" --socket-path "$work/vfsd.sock" --shared-dir "$share" \
    --sandbox "$sandbox" --cache never --log-level warn 2>"$work/virtiofsd.log" &
  vfsd=$!
  for _ in $(seq 100); do
    [ -S "$work/vfsd.sock" ] && return 0
    kill -0 "$vfsd" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}
if start_virtiofsd namespace; then
  echo "virtiofsd: --sandbox namespace"
else
  sed 's/^/    virtiofsd| /' "$work/virtiofsd.log"
  kill -KILL "$vfsd" 2>/dev/null || true
  start_virtiofsd none || { sed 's/^/    virtiofsd| /' "$work/virtiofsd.log"; fail "virtiofsd did not start"; }
  echo "virtiofsd: --sandbox none (namespaces refused here, see above)"
fi

cat >"$work/vm.json" <<JSON
{
  "vcpus": 1,
  "memory_mib": 256,
  "kernel": {
    "path": "$HUSK_GUEST_KERNEL/bzImage",
    "initrd": "$HUSK_TEST_INITRD",
    "cmdline": "console=ttyS0 panic=-1 husk.test=virtiofs"
  },
  "serial": { "output": "file", "path": "$console" },
  "block": [ { "id": "bench", "path": "$work/disk.img", "read_only": true } ],
  "fs": [ { "tag": "husk-fs", "socket": "$work/vfsd.sock", "queue_size": 256 } ],
  "control_socket": "$work/control.sock"
}
JSON

# ctl JSON: one control request; prints the reply line (10 s at most).
ctl() {
  python3 - "$work/control.sock" "$1" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
print(s.makefile("rb").readline().decode().strip())
PY
}
# wait_line PATTERN SECS: waits for a console line, failing if the VM ends.
wait_line() {
  local deadline=$(( $(now_ms) + $2 * 1000 ))
  until tr -d '\r' <"$console" | grep -a -q -E "$1"; do
    kill -0 "$vmm" 2>/dev/null || { sed 's/^/    guest| /' "$console"; sed 's/^/    vmm| /' "$work/vmm.log"; fail "husk-vmm ended waiting for /$1/"; }
    [ "$(now_ms)" -lt "$deadline" ] || { sed 's/^/    guest| /' "$console"; fail "no /$1/ in $2 s"; }
    sleep 0.1
  done
}

: >"$console"
"$HUSK_VMM" --config "$work/vm.json" 2>"$work/vmm.log" &
vmm=$!
set +e
await_console "$vmm" "$console"
rc=$?
set -e
if [ "$rc" -ne 0 ]; then
  [ "$rc" -eq "$STALLED" ] && exit "$STALLED"
  sed 's/^/    vmm| /' "$work/vmm.log"
  fail "husk-vmm ended before its guest printed anything"
fi

wait_line '^HUSK_TEST virtiofs (host-file|FAILED)' 180
got=$(expect_line "$console" '^HUSK_TEST virtiofs (host-file|FAILED)')
[ "$got" = "HUSK_TEST virtiofs host-file hello-from-host-$$" ] || fail "guest read: $got"
echo "guest read the host's file"

wait_line '^HUSK_TEST virtiofs written' 120
if grep -a -q 'HUSK_TEST virtiofs FAILED' "$console"; then fail "$(grep -a 'HUSK_TEST virtiofs FAILED' "$console" | head -n1)"; fi
sums=$(tr -d '\r' <"$console" | grep -a -c '^HUSK_TEST virtiofs sum ')
[ "$sums" -eq 20 ] || fail "the guest reported $sums checksums, expected 20"
# (A file, not process substitution: the test machine has no /dev/fd.)
# Only the name and the 32 hex digits: a kernel message printed on the
# same console can run on after them on the same line.
tr -d '\r' <"$console" | grep -a -o -E '^HUSK_TEST virtiofs sum guest-[0-9]+ [0-9a-f]{32}' >"$work/sums"
[ "$(wc -l <"$work/sums")" -eq 20 ] || fail "$(wc -l <"$work/sums") of the 20 checksum lines are readable"
while read -r _ _ _ f sum; do
  [ -f "$share/$f" ] || fail "$f is not on the host"
  host=$(md5sum "$share/$f" | cut -d' ' -f1)
  [ "$host" = "$sum" ] || fail "$f: host md5 $host, guest wrote $sum"
done <"$work/sums"
echo "20 guest-written, fsynced files are on the host with the guest's checksums"

echo "late-$$" >"$share/late.tmp"
mv "$share/late.tmp" "$share/late.txt"
wait_line '^HUSK_TEST virtiofs late ' 90
got=$(expect_line "$console" '^HUSK_TEST virtiofs late ')
[ "$got" = "HUSK_TEST virtiofs late late-$$" ] || fail "the guest did not see the host's late file: $got"
echo "the guest saw a file the host wrote after the mount"

wait_line '^HUSK_TEST virtiofs io-loop' 300
sleep 1
kill -KILL "$vfsd"
wait "$vfsd" 2>/dev/null || true
killed_at=$(now_ms)
vfsd=''
wait_line '^HUSK_TEST virtiofs io-error' 30
took=$(( $(now_ms) - killed_at ))
echo "guest I/O failed $(( took / 1000 )).$(( took % 1000 / 100 )) s after virtiofsd was killed"
status=$(ctl '{"op":"status"}') || fail "the control socket did not answer after virtiofsd died"
[[ "$status" == *'"running"'* ]] || fail "status after virtiofsd died: $status"
echo "husk-vmm still running: $status"
wait_line '^HUSK_TEST virtiofs done' 90
expect_line "$console" '^HUSK_TEST virtiofs still-failing' >/dev/null

set +e
timeout 60 tail --pid="$vmm" -f /dev/null
wait "$vmm"
rc=$?
set -e
vmm=''
sed 's/^/    guest| /' "$console" | grep -a -v 'virtiofs sum ' || true
grep -a -E 'virtio-fs|vhost' "$work/vmm.log" | sed 's/^/    vmm| /' || true
[ "$rc" -eq 0 ] || { sed 's/^/    vmm| /' "$work/vmm.log"; fail "husk-vmm exited $rc"; }
gone=$(grep -c 'vhost-user backend is gone' "$work/vmm.log" || true)
[ "$gone" -eq 1 ] || fail "the VMM logged the backend's loss $gone times, expected once"

# bench: MB/s = bytes / (t1 - t0)
rate() {
  local line=$1
  awk -v l="$line" 'BEGIN {
    n = split(l, w, " "); for (i = 1; i <= n; i++) { if (w[i] ~ /^bytes=/) b = substr(w[i], 7); if (w[i] ~ /^secs=/) s = substr(w[i], 6) }
    split(s, t, "\\.\\."); d = t[2] - t[1]; if (d <= 0) d = 0.01
    printf "%.1f MB/s (%.2f s)", b / d / 1e6, d }'
}
fs_line=$(tr -d '\r' <"$console" | grep -a -m1 '^HUSK_TEST virtiofs bench fs ' || true)
blk_line=$(tr -d '\r' <"$console" | grep -a -m1 '^HUSK_TEST virtiofs bench blk ' || true)
if [ -n "$fs_line" ] && [ -n "$blk_line" ]; then
  echo "sequential read of 16 MiB in the guest (1 MiB requests, no guest cache):"
  printf '  %-28s %s\n' "virtio-fs (virtiofsd)" "$(rate "$fs_line")" "virtio-blk (O_DIRECT)" "$(rate "$blk_line")"
fi
no_leftovers husk-vmm "$work/control.sock"
no_leftovers virtiofsd
trap - EXIT
rm -rf "$work"
echo "PASS vmm-virtiofs"
