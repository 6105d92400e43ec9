#!/usr/bin/env bash
# husk's main job on a fresh machine: install what is needed, build
# everything, and boot the guest kernel and image in a micro-VM (in the test
# machine where the host has no hardware virtualization), printing the times.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/setup.sh"
"$repo/scripts/build.sh"
exec "$repo/tests/run.sh" boot-guest
