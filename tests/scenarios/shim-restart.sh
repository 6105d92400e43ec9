#!/usr/bin/env bash
# timeout: 1800
# Live sandboxes survive a containerd restart (issue 14): four sandboxes
# (`ctr run -d`; three stay, one container exits with code 7 while
# containerd is down); containerd is stopped (SIGTERM) and started again,
# the shims and VMs running on. After it: `ctr tasks ls` lists all four
# (three RUNNING, the ended one STOPPED), exec, kill and delete work, the
# ended container's exit code is 7, everything is removable, and nothing is
# left (the frame's leak census after each check).
#
# long: CI runs cri-restart, which restarts containerd under pods and plain
# containers alike; this one runs by name.
#   tests/run.sh shim-restart                        (one round)
#   HUSK_SHIM_RESTART_ROUNDS=5 tests/run.sh shim-restart  (the loop)
# check_* functions are called by name (check in tests/shim/ctr.sh).
# shellcheck disable=SC2317
set -uo pipefail
repo=${HUSK_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
# shellcheck source=../shim/ctr.sh
source "$repo/tests/shim/ctr.sh"

ctr_setup shim-restart /run/husk-r 300
husk_shim_config "$HUSK_CONFIG" "$state" boot_timeout_secs=240 request_timeout_secs=120
ctr_start

# The ended container sleeps this long, then exits 7: containerd is down
# by then (it stops right after the four run) and back after.
exit_after=30

# containerd_restart: SIGTERM to containerd, then (once the container that
# ends has ended) a new one on the same root, state and socket.
containerd_restart() {
  local t_end=$1 shims_before shims_down
  shims_before=$(husk_ctrd_shim_pids | wc -l)
  kill -TERM "$HUSK_CTRD_PID"
  wait "$HUSK_CTRD_PID" 2>/dev/null
  want "containerd stopped" not kill -0 "$HUSK_CTRD_PID"
  shims_down=$(husk_ctrd_shim_pids | wc -l)
  want "the $shims_before shims run on without containerd ($shims_down)" [ "$shims_down" = "$shims_before" ]
  while [ "$(date +%s)" -lt "$t_end" ]; do sleep 1; done
  husk_ctrd_start
  want "containerd started again" [ "$?" = 0 ]
  # The frame ends the jobs a check started; this containerd must outlive
  # the check, as the first one does.
  disown "$HUSK_CTRD_PID" 2>/dev/null
}

restart_round() {
  local r=$1 id t_x
  local live=("r$r-a" "r$r-b" "r$r-c") ended="r$r-x"
  for id in "${live[@]}"; do
    run_ctr "run-$id" run -d "${husk[@]}" "$img" "$id" sleep 600
    want "run -d $id: exit 0" [ "$rc" = 0 ] || return
  done
  run_ctr "run-$ended" run -d "${husk[@]}" "$img" "$ended" sh -c "sleep $exit_after; exit 7"
  want "run -d $ended: exit 0" [ "$rc" = 0 ] || return
  t_x=$(date +%s)
  for id in "${live[@]}" "$ended"; do
    want "$id runs" husk_wait_task "$id" "$limit" || return
  done
  want "$ended has not ended yet (boots took too long otherwise)" task_is "$ended" RUNNING || return

  containerd_restart $((t_x + exit_after + 5))

  run_ctr "ls-$r" tasks ls
  for id in "${live[@]}"; do
    want "tasks ls: $id RUNNING" task_is "$id" RUNNING
  done
  want "tasks ls: $ended STOPPED" wait_until 20 task_is "$ended" STOPPED
  run_ctr "exec-$r" task exec --exec-id e1 "${live[0]}" echo hello-after-restart
  want "exec in ${live[0]}: exit 0" [ "$rc" = 0 ]
  want "exec in ${live[0]}: its output" [ "$o" = hello-after-restart ]
  run_ctr "kill-$r" task kill -s SIGKILL "${live[1]}"
  want "kill ${live[1]}: exit 0" [ "$rc" = 0 ]
  want "${live[1]} stops" wait_until 30 task_is "${live[1]}" STOPPED
  run_ctr "rm-$ended" task delete "$ended"
  want "delete $ended: exit 0" [ "$rc" = 0 ]
  want "$ended's exit code is 7" grep -q "exit code 7" <<<"$o$e"
  run_ctr "rm-${live[1]}" task delete "${live[1]}"
  want "delete ${live[1]}: exit 0, code 137" grep -q "exit code 137" <<<"$o$e"
  for id in "${live[0]}" "${live[2]}"; do
    run_ctr "kill-$id" task kill -s SIGKILL "$id"
    wait_until 30 task_is "$id" STOPPED
    run_ctr "rm-$id" task delete "$id"
    want "delete $id: exit 0" [ "$rc" = 0 ]
  done
  for id in "${live[@]}" "$ended"; do
    run_ctr "crm-$id" container delete "$id"
    want "container delete $id: exit 0" [ "$rc" = 0 ]
  done
}

rounds=${HUSK_SHIM_RESTART_ROUNDS:-1}
checks=()
for i in $(seq "$rounds"); do
  eval "check_restart_$i() { restart_round $i; }"
  checks+=("restart_$i")
done
ctr_run_checks "${checks[@]}"
