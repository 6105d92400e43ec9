#!/usr/bin/env bash
# The husk test machine runner: runs end-to-end scenarios (tests/scenarios/*.sh)
# where real KVM can boot a Linux guest.
#
#   tests/run.sh [SCENARIO...]     # names without .sh; default: all but
#                                  # those whose header says "# long:"
#   tests/run.sh bench/vmm         # a name with a slash is a path under tests/
#
# Where the host's /dev/kvm is hardware-backed (vmx or svm in /proc/cpuinfo)
# a scenario runs directly on the host. Otherwise (as on husk's development
# machines, whose /dev/kvm is a software hypervisor that cannot boot Linux)
# it runs inside an L1 test machine: QEMU TCG with `-cpu max` (which presents
# AMD SVM) on the test-machine kernel, the host's root shared read-only over
# virtio-9p, and KVM inside it. HUSK_TEST_MODE=direct|nested overrides.
#
# A scenario is a bash script; it finds the build outputs in the environment
# (target/husk-artifacts.env, written by scripts/build.sh) and a folder for
# results in $HUSK_OUT. Its exit code is the scenario's verdict. Line 2 of
# the script, "# timeout: N", sets its time limit in seconds (default 600);
# HUSK_SCENARIO_TIMEOUT replaces it (for a long documented run, such as
# the full CRI suite). HUSK_{BENCH,SHIM,SOAK,STALL,CRITEST}_* variables
# reach the scenario in the test machine.
#
# The test machine's shape (for the stall investigation, tests/soak/stall.sh;
# the defaults are what CI runs): HUSK_L1_ACCEL (QEMU -accel), HUSK_L1_CPU
# (-cpu), HUSK_L1_SMP, HUSK_L1_MEM (MiB), HUSK_L1_APPEND (the L1 kernel's
# command line beyond what the runner needs).
#
# At the end it prints the stall census: nested boots, stalled boots, and L1
# machines booted again (tests/lib/common.sh counts the boots).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
artifacts="$repo/target/husk-artifacts.env"
[ -f "$artifacts" ] || { echo "no $artifacts: run scripts/build.sh first" >&2; exit 1; }
# shellcheck source=/dev/null
source "$artifacts"
logdir="$repo/target/test-logs"
mkdir -p "$logdir"
say() { echo "[testvm] $*"; }

mode=${HUSK_TEST_MODE:-}
if [ -z "$mode" ]; then
  if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -w /dev/kvm ]; then mode=direct; else mode=nested; fi
fi
case "$mode" in
  direct) say "mode: direct (the host's /dev/kvm is hardware-backed)" ;;
  nested) say "mode: nested (no hardware virtualization here: scenarios run in an L1 QEMU TCG machine with -cpu max and KVM inside)" ;;
  *) echo "HUSK_TEST_MODE must be direct or nested" >&2; exit 2 ;;
esac

now_ms() { date +%s%3N; }

l1_accel=${HUSK_L1_ACCEL:-tcg,thread=multi}
l1_cpu=${HUSK_L1_CPU:-max}
l1_smp=${HUSK_L1_SMP:-2}
# The L1 kernel's clock, which decides whether nested guests run at all
# (README, "The test machine"; tests/soak/stall.sh measures it):
# - tsc_early_khz: the L1's TSC is the host's (QEMU TCG reads the host's), so
#   its frequency is given, not calibrated. Calibrating it against the
#   emulated PIT fails now and then on a busy host; the L1 then has no TSC
#   frequency, and its KVM spins in KVM_RUN without ever entering a guest
#   (kvm_guest_time_update: no tsc_khz): every nested boot in it stalls.
# - nohz=off highres=off: a periodic local-APIC tick, re-armed by the APIC
#   itself. QEMU's TCG updates a vCPU's pending-interrupt bits without a lock
#   on every nested VMRUN and #VMEXIT, racing the timer thread, so now and
#   then the L1's timer interrupt is lost; a one-shot tick is then never
#   re-armed and the L1 freezes. A periodic tick raises it again.
host_tsc_khz() {
  awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo
}
l1_clock="nohz=off highres=off"
tsc_khz=$(host_tsc_khz)
[ -z "$tsc_khz" ] || [ "$tsc_khz" -le 0 ] || l1_clock="tsc_early_khz=$tsc_khz $l1_clock"
l1_append=${HUSK_L1_APPEND-$l1_clock}
[ "$mode" != nested ] || say "L1 kernel clock: ${l1_append:-(none)}"
# Census over the whole run: "SCENARIO ATTEMPT boot|stall WHAT" lines.
census=$(mktemp /tmp/husk-census.XXXXXX)
l1_boots=0 l1_froze=0 l1_stalled=0
trap 'rm -f "$census"' EXIT

# One test machine at a time on a host: two L1s of TCG share the cores, run
# each other's guests many times slower, and turn timing into failures.
exec 9>/tmp/husk-testvm.lock
if ! flock -n 9; then
  say "waiting for another tests/run.sh on this host to finish"
  flock 9
fi

# qemu_threads PID: each thread of QEMU process PID (state, CPU seconds, wait
# channel, the syscall it sits in), twice 2 s apart, and their stacks where
# gdb is installed: the evidence of a frozen test machine.
qemu_threads() {
  local pid=$1 t
  [ -n "$pid" ] || { echo "no QEMU process"; return; }
  for _ in 1 2; do
    echo "QEMU $pid threads (tid comm state utime stime wchan syscall), $(date +%T):"
    for t in /proc/"$pid"/task/*; do
      echo "$(basename "$t") $(cat "$t/comm") $(sed 's/^.*) //' "$t/stat" | awk '{ print $1, $12, $13 }') $(cat "$t/wchan") $(cut -d' ' -f1-3 "$t/syscall")"
    done 2>/dev/null
    sleep 2
  done
  if command -v gdb >/dev/null; then
    timeout 60 gdb -p "$pid" -batch -ex "thread apply all bt 12" 2>&1 | grep -vE '^\[New LWP|^warning:' | head -n 300
  fi
}

# Boots one L1 machine for a scenario, streaming its console to the terminal
# and to $log. A watchdog ends the machine when the L1's heartbeat (a file
# l1-init.sh touches every 5 s) goes stale: the L1 itself froze.
boot_l1() {
  local script=$1 log=$2 limit=$3 out=$4 start watchdog qmp
  start=$(now_ms)
  qmp=$(mktemp -u /tmp/husk-qmp.XXXXXX)
  (
    while sleep 10; do
      [ -f "$out/rc" ] && exit 0
      if [ -f "$out/heartbeat" ] && [ $(( $(date +%s) - $(stat -c %Y "$out/heartbeat") )) -gt 60 ]; then
        touch "$out/froze"
        # Where the frozen machine's CPUs are (in the L1 kernel, or in a
        # nested guest), for the evidence kept with its results.
        # Three snapshots a second apart tell a CPU that loops from one that moves on.
        for _ in 1 2 3; do
          python3 "$repo/tests/lib/qmp_hmp.py" "$qmp" "info cpus" "info registers -a" "info lapic 0" "info lapic 1" || true
          sleep 1
        done >"$out/froze-cpus.txt" 2>&1
        # And QEMU's own threads on this host: which one runs, which waits on what.
        qemu_threads "$(pgrep -f -- "path=$out,security_model" | head -n 1)" >"$out/froze-qemu-threads.txt" 2>&1
        pkill -f -- "path=$out,security_model" || true
        exit 0
      fi
    done
  ) &
  watchdog=$!
  set +e
  timeout --kill-after=10 "$limit" qemu-system-x86_64 \
    -accel "$l1_accel" -M pc -cpu "$l1_cpu" -smp "$l1_smp" -m "${HUSK_L1_MEM:-4096}" \
    -nodefaults -no-user-config -display none -no-reboot \
    -serial stdio -monitor none -qmp "unix:$qmp,server=on,wait=off" \
    -kernel "$HUSK_TESTVM_KERNEL/bzImage" \
    -append "console=ttyS0 quiet panic=-1 $l1_append root=hostroot rootfstype=9p rootflags=trans=virtio,version=9p2000.L,msize=262144,cache=loose ro init=$repo/tests/l1-init.sh" \
    -fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap \
    -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot \
    -fsdev local,id=out,path="$out",security_model=none \
    -device virtio-9p-pci,fsdev=out,mount_tag=husk-out \
    </dev/null 2>&1 | while IFS= read -r line; do
      line=${line%$'\r'}
      printf '%s\n' "$line"
      printf '%s\n' "$line" >>"$log"
      case "$line" in
        HUSK_L1_READY*) say "L1 booted in $(( $(now_ms) - start )) ms wall clock (${line#HUSK_L1_READY })" ;;
      esac
    done
  set -e
  kill "$watchdog" 2>/dev/null || true
  wait "$watchdog" 2>/dev/null || true
  rm -f "$qmp"
  if [ -f "$out/froze" ]; then
    say "the L1 machine froze (no heartbeat for 60 s) after $(( ($(now_ms) - start) / 1000 )) s; last heartbeat: $(tr '\n' ' ' <"$out/heartbeat"); its CPUs are in froze-cpus.txt of the kept results; console tail:"
  elif [ ! -f "$out/rc" ]; then
    say "no exit code from the L1 after $(( ($(now_ms) - start) / 1000 )) s (limit ${limit}s): timed out or crashed; console tail:"
  fi
  [ -f "$out/rc" ] || tail -n 40 "$log" | sed 's/^/    | /'
}

# Runs one scenario inside a fresh L1 machine and returns its exit code.
# A frozen L1, or one that runs no nested guest (scenario exit 75; see the
# README), is the test machine failing, not the scenario: it is booted
# again, up to HUSK_L1_RETRIES (default 2) more times, and the rerun is said
# loudly. What the failed L1 left (logs, partial results) is kept beside the
# scenario's log as NAME.log.l1-N.out; the checks that passed in it
# ($HUSK_OUT/passed) are carried over, so the rerun does only the rest.
run_nested() {
  local script=$1 log=$2 limit=$3 out rc attempt=0 why name prev=
  name=$(basename "$log" .log)
  while :; do
    out=$(mktemp -d /tmp/husk-testvm.XXXXXX)
    [ -z "$prev" ] || [ ! -f "$prev/passed" ] || cp "$prev/passed" "$out/passed"
    {
      grep -E '^export ' "$artifacts"
      env | grep -E '^HUSK_(BENCH|SHIM|SOAK|STALL|CRITEST|HOSTILE)_[A-Z_]*=' | while IFS='=' read -r k v; do
        printf 'export %s=%q\n' "$k" "$v"
      done || true
      echo "export HUSK_REPO=$repo HUSK_SCENARIO=$script HUSK_OUT=/tmp/husk-out HUSK_TEST_MODE=nested"
    } >"$out/env"
    l1_boots=$((l1_boots + 1))
    boot_l1 "$script" "$log" "$limit" "$out"
    [ ! -f "$out/census" ] || sed "s/^/$name $attempt /" "$out/census" >>"$census"
    # Exit 75: the scenario found that this L1 runs no KVM guest at all
    # (every boot stalled; tests/lib/common.sh).
    if [ -f "$out/froze" ]; then l1_froze=$((l1_froze + 1)); fi
    if [ "$(cat "$out/rc" 2>/dev/null)" = 75 ]; then l1_stalled=$((l1_stalled + 1)); fi
    if { [ -f "$out/froze" ] || [ "$(cat "$out/rc" 2>/dev/null)" = 75 ]; } &&
      [ "$attempt" -lt "${HUSK_L1_RETRIES:-2}" ]; then
      attempt=$((attempt + 1))
      if [ -f "$out/froze" ]; then why="froze"; else why="ran no KVM guest"; fi
      rm -rf "$log.l1-$attempt.out"
      mkdir -p "$log.l1-$attempt.out"
      cp -r "$out/." "$log.l1-$attempt.out/" 2>/dev/null || true
      say "RERUN $name: the test machine $why; its results are kept in $log.l1-$attempt.out; booting a fresh one (retry $attempt)"
      [ -z "$prev" ] || rm -rf "$prev"
      prev=$out
      continue
    fi
    break
  done
  [ -z "$prev" ] || rm -rf "$prev"
  if [ -f "$out/rc" ]; then
    rc=$(cat "$out/rc")
  else
    rc=124
  fi
  # Keep what the scenario left for the host (results, disks) next to the log.
  rm -rf "$log.out"
  if mkdir -p "$log.out"; then cp -r "$out/." "$log.out/" 2>/dev/null || true; fi
  rm -rf "$out"
  return "$rc"
}

run_direct() {
  local script=$1 log=$2 limit=$3 out rc
  out=$(mktemp -d /tmp/husk-direct.XXXXXX)
  set +e
  # shellcheck source=/dev/null
  ( set -a; source "$artifacts"; HUSK_REPO=$repo HUSK_OUT=$out HUSK_TEST_MODE=direct \
      timeout --kill-after=10 "$limit" bash "$script" ) 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  set -e
  [ "$rc" = 124 ] && { say "timed out after ${limit}s; log tail:"; tail -n 40 "$log" | sed 's/^/    | /'; }
  [ ! -f "$out/census" ] || sed "s/^/$(basename "$log" .log) 0 /" "$out/census" >>"$census"
  rm -rf "$out"
  return "$rc"
}

# With no names, every scenario but those whose header says "# long:"
# (documented commands, run by name).
if [ $# -eq 0 ]; then
  for f in "$repo"/tests/scenarios/*.sh; do
    if sed -n '1,/^[^#]/p' "$f" | grep -q '^# long:'; then
      say "skipped $(basename "$f" .sh): a long run, by name only"
      continue
    fi
    f=${f##*/}
    set -- "$@" "${f%.sh}"
  done
fi
passed=0 failed=0 failures=()
for name in "$@"; do
  case "$name" in
    */*) script="$repo/tests/$name.sh" ;;
    *) script="$repo/tests/scenarios/$name.sh" ;;
  esac
  [ -f "$script" ] || { echo "no scenario $script" >&2; exit 2; }
  limit=$(sed -n '2s/^# timeout: *\([0-9]*\).*/\1/p' "$script")
  limit=${HUSK_SCENARIO_TIMEOUT:-${limit:-600}}
  log="$logdir/${name//\//-}.log"
  : >"$log"
  say "=== scenario $name ($mode, limit ${limit}s, log $log)"
  t0=$(now_ms)
  if "run_$mode" "$script" "$log" "$limit"; then
    passed=$((passed + 1)); say "=== PASS $name ($(( ($(now_ms) - t0) / 1000 )) s)"
  else
    failed=$((failed + 1)); failures+=("$name"); say "=== FAIL $name ($(( ($(now_ms) - t0) / 1000 )) s)"
  fi
done
[ "$failed" -eq 0 ] || say "failed: ${failures[*]}"
boots=$(awk '$3 == "boot" || $3 == "stall"' "$census" | wc -l)
stalls=$(awk '$3 == "stall"' "$census" | wc -l)
if [ "$mode" = nested ]; then
  say "stall census: $boots nested boots, $stalls stalled; $l1_boots L1 machines for $# scenarios ($l1_stalled ran no nested guest, $l1_froze froze)"
else
  say "stall census: $boots boots, $stalls stalled"
fi
awk '$3 == "stall" { print "[testvm]   stalled: " $1 " (L1 attempt " $2 "): " $4 }' "$census"
echo "scenarios: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
