#!/usr/bin/env bash
# timeout: 2400
# alone: a benchmark; another test machine beside it would skew its numbers.
# Benchmark, not a test: a Kubernetes pod through containerd's CRI plugin
# (crictl; the harness is tests/cri/lib.sh), husk against runc in one run.
#   pod start   RunPodSandbox + CreateContainer + StartContainer until the
#               container runs, wall clock of the three crictl calls;
#               HUSK_BENCH_RUNS (default 3) of each, interleaved
#   memory      a husk pod of 1 GiB: its VMM's resident memory (VmRSS) when
#               idle, after a container touched 800 MiB and ended, and 30 s
#               later, once the guest has reported the free pages
#               (virtio-balloon free page reporting gives them back)
# Run it where KVM boots Linux: `tests/run.sh bench/pod` (nested here).
set -uo pipefail
repo=${HUSK_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
# shellcheck source=../cri/lib.sh
source "$repo/tests/cri/lib.sh"
say() { echo "[bench-pod] $*"; }
die() { echo "bench-pod: $*" >&2; exit 1; }
runs=${HUSK_BENCH_RUNS:-3}

cri_up bench-pod husk || exit 1
img=registry.k8s.io/e2e-test-images/busybox:1.29-2
crit() { cri --timeout 600s "$@"; }
crit pull "$img" >/dev/null || die "pulling $img"

# config FILE JSON: writes a crictl config.
config() { printf '%s\n' "$2" >"$work/$1"; }
config ctr.json "{\"metadata\": {\"name\": \"c\"}, \"image\": {\"image\": \"$img\"}, \"command\": [\"sleep\", \"100000\"], \"log_path\": \"c.log\"}"
config touch.json "{\"metadata\": {\"name\": \"t\"}, \"image\": {\"image\": \"$img\"}, \"command\": [\"sh\", \"-c\", \"dd if=/dev/zero of=/dev/null bs=800M count=1\"], \"log_path\": \"t.log\", \"linux\": {\"resources\": {\"memory_limit_in_bytes\": $((900 << 20))}}}"

# start RUNTIME N: one pod and its container; prints the wall ms.
start() {
  local t0 p c
  mkdir -p "$work/logs/$1-$2"
  config "pod-$1-$2.json" "{\"metadata\": {\"name\": \"p-$1-$2\", \"namespace\": \"bench\", \"uid\": \"u-$1-$2\"}, \"log_directory\": \"$work/logs/$1-$2\", \"linux\": {}}"
  t0=$(now_ms)
  p=$(crit runp --runtime "$1" "$work/pod-$1-$2.json") || die "$1: runp failed"
  c=$(crit create "$p" "$work/ctr.json" "$work/pod-$1-$2.json") || die "$1: create failed"
  crit start "$c" >/dev/null || die "$1: start failed"
  echo $(( $(now_ms) - t0 ))
  crit rmp --force "$p" >/dev/null 2>&1
}

say "warm-up (unmeasured): one pod of each"
start runc 0 >/dev/null
start husk 0 >/dev/null
: >"$work/start.tsv"
for i in $(seq "$runs"); do
  h=$(start husk "$i") r=$(start runc "$i")
  printf '%s\t%s\n' "$h" "$r" >>"$work/start.tsv"
  say "run $i/$runs: husk $h ms, runc $r ms"
done

# Memory of an idle 1 GiB pod.
config pod-mem.json "{\"metadata\": {\"name\": \"mem\", \"namespace\": \"bench\", \"uid\": \"mem\"}, \"log_directory\": \"$work/logs\", \"linux\": {\"resources\": {\"memory_limit_in_bytes\": 1073741824}}}"
p=$(crit runp --runtime husk "$work/pod-mem.json") || die "the 1 GiB pod did not start"
vmm=$(vmm_of "$p")
rss() { awk '/^VmRSS/ { print int($2 / 1024) }' "/proc/$vmm/status"; }
sleep 10
idle=$(rss)
c=$(crit create "$p" "$work/touch.json" "$work/pod-mem.json") || die "creating the touch container failed"
crit start "$c" >/dev/null || die "starting the touch container failed"
exited() { crit inspect -o json "$c" 2>/dev/null | grep -q CONTAINER_EXITED; }
wait_until 300 exited || die "the touch container did not end"
touched=$(rss)
sleep 30
back=$(rss)
crit rmp --force "$p" >/dev/null 2>&1
say "1 GiB pod VMM RSS: idle $idle MiB, after touching 800 MiB $touched MiB, 30 s later $back MiB"

python3 - "$work/start.tsv" "$idle" "$touched" "$back" "${HUSK_TEST_MODE:-?}" <<'PY'
import statistics, sys
rows = [list(map(int, l.split())) for l in open(sys.argv[1]) if l.strip()]
idle, touched, back = map(int, sys.argv[2:5])
husk, runc = [r[0] for r in rows], [r[1] for r in rows]
med = statistics.median
print(f"\npod start (RunPodSandbox + CreateContainer + StartContainer, crictl), median of {len(rows)}; environment: {sys.argv[5]}")
print(f"| {'runtime':<8} | {'median':>9} | {'min':>9} | {'max':>9} |")
print(f"|{'-' * 10}|{'-' * 11}|{'-' * 11}|{'-' * 11}|")
for name, xs in (("husk", husk), ("runc", runc)):
    print(f"| {name:<8} | {med(xs):>6} ms | {min(xs):>6} ms | {max(xs):>6} ms |")
print(f"| husk/runc | {med(husk) / med(runc):>8.2f}x |           |           |")
print(f"\nhost memory of an idle husk pod of 1 GiB (VMM VmRSS)")
print(f"| {'when':<48} | {'VmRSS':>9} |")
print(f"|{'-' * 50}|{'-' * 11}|")
print(f"| {'idle, before any container':<48} | {idle:>5} MiB |")
print(f"| {'a container touched 800 MiB and ended':<48} | {touched:>5} MiB |")
print(f"| {'30 s later (free page reporting)':<48} | {back:>5} MiB |")
PY
