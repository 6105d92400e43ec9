#!/usr/bin/env bash
# The nested-boot stall soak: boots the guest BOOTS times in each of L1S
# fresh test machines (default 20 x 10 = 200 nested boots) and prints the
# stalls per L1 and in all, with each L1's clocksource.
#
#   tests/soak/stall.sh [L1S] [BOOTS]         # after scripts/build.sh
#   HUSK_L1_APPEND="kvm_amd.vgif=0" tests/soak/stall.sh 5 20   # a hypothesis
#
# The test machine's shape comes from the HUSK_L1_* variables (tests/run.sh);
# HUSK_SOAK_STALL_SECS (default 20) is the silence that makes a stall (a
# healthy guest prints within about 1 s). Results: target/test-logs/soak/.
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
l1s=${1:-10}
boots=${2:-20}
res="$repo/target/test-logs/soak/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$res"
echo "[soak] $l1s L1s x $boots boots; L1: accel ${HUSK_L1_ACCEL:-tcg,thread=multi} cpu ${HUSK_L1_CPU:-max} smp ${HUSK_L1_SMP:-2} append '${HUSK_L1_APPEND-(default: the runner clock settings)}'; results in $res"
t0=$(date +%s)
for i in $(seq "$l1s"); do
  HUSK_L1_RETRIES=0 HUSK_SOAK_BOOTS=$boots "$repo/tests/run.sh" soak/nested-boot >"$res/l1-$i.log" 2>&1
  # Everything the L1 left (its soak results, stall evidence, a frozen
  # machine's CPU state) is kept per L1.
  src="$repo/target/test-logs/soak-nested-boot.log.out"
  [ ! -d "$src" ] || cp -r "$src" "$res/l1-$i"
  if [ -f "$res/l1-$i/soak/summary.json" ]; then
    grep -a '^SOAK_RESULT' "$res/l1-$i.log" | tr -d '\r' | sed "s/^/[soak] L1 $i: /"
  else
    echo "[soak] L1 $i: no result: $(grep -a -m1 -oE 'the L1 machine froze[^;]*|timed out or crashed' "$res/l1-$i.log" || echo 'see the log'); $(grep -ac '^soak: boot' "$res/l1-$i.log") boots before ($res/l1-$i.log)"
  fi
done
python3 "$repo/tests/soak/summary.py" "$res"
echo "[soak] done in $(( $(date +%s) - t0 )) s"
