#!/usr/bin/env bash
# Builds husk's fuzz targets and runs each for a bounded time.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Default: 30 s per target, every target. CI runs it with 20-30 s; a longer
# campaign is e.g. `nice -n 19 fuzz/run.sh 3600 block vsock`.
#
# Stable Rust, no cargo-fuzz: libfuzzer-sys builds libFuzzer from source
# (g++), and the coverage instrumentation libFuzzer needs is LLVM's
# SanitizerCoverage, which stable rustc enables with -Cpasses=sancov-module
# and -Cllvm-args (what cargo-fuzz passes too). No sanitizer (-Zsanitizer is
# nightly-only): a safe-Rust bug shows as a panic, which libFuzzer reports as
# a crash; debug assertions and overflow checks are on. `--target` keeps the
# flags off build scripts and proc macros, which must not be instrumented.
# fuzz/Cargo.lock pins the versions; it is not built --locked, so that a
# dependency the husk crates gain is added rather than failing the build.
#
# Each target's seeds are fuzz/corpus/<target>/ (see fuzz/seeds.py); what a
# run learns goes to fuzz/target/corpus/<target>/ (not committed), so the
# next run starts from there. A crash stops the target, its input is saved
# in fuzz/artifacts/<target>/ and the script ends non-zero after the other
# targets ran. Reproduce one with
#   fuzz/target/x86_64-unknown-linux-gnu/release/<target> fuzz/artifacts/<target>/crash-...
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
secs=${1:-30}
shift || true
all=(vm_config vm_control snapshot_state mmio block vsock net_tx fs_error agent_request agent_paths shim_spec shim_config)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
  [[ " ${all[*]} " == *" $t "* ]] || { echo "unknown target $t (have: ${all[*]})" >&2; exit 2; }
done

triple=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 -Cllvm-args=-sanitizer-coverage-stack-depth"
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
start=$(date +%s)
(cd "$here" && cargo build --release --target "$triple" "${bins[@]}")
echo "[fuzz] build: $(($(date +%s) - start)) s"

failed=()
summary=()
for t in "${targets[@]}"; do
  work=$here/target/corpus/$t
  artifacts=$here/artifacts/$t/
  mkdir -p "$work" "$artifacts"
  log=$here/target/$t.log
  # The targets' scratch files (disk image, sockets, rootfs trees) go here,
  # removed after the run.
  scratch=$here/target/tmp/$t
  rm -rf "$scratch"
  mkdir -p "$scratch"
  start=$(date +%s)
  rc=0
  TMPDIR=$scratch "$here/target/$triple/release/$t" "$work" "$here/corpus/$t" \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$artifacts" -print_final_stats=1 >"$log" 2>&1 || rc=$?
  took=$(($(date +%s) - start))
  rm -rf "$scratch"
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1)
  corp=$(grep -oE 'corp: [0-9]+/[0-9]+[a-zA-Z]*' "$log" | tail -1)
  line="$t: runs ${runs:-?}, ${cov:-cov: ?}, ${corp:-corp: ?}, ${took} s"
  if [ "$rc" -ne 0 ]; then
    failed+=("$t")
    line="$line, FAILED (exit $rc): $(grep -m1 -oE "Test unit written to .*" "$log" || echo "see $log")"
    grep -m1 -B2 -A12 -E "panicked at|ERROR: libFuzzer" "$log" >&2 || tail -20 "$log" >&2
  fi
  echo "[fuzz] $line"
  summary+=("$line")
done

echo "[fuzz] summary (${secs} s per target):"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "[fuzz] crashes in: ${failed[*]}" >&2
  exit 1
fi
