#!/usr/bin/env bash
# timeout: 2700
# containerd -> containerd-shim-husk-v2 -> husk-vmm -> husk-agent, end to end
# with containerd's own client `ctr`, in the test machine (KVM inside):
#
#   - a private containerd (tests/shim/containerd.sh) whose config registers
#     husk the way configs/containerd-husk.toml tells users to, and the busybox
#     image built locally (tests/shim/make-image.sh);
#   - the runc peer: `uname -r` is the test machine's kernel, exit codes;
#   - husk: `uname -r` prints the guest kernel's release; proof that the
#     container ran in a micro-VM (a husk-vmm process during the run, a boot
#     id and a memory size other than the test machine's); two sandboxes
#     read different /dev/urandom bytes and the host's time; exit codes;
#     stdout and stderr apart; the runtime option ConfigPath
#     (`--runtime-config-path`); `ctr task exec` (output, exit code, stdin);
#     `ctr task kill` with SIGTERM and SIGKILL (143, 137) for an exec'd
#     process and the container's init; `ctr run -t` on a pseudo-terminal;
#     two containers in one sandbox (CRI's annotations) share one VM and one
#     shim; a command that does not exist, a bad configuration (vcpus = 0, a
#     kernel_path that is no kernel) fail cleanly; a VMM killed under a
#     running container ends it; a shim killed under one ends its VM;
#   - after every check: no husk-vmm and no containerd-shim-husk-v2 process,
#     no mounts under and no files in the husk state folder, no tasks or
#     containers left.
#
# Templates are on (template = true): the first sandbox boots and leaves
# the template, every later one is restored from it, so these checks cover
# the templated start (as shim-extra and shim-volumes do; shim-restart,
# shim-install, husk-cli and the CRI scenarios boot theirs).
# HUSK_SHIM_TEMPLATE=0 boots every sandbox here.
#
# Each check prints PASS or FAIL; any FAIL makes the scenario fail, after
# the shim's and containerd's log and the guest consoles are shown.
# The frame (containerd, sampler, check machinery, verdict) is
# tests/shim/ctr.sh; this file holds the checks.
#   tests/run.sh shim-ctr            (logs: target/test-logs/shim-ctr.log{,.out/})
# check_* functions are called by name (check in tests/shim/ctr.sh).
# shellcheck disable=SC2317
set -uo pipefail
HUSK_SHIM_TEMPLATE=${HUSK_SHIM_TEMPLATE:-1}
repo=${HUSK_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
# shellcheck source=../shim/ctr.sh
source "$repo/tests/shim/ctr.sh"

ctr_setup shim-ctr "${HUSK_SHIM_STATE:-/run/husk-test}" "${HUSK_SHIM_TIMEOUT:-240}" # a boot here takes ~10 s
# Boots in the nested test machine take ~10 s; the boot timeout stays under
# the ctr command's, so that a VM that does not boot is the shim's error.
tmo=(boot_timeout_secs=120 request_timeout_secs=120)
husk_shim_config "$HUSK_CONFIG" "$state" memory_mib=256 "${tmo[@]}"
husk_shim_config "$work/configuration-384m.toml" "$state" memory_mib=384 "${tmo[@]}"
ctr_start

# ---- runc: the peer, and a check of the checks ----------------------------
check_runc_uname() {
  run_ctr runc-uname run --rm "${runc[@]}" "$img" runc-uname sh -c 'uname -r; cat /proc/sys/kernel/random/boot_id'
  want "exit 0" [ "$rc" = 0 ]
  want "uname -r is this machine's kernel ($l1_release)" [ "$(sed -n 1p <<<"$o")" = "$l1_release" ]
  want "boot id is this machine's (so a different one proves another kernel)" [ "$(sed -n 2p <<<"$o")" = "$l1_boot" ]
}
check_runc_exit() {
  run_ctr runc-exit run --rm "${runc[@]}" "$img" runc-exit sh -c 'exit 7'
  want "exit 7" [ "$rc" = 7 ]
}

# ---- husk --------------------------------------------------------------------
check_husk_uname() {
  local t0 t1
  t0=$(now_ms)
  run_ctr husk-uname run --rm "${husk[@]}" "$img" husk-uname uname -r
  t1=$(now_ms)
  say "ctr run --rm uname -r: $((t1 - t0)) ms"
  want "exit 0" [ "$rc" = 0 ]
  want "stdout is exactly the guest kernel's release ($guest_release)" [ "$o" = "$guest_release" ]
  want "a husk-vmm process ran meanwhile" [ "$(vms_between "$t0" "$t1")" -ge 1 ]
}
check_husk_in_vm() {
  local t0 t1 mem
  t0=$(now_ms)
  run_ctr husk-in-vm run --rm "${husk[@]}" "$img" husk-in-vm sh -c \
    'cat /proc/sys/kernel/random/boot_id; sed -n "s/^MemTotal: *\([0-9]*\) kB/\1/p" /proc/meminfo; cat /proc/cmdline'
  t1=$(now_ms)
  want "exit 0" [ "$rc" = 0 ]
  want "boot id is not this machine's: another kernel" [ -n "$(sed -n 1p <<<"$o")" -a "$(sed -n 1p <<<"$o")" != "$l1_boot" ]
  mem=$(sed -n 2p <<<"$o")
  want "MemTotal ${mem:-?} kB fits the VM's 256 MiB (this machine has $(awk '/MemTotal/ { print $2 }' /proc/meminfo) kB)" \
    [ "${mem:-0}" -gt 65536 -a "${mem:-0}" -le 262144 ]
  want "kernel command line is not this machine's" [ -n "$(sed -n 3p <<<"$o")" -a "$(sed -n 3p <<<"$o")" != "$(cat /proc/cmdline)" ]
  want "exactly one husk-vmm process ran meanwhile" [ "$(vms_between "$t0" "$t1")" = 1 ]
}
check_husk_identity() {
  # Each sandbox is its own machine (CreateSandbox: the host's entropy, the
  # host's clock), as clones of one VM template must be.
  local a b t0 t1 now
  t0=$(date +%s)
  run_ctr husk-id-1 run --rm "${husk[@]}" "$img" husk-id-1 sh -c 'head -c 16 /dev/urandom | od -An -tx1 | tr -d " \n"; echo; date +%s'
  a=$o
  run_ctr husk-id-2 run --rm "${husk[@]}" "$img" husk-id-2 sh -c 'head -c 16 /dev/urandom | od -An -tx1 | tr -d " \n"; echo; date +%s'
  b=$o
  t1=$(date +%s)
  want "sandbox 1 read 16 bytes of /dev/urandom" grep -qxE '[0-9a-f]{32}' <<<"$(sed -n 1p <<<"$a")"
  want "sandbox 2 read 16 bytes of /dev/urandom" grep -qxE '[0-9a-f]{32}' <<<"$(sed -n 1p <<<"$b")"
  want "... and they differ ($(sed -n 1p <<<"$a") / $(sed -n 1p <<<"$b"))" [ "$(sed -n 1p <<<"$a")" != "$(sed -n 1p <<<"$b")" ]
  for now in "$(sed -n 2p <<<"$a")" "$(sed -n 2p <<<"$b")"; do
    want "the container's date +%s (${now:-?}) is within 2 s of the host's during the run ($t0..$t1)" \
      [ "${now:-0}" -ge $((t0 - 2)) -a "${now:-0}" -le $((t1 + 2)) ]
  done
}
check_husk_exit() {
  run_ctr husk-exit run --rm "${husk[@]}" "$img" husk-exit sh -c 'echo to-out; echo to-err >&2; exit 7'
  want "exit 7" [ "$rc" = 7 ]
  want "stdout is 'to-out'" [ "$o" = to-out ]
  want "stderr has 'to-err' (and not stdout's line)" grep -qx to-err <<<"$e"
  want "stderr has no 'to-out'" not grep -q to-out <<<"$e"
}
check_husk_config_path() {
  run_ctr husk-config-path run --rm "${husk[@]}" --runtime-config-path "$work/configuration-384m.toml" "$img" husk-config-path \
    sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo
  want "exit 0" [ "$rc" = 0 ]
  want "MemTotal ${o:-?} kB: the VM has the 384 MiB of the ConfigPath file, not the 256 MiB of HUSK_CONFIG" \
    [ "${o:-0}" -gt 262144 -a "${o:-0}" -le 393216 ]
}
check_husk_exec_kill() {
  local id=husk-exec-kill bg bgrc pid
  # The init traps SIGTERM (an init without a handler ignores it, as under runc).
  timeout "$limit" ctr run --rm "${husk[@]}" "$img" "$id" sh -c \
    'trap "echo got-term; exit 143" TERM; echo ready; while :; do sleep 0.2; done' \
    >"$work/$id.stdout" 2>"$work/$id.stderr" </dev/null &
  bg=$!
  want "the container runs" husk_wait_task "$id" "$limit"
  want "its init printed 'ready'" husk_wait_file_line "$work/$id.stdout" '^ready' 60

  run_ctr husk-exec-1 task exec --exec-id e1 "$id" sh -c 'echo exec-out; echo exec-err >&2; exit 5'
  want "exec: exit 5" [ "$rc" = 5 ]
  want "exec: stdout 'exec-out'" [ "$o" = exec-out ]
  want "exec: stderr 'exec-err'" [ "$e" = exec-err ]

  printf 'line-1\nline-2\n' >"$work/stdin.txt"
  timeout "$limit" ctr task exec --exec-id e2 "$id" sh -c 'cat; echo eof' <"$work/stdin.txt" >"$work/husk-exec-2.stdout" 2>&1
  rc=$?
  o=$(tr -d '\r' <"$work/husk-exec-2.stdout")
  echo "    \$ ctr task exec --exec-id e2 $id sh -c 'cat; echo eof' <stdin.txt -> exit $rc"
  indent '      out| ' <<<"$o"
  want "exec: stdin reaches the process, and its end too" [ "$o" = $'line-1\nline-2\neof' ]
  want "exec: exit 0" [ "$rc" = 0 ]

  # An exec'd process (not an init) dies of SIGTERM: 143; of SIGKILL: 137.
  local sig code
  for sig in SIGTERM:143 SIGKILL:137; do
    code=${sig#*:}
    sig=${sig%:*}
    timeout "$limit" ctr task exec --exec-id "s-$code" "$id" sh -c 'echo started; exec sleep 1000' \
      >"$work/husk-exec-s-$code.stdout" 2>&1 </dev/null &
    pid=$!
    want "exec s-$code started" husk_wait_file_line "$work/husk-exec-s-$code.stdout" '^started' "$limit"
    run_ctr "husk-kill-$code" task kill -s "$sig" --exec-id "s-$code" "$id"
    want "kill -s $sig --exec-id: exit 0" [ "$rc" = 0 ]
    wait "$pid"
    rc=$?
    want "the exec'd sleep ended by $sig: ctr task exec exits $code (got $rc)" [ "$rc" = "$code" ]
  done

  run_ctr husk-kill-init task kill "$id"
  want "kill (SIGTERM) of the init: exit 0" [ "$rc" = 0 ]
  wait "$bg"
  bgrc=$?
  echo "    ctr run of $id -> exit $bgrc"
  indent '      out| ' <"$work/$id.stdout"
  want "the init's SIGTERM trap ran" grep -qx got-term "$work/$id.stdout"
  want "ctr run exits 143 (the trap's exit)" [ "$bgrc" = 143 ]
}
check_husk_sigkill() {
  local id=husk-sigkill bg bgrc
  timeout "$limit" ctr run --rm "${husk[@]}" "$img" "$id" sleep 1000 >/dev/null 2>&1 </dev/null &
  bg=$!
  want "the container runs" husk_wait_task "$id" "$limit"
  sleep 1
  run_ctr husk-sigkill task kill -s SIGKILL "$id"
  want "kill -s SIGKILL: exit 0" [ "$rc" = 0 ]
  wait "$bg"
  bgrc=$?
  want "ctr run exits 137 (got $bgrc)" [ "$bgrc" = 137 ]
}
check_husk_tty() {
  # The shell in the container expands $((1+2)).
  # shellcheck disable=SC2016
  python3 "$repo/tests/shim/pty-run.py" --timeout "$limit" \
    --input 'tty; [ -t 0 ] && echo is-a-tty; echo hi-$((1+2)); exit 3\n' -- \
    ctr run -t --rm "${husk[@]}" "$img" husk-tty sh >"$work/husk-tty.out" 2>&1
  rc=$?
  o=$(tr -d '\r' <"$work/husk-tty.out" | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g')
  echo "    ctr run -t ... sh on a pty, typed 'tty; ...; exit 3' -> exit $rc"
  indent '      tty| ' <<<"$o"
  want "exit 3" [ "$rc" = 3 ]
  want "the shell computed hi-3" grep -qx hi-3 <<<"$o"
  want "stdin is a terminal in the container" grep -qx is-a-tty <<<"$o"
  want "tty names a terminal device" grep -qE '^/dev/(pts/[0-9]+|console|tty)' <<<"$o"
}
check_husk_pod() {
  local t0 sandbox=husk-pod c1=husk-pod-c1 b1 b2 b3
  t0=$(now_ms)
  run_ctr pod-sandbox run -d "${husk[@]}" \
    --annotation io.kubernetes.cri.container-type=sandbox \
    --annotation io.kubernetes.cri.sandbox-id="$sandbox" \
    "$img" "$sandbox" sleep 100000
  want "sandbox container started" [ "$rc" = 0 ]
  want "sandbox container runs" husk_wait_task "$sandbox" "$limit"
  run_ctr pod-c1 run -d "${husk[@]}" \
    --annotation io.kubernetes.cri.container-type=container \
    --annotation io.kubernetes.cri.sandbox-id="$sandbox" \
    "$img" "$c1" sleep 100000
  want "second container started" [ "$rc" = 0 ]
  want "second container runs" husk_wait_task "$c1" "$limit"
  echo "    husk processes now (pid, resident KiB, command):"
  husk_procs | while read -r p _; do ps -o pid=,rss=,args= -p "$p"; done | cut -c1-200 | sed 's/^ */      /'
  want "one husk-vmm process for the pod" [ "$(husk_count husk-vmm)" = 1 ]
  want "one containerd-shim-husk-v2 process for the pod" [ "$(husk_count containerd-shim-husk-v2)" = 1 ]
  run_ctr pod-boot1 task exec --exec-id b "$sandbox" cat /proc/sys/kernel/random/boot_id
  b1=$o
  run_ctr pod-boot2 task exec --exec-id b "$c1" cat /proc/sys/kernel/random/boot_id
  b2=$o
  want "both containers see one kernel (boot ids equal)" [ -n "$b1" -a "$b1" = "$b2" ]
  want "... and it is not this machine's" [ "$b1" != "$l1_boot" ]
  # awk in the container reads its fields.
  # shellcheck disable=SC2016
  run_ctr pod-mem task exec --exec-id m "$sandbox" sh -c \
    'awk "/^MemTotal|^MemAvailable/ { v[\$1] = \$2 } END { print (v[\"MemTotal:\"] - v[\"MemAvailable:\"]) / 1024 }" /proc/meminfo'
  say "pod of two busybox containers: guest memory in use (MemTotal - MemAvailable): ${o:-?} MiB"
  run_ctr pod-ns1 task exec --exec-id n "$sandbox" readlink /proc/1/ns/mnt
  b1=$o
  run_ctr pod-ns2 task exec --exec-id n "$c1" readlink /proc/1/ns/mnt
  want "... but each has its own mount namespace" [ -n "$b1" -a "$b1" != "$o" ]
  # The second container goes; the sandbox and its VM stay.
  run_ctr pod-kill-c1 task kill -s SIGKILL "$c1"
  wait_until 20 task_is "$c1" STOPPED
  run_ctr pod-rm-c1 task delete "$c1"
  want "task $c1 deleted" [ "$rc" = 0 ]
  run_ctr pod-rmc-c1 containers rm "$c1"
  want "container $c1 removed" [ "$rc" = 0 ]
  want "the VM stays for the sandbox" [ "$(husk_count husk-vmm)" = 1 ]
  run_ctr pod-boot3 task exec --exec-id b3 "$sandbox" cat /proc/sys/kernel/random/boot_id
  b3=$o
  want "the sandbox still answers, same kernel" [ "$rc" = 0 -a "$b3" = "$b2" ]
  run_ctr pod-kill-sandbox task kill -s SIGKILL "$sandbox"
  wait_until 20 task_is "$sandbox" STOPPED
  run_ctr pod-rm-sandbox task delete "$sandbox"
  want "task $sandbox deleted" [ "$rc" = 0 ]
  run_ctr pod-rmc-sandbox containers rm "$sandbox"
  want "container $sandbox removed" [ "$rc" = 0 ]
  want "exactly one VM over the whole pod's life" [ "$(vms_between "$t0" "$(now_ms)")" = 1 ]
}
check_husk_bad_command() {
  run_ctr husk-bad-command run --rm "${husk[@]}" "$img" husk-bad-command /no/such/program
  want "ctr run fails (exit $rc)" [ "$rc" != 0 ]
  want "the error names the program" grep -q /no/such/program <<<"$e$o"
}

check_husk_bad_config() {
  husk_shim_config "$work/configuration-bad-vcpus.toml" "$state" vcpus=0
  run_ctr husk-bad-config-1 run --rm "${husk[@]}" --runtime-config-path "$work/configuration-bad-vcpus.toml" "$img" husk-bad-config true
  want "vcpus = 0: ctr run fails (exit $rc)" [ "$rc" != 0 ]
  want "... and the error names vcpus" grep -q vcpus <<<"$e"
  husk_ctrd_clean >/dev/null 2>&1
  # A file that exists but is no kernel: the VMM fails to load it.
  husk_shim_config "$work/configuration-bad-kernel.toml" "$state" "kernel_path=\"$HUSK_INITRD\""
  run_ctr husk-bad-config-2 run --rm "${husk[@]}" --runtime-config-path "$work/configuration-bad-kernel.toml" "$img" husk-bad-config true
  want "kernel_path is not a kernel: ctr run fails (exit $rc)" [ "$rc" != 0 ]
}
check_husk_vm_dies() {
  local id=husk-vm-dies bg bgrc vmm t0
  timeout "$limit" ctr run --rm "${husk[@]}" "$img" "$id" sleep 1000 >"$work/$id.stdout" 2>"$work/$id.stderr" </dev/null &
  bg=$!
  want "the container runs" husk_wait_task "$id" "$limit"
  vmm=$(vmm_of "$id")
  want "its husk-vmm found (${vmm:-none})" [ -n "$vmm" ]
  [ -n "$vmm" ] || return
  kill -KILL "$vmm"
  t0=$(now_ms)
  wait_until 60 not kill -0 "$bg" 2>/dev/null
  want "ctr run returns within 60 s of the VMM's death ($(( ($(now_ms) - t0) / 1000 )) s)" not kill -0 "$bg" 2>/dev/null
  kill "$bg" 2>/dev/null
  wait "$bg"
  bgrc=$?
  echo "    ctr run -> exit $bgrc"
  indent '      err| ' <"$work/$id.stderr"
  want "ctr run exits non-zero (got $bgrc)" [ "$bgrc" != 0 ]
}
no_vmm() { [ "$(husk_count husk-vmm)" = 0 ]; }
check_husk_shim_dies() {
  local id=husk-shim-dies shim t0
  run_ctr husk-shim-dies run -d "${husk[@]}" "$img" "$id" sleep 1000
  want "the container runs" husk_wait_task "$id" "$limit"
  shim=$(shim_of "$id")
  want "its shim found (${shim:-none})" [ -n "$shim" ]
  [ -n "$shim" ] || return
  kill -KILL "$shim"
  t0=$(now_ms)
  wait_until 60 no_vmm
  want "the VM ends within 60 s of the shim's death ($(( ($(now_ms) - t0) / 1000 )) s)" no_vmm
  wait_until 30 not task_is "$id" RUNNING
  want "containerd no longer reports the task running (status: $(task_status "$id"))" [ "$(task_status "$id")" != RUNNING ]
}

ctr_run_checks runc-uname runc-exit husk-uname husk-in-vm husk-identity husk-exit husk-config-path \
  husk-exec-kill husk-sigkill husk-tty husk-pod husk-bad-command husk-bad-config \
  husk-vm-dies husk-shim-dies
