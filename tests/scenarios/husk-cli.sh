#!/usr/bin/env bash
# timeout: 900
# The `husk` command in the test machine (real, nested KVM): `husk check`
# passes; with two sandboxes running (`ctr run -d`), `husk ps` lists both
# with their VMM pids, `husk metrics --once` is parsed by Prometheus's own
# text parser (python3-prometheus-client) and has every documented metric
# for each sandbox, `husk logs` shows the guest console; the shim's own
# figures (metrics.json: guest memory use, agent request latencies, OOM
# kills) come out for a sandbox whose container's child is OOM-killed
# (check_husk_metrics_shim); `husk exec` (the debug console,
# debug_console = true here) prints the guest kernel's release as the
# guest's console reports it, passes exit codes through (128 + N for a
# signal), keeps stdout and stderr apart, runs an interactive shell on a
# terminal (under script(1)), and is refused, naming the key, by a
# configuration with debug_console = false. The host half (`husk check`
# failing on a software /dev/kvm) is cli/tests/cli.rs.
#
#   tests/run.sh husk-cli   (after scripts/build.sh)
# check_* functions are called by name (check in tests/shim/ctr.sh).
# shellcheck disable=SC2317
set -uo pipefail
repo=${HUSK_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
# shellcheck source=../shim/ctr.sh
source "$repo/tests/shim/ctr.sh"

ctr_setup husk-cli /run/husk-c 300
husk_shim_config "$HUSK_CONFIG" "$state" boot_timeout_secs=240 request_timeout_secs=120
ctr_start

husk_cmd() { PATH="${HUSK_BIN:-$repo/target/release}:$PATH" husk --config "$HUSK_CONFIG" --containerd-config "$HUSK_CTRD_DIR/config.toml" "$@"; }

check_husk_check() {
  husk_cmd check >"$work/check.out" 2>&1
  local rc=$?
  indent '      | ' <"$work/check.out"
  want "husk check: exit 0 (no FAIL)" [ "$rc" = 0 ]
  want "kvm-hardware is OK" grep -qE '^OK +kvm-hardware' "$work/check.out"
  want "the VMM, kernel and initrd are OK" [ "$(grep -cE '^OK +(vmm|kernel|initrd) ' "$work/check.out")" = 3 ]
}

check_husk_ps_metrics_logs() {
  local a=hc-a b=hc-b
  run_ctr run-a run -d "${husk[@]}" "$img" "$a" sleep 600
  want "run -d $a: exit 0" [ "$rc" = 0 ] || return
  run_ctr run-b run -d "${husk[@]}" "$img" "$b" sleep 600
  want "run -d $b: exit 0" [ "$rc" = 0 ] || return
  want "$a runs" husk_wait_task "$a" "$limit" || return
  want "$b runs" husk_wait_task "$b" "$limit" || return

  husk_cmd ps >"$work/ps.out" 2>&1
  indent '      | ' <"$work/ps.out"
  local id pid
  for id in "$a" "$b"; do
    pid=$(vmm_of "$id")
    # shellcheck disable=SC2016 # awk's own variables
    want "husk ps lists $id with its VMM pid ${pid:-?}" \
      awk -v id="$id" -v pid="$pid" '$1 == id && $3 == pid && pid != "" { f = 1 } END { exit !f }' "$work/ps.out"
  done

  husk_cmd metrics --once >"$work/metrics.txt" 2>"$work/metrics.err"
  want "husk metrics --once: exit 0" [ "$?" = 0 ]
  want "Prometheus's parser reads it, every metric for each sandbox" \
    python3 - "$work/metrics.txt" "$a" "$b" <<'PY'
import sys
from prometheus_client.parser import text_string_to_metric_families
text = open(sys.argv[1]).read()
fams = {f.name: f for f in text_string_to_metric_families(text)}
per_sandbox = [
    "husk_sandbox_vmm_up", "husk_sandbox_vmm_resident_memory_bytes",
    "husk_sandbox_vmm_cpu_seconds", "husk_sandbox_vcpus",
    "husk_sandbox_guest_memory_bytes", "husk_sandbox_start_time_seconds",
    "husk_sandbox_boot_seconds", "husk_sandbox_containers",
    "husk_sandbox_guest_faults", "husk_sandbox_guest_fault_logs_suppressed",
    "husk_sandbox_console_bytes", "husk_sandbox_console_dropped_bytes",
    "husk_sandbox_vmm_log_bytes", "husk_sandbox_vmm_log_dropped_lines",
]
ok = True
for host in ["husk_sandboxes", "husk_sandboxes_running"]:
    if host not in fams or fams[host].samples[0].value < 2:
        print(f"      {host}: missing or < 2"); ok = False
for name in per_sandbox:
    fam = fams.get(name)
    for sb in sys.argv[2:]:
        got = [s for s in (fam.samples if fam else []) if s.labels.get("sandbox_id") == sb]
        if not got:
            print(f"      {name}: none for {sb}"); ok = False
        elif not all("pod" in s.labels and "namespace" in s.labels for s in got):
            print(f"      {name}: {sb} lacks the pod/namespace labels"); ok = False
up = [s for s in fams["husk_sandbox_vmm_up"].samples if s.value != 1]
if up:
    print(f"      not up: {up}"); ok = False
rss = [s for s in fams["husk_sandbox_vmm_resident_memory_bytes"].samples if s.value <= 0]
if rss:
    print(f"      no RSS: {rss}"); ok = False
sys.exit(0 if ok else 1)
PY
  head -40 "$work/metrics.txt" | indent '      | '

  husk_cmd logs --console "$a" >"$work/logs.out" 2>&1
  want "husk logs --console $a shows the guest's boot" grep -q "Linux version" "$work/logs.out"
  husk_cmd logs --vmm "$a" >"$work/logs-vmm.out" 2>&1
  want "husk logs --vmm $a shows the VMM's log" grep -q "vmm.log <==" "$work/logs-vmm.out"

  for id in "$a" "$b"; do
    run_ctr "kill-$id" task kill -s SIGKILL "$id"
    wait_until 30 task_is "$id" STOPPED
    run_ctr "rm-$id" task delete "$id"
    run_ctr "crm-$id" container delete "$id"
  done
  husk_cmd ps >"$work/ps-after.out" 2>&1
  want "husk ps lists neither after delete" bash -c "! grep -qE '^hc-' '$work/ps-after.out'"
}

# The shim's figures: a sandbox whose container runs `tail /dev/zero` (it
# reads one endless line into memory) under a 32 MiB limit, as a child of
# sh, which lives on: the guest's OOM killer kills tail, the container
# stays. `husk metrics --once` must then show, parsed by Prometheus's
# parser, the file's series with sane values and the kill.
check_husk_metrics_shim() {
  local id=hc-oom
  run_ctr run-oom run -d --memory-limit 33554432 "${husk[@]}" "$img" "$id" sh -c 'tail /dev/zero; echo tail-ended; sleep 600'
  want "run -d $id: exit 0" [ "$rc" = 0 ] || return
  want "$id runs" husk_wait_task "$id" "$limit" || return
  # The publisher rewrites metrics.json within a second of the kill.
  local n=0 got=1
  while [ "$n" -lt 60 ]; do
    husk_cmd metrics --once >"$work/metrics-shim.txt" 2>"$work/metrics-shim.err"
    if python3 - "$work/metrics-shim.txt" "$id" >"$work/metrics-shim.why" 2>&1 <<'PY'
import sys
from prometheus_client.parser import text_string_to_metric_families
text, sb = open(sys.argv[1]).read(), sys.argv[2]
fams = {f.name: f for f in text_string_to_metric_families(text)}
def samples(family, name=None, **labels):
    fam = fams.get(family)
    return [s for s in (fam.samples if fam else [])
            if s.labels.get("sandbox_id") == sb and (name is None or s.name == name)
            and all(s.labels.get(k) == v for k, v in labels.items())]
def one(family, name=None, **labels):
    got = samples(family, name, **labels)
    if len(got) != 1:
        print(f"      {name or family}{labels}: {len(got)} samples for {sb}")
        return None
    return got[0].value
ok = True
def want(what, cond):
    global ok
    if not cond:
        print(f"      want {what}"); ok = False
if fams.get("husk_sandbox_agent_request_duration_seconds") is not None:
    want("a histogram", fams["husk_sandbox_agent_request_duration_seconds"].type == "histogram")
want("metrics_file_ok 1", one("husk_sandbox_metrics_file_ok") == 1)
vm = one("husk_sandbox_guest_memory_bytes") or 0
used = one("husk_sandbox_guest_memory_used_bytes")
avail = one("husk_sandbox_guest_memory_available_bytes")
want(f"0 < guest memory used {used} < VM memory {vm}", used is not None and 0 < used < vm)
want(f"0 < available {avail} < VM memory {vm}", avail is not None and 0 < avail < vm)
h = "husk_sandbox_agent_request_duration_seconds"
count = one(h, h + "_count", method="CreateContainer")
total = one(h, h + "_sum", method="CreateContainer")
inf = one(h, h + "_bucket", method="CreateContainer", le="+Inf")
want(f"CreateContainer count {count} > 0", (count or 0) > 0)
want(f"CreateContainer +Inf bucket {inf} == count", inf == count)
want(f"CreateContainer sum {total} in (0, 240)", total is not None and 0 < total < 240)
want("CreateContainer errors 0", one("husk_sandbox_agent_request_errors", method="CreateContainer") == 0)
for m in ["StartContainer", "GetMemInfo"]:
    want(f"{m} counted", (one(h, h + "_count", method=m) or 0) > 0)
kills = one("husk_sandbox_container_oom_kills", container_id=sb)
want(f"OOM kills of {sb}: {kills} >= 1", (kills or 0) >= 1)
sys.exit(0 if ok else 1)
PY
    then got=0; break; fi
    n=$((n + 1)); sleep 1
  done
  indent '      | ' <"$work/metrics-shim.why"
  want "husk metrics: the shim's series for $id, sane, with its OOM kill (after ${n}s)" [ "$got" = 0 ]
  grep -E 'guest_memory_(used|available)|request_duration_seconds_(count|sum)\{.*CreateContainer|errors_total\{.*CreateContainer|oom_kills|metrics_file_ok' \
    "$work/metrics-shim.txt" | indent '      | '
  run_ctr "kill-$id" task kill -s SIGKILL "$id"
  wait_until 30 task_is "$id" STOPPED
  run_ctr "rm-$id" task delete "$id"
  run_ctr "crm-$id" container delete "$id"
}


check_husk_exec() {
  local x=hc-x
  # timeout(1) runs programs, not functions: husk_cmd as an array.
  local hx=("${HUSK_BIN:-$repo/target/release}/husk" --config "$HUSK_CONFIG" --containerd-config "$HUSK_CTRD_DIR/config.toml")
  run_ctr run-x run -d "${husk[@]}" "$img" "$x" sleep 600
  want "run -d $x: exit 0" [ "$rc" = 0 ] || return
  want "$x runs" husk_wait_task "$x" "$limit" || return

  # The guest's own report of its release: the console's first line.
  local release
  release=$(husk_cmd logs --console "$x" | grep -o 'Linux version [^ ]*' | head -1 | awk '{print $3}')
  timeout 60 "${hx[@]}" exec "$x" uname -r </dev/null >"$work/exec-uname.out" 2>"$work/exec-uname.err"
  local rc=$?
  indent '      | ' <"$work/exec-uname.out"
  indent '      ! ' <"$work/exec-uname.err"
  local ok=0
  [ "$rc" = 0 ] && [ -n "$release" ] && [ "$(cat "$work/exec-uname.out")" = "$release" ] && ok=1
  want "husk exec $x uname -r: exit 0, prints the console's release ${release:-?}" [ "$ok" = 1 ]

  timeout 60 "${hx[@]}" exec "$x" sh -c 'exit 3' </dev/null
  rc=$?
  want "husk exec $x sh -c 'exit 3': exit 3 (got $rc)" [ "$rc" = 3 ]
  # shellcheck disable=SC2016 # the guest's shell expands it
  timeout 60 "${hx[@]}" exec "$x" sh -c 'kill -9 $$' </dev/null
  rc=$?
  want "husk exec $x sh -c 'kill -9 \$\$': exit 137 (128 + SIGKILL; got $rc)" [ "$rc" = 137 ]
  timeout 60 "${hx[@]}" exec "$x" sh -c 'echo out; echo err >&2' </dev/null >"$work/exec-out" 2>"$work/exec-err"
  ok=0
  [ "$(cat "$work/exec-out")" = out ] && [ "$(cat "$work/exec-err")" = err ] && ok=1
  want "husk exec without a terminal keeps stdout and stderr apart" [ "$ok" = 1 ]
  echo guest-stdin | timeout 60 "${hx[@]}" exec "$x" cat >"$work/exec-cat" 2>&1
  want "husk exec without a terminal: stdin reaches the command, its end ends it" \
    [ "$(cat "$work/exec-cat")" = guest-stdin ]

  # A terminal: script(1) gives husk exec one; the default command is the
  # guest's /bin/sh. `hi$((6*7))` tells the shell's output from the echo.
  local husk_line
  husk_line=$(printf '%q ' "${hx[@]}" exec "$x")
  # shellcheck disable=SC2016 # the guest's shell expands it
  printf 'tty; echo hi$((6*7)); exit 7\n' |
    timeout 60 script -qec "$husk_line" /dev/null >"$work/exec-tty.out" 2>&1
  rc=$?
  tr -d '\r' <"$work/exec-tty.out" | indent '      | '
  ok=0
  [ "$rc" = 7 ] && grep -q hi42 "$work/exec-tty.out" && grep -q /dev/pts/ "$work/exec-tty.out" && ok=1
  want "husk exec $x on a terminal: an interactive shell, exit 7 (got $rc)" [ "$ok" = 1 ]
  want "no husk exec left on the host" bash -c "! pgrep -x husk"

  # The host's policy: a configuration with debug_console = false refuses
  # before reaching the guest, naming the key.
  sed 's/^debug_console *=.*/debug_console = false/' "$HUSK_CONFIG" >"$work/debug-off.toml"
  PATH="${HUSK_BIN:-$repo/target/release}:$PATH" timeout 60 husk --config "$work/debug-off.toml" \
    --containerd-config "$HUSK_CTRD_DIR/config.toml" exec "$x" uname -r </dev/null >"$work/exec-off.out" 2>&1
  rc=$?
  indent '      | ' <"$work/exec-off.out"
  ok=0
  [ "$rc" = 1 ] && grep -q 'debug_console = true' "$work/exec-off.out" && ok=1
  want "debug_console = false: husk exec refuses (exit 1), naming the key" [ "$ok" = 1 ]

  run_ctr kill-x task kill -s SIGKILL "$x"
  wait_until 30 task_is "$x" STOPPED
  run_ctr rm-x task delete "$x"
  run_ctr crm-x container delete "$x"
}

ctr_run_checks husk_check husk_ps_metrics_logs husk_metrics_shim husk_exec
