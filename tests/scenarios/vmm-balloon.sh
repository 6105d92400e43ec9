#!/usr/bin/env bash
# timeout: 600
# Free page reporting end to end: a guest of the real kernel with husk-vmm's
# virtio-balloon touches ~400 MiB, frees it, and the VMM's resident memory
# (VmRSS of the husk-vmm process: guest RAM is its private anonymous
# mapping) must fall by most of that once the guest reports the pages free
# (the kernel reports every ~2 s, a sixteenth of its free lists at a time:
# "about 30 seconds" for all of it, says mm/page_reporting.c; measured in
# the test machine: 300 MiB back in about 4 s), and the control socket's
# status must count at least that much reported. Prints the RSS before the
# touch, after it, and after the free.
# alone: the memory must come back within a time; another test machine's
# load on the host would slow the guest's reports.
set -euo pipefail
source "$HUSK_REPO/tests/lib/common.sh"
[ -c /dev/kvm ] || fail "no /dev/kvm"
work=$(mktemp -d /tmp/vmm-balloon.XXXXXX)
console="$HUSK_OUT/vmm-balloon.console"
touch_mib=400
# Most of what the guest touched must come back within this long.
want_back_mib=$(( touch_mib * 3 / 4 ))
wait_secs=${HUSK_BALLOON_WAIT_SECS:-90}
cat >"$work/vm.json" <<JSON
{
  "vcpus": 1,
  "memory_mib": 768,
  "kernel": {
    "path": "$HUSK_GUEST_KERNEL/bzImage",
    "initrd": "$HUSK_TEST_INITRD",
    "cmdline": "console=ttyS0 panic=-1 husk.test=balloon"
  },
  "serial": { "output": "file", "path": "$console" },
  "balloon": { "free_page_reporting": true },
  "control_socket": "$work/ctl"
}
JSON

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
# wait_line PATTERN SECS: waits for a console line, failing if the VM ends.
wait_line() {
  local deadline=$(( $(now_ms) + $2 * 1000 ))
  until tr -d '\r' <"$console" | grep -a -q -E "$1"; do
    kill -0 "$vmm" 2>/dev/null || { sed 's/^/    vmm| /' "$work/vmm.log"; fail "husk-vmm ended waiting for /$1/"; }
    [ "$(now_ms)" -lt "$deadline" ] || { sed 's/^/    guest| /' "$console"; fail "no /$1/ in $2 s"; }
    sleep 0.2
  done
}

: >"$console"
"$HUSK_VMM" --config "$work/vm.json" 2>"$work/vmm.log" &
vmm=$!
trap 'kill "$vmm" 2>/dev/null || true' EXIT
set +e
await_console "$vmm" "$console"
rc=$?
set -e
if [ "$rc" -ne 0 ]; then
  [ "$rc" -eq "$STALLED" ] && exit "$STALLED"
  sed 's/^/    vmm| /' "$work/vmm.log"
  fail "husk-vmm ended before its guest printed anything"
fi

wait_line '^HUSK_TEST balloon features ' 300
before=$(rss_kib "$vmm")
features=$(expect_line "$console" '^HUSK_TEST balloon features ' | awk '{ print $4 }')
[ "${features:5:1}" = 1 ] || fail "the guest did not accept VIRTIO_BALLOON_F_REPORTING (features $features)"
wait_line '^HUSK_TEST balloon (touched|FAILED)' 300
expect_line "$console" '^HUSK_TEST balloon touched' >/dev/null
touched=$(rss_kib "$vmm")
wait_line '^HUSK_TEST balloon freed' 60
freed_at=$(now_ms)
after=$touched
while :; do
  after=$(rss_kib "$vmm")
  [ $(( (touched - after) / 1024 )) -lt "$want_back_mib" ] || break
  [ $(( $(now_ms) - freed_at )) -lt $(( wait_secs * 1000 )) ] || break
  sleep 1
done
took=$(( $(now_ms) - freed_at ))
# The status's count of what the guest reported (the shim waits on it
# before it takes a template).
status=$(python3 - "$work/ctl" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(60)
s.connect(sys.argv[1])
s.sendall(b'{"op":"status"}\n')
print(s.makefile("rb").readline().decode().strip())
PY
)
reported_mib=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["counters"]["free_pages"]["reported_bytes"] >> 20)' "$status") ||
  fail "no free page count in the status: $status"
echo "status: $(( reported_mib )) MiB of free pages reported"
echo "husk-vmm VmRSS: before touch $(( before / 1024 )) MiB, after touching ${touch_mib} MiB $(( touched / 1024 )) MiB, $(( took / 1000 )).$(( took % 1000 / 100 )) s after the free $(( after / 1024 )) MiB"
kill -TERM "$vmm"
set +e
wait "$vmm"
rc=$?
set -e
trap - EXIT
sed 's/^/    guest| /' "$console"
grep -E 'balloon' "$work/vmm.log" | sed 's/^/    vmm| /' || true
[ "$rc" -eq 0 ] || { sed 's/^/    vmm| /' "$work/vmm.log"; fail "husk-vmm exited $rc"; }
[ $(( (touched - before) / 1024 )) -ge $(( touch_mib * 3 / 4 )) ] ||
  fail "touching ${touch_mib} MiB in the guest grew husk-vmm's RSS by only $(( (touched - before) / 1024 )) MiB"
[ $(( (touched - after) / 1024 )) -ge "$want_back_mib" ] ||
  fail "husk-vmm's RSS fell by $(( (touched - after) / 1024 )) MiB in ${wait_secs} s, wanted ${want_back_mib}"
[ "$reported_mib" -ge $(( (touched - after) / 1024 )) ] ||
  fail "the status counts ${reported_mib} MiB reported, less than the $(( (touched - after) / 1024 )) MiB the RSS fell"
if grep -q 'free page report refused' "$work/vmm.log"; then fail "the VMM refused some of the guest's reports"; fi
no_leftovers husk-vmm
rm -rf "$work"
echo "PASS vmm-balloon"
