#!/usr/bin/env bash
# husk's main job on a fresh machine: install what is needed, build
# everything, boot the guest kernel and image in a micro-VM, printing the
# times, then run a busybox container in a husk micro-VM through containerd
# (`ctr run --runtime io.containerd.husk.v2 ... uname -r`). Where the host
# has no hardware virtualization, both run in the test machine.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/setup.sh"
"$repo/scripts/build.sh"
export HUSK_SHIM_CHECKS=${HUSK_SHIM_CHECKS:-husk-uname husk-in-vm husk-exit}
exec "$repo/tests/run.sh" boot-guest shim-ctr
