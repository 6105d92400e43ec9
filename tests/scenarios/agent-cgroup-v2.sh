#!/usr/bin/env bash
# timeout: 1200
# The agent's host tests inside the L1 test machine, whose cgroup v2 has
# every controller (development hosts may have memory and pids on cgroup v1,
# where those tests can only check the agent's refusal). Run from the host:
#
#   cargo test -p husk-agent --no-run     # builds target/debug/deps/host-*
#   tests/run.sh agent-cgroup-v2          # runs it in the L1
set -euo pipefail
repo=${HUSK_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
# The newest host-* test binary (not its .d file).
bin=$(find "$repo/target/debug/deps" -maxdepth 1 -name 'host-*' ! -name '*.d' -printf '%T@ %p\n' 2>/dev/null |
  sort -rn | head -n 1 | cut -d' ' -f2- || true)
[ -x "$bin" ] || { echo "FAIL: no host test binary: run cargo test -p husk-agent --no-run first"; exit 1; }
echo "cgroup2 controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
# Delegate every controller to the groups below the root, as an init would.
read -r -a controllers </sys/fs/cgroup/cgroup.controllers
for c in "${controllers[@]}"; do
  echo "+$c" >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || echo "cannot enable $c"
done
echo "delegated: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
"$bin" --test-threads=2 "$@"
