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
# - tsc=reliable: the clocksource watchdog's reference is a tick the busy
#   host delays, so under load it marked the L1's TSC unstable (11 of 19
#   L1s of one CI run then kept time with refined-jiffies). TCG's TSC is
#   the host's: steady, and the same on every vCPU.
host_tsc_khz() {
  awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo
}
l1_clock="tsc=reliable nohz=off highres=off"
tsc_khz=$(host_tsc_khz)
[ -z "$tsc_khz" ] || [ "$tsc_khz" -le 0 ] || l1_clock="tsc_early_khz=$tsc_khz $l1_clock"
l1_append=${HUSK_L1_APPEND-$l1_clock}
[ "$mode" != nested ] || say "L1 kernel clock: ${l1_append:-(none)}"
# Census over the whole run: "SCENARIO ATTEMPT boot|stall WHAT" lines.
# Lines "SCENARIO ATTEMPT l1|froze|l1stall" count the L1 machines; the
# verdicts go to $results ("PASS|FAIL NAME"). Both are files, as lanes are
# subshells.
census=$(mktemp /tmp/husk-census.XXXXXX)
results=$(mktemp /tmp/husk-results.XXXXXX)
lanes_dir=$(mktemp -d /tmp/husk-lanes.XXXXXX)
trap 'rm -rf "$census" "$results" "$lanes_dir"' EXIT

# One runner at a time on a host: its lanes are all the test machines the
# host runs (two runs side by side would run each other's guests slower and
# turn timing into failures).
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
    echo "$name $attempt l1" >>"$census"
    boot_l1 "$script" "$log" "$limit" "$out"
    [ ! -f "$out/census" ] || sed "s/^/$name $attempt /" "$out/census" >>"$census"
    # Exit 75: the scenario found that this L1 runs no KVM guest at all
    # (every boot stalled; tests/lib/common.sh).
    if [ -f "$out/froze" ]; then echo "$name $attempt froze" >>"$census"; fi
    if [ "$(cat "$out/rc" 2>/dev/null)" = 75 ]; then echo "$name $attempt l1stall" >>"$census"; fi
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

# header NAME KEY: the scenario's header comment line "# KEY: ..." (the
# comment block before its first command), without the key; fails if none.
header() {
  sed -n '1,/^[^#]/p' "$1" | sed -n "s/^# $2: *//p" | grep .
}
script_of() {
  case "$1" in
    */*) echo "$repo/tests/$1.sh" ;;
    *) echo "$repo/tests/scenarios/$1.sh" ;;
  esac
}

# With no names, every scenario but those whose header says "# long:"
# (documented commands, run by name).
if [ $# -eq 0 ]; then
  for f in "$repo"/tests/scenarios/*.sh; do
    if header "$f" long >/dev/null; then
      say "skipped $(basename "$f" .sh): a long run, by name only"
      continue
    fi
    f=${f##*/}
    set -- "$@" "${f%.sh}"
  done
fi
for name in "$@"; do
  [ -f "$(script_of "$name")" ] || { echo "no scenario $(script_of "$name")" >&2; exit 2; }
done

# run_one NAME: runs one scenario in its own test machine (or on the host)
# and appends its verdict to $results.
run_one() {
  local name=$1 script limit log t0
  script=$(script_of "$name")
  limit=$(sed -n '2s/^# timeout: *\([0-9]*\).*/\1/p' "$script")
  limit=${HUSK_SCENARIO_TIMEOUT:-${limit:-600}}
  log="$logdir/${name//\//-}.log"
  : >"$log"
  say "=== scenario $name ($mode, limit ${limit}s, log $log)"
  t0=$(now_ms)
  if "run_$mode" "$script" "$log" "$limit"; then
    echo "PASS $name" >>"$results"; say "=== PASS $name ($(( ($(now_ms) - t0) / 1000 )) s)"
  else
    echo "FAIL $name" >>"$results"; say "=== FAIL $name ($(( ($(now_ms) - t0) / 1000 )) s)"
  fi
}

# Lanes: with HUSK_TEST_JOBS=N (nested mode only), N test machines run at
# once. A scenario keeps the CPUs of one L1 about half busy (the nested
# guest runs on one vCPU at a time, and much of a scenario waits), so two
# lanes on two cores finish the suite in a little over half the time. A
# scenario whose header says "# alone:" (it measures rates or times that
# another machine's load would skew) runs after the lanes, by itself.
# Each scenario's output is printed whole when it ends, so that the lanes'
# lines do not interleave; "started" lines show progress meanwhile.
jobs=${HUSK_TEST_JOBS:-1}
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || { echo "HUSK_TEST_JOBS must be a positive number" >&2; exit 2; }
[ "$mode" = nested ] || jobs=1
shared=() alone=()
for name in "$@"; do
  if [ "$jobs" -gt 1 ] && ! header "$(script_of "$name")" alone >/dev/null; then
    shared+=("$name")
  else
    alone+=("$name")
  fi
done
if [ ${#shared[@]} -gt 0 ]; then
  say "${#shared[@]} scenarios in $jobs lanes, then ${#alone[@]} alone"
  # The longest first, by their time limits, so that no lane is left with a
  # long one at the end.
  for name in "${shared[@]}"; do
    limit=$(sed -n '2s/^# timeout: *\([0-9]*\).*/\1/p' "$(script_of "$name")")
    echo "${limit:-600} $name"
  done | sort -s -k1,1nr | cut -d' ' -f2 >"$lanes_dir/queue"
  next_scenario() {
    (
      flock 8
      local n
      n=$(head -n 1 "$lanes_dir/queue")
      [ -n "$n" ] || exit 1
      sed -i 1d "$lanes_dir/queue"
      echo "$n"
    ) 8>"$lanes_dir/queue.lock"
  }
  lane() {
    local k=$1 name out
    while name=$(next_scenario); do
      out="$lanes_dir/${name//\//-}.out"
      say "lane $k: $name started"
      run_one "$name" >"$out" 2>&1 || true
      flock "$lanes_dir/print.lock" cat "$out"
    done
  }
  pids=()
  for ((k = 1; k <= jobs; k++)); do
    lane "$k" &
    pids+=($!)
  done
  trap 'kill "${pids[@]}" 2>/dev/null; exit 130' INT TERM
  for p in "${pids[@]}"; do wait "$p" || true; done
  trap - INT TERM
fi
for name in "${alone[@]}"; do
  run_one "$name"
done

passed=$(grep -c '^PASS ' "$results" || true)
failed=$(grep -c '^FAIL ' "$results" || true)
[ "$failed" -eq 0 ] || say "failed: $(sed -n 's/^FAIL //p' "$results" | paste -sd ' ')"
boots=$(awk '$3 == "boot" || $3 == "stall"' "$census" | wc -l)
stalls=$(awk '$3 == "stall"' "$census" | wc -l)
if [ "$mode" = nested ]; then
  l1_boots=$(awk '$3 == "l1"' "$census" | wc -l)
  l1_stalled=$(awk '$3 == "l1stall"' "$census" | wc -l)
  l1_froze=$(awk '$3 == "froze"' "$census" | wc -l)
  say "stall census: $boots nested boots, $stalls stalled; $l1_boots L1 machines for $# scenarios ($l1_stalled ran no nested guest, $l1_froze froze)"
else
  say "stall census: $boots boots, $stalls stalled"
fi
awk '$3 == "stall" { print "[testvm]   stalled: " $1 " (L1 attempt " $2 "): " $4 }' "$census"
echo "scenarios: $passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ $((passed + failed)) -eq $# ]
