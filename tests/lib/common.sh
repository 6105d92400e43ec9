# shellcheck shell=bash
# Helpers shared by scenarios (source it).

# fail MSG: prints a FAIL line and exits 1.
fail() { echo "FAIL: $*"; exit 1; }

# now_ms: wall clock in milliseconds.
now_ms() { date +%s%3N; }

# indent PREFIX: copies stdin to stdout with PREFIX before every line.
indent() { awk -v p="$1" '{ print p $0 }'; }

# expect_line FILE PATTERN: the first line of FILE matching the extended
# regex PATTERN, or a failure naming it.
expect_line() {
  local line
  line=$(tr -d '\r' <"$1" | grep -a -m1 -E "$2") || fail "no line matching /$2/ in $1"
  printf '%s\n' "$line"
}

# no_leftovers NAME PATH...: fails if a process called NAME still runs or any
# PATH still exists.
no_leftovers() {
  local name=$1 p
  shift
  if pgrep -x "$name" >/dev/null; then fail "a $name process is left: $(pgrep -a -x "$name")"; fi
  for p in "$@"; do [ ! -e "$p" ] || fail "$p is left behind"; done
}

# The nested-boot stall: now and then an L1 test machine comes up in which
# no nested guest ever prints a byte (QEMU's and husk's alike), while a fresh
# L1 boots them (README, "The test machine"). Every boot-and-wait of every
# scenario goes through the helpers below, so a silent guest is called a
# stall within HUSK_STALL_SECS (default 60) seconds, its evidence is kept in
# $HUSK_OUT/stalls/, and the scenario exits $STALLED, which tests/run.sh
# answers with a fresh L1. A guest that printed anything is never retried.
STALLED=75

# census_add boot|stall [WHAT]: counts one nested boot for the runner's stall
# census (tests/run.sh adds them up over every scenario and L1).
census_add() {
  [ -z "${HUSK_OUT:-}" ] || echo "$1 ${2:-}" >>"$HUSK_OUT/census"
}

# stall_evidence PID NAME: keeps what tells a stalled guest apart, in
# $HUSK_OUT/stalls/NAME.txt: the monitor's threads (state, wait channel, and
# the user, system and guest CPU seconds each used in 2 s: a guest that runs
# but prints nothing spins, one that waits on an interrupt does not), and the
# L1's clocksource and kvm_amd settings.
stall_evidence() {
  local pid=$1 name=$2 dir=${HUSK_OUT:-/tmp}/stalls
  mkdir -p "$dir"
  {
    echo "stalled: $name (pid $pid, $(date -u +%FT%TZ))"
    echo "L1 clocksource: $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource 2>/dev/null)"
    echo "L1 cmdline: $(cat /proc/cmdline)"
    echo "kvm_amd: $(grep -H . /sys/module/kvm_amd/parameters/* 2>/dev/null | sed 's|.*/||' | tr '\n' ' ')"
    _threads() {
      local t f
      for t in /proc/"$pid"/task/*; do
        f=$(sed 's/^.*) //' "$t/stat" 2>/dev/null) || continue
        # state utime stime guest_time (fields 3, 14, 15, 43 of stat).
        echo "$(basename "$t") $(cat "$t/comm" 2>/dev/null) $(awk '{ print $1, $12, $13, $41 }' <<<"$f") $(cat "$t/wchan" 2>/dev/null)"
      done
    }
    _kvm_stats() {
      local d
      for d in /sys/kernel/debug/kvm/"$pid"-*; do
        [ -d "$d" ] || continue
        echo "$(basename "$d"): $(for s in exits halt_exits io_exits mmio_exits irq_exits irq_injections nmi_injections request_irq_exits pf_taken halt_wakeup signal_exits; do
          [ -f "$d/$s" ] && printf '%s=%s ' "$s" "$(cat "$d/$s")"; done)"
      done
    }
    echo "threads (tid comm state utime stime guest_time wchan; clock ticks) and KVM's exit counters, then 2 s later:"
    _threads
    _kvm_stats
    # The L1's own interrupts (its local timer, virtio, serial) before and after.
    local irq0
    irq0=$(grep -E '^ *(LOC|[0-9]+):' /proc/interrupts 2>/dev/null)
    local tr=/sys/kernel/tracing
    if [ -w "$tr/events/kvm/enable" ]; then
      : >"$tr/trace"
      echo 1 >"$tr/events/kvm/enable"
    fi
    sleep 2
    _threads
    _kvm_stats
    echo "L1 interrupts, then 2 s later:"
    echo "$irq0"
    grep -E '^ *(LOC|[0-9]+):' /proc/interrupts 2>/dev/null
    if [ -w "$tr/events/kvm/enable" ]; then
      echo 0 >"$tr/events/kvm/enable"
      echo "KVM trace events in those 2 s: $(grep -vc '^#' "$tr/trace"); the first 40:"
      grep -v '^#' "$tr/trace" | head -n 40
    fi
    local t
    for t in /proc/"$pid"/task/*; do
      echo "stack of $(basename "$t") $(cat "$t/comm" 2>/dev/null):"
      head -n 12 "$t/stack" 2>/dev/null
    done
    echo "L1 dmesg (clock, kvm):"
    dmesg 2>/dev/null | grep -iE 'tsc|clocksource|kvm|svm' | tail -n 20
  } >"$dir/$name.txt" 2>&1
  sed 's/^/    stall| /' "$dir/$name.txt"
}

# vm_wait PID CONSOLE: waits for the VM process PID (a `timeout` wrapper or
# the VM itself: it gets SIGTERM), returning its exit status, or $STALLED
# when await_console stopped it. A function `vm_tick`, if defined, runs
# every 50 ms while the VM does.
vm_wait() {
  local pid=$1 console=$2 rc=0
  await_console "$pid" "$console" || rc=$?
  [ "$rc" -ne "$STALLED" ] || return "$STALLED"
  while kill -0 "$pid" 2>/dev/null; do
    if declare -F vm_tick >/dev/null; then vm_tick; fi
    sleep 0.05
  done
  rc=0
  wait "$pid" || rc=$?
  return "$rc"
}

# boot_retrying CONSOLE FUNCTION: runs FUNCTION (which starts one VM in the
# foreground, its console going to CONSOLE; `exec` it so that the stop
# reaches the VM) in the background under vm_wait, up to
# HUSK_STALL_ATTEMPTS (default 1: see above) times while it stalls. Returns the VM's
# exit status. boot_start holds the start (ms) of the last attempt.
boot_retrying() {
  local console=$1 fn=$2 attempt rc
  for attempt in $(seq "${HUSK_STALL_ATTEMPTS:-1}"); do
    rm -f "$console"
    : >"$console"
    # Read by the scenarios that call this.
    # shellcheck disable=SC2034
    boot_start=$(now_ms)
    "$fn" &
    rc=0
    vm_wait $! "$console" || rc=$?
    [ "$rc" -eq "$STALLED" ] || return "$rc"
    [ "$attempt" -ge "${HUSK_STALL_ATTEMPTS:-1}" ] || echo "RETRY: boot attempt $attempt stalled"
  done
  echo "the guest stalled: this test machine runs no nested guest (exit $STALLED: the runner boots a fresh one)"
  return "$STALLED"
}

# await_console PID CONSOLE: returns 0 once the VM process PID has printed
# to CONSOLE, or $STALLED after stopping it when it printed nothing in
# HUSK_STALL_SECS (default 60) seconds (1 if it exited first). Runs
# `vm_tick`, if defined, every 50 ms meanwhile.
await_console() {
  local pid=$1 console=$2 start vmm
  start=$(now_ms)
  until [ -s "$console" ]; do
    kill -0 "$pid" 2>/dev/null || return 1
    if declare -F vm_tick >/dev/null; then vm_tick; fi
    if [ $(( $(now_ms) - start )) -gt $(( ${HUSK_STALL_SECS:-60} * 1000 )) ]; then
      echo "STALL: the guest printed nothing in ${HUSK_STALL_SECS:-60} s (the nested-boot stall, tests/lib/common.sh); stopping it"
      census_add stall "$(basename "$console")"
      # PID may be a `timeout` wrapper: the evidence is the monitor's.
      vmm=$(pgrep -P "$pid" | head -n 1)
      stall_evidence "${vmm:-$pid}" "$(basename "$console")"
      kill -TERM "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
      return "$STALLED"
    fi
    sleep 0.05
  done
  census_add boot "$(basename "$console")"
}

# stall_watch STATE_DIR: for scenarios whose VMs the shim boots. In the
# background, watches every sandbox console (STATE_DIR/*/console.log, so the
# shim must run with debug_console on): a console that stays empty for
# HUSK_STALL_SECS while its VMM (STATE_DIR/*/vmm.pid) lives is a stall: its
# evidence is kept, $HUSK_OUT/stalled is written and the VMM is killed, so
# the shim fails that sandbox at once instead of waiting out its boot
# timeout, and the scenario gets SIGUSR1, on which it exits $STALLED (as
# soon as its current command returns; its EXIT trap cleans up). A scenario
# may also call stall_exit after each step. The watcher ends with the
# scenario, or at stall_unwatch.
stall_watch() {
  local dir=$1 main=$BASHPID
  rm -f "${HUSK_OUT:?}/stalled"
  trap stall_exit USR1
  (
    declare -A first done_
    while kill -0 "$main" 2>/dev/null; do
      for c in "$dir"/*/console.log; do
        [ -f "$c" ] || continue
        key="$c:$(stat -c %i "$c" 2>/dev/null)"
        [ -z "${done_[$key]:-}" ] || continue
        sb=$(basename "$(dirname "$c")")
        if [ -s "$c" ]; then
          census_add boot "$sb"
          done_[$key]=1
          continue
        fi
        pid=$(cat "$(dirname "$c")/vmm.pid" 2>/dev/null || true)
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
          done_[$key]=1 # the VMM ended before printing: not a stall (a bad config, a kill)
          continue
        fi
        first[$key]=${first[$key]:-$(date +%s)}
        t0=${first[$key]}
        if [ $(( $(date +%s) - t0 )) -ge "${HUSK_STALL_SECS:-60}" ] && [ -n "$pid" ]; then
          echo "STALL: sandbox $sb printed nothing in ${HUSK_STALL_SECS:-60} s (the nested-boot stall, tests/lib/common.sh); killing its VMM"
          census_add stall "$sb"
          stall_evidence "$pid" "$sb"
          echo "$sb" >>"$HUSK_OUT/stalled"
          kill -KILL "$pid" 2>/dev/null
          kill -USR1 "$main" 2>/dev/null
          done_[$key]=1
        fi
      done
      sleep 1
    done
  ) &
  stall_watcher=$!
}
stall_unwatch() {
  [ -z "${stall_watcher:-}" ] || kill "$stall_watcher" 2>/dev/null || true
  stall_watcher=
}

# stall_exit: ends the scenario with $STALLED when the watcher saw a stall.
stall_exit() {
  [ -f "${HUSK_OUT:?}/stalled" ] || return 0
  trap - USR1
  echo "STALL: this test machine runs no nested guest (sandbox $(head -n 1 "$HUSK_OUT/stalled")); exit $STALLED: the runner boots a fresh one and reruns what did not pass"
  exit "$STALLED"
}

# Checks that passed in an earlier L1 of this run (tests/run.sh carries
# $HUSK_OUT/passed over to the rerun), so a rerun does only the rest.
# check_passed NAME: true if NAME passed before; check_record NAME: it passed.
check_passed() { grep -qxF "$1" "${HUSK_OUT:?}/passed" 2>/dev/null; }
check_record() { echo "$1" >>"${HUSK_OUT:?}/passed"; }
# check_once NAME: the scenario's `check NAME` (which leaves $cfail 0 when
# it passed), unless NAME passed on an earlier test machine of this run;
# records a pass.
check_once() {
  if check_passed "$1"; then
    echo "==== $1"
    echo "PASS $1 (passed on an earlier test machine of this run)"
    return
  fi
  check "$1"
  # cfail is the scenario's (tests/shim/lib.sh, want).
  # shellcheck disable=SC2154
  [ "$cfail" != 0 ] || check_record "$1"
}
