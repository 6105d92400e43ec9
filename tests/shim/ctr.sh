# shellcheck shell=bash
# The frame of the shim scenarios that drive containerd with `ctr`
# (tests/scenarios/shim-ctr.sh, shim-extra.sh): a private containerd, the
# husk configuration, a sampler of husk's processes and VM logs, the check
# machinery and the verdict. A scenario sets `repo`, sources this file (it
# sources tests/shim/containerd.sh, tests/shim/lib.sh and tests/lib/common.sh)
# and keeps only its checks:
#
#   ctr_setup NAME STATE LIMIT   preflight; $work ($HUSK_OUT/NAME), $state (the
#                                shim's state folder, STATE), $limit (seconds for
#                                one ctr command), $img, $husk and $runc (ctr's
#                                --runtime options), HUSK_CONFIG; prints the kernels
#   (the scenario writes its husk configurations: husk_shim_config)
#   ctr_start                    the sampler, containerd with the busybox image,
#                                the stall watcher (tests/lib/common.sh), the
#                                teardown at exit
#   check_NAME                   the scenario's checks, using
#     want DESCRIPTION TEST...   one expectation (tests/shim/lib.sh)
#     run_ctr NAME ARGS...       `ctr ARGS`: exit code in $rc, stdout in $o,
#                                stderr in $e (files $work/NAME.std{out,err})
#     vms_between T0 T1          husk-vmm processes the sampler saw meanwhile
#     and tests/shim/lib.sh: husk_wait_task, task_status, vmm_of, wait_until, ...
#   ctr_run_checks NAME...       runs each check once (HUSK_SHIM_CHECKS, a
#                                blank-separated list, overrides the list);
#                                prints the summary and exits with the verdict
#
# Each check prints PASS or FAIL; after every check all tasks and containers
# are removed and nothing may be left (no husk process, no mount under and no
# file in $state, no task, no container). A failed check shows the
# containerd and shim log lines of its time and its VMs' consoles and VMM
# logs. HUSK_SHIM_RUNTIME (default io.containerd.husk.v2) runs the husk
# checks with another runtime: with io.containerd.runc.v2 a check of the
# checks (those about the VM must then fail).

repo=${repo:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
# shellcheck source=../shim/containerd.sh
source "$repo/tests/shim/containerd.sh"
# shellcheck source=../shim/lib.sh
source "$repo/tests/shim/lib.sh"
# shellcheck source=../lib/common.sh
source "$repo/tests/lib/common.sh"

say() { echo "[${scenario:-shim}] $*"; }

# ctr_setup NAME STATE LIMIT: see above. Also sets guest_release (the guest
# kernel's release), l1_release and l1_boot (this machine's kernel release
# and boot id: a container that sees others ran in another kernel).
ctr_setup() {
  scenario=$1 state=$2 limit=$3
  out=${HUSK_OUT:-$(mktemp -d)}
  export HUSK_OUT=$out
  work=$out/$scenario
  procs=$work/procs.log
  mkdir -p "$work/vm-logs"
  export HUSK_SHIM_STATE_DIR=$state # husk_procs: only this test's VMs
  husk_ctrd__init # HUSK_CTRD_ADDR and the rest, before anything samples processes
  # Used by the scenarios' checks.
  # shellcheck disable=SC2034
  {
    img=localhost/husk-busybox:latest
    husk=(--runtime "${HUSK_SHIM_RUNTIME:-io.containerd.husk.v2}")
    runc=(--runtime io.containerd.runc.v2)
  }
  failed=()
  cfail=0
  local f
  for f in "${HUSK_BIN:-}/containerd-shim-husk-v2" "${HUSK_VMM:-}" "${HUSK_GUEST_KERNEL:-}/bzImage" \
    "${HUSK_GUEST_KERNEL:-}/kernel.release" "${HUSK_INITRD:-}" /dev/kvm; do
    [ -e "$f" ] || { echo "FAIL preflight: no $f (scripts/build.sh writes target/husk-artifacts.env)"; exit 1; }
  done
  guest_release=$(cat "$HUSK_GUEST_KERNEL/kernel.release")
  l1_release=$(uname -r)
  l1_boot=$(cat /proc/sys/kernel/random/boot_id)
  say "guest kernel $guest_release; this machine: kernel $l1_release, boot id $l1_boot"
  mkdir -p "$state"
  export HUSK_CONFIG=$work/configuration.toml
}

# ctr_sample: twice a second, which husk processes run ("MS PID ARGS" lines
# in $procs: the proof that a VM was there), and a copy of every sandbox's
# console.log, vmm.log and vm.json (debug_console is on; the shim removes
# them with the sandbox) into $work/vm-logs/SANDBOX.{console.log,...}.
ctr_sample() {
  local f
  while :; do
    husk_procs | sed "s/^/$(now_ms) /" >>"$procs"
    for f in "$state"/*/console.log "$state"/*/vmm.log "$state"/*/vm.json; do
      [ -f "$f" ] || continue
      cp -f "$f" "$work/vm-logs/$(basename "$(dirname "$f")").$(basename "$f")" 2>/dev/null
    done
    sleep 0.5
  done
}

# ctr_kill_vms: ends this test's husk processes (should a check have lost
# one).
ctr_kill_vms() {
  local p
  for p in $(husk_procs | awk '{ print $1 }'); do kill -KILL "$p" 2>/dev/null; done
}

ctr_cleanup() {
  stall_unwatch
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
  husk_ctrd_stop || say "the containerd teardown found leftovers (see above)"
  ctr_kill_vms
}

# ctr_start: see above. A sandbox whose guest stays silent is the nested
# machine's stall, not husk's failure: the scenario ends with 75 and the
# runner reruns the checks that did not pass on a fresh test machine.
ctr_start() {
  say "husk configuration $HUSK_CONFIG:"
  grep -vE '^\s*(#|$)' "$HUSK_CONFIG" | indent '    '
  ctr_sample 2>/dev/null &
  sampler=$!
  trap ctr_cleanup EXIT
  husk_ctrd_start || { echo "FAIL containerd did not start"; exit 1; }
  husk_ctrd_import_busybox || { echo "FAIL image import"; exit 1; }
  stall_watch "$state"
}

# run_ctr NAME ARGS...: `ctr ARGS` (time limit $limit), stdout in $o and
# $work/NAME.stdout, stderr in $e and $work/NAME.stderr, exit code in $rc;
# shows the command, its time and the start of its output.
run_ctr() {
  local name=$1 t0
  shift
  t0=$(now_ms)
  timeout --kill-after=10 "$limit" ctr "$@" >"$work/$name.stdout" 2>"$work/$name.stderr" </dev/null
  rc=$?
  o=$(tr -d '\r' <"$work/$name.stdout")
  e=$(tr -d '\r' <"$work/$name.stderr")
  echo "    \$ ctr $* -> exit $rc ($(( $(now_ms) - t0 )) ms)"
  [ -z "$o" ] || head -c 2000 <<<"$o" | indent '      out| '
  [ -z "$e" ] || head -c 3000 <<<"$e" | indent '      err| '
}

# vms_between T0 T1: how many distinct husk-vmm processes the sampler saw
# between T0 and T1 (ms).
vms_between() {
  awk -v a="$1" -v b="$2" '$1 >= a && $1 <= b { n = split($3, p, "/"); if (p[n] == "husk-vmm") s[$2] = 1 }
    END { for (k in s) c++; print c + 0 }' "$procs"
}

# ctr_show_failure FROM: what a failed check shows: the containerd and shim
# log from line FROM on, without the noise, and the consoles and VMM logs
# of the VMs that ran during the check.
ctr_show_failure() {
  local from=$1 f
  echo "    ---- containerd/shim log during the check:"
  tail -n +"$from" "$HUSK_CTRD_LOG" |
    grep -a -v -E 'event (forwarded|published)|snapshot|garbage|level=debug msg="(get|prepare|remove)' |
    tail -n 80 | cut -c1-800 | indent '    log| '
  for f in "$work"/vm-logs/*; do
    [ -f "$f" ] || continue
    [ "$f" -nt "$work/.check-start" ] || continue
    echo "    ---- $(basename "$f") (last 30 lines):"
    tail -n 30 "$f" | cut -c1-300 | indent '    vm| '
  done
}

# check NAME: runs check_NAME (dashes become underscores), then ends the
# background jobs it left (a `ctr run` or `ctr events` of a check that
# stopped early), removes every task and container and demands that nothing
# is left. Leaves cfail 0 when the check passed; a failed check goes into
# $failed (NAME(leftovers) when it left something behind).
check() {
  local name=$1 t0 left from before j
  echo "==== $name"
  cfail=0
  t0=$(now_ms)
  touch "$work/.check-start"
  from=$(($(wc -l <"$HUSK_CTRD_LOG") + 1))
  before=" $(jobs -p | tr '\n' ' ') "
  "check_${name//-/_}"
  stall_exit
  [ "$cfail" = 0 ] || failed+=("$name")
  for j in $(jobs -p); do [[ "$before" == *" $j "* ]] || kill "$j" 2>/dev/null; done
  husk_ctrd_clean >/dev/null 2>&1
  if left=$(husk_wait_clean "$state" 30); then
    echo "    ok   nothing left behind"
  else
    echo "    FAIL $left"
    failed+=("$name(leftovers)")
    cfail=1
    ctr_kill_vms
    findmnt -rn -o TARGET | awk -v d="$state" 'index($0, d) == 1' | sort -r | xargs -r -n1 umount -l
    rm -rf "${state:?}"/*
  fi
  if [ "$cfail" = 0 ]; then
    echo "PASS $name ($(( ($(now_ms) - t0) / 1000 )) s)"
  else
    ctr_show_failure "$from"
    echo "FAIL $name ($(( ($(now_ms) - t0) / 1000 )) s)"
  fi
}

# ctr_run_checks NAME...: see above.
ctr_run_checks() {
  local c t_all checks=("$@")
  t_all=$(now_ms)
  [ -z "${HUSK_SHIM_CHECKS:-}" ] || read -r -a checks <<<"$HUSK_SHIM_CHECKS"
  for c in "${checks[@]}"; do check_once "$c"; done
  echo "==== summary ($(( ($(now_ms) - t_all) / 1000 )) s)"
  if [ ${#failed[@]} -eq 0 ]; then
    echo "PASS $scenario: ${#checks[@]} checks"
    exit 0
  fi
  echo "(each failed check shows its log above; the whole containerd log with the shim's is"
  echo " $HUSK_CTRD_LOG, the VMs' consoles and VMM logs are in $work/vm-logs)"
  echo "FAIL $scenario: ${failed[*]}"
  exit 1
}
