#!/usr/bin/env bash
# timeout: 1500
# containerd restarted under two husk pods (CRI) and two plain husk
# containers, one container exiting while it is down (tests/cri/restart.sh
# says what is checked; HUSK_SHIM_RESTART_ROUNDS loops it).
set -uo pipefail
repo=${HUSK_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
exec "$repo/tests/cri/restart.sh"
