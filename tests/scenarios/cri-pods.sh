#!/usr/bin/env bash
# timeout: 1500
# Pods through containerd's CRI plugin with crictl: husk and runc pods on a
# CNI bridge, their network, DNS, hostname, size and PID namespace, bad
# CNI input, and the teardown (tests/cri/pods.sh says what is checked).
set -uo pipefail
repo=${HUSK_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
exec "$repo/tests/cri/pods.sh"
