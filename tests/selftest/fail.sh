#!/usr/bin/env bash
# timeout: 120
# A stand-in scenario for tests/selftest/helpers.sh: fails, so that the
# runner's lanes are seen to report a failure beside a pass.
set -uo pipefail
echo "selftest-fail: a stand-in failure"
exit 1
