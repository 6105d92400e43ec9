#!/usr/bin/env bash
# husk's whole test suite: formatting and lints (rustfmt, shellcheck of every
# shell script, clippy), the build, the unit and host integration tests (some
# boot the real guest kernel on the host's /dev/kvm, so they run after the
# build), then every end-to-end scenario on real KVM
# (tests/run.sh). CI runs exactly this (.ci/run). Each stage's time is
# printed at the end, with the test machine's stall census (tests/run.sh).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

times=()
t_start=$(date +%s)
report() {
  local rc=$?
  echo "[test] stage times:"
  printf '[test]   %s\n' "${times[@]}"
  echo "[test]   total $(( $(date +%s) - t_start )) s; exit $rc"
}
trap report EXIT
# stage NAME COMMAND...: runs one stage and records its time.
stage() {
  local name=$1 t0 rc=0
  shift
  echo "[test] $name"
  t0=$(date +%s)
  "$@" || rc=$?
  times+=("$(printf '%-28s %5d s%s' "$name" $(( $(date +%s) - t0 )) "$([ "$rc" = 0 ] || echo "  FAILED ($rc)")")")
  return "$rc"
}

stage "setup" "$repo/scripts/setup.sh"
stage "cargo fmt --check" cargo fmt --all --check
stage "shellcheck" "$repo/scripts/shellcheck.sh"
stage "cargo clippy" cargo clippy --locked --workspace --all-targets -- -D warnings
stage "build (kernels, images)" "$repo/scripts/build.sh"
# shellcheck source=/dev/null
source "$repo/target/husk-artifacts.env"
stage "cargo test" cargo test --locked --workspace
stage "install test" "$repo/tests/shim/install-test.sh"
# Coverage-guided fuzzing, bounded: each target 5 s from its seeds and what
# earlier runs here learned (fuzz/README.md has the longer campaign).
stage "fuzz (12 targets x 5 s)" "$repo/fuzz/run.sh" 5
stage "test machinery self-test" "$repo/tests/selftest/helpers.sh"
# The CRI suite's tools and images, built on the host (Go under the test
# machine's TCG would take many times longer); cached, so seconds when built.
stage "CRI tools and images (tests/cri)" bash -c "'$repo/tests/cri/tools.sh' && '$repo/tests/cri/make-images.sh'"
# Two test machines at a time (each keeps about one core busy); the
# scenarios that time rates run alone afterwards (tests/run.sh, "Lanes").
stage "scenarios (tests/run.sh)" env HUSK_TEST_JOBS="${HUSK_TEST_JOBS:-2}" "$repo/tests/run.sh"
