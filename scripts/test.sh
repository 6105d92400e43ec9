#!/usr/bin/env bash
# husk's whole test suite: formatting and lints, the build, the unit and host
# integration tests (some boot the real guest kernel on the host's /dev/kvm,
# so they run after the build), then every end-to-end scenario on real KVM
# (tests/run.sh). CI runs exactly this (.ci/run).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
"$repo/scripts/setup.sh"
echo "[test] cargo fmt --check"
cargo fmt --all --check
echo "[test] cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
"$repo/scripts/build.sh"
# shellcheck source=/dev/null
source "$repo/target/husk-artifacts.env"
echo "[test] cargo test"
cargo test --locked --workspace
echo "[test] configs/install.sh (tests/shim/install-test.sh)"
"$repo/tests/shim/install-test.sh"
"$repo/tests/run.sh"
