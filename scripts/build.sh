#!/usr/bin/env bash
# Builds everything husk runs: the Rust binaries, the guest kernel, the
# test-machine kernel and the guest initramfs. Kernels and images are cached
# outside the work tree (guest-kernel/build.sh, rootfs-image/build.sh).
# Writes target/husk-artifacts.env, which the tests and benchmarks source.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

t0=$(date +%s)
echo "[build] cargo build --release" >&2
cargo build --release --locked --workspace >&2
# The agent's vsock client, used by the agent-vsock scenario.
cargo build --release --locked -p husk-agent --example agent-client >&2
# The shim's task-API client, used by the shim-extra scenario (Update).
cargo build --release --locked -p containerd-shim-husk-v2 --example shim-client >&2
# The VMM runs once per pod: linked statically, it maps no shared libraries,
# which keeps its resident memory (per-pod overhead) under 3 MiB. Same flags
# as the guest image's static build, so the two share compiled dependencies.
RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=$repo=/husk" \
  cargo build --release --locked -p husk-vmm --target x86_64-unknown-linux-gnu >&2
guest=$(guest-kernel/build.sh guest)
testvm=$(guest-kernel/build.sh testvm)
initrd=$(rootfs-image/build.sh agent)
test_initrd=$(rootfs-image/build.sh test)

mkdir -p target
cat >target/husk-artifacts.env <<ENV
export HUSK_GUEST_KERNEL=$guest
export HUSK_TESTVM_KERNEL=$testvm
export HUSK_INITRD=$initrd
export HUSK_TEST_INITRD=$test_initrd
export HUSK_BIN=$repo/target/release
export HUSK_VMM=$repo/target/x86_64-unknown-linux-gnu/release/husk-vmm
ENV
echo "[build] done in $(( $(date +%s) - t0 ))s; artifacts in target/husk-artifacts.env:" >&2
cat target/husk-artifacts.env >&2
