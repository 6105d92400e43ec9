# shellcheck shell=bash
# Helpers for the shim scenarios and the benchmark (source it after
# tests/shim/containerd.sh): the husk configuration, husk's processes, what
# a test left behind, waits, expectations, and the KVM probe. The check
# machinery of the scenarios that drive containerd with `ctr` is
# tests/shim/ctr.sh (which sources this file).

# husk_shim_config OUT STATE_DIR [KEY=TOML_VALUE...]: writes the husk
# configuration the shim reads. It starts from configs/configuration.toml
# (the documented defaults) and points it at the build outputs (the static
# VMM, the guest bzImage, the agent initramfs) and at STATE_DIR; then applies
# the KEY=VALUE overrides (VALUE as TOML: 256, "text", true). The nested test
# machine needs the bzImage: PVH boots of vmlinux stall there now and then.
# HUSK_SHIM_TEMPLATE=1 turns VM templates on (template = true) unless the
# overrides say otherwise: `HUSK_SHIM_TEMPLATE=1 tests/run.sh shim-extra`
# runs a shim scenario with its sandboxes restored from templates (shim-ctr
# runs so by default; HUSK_SHIM_TEMPLATE=0 boots each of its sandboxes).
husk_shim_config() {
  local out=$1 state=$2
  shift 2
  local base
  base="$(husk_ctrd__repo)/configs/configuration.toml"
  [ -f "$base" ] || base=/dev/null
  python3 - "$base" "$out" \
    "vmm_path=\"$HUSK_VMM\"" \
    "kernel_path=\"$HUSK_GUEST_KERNEL/bzImage\"" \
    "initrd_path=\"$HUSK_INITRD\"" \
    "state_dir=\"$state\"" \
    "log_level=\"debug\"" \
    "debug_console=true" \
    "$([ "${HUSK_SHIM_TEMPLATE:-0}" = 1 ] && echo template=true || echo template=false)" \
    "$@" <<'PY'
import re, sys
base, out, *sets = sys.argv[1:]
lines = open(base).read().splitlines()
# Top-level keys live before the first [table].
top = next((i for i, l in enumerate(lines) if re.match(r"\s*\[", l)), len(lines))
for kv in sets:
    key, value = kv.split("=", 1)
    line = f"{key} = {value}"
    # The key's setting, else a commented-out one (a comment's prose that
    # starts with "key =" must not win over the setting itself).
    hit = None
    for pat in (rf"\s*{re.escape(key)}\s*=", rf"\s*#\s*{re.escape(key)}\s*="):
        hit = next((i for i in range(top) if re.match(pat, lines[i])), None)
        if hit is not None:
            break
    if hit is None:
        lines.insert(top, line)
        top += 1
    else:
        lines[hit] = line
with open(out, "w") as f:
    f.write("# Written by tests/shim/lib.sh for a test run.\n" + "\n".join(lines) + "\n")
PY
}

# husk_procs: "PID ARGS" of every live (not zombie) husk-vmm, virtiofsd and
# containerd-shim-husk-v2 process of this test: VMMs and virtiofsds of a
# sandbox under $HUSK_SHIM_STATE_DIR, shims of the containerd on $HUSK_CTRD_ADDR (all
# of them where those are unset), so that a husk the host runs for real is
# neither counted nor killed. A VMM's line ends with "log=" and its stderr
# (STATE/ID/vmm.log): a jailed VMM's arguments name only paths inside its
# jail (/vm.json). (pgrep -x cannot see the shim: the kernel keeps only 15
# characters of a process name.)
husk_procs() {
  local pid stat args b log
  # A pipe, not < <(...): the test machine has no /dev/fd.
  ps -eo pid=,stat=,args= | while read -r pid stat args; do
    [[ $stat == Z* ]] && continue
    b=${args%% *}
    b=${b##*/}
    case $b in
      husk-vmm)
        log=$(readlink "/proc/$pid/fd/2" 2>/dev/null || true)
        [ -z "${HUSK_SHIM_STATE_DIR:-}" ] || [[ "$args log=$log" == *"$HUSK_SHIM_STATE_DIR/"* ]] || continue
        echo "$pid $args log=$log" ;;
      containerd-shim-husk-v2)
        [ -z "${HUSK_CTRD_ADDR:-}" ] || [[ "$args " == *"-address $HUSK_CTRD_ADDR "* ]] || continue
        echo "$pid $args" ;;
      virtiofsd)
        # A sandbox's, serving STATE/ID/shared (both of its processes).
        [ -z "${HUSK_SHIM_STATE_DIR:-}" ] || [[ "$args" == *"--shared-dir=$HUSK_SHIM_STATE_DIR/"* ]] || continue
        echo "$pid $args" ;;
    esac
  done
}

# husk_count NAME: how many live processes NAME (husk-vmm or the shim) run.
husk_count() {
  husk_procs | awk -v n="$1" '{ m = split($2, p, "/"); if (p[m] == n) c++ } END { print c + 0 }'
}

# husk_leftovers STATE_DIR: prints what a finished test left behind (live
# husk processes, husk's taps in any named network namespace, mounts under
# STATE_DIR, sandbox cgroups, entries in STATE_DIR but its VM templates, containerd tasks and
# containers); prints nothing when all is clean.
husk_leftovers() {
  local state=$1 p ns
  p=$(husk_procs)
  [ -z "$p" ] || awk '{ sub(/^ */, "process: "); print }' <<<"$p"
  for ns in $(ip netns list 2>/dev/null | awk '{ print $1 }'); do
    ip -n "$ns" -o link show 2>/dev/null | awk -v ns="$ns" '$2 ~ /^husk_tap/ { print "tap: " ns " " $2 }'
  done
  findmnt -rn -o TARGET | awk -v d="$state" 'index($0, d) == 1 { print "mount: " $0 }'
  husk_cgroups | sed 's/^/cgroup: /'
  # (VM templates are a cache kept on purpose: tests/scenarios/shim-template.sh
  # checks them itself.)
  [ ! -d "$state" ] || find "$state" -mindepth 1 -not -path "$state/.templates" -not -path "$state/.templates/*" | sed 's/^/file: /'
  hctr tasks ls -q 2>/dev/null | sed 's/^/task: /'
  hctr containers ls -q 2>/dev/null | sed 's/^/container: /'
}

# husk_cgroups: the cgroup folders of sandboxes that are still there: husk's
# own /husk (where a sandbox whose spec names no cgroup goes) and all in it,
# and the containers' folders in the test containerd's namespace
# (/$HUSK_CTRD_NS/ID, where ctr's specs put them), on cgroup v2 or in the v1
# hierarchies the shim uses.
husk_cgroups() {
  local r
  for r in /sys/fs/cgroup /sys/fs/cgroup/memory /sys/fs/cgroup/cpu /sys/fs/cgroup/pids; do
    [ -f "$r/cgroup.procs" ] || continue
    [ ! -d "$r/husk" ] || find "$r/husk" -type d
    [ -z "${HUSK_CTRD_NS:-}" ] || [ ! -d "$r/$HUSK_CTRD_NS" ] ||
      find "$r/$HUSK_CTRD_NS" -mindepth 1 -maxdepth 1 -type d
  done
}

# husk_wait_clean STATE_DIR [SECONDS]: waits (default 20 s) until nothing is
# left behind; prints the leftovers and fails if something stays.
husk_wait_clean() {
  local state=$1 limit=${2:-20} t0 left
  t0=$(date +%s)
  while :; do
    left=$(husk_leftovers "$state")
    [ -n "$left" ] || return 0
    [ $(( $(date +%s) - t0 )) -lt "$limit" ] || break
    sleep 0.2
  done
  echo "left behind after ${limit} s:"
  printf '%s\n' "$left" | sed 's/^/    /'
  return 1
}

# husk_wait_task ID [SECONDS]: waits (default 300 s) until task ID runs.
husk_wait_task() {
  local id=$1 limit=${2:-300} t0
  t0=$(date +%s)
  until task_is "$id" RUNNING; do
    [ $(( $(date +%s) - t0 )) -lt "$limit" ] || return 1
    sleep 0.2
  done
}

# task_status ID: the status containerd reports for task ID (RUNNING,
# STOPPED, PAUSED, ...), or nothing when there is no such task.
task_status() { hctr tasks ls 2>/dev/null | awk -v id="$1" '$1 == id { print $3 }'; }

# task_is ID STATUS: true if task ID has STATUS.
task_is() { [ "$(task_status "$1")" = "$2" ]; }

# vmm_of ID / shim_of ID: the pid of the husk-vmm of sandbox ID (its VM
# description is in STATE_DIR/ID/) / of the shim of task ID.
vmm_of() { husk_procs | awk -v p="/$1/" 'index($0, p) && $2 ~ /husk-vmm$/ { print $1; exit }'; }
shim_of() { husk_procs | awk -v p="-id $1 " 'index($0 " ", p) && $2 ~ /containerd-shim-husk-v2$/ { print $1; exit }'; }

# wait_until SECONDS COMMAND...: runs COMMAND every 0.1 s until it succeeds
# (0) or SECONDS have passed (1).
wait_until() {
  local limit=$1 t0
  shift
  t0=$(date +%s%3N)
  until "$@"; do
    [ $(( $(date +%s%3N) - t0 )) -lt $(( limit * 1000 )) ] || return 1
    sleep 0.1
  done
}

# want DESCRIPTION TEST...: one expectation. Prints "ok" or "FAIL" with
# DESCRIPTION; on a failure sets cfail=1 (the current check failed), counts
# it in want_failed and returns 1 (so `want ... || return` ends a check).
cfail=0 want_failed=0
want() {
  local d=$1
  shift
  if "$@"; then
    echo "    ok   $d"
  else
    echo "    FAIL $d"
    # Read by the scenario's check (tests/shim/ctr.sh, check_once).
    # shellcheck disable=SC2034
    cfail=1
    want_failed=$((want_failed + 1))
    return 1
  fi
}
# not COMMAND...: true if COMMAND fails (for want).
not() { ! "$@"; }

# husk_wait_file_line FILE REGEX [SECONDS]: waits until FILE has a line
# matching REGEX.
husk_wait_file_line() {
  local f=$1 re=$2 limit=${3:-300} t0
  t0=$(date +%s)
  until grep -aqE "$re" "$f" 2>/dev/null; do
    [ $(( $(date +%s) - t0 )) -lt "$limit" ] || return 1
    sleep 0.2
  done
}

# husk_kvm_probe DIR: can this machine run a KVM guest at all? Boots the guest
# (bzImage, agent initramfs, vsock) with a bare husk-vmm until the agent
# answers (tests/bench/agent-ready.py, 60 s). If that fails, boots the same
# kernel (vmlinux) and initramfs with QEMU -accel kvm (the agent ends that VM
# by itself: it has no vsock device). Returns 0 when husk-vmm's guest is
# ready; 75 when neither guest printed a line on its console (the test
# machine's nested KVM runs no guest: not husk's failure; seen in about one
# L1 boot in four here); 1 when only husk-vmm's guest failed. Logs in DIR.
husk_kvm_probe() {
  local d=$1 n q vm rc
  mkdir -p "$d/husk-vmm"
  # The VM's folder holds its vsock socket: local (DIR may be 9p).
  vm=$(mktemp -d /tmp/husk-probe.XXXXXX)
  python3 "$(husk_ctrd__repo)/tests/bench/agent-ready.py" --vmm "$HUSK_VMM" \
    --kernel "$HUSK_GUEST_KERNEL/bzImage" --initrd "$HUSK_INITRD" \
    --cmdline "console=ttyS0 reboot=k panic=-1 husk.agent_port=1024" \
    --timeout 60 --dir "$vm" >"$d/husk-vmm.out" 2>&1
  rc=$?
  n=$(wc -l <"$vm/console.log" 2>/dev/null || echo 0)
  find "$vm" -maxdepth 1 -type f -exec cp {} "$d/husk-vmm/" \;
  rm -rf "$vm"
  if [ "$rc" = 0 ]; then
    echo "kvm probe: a bare husk-vmm guest answers: $(tail -n 1 "$d/husk-vmm.out")"
    return 0
  fi
  echo "kvm probe: a bare husk-vmm guest did not answer in 60 s ($n console lines; $(grep -m1 '^agent-ready:' "$d/husk-vmm.out"))"
  timeout 90 qemu-system-x86_64 -accel kvm -M microvm,acpi=off -cpu host -smp 1 -m 256 \
    -nodefaults -no-user-config -display none -no-reboot -serial "file:$d/qemu.console" \
    -kernel "$HUSK_GUEST_KERNEL/vmlinux" -initrd "$HUSK_INITRD" \
    -append "console=ttyS0 panic=-1 reboot=t" </dev/null >"$d/qemu.out" 2>&1
  q=$(wc -l <"$d/qemu.console" 2>/dev/null || echo 0)
  echo "kvm probe: QEMU -accel kvm, same guest: $q console lines$(grep -q HUSK_GUEST_READY "$d/qemu.console" 2>/dev/null && echo ', agent ready')"
  if [ "$n" = 0 ] && [ "$q" = 0 ]; then
    echo "kvm probe: no KVM guest prints anything in this machine: its nested KVM is broken (not husk's failure)"
    return 75
  fi
  return 1
}
