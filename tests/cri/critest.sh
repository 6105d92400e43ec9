#!/usr/bin/env bash
# Kubernetes' CRI conformance suite (critest, cri-tools v1.26.1) against a
# private containerd's CRI plugin, with the runtime handler runc and then
# husk (the same containerd, one run after the other), and one table of
# both: per group, passed/total for each handler; then the specs husk fails
# that runc passes, each with its first error line.
#
#   tests/cri/critest.sh [--full] [HANDLER...]   # default handlers: runc husk
#
# Default (CI): the focused subset tests/cri/ci-subset.txt (a few minutes
# for husk in the test machine). --full: the whole default suite. Both
# skip the digest spec (it pulls a fixed digest of an image built
# elsewhere, which no local registry can serve). The verdict (exit 1): husk
# fails a spec runc passes that tests/cri/husk-exceptions.txt (one spec
# text per line, `# reason`) does not list; exceptions that pass now are
# reported. Needs root, containerd, runc, the CNI plugins, and for husk
# real KVM (the nested test machine: tests/scenarios/cri-critest.sh).
#
# What it sets up and tears down: tests/cri/lib.sh.
#
# Results in $HUSK_OUT/cri-critest (else a temporary folder): each
# handler's critest log, JUnit and JSON reports, the table (report.txt),
# containerd's log with the shim's, the VMs' consoles.
# Settings: HUSK_CRITEST_FOCUS / HUSK_CRITEST_SKIP (ginkgo regular
# expressions replacing the subset / added to the skips),
# HUSK_CRITEST_TIMEOUT (ginkgo's suite timeout, default 3h), HUSK_CONFIG,
# HUSK_CTRD_DIR, and the build outputs for husk (target/husk-artifacts.env).
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"

full=0
handlers=()
for a in "$@"; do
  case "$a" in
    --full) full=1 ;;
    -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    -*) echo "critest.sh: unknown option $a" >&2; exit 2 ;;
    *) handlers+=("$a") ;;
  esac
done
[ ${#handlers[@]} -gt 0 ] || handlers=(runc husk)
say() { echo "[critest] $*"; }

if [[ " ${handlers[*]} " == *" husk "* ]]; then
  cri_up cri-critest husk || exit 1
else
  cri_up cri-critest || exit 1
fi

# ---- the runs --------------------------------------------------------------
focus=()
if [ -n "${HUSK_CRITEST_FOCUS:-}" ]; then
  focus=("-ginkgo.focus=$HUSK_CRITEST_FOCUS")
elif [ "$full" = 0 ]; then
  # Go regexp escapes (RE2 refuses Python's escaped blanks); anchored at the
  # end only: ginkgo matches the suite's description, a blank, then the text.
  re=$(grep -vE '^\s*(#|$)' "$here/ci-subset.txt" | python3 -c '
import re, sys
print("|".join(re.sub(r"([][\\.+*?(){}|^$])", r"\\\1", l.strip()) + "$" for l in sys.stdin))')
  focus=("-ginkgo.focus=$re")
fi
skip=("-ginkgo.skip=public image with digest should be pulled and removed")
[ -z "${HUSK_CRITEST_SKIP:-}" ] || skip+=("-ginkgo.skip=$HUSK_CRITEST_SKIP")
if [ -n "${HUSK_CRITEST_FOCUS:-}" ]; then
  mode="focus $HUSK_CRITEST_FOCUS"
elif [ "$full" = 1 ]; then
  mode="full suite"
else
  mode="CI subset ($(grep -cvE '^\s*(#|$)' "$here/ci-subset.txt") specs, tests/cri/ci-subset.txt)"
fi
say "mode: $mode; handlers: ${handlers[*]}"

declare -A took
for h in "${handlers[@]}"; do
  say "=== critest --runtime-handler $h (log $work/critest-$h.log)"
  t=$(now_ms)
  "$tools/critest" --runtime-endpoint "$endpoint" --image-endpoint "$endpoint" --runtime-handler "$h" \
    "-ginkgo.timeout=${HUSK_CRITEST_TIMEOUT:-3h}" -ginkgo.v -ginkgo.no-color \
    "-ginkgo.junit-report=$work/junit-$h.xml" "-ginkgo.json-report=$work/report-$h.json" \
    "${focus[@]}" "${skip[@]}" >"$work/critest-$h.log" 2>&1 &
  wait $!
  rc=$?
  stall_exit
  took[$h]=$(( ($(now_ms) - t) / 1000 ))
  say "critest $h: exit $rc in ${took[$h]} s; $(grep -aE '^(Ran|PASS|FAIL)' "$work/critest-$h.log" | tr '\n' ' ')"
  # Between handlers: no pod of one run may meet the next.
  "$tools/crictl" --runtime-endpoint "$endpoint" rmp --force --all >/dev/null 2>&1
done

# ---- the table -------------------------------------------------------------
echo
for h in "${handlers[@]}"; do say "run time $h: ${took[$h]} s"; done
if [ ${#handlers[@]} -eq 2 ]; then
  python3 "$here/report.py" "${handlers[0]}" "$work/report-${handlers[0]}.json" \
    "${handlers[1]}" "$work/report-${handlers[1]}.json" "$here/husk-exceptions.txt" "$work/report.txt"
  verdict=$?
else
  python3 "$here/report.py" "${handlers[0]}" "$work/report-${handlers[0]}.json" \
    "${handlers[0]}" "$work/report-${handlers[0]}.json" /dev/null "$work/report.txt"
  verdict=$?
fi
exit "$verdict"
