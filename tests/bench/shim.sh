#!/usr/bin/env bash
# timeout: 2400
# alone: a benchmark; another test machine beside it would skew its numbers.
# Benchmark, not a test: what a container costs through containerd with husk
# against runc, in one run on one machine. Run it where KVM boots Linux:
# `tests/run.sh bench/shim` (nested here). HUSK_BENCH_RUNS (default 5) runs
# of each, interleaved, after one unmeasured warm-up of each:
#
#   husk total   `ctr run --rm --runtime io.containerd.husk.v2 busybox true`,
#                wall clock of the ctr process: VM boot, container, teardown
#   bare boot    husk-vmm alone, same kernel, initramfs, vCPUs and memory as
#                the shim's VMs: spawn -> the agent answers Check over vsock
#                (tests/bench/agent-ready.py)
#   husk overhead  husk total - bare boot: what the shim, containerd and the
#                agent's container work add to booting the VM
#   runc total   `ctr run --rm --runtime io.containerd.runc.v2 busybox true`
#   husk template  `ctr run --rm ...` with `template = true`: the VM restored
#                from the template the warm-up made, not booted
#   restore      the shim's log: VMM spawn -> the restored agent answered and
#                CreateSandbox done (to set against bare boot)
#   block template  the same with rootfs = "block" (no virtio-fs): the
#                clone maps the template's memory file copy-on-write,
#                where a virtio-fs clone copies it into a memfd
#
# Then the host memory of HUSK_BENCH_IDLE (default 8) idle sandboxes
# (`sleep`), cold-booted and then restored from one template, with the
# default virtio-fs rootfs and with rootfs = "block": the sum of their VMMs'
# RSS and PSS (and virtiofsd's, with virtio-fs).
#
# Prints a table of medians (and min/max); the raw numbers go to
# $HUSK_OUT/bench-shim/.
set -uo pipefail
repo=${HUSK_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
# shellcheck source=../shim/containerd.sh
source "$repo/tests/shim/containerd.sh"
# shellcheck source=../shim/lib.sh
source "$repo/tests/shim/lib.sh"

runs=${HUSK_BENCH_RUNS:-5}
out=${HUSK_OUT:-$(mktemp -d)}
work=$out/bench-shim
mkdir -p "$work"
state=/run/husk-bench
export HUSK_SHIM_STATE_DIR=$state # husk_procs: only this test's VMs
husk_ctrd__init # HUSK_CTRD_ADDR and the rest, before anything samples processes
img=localhost/husk-busybox:latest
now_ms() { date +%s%3N; }
say() { echo "[bench-shim] $*"; }
die() { echo "bench-shim: $*" >&2; exit 1; }

shim=${HUSK_BIN:-}/containerd-shim-husk-v2
for f in "$shim" "${HUSK_VMM:-}" "${HUSK_GUEST_KERNEL:-}/bzImage" "${HUSK_INITRD:-}" /dev/kvm; do
  [ -e "$f" ] || die "no $f (scripts/build.sh writes target/husk-artifacts.env)"
done
mkdir -p "$state"

# The shipped defaults (configs/configuration.toml) for vCPUs, memory, log
# level and console; only paths and the (nested-machine) boot timeout differ.
export HUSK_CONFIG=$work/configuration.toml
husk_shim_config "$HUSK_CONFIG" "$state" log_level='"info"' debug_console=false boot_timeout_secs=600 request_timeout_secs=120
templated=$work/configuration-template.toml
husk_shim_config "$templated" "$state" log_level='"info"' debug_console=false boot_timeout_secs=600 request_timeout_secs=120 template=true
# The same with rootfs = "block" and no virtio-fs: a restored VM's RAM is
# then the template's memory file mapped copy-on-write, shared by clones.
block=$work/configuration-block.toml
husk_shim_config "$block" "$state" log_level='"info"' debug_console=false boot_timeout_secs=600 request_timeout_secs=120 rootfs='"block"' shared_fs='"none"'
block_tmpl=$work/configuration-block-template.toml
husk_shim_config "$block_tmpl" "$state" log_level='"info"' debug_console=false boot_timeout_secs=600 request_timeout_secs=120 rootfs='"block"' shared_fs='"none"' template=true
cfg() { sed -n "s/^$1 *= *//p" "$HUSK_CONFIG" | head -n1 | tr -d '"'; }
vcpus=$(cfg vcpus)
mem=$(cfg memory_mib)
params=$(cfg kernel_params)
say "husk configuration: vcpus=${vcpus:-?} memory_mib=${mem:-?} (from $HUSK_CONFIG)"

husk_kvm_probe "$work/kvm-probe"
case $? in
  0) ;;
  75) echo "bench-shim: the test machine runs no KVM guest (exit 75: rerun on a fresh test machine)" >&2; exit 75 ;;
  *) die "a bare husk-vmm guest does not boot (QEMU's does): see $work/kvm-probe" ;;
esac

cleanup() { husk_ctrd_stop >/dev/null 2>&1 || true; }
trap cleanup EXIT
husk_ctrd_start || die "containerd did not start"
husk_ctrd_import_busybox || die "image import failed"

# ctr_run RUNTIME ID [CTR OPTIONS...]: one `ctr run --rm ... true`; prints
# its wall ms.
ctr_run() {
  local t0 t1 rc rt=$1 id=$2
  shift 2
  t0=$(now_ms)
  timeout 600 ctr run --rm --runtime "$rt" "$@" "$img" "$id" true >"$work/$id.out" 2>&1 </dev/null
  rc=$?
  t1=$(now_ms)
  [ "$rc" = 0 ] || { cat "$work/$id.out" >&2; die "ctr run $id with $rt: exit $rc"; }
  echo $((t1 - t0))
}
# The bare VM's folder holds its vsock socket: not on $HUSK_OUT (9p in the
# test machine cannot hold sockets).
bare_boot() {
  local r d=$state-bare/$1
  r=$(python3 "$repo/tests/bench/agent-ready.py" --vmm "$HUSK_VMM" --kernel "$HUSK_GUEST_KERNEL/bzImage" \
    --initrd "$HUSK_INITRD" --vcpus "${vcpus:-1}" --memory-mib "${mem:-256}" \
    --cmdline "console=ttyS0 reboot=k panic=-1 husk.agent_port=1024 quiet${params:+ $params}" \
    --dir "$d") || { cp -r "$d" "$work/" 2>/dev/null; die "bare boot $1 failed"; }
  rm -rf "$d"
  echo "$r" >>"$work/bare.jsonl"
  python3 -c 'import json, sys; print(round(json.loads(sys.argv[1])["ready_ms"]))' "$r"
}
settle() { husk_wait_clean "$state" 60 >/dev/null || say "warning: leftovers after a husk run"; sync; sleep 1; }

say "warm-up (unmeasured): one run of each"
ctr_run io.containerd.runc.v2 warm-runc >/dev/null
ctr_run io.containerd.husk.v2 warm-husk >/dev/null
settle
# Makes the template the measured runs restore.
tmpl=(--runtime-config-path "$templated")
ctr_run io.containerd.husk.v2 warm-template "${tmpl[@]}" >/dev/null
settle
ctr_run io.containerd.husk.v2 warm-template-2 "${tmpl[@]}" >/dev/null
settle
# And the block rootfs's template: its clones map the memory file
# copy-on-write instead of copying it into a memfd.
btmpl_opt=(--runtime-config-path "$block_tmpl")
ctr_run io.containerd.husk.v2 warm-block-template "${btmpl_opt[@]}" >/dev/null
settle
ctr_run io.containerd.husk.v2 warm-block-template-2 "${btmpl_opt[@]}" >/dev/null
settle
bare_boot warm >/dev/null
: >"$work/bare.jsonl"

: >"$work/samples.tsv"
for i in $(seq "$runs"); do
  h=$(ctr_run io.containerd.husk.v2 "husk-$i")
  settle
  b=$(bare_boot "$i")
  settle
  r=$(ctr_run io.containerd.runc.v2 "runc-$i")
  settle
  t=$(ctr_run io.containerd.husk.v2 "template-$i" "${tmpl[@]}")
  settle
  # The shim's own figure: VMM spawn -> restored agent set up (CreateSandbox done).
  rt=$(grep -a -o "sandbox template-$i: restored from template [0-9a-f]* in [0-9]* ms" "$HUSK_CTRD_LOG" | awk '{ print $(NF - 1) }' | tail -n 1)
  tb=$(ctr_run io.containerd.husk.v2 "block-template-$i" "${btmpl_opt[@]}")
  settle
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$i" "$h" "$b" "$r" "$t" "${rt:-0}" "$tb" >>"$work/samples.tsv"
  say "run $i/$runs: husk total $h ms, bare boot $b ms, runc total $r ms, husk from template $t ms, block rootfs from template $tb ms"
done

python3 - "$work/samples.tsv" "$runs" "${vcpus:-1}" "${mem:-256}" "${HUSK_TEST_MODE:-?}" <<'PY'
import statistics, sys
path, runs, vcpus, mem, mode = sys.argv[1:]
rows = [list(map(int, l.split("\t"))) for l in open(path) if l.strip()]
husk = [r[1] for r in rows]
boot = [r[2] for r in rows]
runc = [r[3] for r in rows]
over = [h - b for h, b in zip(husk, boot)]
med = statistics.median
print(f"\nctr run --rm busybox true: husk vs runc, median of {runs} runs "
      f"(husk VM: {vcpus} vCPU, {mem} MiB; environment: {mode})")
print(f"| {'metric':<46} | {'median':>10} | {'min':>10} | {'max':>10} |")
print(f"|{'-' * 48}|{'-' * 12}|{'-' * 12}|{'-' * 12}|")
def row(label, xs):
    print(f"| {label:<46} | {med(xs):>7,.0f} ms | {min(xs):>7,.0f} ms | {max(xs):>7,.0f} ms |")
row("husk total (ctr run --rm ... true)", husk)
row("bare boot (husk-vmm spawn -> agent Check)", boot)
row("husk overhead (husk total - bare boot)", over)
row("runc total (ctr run --rm ... true)", runc)
tmpl = [r[4] for r in rows]
row("husk from template (ctr run --rm ... true)", tmpl)
row("restore (VMM spawn -> agent set up, shim log)", [r[5] for r in rows])
btmpl = [r[6] for r in rows]
row("husk from template, block rootfs", btmpl)
ratio = [o / r for o, r in zip(over, runc)]
print(f"| {'husk overhead / runc total':<46} | {med(over) / med(runc):>8.2f} x | "
      f"{min(ratio):>8.2f} x | {max(ratio):>8.2f} x |")
print(f"| {'husk total / runc total':<46} | {med(husk) / med(runc):>8.2f} x | "
      f"{min(h / r for h, r in zip(husk, runc)):>8.2f} x | {max(h / r for h, r in zip(husk, runc)):>8.2f} x |")
print(f"| {'husk from template / runc total':<46} | {med(tmpl) / med(runc):>8.2f} x | "
      f"{min(t / r for t, r in zip(tmpl, runc)):>8.2f} x | {max(t / r for t, r in zip(tmpl, runc)):>8.2f} x |")
print(f"| {'husk from template, block rootfs / runc total':<46} | {med(btmpl) / med(runc):>8.2f} x | "
      f"{min(t / r for t, r in zip(btmpl, runc)):>8.2f} x | {max(t / r for t, r in zip(btmpl, runc)):>8.2f} x |")
print(f"| {'husk from template / husk total (cold)':<46} | {med(tmpl) / med(husk):>8.2f} x | "
      f"{min(t / h for t, h in zip(tmpl, husk)):>8.2f} x | {max(t / h for t, h in zip(tmpl, husk)):>8.2f} x |")
print(f"(overhead and ratios per run, then their median; the difference of the medians, "
      f"{med(husk) - med(boot):,.0f} ms, is steadier: boot times vary from run to run, "
      f"more than the overhead itself in a nested test machine)")
PY

# Host memory of idle sandboxes: N cold-booted, then N restored from the
# template, each a `sleep` in its own VM. Sums of their VMMs' (and their
# virtiofsds') RSS and PSS, from /proc/PID/smaps_rollup.
idle=${HUSK_BENCH_IDLE:-8}
# mem_sum: "RSS_KIB PSS_KIB CGROUP_KIB": RSS and PSS summed over this test's
# husk-vmm and virtiofsd, and the sandboxes' cgroups' memory.current summed.
# RSS and PSS count only pages a process has mapped: a virtio-fs clone's
# memfd holds the template's data whether or not the guest has touched it
# since, and its cgroup is charged for it. A block clone's cgroup is not
# charged for the template pages it only reads (the template's maker was).
mem_sum() {
  local pid rss=0 pss=0 cg=0 r p d c
  for pid in $(husk_procs | awk '$2 ~ /(husk-vmm|virtiofsd)$/ { print $1 }'); do
    r=$(awk '/^Rss:/ { print $2 }' "/proc/$pid/smaps_rollup" 2>/dev/null)
    p=$(awk '/^Pss:/ { print $2 }' "/proc/$pid/smaps_rollup" 2>/dev/null)
    rss=$((rss + ${r:-0}))
    pss=$((pss + ${p:-0}))
  done
  for d in "$state"/*/; do
    c=$(tail -n 1 "$d/cgroups" 2>/dev/null)
    if [ -n "$c" ] && [ -r "$c/memory.current" ]; then
      cg=$((cg + $(cat "$c/memory.current") / 1024))
    fi
  done
  echo "$rss $pss $cg"
}
# idle_set NAME [CTR OPTIONS...]: starts $idle idle sandboxes, waits 20 s
# for them to settle, prints mem_sum's "RSS PSS CGROUP" (KiB), ends them.
idle_set() {
  local name=$1 n m
  shift
  for n in $(seq "$idle"); do
    timeout 600 ctr run -d --runtime io.containerd.husk.v2 "$@" "$img" "$name-$n" sleep 100000 >"$work/$name-$n.out" 2>&1 </dev/null ||
      die "$name-$n did not start: $(cat "$work/$name-$n.out")"
    husk_wait_task "$name-$n" 600 || die "$name-$n does not run"
  done
  sleep 20
  m=$(mem_sum)
  for n in $(seq "$idle"); do
    hctr tasks kill -s SIGKILL "$name-$n" >/dev/null 2>&1
  done
  for n in $(seq "$idle"); do
    wait_until 60 task_is "$name-$n" STOPPED
    hctr tasks delete "$name-$n" >/dev/null 2>&1
    hctr containers delete "$name-$n" >/dev/null 2>&1
  done
  settle
  echo "$m"
}
say "memory: $idle idle sandboxes each: virtio-fs rootfs cold and from a template, block rootfs cold and from a template"
cold=$(idle_set idle-cold)
tmpl_m=$(idle_set idle-tmpl "${tmpl[@]}")
bcold=$(idle_set idle-bcold --runtime-config-path "$block")
btmpl=$(idle_set idle-btmpl --runtime-config-path "$block_tmpl")
# The templates' memory files (data on the state folder's tmpfs), KiB.
files=$(du -k -c "$state"/.templates/*/memory 2>/dev/null | tail -n 1 | cut -f1)
# shellcheck disable=SC2086 # four "RSS PSS CGROUP" triples
python3 - "$idle" "${files:-0}" $cold $tmpl_m $bcold $btmpl <<'PY'
import sys
n, files, *v = map(int, sys.argv[1:])
sets = [v[i:i + 3] for i in range(0, 12, 3)]
print(f"\nhost memory of {n} idle sandboxes (MiB): RSS and PSS summed over their VMMs and "
      "virtiofsds, and their cgroups' memory.current")
print(f"| {'sandboxes':<46} | {'RSS':>9} | {'PSS':>9} | {'cgroups':>9} |")
print(f"|{'-' * 48}|{'-' * 11}|{'-' * 11}|{'-' * 11}|")
labels = ["virtio-fs rootfs, booted cold", "virtio-fs rootfs, restored from one template",
          "block rootfs, booted cold", "block rootfs, restored from one template"]
for i, label in enumerate(labels):
    print(f"| {f'{n} {label}':<46} | " + " | ".join(f"{x / 1024:>9.1f}" for x in sets[i]) + " |")
    if i % 2:
        base = sets[i - 1]
        print(f"| {'  template / cold':<46} | " + " | ".join(
            f"{a / b:>8.2f}x" if b else f"{'-':>9}" for a, b in zip(sets[i], base)) + " |")
print(f"templates' memory files (data, on the state folder's tmpfs, once per shape): "
      f"{files / 1024:.1f} MiB")
print("(a virtio-fs clone's RAM is a copy in its own memfd, which virtiofsd maps: RSS counts "
      "only the pages the guest touched since; a block clone's RAM is the template file "
      "mapped copy-on-write, its reads charged to no clone)")
PY
