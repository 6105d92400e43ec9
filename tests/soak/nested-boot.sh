#!/usr/bin/env bash
# timeout: 1500
# One L1's share of the nested-boot stall soak: HUSK_SOAK_BOOTS (default 20)
# boots of husk-vmm's guest, with the L1's clock and KVM state recorded and a
# stalled boot probed (tests/soak/nested-boot.py). Run it through
# tests/soak/stall.sh, which boots many fresh L1s and adds up their stalls.
set -euo pipefail
[ -c /dev/kvm ] || { echo "FAIL: no /dev/kvm"; exit 1; }
exec python3 "$HUSK_REPO/tests/soak/nested-boot.py" "$HUSK_OUT/soak" \
  --boots "${HUSK_SOAK_BOOTS:-20}" --stall "${HUSK_SOAK_STALL_SECS:-20}"
