#!/usr/bin/env bash
# timeout: 120
# A stand-in scenario for tests/selftest/helpers.sh: on its first test
# machine it passes check-a, then "stalls" (exit 75); on the rerun it must
# find check-a passed and only run check-b.
set -uo pipefail
source "$HUSK_REPO/tests/lib/common.sh"
rerun=0
check_passed check-a && rerun=1
for c in check-a check-b; do
  if check_passed "$c"; then echo "$c: passed before"; continue; fi
  if [ "$c" = check-b ] && [ "$rerun" = 0 ]; then
    touch "$HUSK_OUT/first-attempt"
    census_add stall selftest
    echo "$c: stand-in stall"
    exit "$STALLED"
  fi
  echo "$c: PASS"
  check_record "$c"
done
