# Helpers shared by scenarios (source it).

# fail MSG: prints a FAIL line and exits 1.
fail() { echo "FAIL: $*"; exit 1; }

# now_ms: wall clock in milliseconds.
now_ms() { date +%s%3N; }

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
# no nested guest ever executes an instruction (QEMU's and husk's alike; the
# emulated SVM of the outer QEMU TCG does not resume it), and a loaded host
# makes it more likely. The guest prints nothing, ever, and every later boot
# in that L1 stalls too, while a fresh L1 boots them. So a boot whose console
# stays empty is stopped and the scenario exits $STALLED, which tests/run.sh
# answers with a fresh L1. A guest that printed anything is never retried.
STALLED=75

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
  local pid=$1 console=$2 start
  start=$(now_ms)
  until [ -s "$console" ]; do
    kill -0 "$pid" 2>/dev/null || return 1
    if declare -F vm_tick >/dev/null; then vm_tick; fi
    if [ $(( $(now_ms) - start )) -gt $(( ${HUSK_STALL_SECS:-60} * 1000 )) ]; then
      echo "STALL: the guest printed nothing in ${HUSK_STALL_SECS:-60} s (the nested-boot stall, tests/lib/common.sh); stopping it"
      kill -TERM "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
      return "$STALLED"
    fi
    sleep 0.05
  done
}
