#!/usr/bin/env bash
# Benchmark of husk-agent against runc on this machine (as root): builds the
# static release agent (as the guest image does) and the bench client, makes
# the busybox bundle, and prints create+start+wait of `true` through the
# agent vs `runc run`, the ratio, and the agent's idle RSS.
#
#   tests/agent/bench.sh [ITERATIONS]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$repo/target}
command -v runc >/dev/null || { echo "bench: runc is not installed" >&2; exit 1; }
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release --locked \
  -p husk-agent --target x86_64-unknown-linux-gnu --manifest-path "$repo/Cargo.toml"
cargo build --quiet --release --locked -p husk-agent --example agent-bench \
  --manifest-path "$repo/Cargo.toml"
bundle=$(mktemp -d)
trap 'rm -rf "$bundle"' EXIT
"$repo/tests/agent/make-bundle.sh" "$bundle" >/dev/null
"$target_dir/release/examples/agent-bench" \
  "$target_dir/x86_64-unknown-linux-gnu/release/husk-agent" "$bundle" "${1:-20}"
