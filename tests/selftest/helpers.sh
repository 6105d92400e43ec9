#!/usr/bin/env bash
# Self-test of the test machinery itself (scripts/test.sh runs it): the
# stall helpers of tests/lib/common.sh on the host, with stand-in "VMs"
# (plain processes that print or stay silent), then the runner's rerun of a
# scenario that exits 75 in a fresh L1 (tests/selftest/rerun.sh), carrying
# over the checks that passed and keeping the failed L1's results, beside a
# failing one (tests/selftest/fail.sh) in a second lane.
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HUSK_OUT=$(mktemp -d /tmp/husk-selftest.XXXXXX)
export HUSK_OUT HUSK_STALL_SECS=2
trap 'rm -rf "$HUSK_OUT"' EXIT
# shellcheck source=../lib/common.sh
source "$repo/tests/lib/common.sh"
fails=0
ok() { echo "    ok   $*"; }
bad() { echo "    FAIL $*"; fails=$((fails + 1)); }
expect() { local d=$1; shift; if "$@"; then ok "$d"; else bad "$d"; fi; }

echo "==== await_console: a silent VM is a stall, a talking one is a boot"
c=$HUSK_OUT/silent.console
: >"$c"
sleep 30 &
vm=$!
t0=$(date +%s)
rc=0
await_console "$vm" "$c" >"$HUSK_OUT/await.out" || rc=$?
expect "returns $STALLED (got $rc)" [ "$rc" = "$STALLED" ]
expect "within HUSK_STALL_SECS plus the evidence's 2 s" [ $(( $(date +%s) - t0 )) -le 6 ]
expect "the silent VM was stopped" bash -c "! kill -0 $vm 2>/dev/null"
expect "its evidence is kept" grep -q "stalled: silent.console" "$HUSK_OUT/stalls/silent.console.txt"
expect "the census counts a stall" grep -qx "stall silent.console" "$HUSK_OUT/census"
c=$HUSK_OUT/talks.console
: >"$c"
(sleep 0.5; echo hello >"$c"; sleep 1) &
vm=$!
rc=0
await_console "$vm" "$c" || rc=$?
expect "a VM that prints: 0 (got $rc)" [ "$rc" = 0 ]
expect "the census counts a boot" grep -qx "boot talks.console" "$HUSK_OUT/census"
wait "$vm"

echo "==== stall_watch: a shim-booted VM that stays silent ends the scenario with $STALLED"
state=$HUSK_OUT/state
mkdir -p "$state/sb-ok" "$state/sb-silent"
rc=0
t0=$(date +%s)
(
  stall_watch "$state"
  echo up >"$state/sb-ok/console.log"
  sleep 60 &
  echo $! >"$state/sb-ok/vmm.pid"
  sleep 60 &
  echo $! >"$state/sb-silent/vmm.pid"
  echo $! >"$HUSK_OUT/silent.pid"
  : >"$state/sb-silent/console.log"
  # A scenario step that would wait long: the stall cuts it short.
  for _ in $(seq 600); do sleep 0.1; done
  echo "the scenario ran on"
) >"$HUSK_OUT/watch.out" 2>&1 || rc=$?
expect "the scenario exits $STALLED (got $rc)" [ "$rc" = "$STALLED" ]
expect "soon after HUSK_STALL_SECS ($(( $(date +%s) - t0 )) s)" [ $(( $(date +%s) - t0 )) -le 10 ]
expect "the silent VMM was killed" bash -c "! kill -0 $(cat "$HUSK_OUT/silent.pid") 2>/dev/null"
expect "the stalled sandbox is named" grep -qx sb-silent "$HUSK_OUT/stalled"
expect "the talking sandbox counts as a boot" grep -qx "boot sb-ok" "$HUSK_OUT/census"
expect "the silent one as a stall" grep -qx "stall sb-silent" "$HUSK_OUT/census"
expect "the scenario did not run on" bash -c "! grep -q 'ran on' '$HUSK_OUT/watch.out'"
pkill -f "sleep 60" 2>/dev/null

echo "==== check_passed / check_record"
check_record alpha
expect "a recorded check passed" check_passed alpha
expect "another did not" bash -c "! (source '$repo/tests/lib/common.sh'; check_passed beta)"

if [ "${HUSK_SELFTEST_RUNNER:-1}" = 1 ]; then
  echo "==== tests/run.sh in two lanes: reruns a scenario that exits $STALLED, with what passed, beside one that fails"
  log=$repo/target/test-logs/selftest-rerun.log
  rc=0
  out=$(HUSK_TEST_JOBS=2 "$repo/tests/run.sh" selftest/rerun selftest/fail 2>&1) || rc=$?
  grep -E '^\[testvm\] (RERUN|=== |lane|stall census|failed)|^scenarios:' <<<"$out" | sed 's/^/      /'
  expect "the run fails, for the failing scenario (run.sh exit $rc)" [ "$rc" != 0 ]
  # Lanes are for test machines: on a host with hardware KVM (direct mode)
  # scenarios share the host, and run one at a time.
  if grep -q 'mode: nested' <<<"$out"; then
    lanes() { grep -q "lane 1: selftest/" <<<"$out" && grep -q "lane 2: selftest/" <<<"$out"; }
    expect "both ran at once, a lane each" lanes
  fi
  expect "the verdicts: one passed, one failed" grep -q '^scenarios: 1 passed, 1 failed' <<<"$out"
  expect "the failure is named" grep -q 'failed: selftest/fail' <<<"$out"
  expect "the runner said RERUN" grep -q 'RERUN selftest-rerun' <<<"$out"
  expect "the rerun passed" grep -q '=== PASS selftest/rerun' <<<"$out"
  expect "the first L1's results are kept" test -f "$log.l1-1.out/first-attempt"
  expect "the rerun skipped the check that had passed" grep -q 'check-a: passed before' "$log"
  expect "the census counts one stalled L1" grep -q '3 L1 machines for 2 scenarios (1 ran no nested guest' <<<"$out"
  # A lane prints a scenario's output whole: between the failing
  # scenario's start and its verdict there is no line of the other's.
  whole() {
    sed -n '/=== scenario selftest\/fail/,/=== FAIL selftest\/fail/p' <<<"$out" | grep -q 'check-[ab]' && return 1
    grep -q 'selftest-fail: a stand-in failure' <<<"$out"
  }
  expect "each scenario's output is printed whole" whole
fi

[ "$fails" = 0 ] || { echo "FAIL selftest: $fails"; exit 1; }
echo "PASS selftest"
