#!/usr/bin/env bash
# timeout: 1500
# alone: a benchmark; another test machine beside it would skew its numbers.
# Benchmark, not a test: husk-vmm against QEMU microvm (see vmm.py). Run it
# where KVM boots Linux: `tests/run.sh bench/vmm` (nested here).
set -euo pipefail
exec python3 -u "$HUSK_REPO/tests/bench/vmm.py"
