#!/usr/bin/env bash
# Live sandboxes survive a containerd restart, pods included (issue 14):
# per round, two husk pods through CRI (crictl) and two plain husk
# containers (ctr run -d); containerd is stopped (SIGTERM) while all four
# run, and one pod's container exits with code 7 while it is down; then
# containerd starts again. After it: crictl lists both pods Ready and both
# containers, the one that ended EXITED with code 7; `ctr tasks ls` lists
# the plain ones RUNNING; exec works in both kinds; everything is stopped
# and removed; nothing of husk's and no CNI netns is left.
#
#   tests/run.sh cri-restart                              (one round, CI)
#   HUSK_SHIM_RESTART_ROUNDS=5 tests/run.sh cri-restart   (the loop)
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"
say() { echo "[cri-restart] $*"; }

cri_up cri-restart husk || exit 1
img=registry.k8s.io/e2e-test-images/busybox:1.29-2
crit() { cri --timeout 600s "$@"; }
crit pull "$img" >/dev/null || { echo "FAIL: pulling $img"; exit 1; }
# The plain containers run the image CRI pulled (ctr's namespace is CRI's,
# k8s.io).
plain_img=$img
husk=(--runtime io.containerd.husk.v2)
# The pod container that ends exits this long after it starts: after
# containerd stops (right after it starts), before containerd is back.
exit_after=40

# pod NAME: runs a husk pod; prints its id.
pod() {
  local name=$1
  mkdir -p "$work/logs/$name"
  cat >"$work/pod-$name.json" <<JSON
{"metadata": {"name": "$name", "namespace": "husk-test", "uid": "$name-uid", "attempt": 0},
 "log_directory": "$work/logs/$name", "linux": {}}
JSON
  crit runp --runtime husk "$work/pod-$name.json" 2>"$work/runp-$name.err"
}

# ctr_in POD_ID POD_NAME NAME COMMAND...: creates and starts a container;
# prints its id.
ctr_in() {
  local pid=$1 pname=$2 name=$3 id
  shift 3
  python3 - "$name" "$img" "$@" >"$work/ctr-$pname-$name.json" <<'PY'
import json, sys
name, img, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
print(json.dumps({"metadata": {"name": name}, "image": {"image": img}, "command": cmd,
                  "log_path": name + ".log", "linux": {}}))
PY
  id=$(crit create "$pid" "$work/ctr-$pname-$name.json" "$work/pod-$pname.json" 2>"$work/create-$pname-$name.err") || return 1
  crit start "$id" >/dev/null 2>>"$work/create-$pname-$name.err" || return 1
  echo "$id"
}

cstate() { crit inspect -o json "$1" 2>/dev/null | python3 -c 'import json, sys; s = json.load(sys.stdin)["status"]; print(s["state"], s.get("exitCode", ""))'; }
pstate() { crit inspectp -o json "$1" 2>/dev/null | python3 -c 'import json, sys; print(json.load(sys.stdin)["status"]["state"])'; }
is_exited_7() { [ "$(cstate "$1")" = "CONTAINER_EXITED 7" ]; }
left_ns() { ls /var/run/netns/cni-* >/dev/null 2>&1; }

round() {
  local r=$1 pa pb ca cb t_x id o shims_before shims_down
  local plain=("p$r-c" "p$r-d")
  for id in "${plain[@]}"; do
    hctr run -d "${husk[@]}" "$plain_img" "$id" sleep 600 >"$work/run-$id.log" 2>&1
    want "ctr run -d $id" [ $? = 0 ] || return 1
    want "$id runs" husk_wait_task "$id" 600 || return 1
  done
  pa=$(pod "r$r-a")
  want "pod r$r-a runs" [ -n "$pa" ] || { cat "$work/runp-r$r-a.err"; return 1; }
  ca=$(ctr_in "$pa" "r$r-a" sleeper sleep 100000)
  want "its container starts" [ -n "$ca" ] || return 1
  pb=$(pod "r$r-b")
  want "pod r$r-b runs" [ -n "$pb" ] || { cat "$work/runp-r$r-b.err"; return 1; }
  cb=$(ctr_in "$pb" "r$r-b" ender sh -c "sleep $exit_after; exit 7")
  t_x=$(date +%s)
  want "its container (exits 7 in ${exit_after}s) starts" [ -n "$cb" ] || return 1

  shims_before=$(husk_ctrd_shim_pids | wc -l)
  kill -TERM "$HUSK_CTRD_PID"
  wait "$HUSK_CTRD_PID" 2>/dev/null
  want "containerd stopped, r$r-b's container still ran then" [ "$(( $(date +%s) - t_x ))" -lt "$exit_after" ]
  shims_down=$(husk_ctrd_shim_pids | wc -l)
  want "the $shims_before shims run on without containerd ($shims_down)" [ "$shims_down" = "$shims_before" ]
  while [ "$(date +%s)" -lt $((t_x + exit_after + 5)) ]; do sleep 1; done
  husk_ctrd_start
  want "containerd started again" [ $? = 0 ] || return 1
  disown "$HUSK_CTRD_PID" 2>/dev/null

  for id in "$pa" "$pb"; do
    want "crictl: pod ${id:0:12} SANDBOX_READY ($(pstate "$id"))" [ "$(pstate "$id")" = SANDBOX_READY ]
  done
  want "crictl: r$r-a's container RUNNING ($(cstate "$ca"))" [ "$(cstate "$ca")" = "CONTAINER_RUNNING 0" ]
  want "crictl: r$r-b's container EXITED with code 7 ($(cstate "$cb"))" wait_until 30 is_exited_7 "$cb"
  o=$(crit exec "$ca" echo hello-after-restart 2>&1)
  want "crictl exec in r$r-a ($o)" [ "$o" = hello-after-restart ]
  for id in "${plain[@]}"; do
    want "ctr tasks ls: $id RUNNING" task_is "$id" RUNNING
  done
  o=$(hctr task exec --exec-id e1 "${plain[0]}" echo hello-after-restart 2>&1)
  want "ctr exec in ${plain[0]} ($o)" [ "$o" = hello-after-restart ]

  for id in "${plain[@]}"; do
    hctr task kill -s SIGKILL "$id" >/dev/null 2>&1
    wait_until 30 task_is "$id" STOPPED
    o=$(hctr task delete "$id" 2>&1)
    want "ctr task delete $id (code 137)" grep -q "exit code 137" <<<"$o"
    hctr container delete "$id" >/dev/null 2>&1
    want "ctr container delete $id" [ $? = 0 ]
  done
  crit stop "$ca" >/dev/null 2>&1
  want "crictl stop r$r-a's container" [ $? = 0 ]
  crit rmp -f "$pa" "$pb" >/dev/null 2>&1
  want "crictl rmp both pods" [ $? = 0 ]
  want "nothing of husk's is left (VMM, shim, tap, mount, state folder, task)" husk_wait_clean "$state" 60
  want "no CNI network namespace is left" wait_until 30 not left_ns
}

for r in $(seq "${HUSK_SHIM_RESTART_ROUNDS:-1}"); do
  say "round $r"
  round "$r" || break
done
say "$want_failed expectation(s) failed"
if [ "$want_failed" != 0 ]; then
  echo "FAIL cri-restart"
  exit 1
fi
echo "PASS cri-restart"
