# Helpers for the shim scenario and benchmark (source it after
# tests/shim/containerd.sh).

# husk_shim_config OUT STATE_DIR [KEY=TOML_VALUE...]: writes the husk
# configuration the shim reads. It starts from configs/configuration.toml
# (the documented defaults) and points it at the build outputs (the static
# VMM, the guest bzImage, the agent initramfs) and at STATE_DIR; then applies
# the KEY=VALUE overrides (VALUE as TOML: 256, "text", true). The nested test
# machine needs the bzImage: PVH boots of vmlinux stall there now and then.
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
    "$@" <<'PY'
import re, sys
base, out, *sets = sys.argv[1:]
lines = open(base).read().splitlines()
# Top-level keys live before the first [table].
top = next((i for i, l in enumerate(lines) if re.match(r"\s*\[", l)), len(lines))
for kv in sets:
    key, value = kv.split("=", 1)
    line = f"{key} = {value}"
    pat = re.compile(rf"\s*#?\s*{re.escape(key)}\s*=")
    hit = next((i for i in range(top) if pat.match(lines[i])), None)
    if hit is None:
        lines.insert(top, line)
        top += 1
    else:
        lines[hit] = line
with open(out, "w") as f:
    f.write("# Written by tests/shim/lib.sh for a test run.\n" + "\n".join(lines) + "\n")
PY
}

# husk_procs: "PID ARGS" of every live (not zombie) husk-vmm and
# containerd-shim-husk-v2 process. (pgrep -x cannot see the shim: the kernel
# keeps only 15 characters of a process name.)
husk_procs() {
  ps -eo pid=,stat=,args= | awk '$2 !~ /^Z/ {
    n = split($3, p, "/"); b = p[n];
    if (b == "husk-vmm" || b == "containerd-shim-husk-v2") { $2 = ""; print }
  }'
}

# husk_count NAME: how many live processes NAME (husk-vmm or the shim) run.
husk_count() {
  husk_procs | awk -v n="$1" '{ m = split($2, p, "/"); if (p[m] == n) c++ } END { print c + 0 }'
}

# husk_leftovers STATE_DIR: prints what a finished test left behind (live
# husk processes, mounts under STATE_DIR, entries in STATE_DIR, containerd
# tasks and containers); prints nothing when all is clean.
husk_leftovers() {
  local state=$1 p
  p=$(husk_procs)
  [ -z "$p" ] || sed 's/^ */process: /' <<<"$p"
  findmnt -rn -o TARGET | awk -v d="$state" 'index($0, d) == 1 { print "mount: " $0 }'
  [ ! -d "$state" ] || find "$state" -mindepth 1 | sed 's/^/file: /'
  hctr tasks ls -q 2>/dev/null | sed 's/^/task: /'
  hctr containers ls -q 2>/dev/null | sed 's/^/container: /'
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
  until hctr tasks ls 2>/dev/null | awk -v id="$1" '$1 == id && $3 == "RUNNING" { f = 1 } END { exit !f }'; do
    [ $(( $(date +%s) - t0 )) -lt "$limit" ] || return 1
    sleep 0.2
  done
}

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
