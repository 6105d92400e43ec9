#!/usr/bin/env bash
# timeout: 1800
# Files over virtio-fs (issue 11), end to end with containerd, the shim,
# the sandbox's virtiofsd, the VMM's vhost-user-fs device and the agent:
# the container's root file system is containerd's snapshot, shared; its
# volumes (the spec's bind mounts) are shared live.
#
#   live          a container's write in a volume is on the host while it
#                 runs and after it exits; a host write reaches it
#   pod           two containers of one pod see each other's writes in a
#                 shared folder (an emptyDir)
#   configmap     the kubelet's atomic update (a `..data` symlink swap) of a
#                 configMap-like folder shows in the container within 5 s
#   readonly      a read-only volume refuses writes, also to a privileged
#                 container that remounts it read-write
#   durable       100 files written and fsynced, then the VMM SIGKILLed: all
#                 100 on the host, checksums right
#   symlink       a guest symlink to /etc/shadow in a volume: the host's file
#                 is neither read nor changed through it
#   refused       a socket and a procfs file as volume sources: Create fails
#                 naming the mount
#   vfsd-death    virtiofsd SIGKILLed under a running container: the
#                 container's file I/O fails, the shim logs it, delete
#                 leaves nothing
# After every check nothing may be left (tests/shim/ctr.sh): no VMM, no
# virtiofsd, no mount under and no file in the state folder.
#
# Templates are on (template = true), as in shim-ctr: the first sandbox of a
# VM shape boots and leaves its template, the later ones are restored from
# it. HUSK_SHIM_TEMPLATE=0 boots every sandbox.
#
# HUSK_BENCH_VOLUMES=1 adds the measurement of the issue (bench): `ctr run
# --rm IMAGE true` of busybox and of busybox plus a 300 MiB layer, with
# rootfs = "virtiofs", rootfs = "block" and runc, as a table (median of
# HUSK_BENCH_RUNS, default 3); and I/O in a volume (volio): sequential
# write (dd, fsync) and read of 256 MiB, then creating and stat-ing 5,000
# small files, timed inside the container, husk (virtio-fs) against runc.
#
#   tests/run.sh shim-volumes
# check_* functions are called by name (check in tests/shim/ctr.sh).
# shellcheck disable=SC2317
set -uo pipefail
HUSK_SHIM_TEMPLATE=${HUSK_SHIM_TEMPLATE:-1}
repo=${HUSK_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
# shellcheck source=../shim/ctr.sh
source "$repo/tests/shim/ctr.sh"

ctr_setup shim-volumes /run/husk-v 300
tmo=(boot_timeout_secs=240 request_timeout_secs=120)
husk_shim_config "$HUSK_CONFIG" "$state" shared_fs='"virtiofs"' rootfs='"virtiofs"' "${tmo[@]}"
husk_shim_config "$work/block.toml" "$state" shared_fs='"virtiofs"' rootfs='"block"' "${tmo[@]}"
ctr_start

# vol NAME: a fresh host folder for a check's volume, on this machine's
# /run (a tmpfs; $HUSK_OUT is 9p in the test machine).
vols=/run/husk-volumes-test
vol() {
  local d=$vols/$1
  rm -rf "$d"
  mkdir -p "$d"
  echo "$d"
}

# vfsd_of ID: the pid of the virtiofsd (the shim's child) of sandbox ID.
vfsd_of() {
  husk_procs | awk -v p="--shared-dir=$state/$1/shared" 'index($0, p) && $2 ~ /virtiofsd$/ { print $1; exit }'
}

check_live() {
  local id=v-live d
  d=$(vol live)
  # shellcheck disable=SC2016
  run_ctr live-run run -d "${husk[@]}" --mount "type=bind,src=$d,dst=/data,options=rbind:rw" "$img" "$id" \
    sh -c 'echo from-guest >/data/g; while [ ! -f /data/h ]; do sleep 0.2; done; cat /data/h >/data/h-seen; exec sleep 100000'
  want "run -d: exit 0" [ "$rc" = 0 ] || return
  want "the container runs" husk_wait_task "$id" "$limit" || return
  want "its write is on the host while it runs" wait_until 30 grep -qx from-guest "$d/g"
  want "its rootfs is shared, not an erofs image" [ ! -e "$state/$id/root.erofs" ]
  echo from-host >"$d/h"
  want "the host's later write reaches it" wait_until 30 grep -qx from-host "$d/h-seen"
  run_ctr live-exec task exec --exec-id e "$id" sh -c 'echo again >>/data/g; sync'
  hctr tasks kill -s SIGKILL "$id" >/dev/null 2>&1
  wait_until 60 not task_is "$id" RUNNING
  hctr tasks rm "$id" >/dev/null 2>&1
  hctr containers rm "$id" >/dev/null 2>&1
  want "after it ended, its writes stay on the host" [ "$(cat "$d/g" 2>/dev/null)" = $'from-guest\nagain' ]
}

check_pod() {
  local sandbox=v-pod d
  d=$(vol pod)
  local pod=(--annotation io.kubernetes.cri.container-type=container --annotation io.kubernetes.cri.sandbox-id="$sandbox")
  run_ctr pod-sb run -d "${husk[@]}" \
    --annotation io.kubernetes.cri.container-type=sandbox --annotation io.kubernetes.cri.sandbox-id="$sandbox" \
    "$img" "$sandbox" sleep 100000
  want "the pod starts" [ "$rc" = 0 ] || return
  want "the pod runs" husk_wait_task "$sandbox" "$limit" || return
  local c
  for c in a b; do
    run_ctr "pod-$c" run -d "${husk[@]}" "${pod[@]}" --mount "type=bind,src=$d,dst=/shared,options=rbind:rw" \
      "$img" "$sandbox-$c" sleep 100000
    want "container $c starts" [ "$rc" = 0 ] || return
    want "container $c runs" husk_wait_task "$sandbox-$c" "$limit" || return
  done
  run_ctr pod-wa task exec --exec-id w "$sandbox-a" sh -c 'echo from-a >/shared/a'
  run_ctr pod-rb task exec --exec-id r "$sandbox-b" sh -c 'cat /shared/a; echo from-b >/shared/b'
  want "b reads what a wrote ($o)" [ "$o" = from-a ]
  run_ctr pod-ra task exec --exec-id r "$sandbox-a" cat /shared/b
  want "a reads what b wrote ($o)" [ "$o" = from-b ]
  want "both are on the host" [ "$(cat "$d/a" "$d/b")" = $'from-a\nfrom-b' ]
}

check_configmap() {
  local id=v-cm d
  d=$(vol cm)
  # The kubelet's atomic writer: the data in a timestamped folder, ..data
  # a symlink to it, each key a symlink through ..data.
  mkdir "$d/..2026_01"
  echo v1 >"$d/..2026_01/key"
  ln -s ..2026_01 "$d/..data"
  ln -s ..data/key "$d/key"
  run_ctr cm-run run -d "${husk[@]}" --mount "type=bind,src=$d,dst=/etc/cm,options=rbind:ro" "$img" "$id" sleep 100000
  want "run -d: exit 0" [ "$rc" = 0 ] || return
  want "the container runs" husk_wait_task "$id" "$limit" || return
  run_ctr cm-v1 task exec --exec-id v1 "$id" cat /etc/cm/key
  want "it reads v1 ($o)" [ "$o" = v1 ]
  mkdir "$d/..2026_02"
  echo v2 >"$d/..2026_02/key"
  ln -s ..2026_02 "$d/..data_tmp"
  mv -T "$d/..data_tmp" "$d/..data"
  rm -rf "$d/..2026_01"
  local t0 n=0 seen=
  t0=$(date +%s%3N)
  while [ $(($(date +%s%3N) - t0)) -lt 5000 ]; do
    n=$((n + 1))
    run_ctr cm-v2 task exec --exec-id "v2-$n" "$id" cat /etc/cm/key
    if [ "$o" = v2 ]; then
      seen=$(($(date +%s%3N) - t0))
      break
    fi
    sleep 0.2
  done
  want "the swap to v2 shows within 5 s (${seen:-not} ms)" [ -n "$seen" ]
}

check_readonly() {
  local id=v-ro d
  d=$(vol ro)
  echo keep >"$d/f"
  # shellcheck disable=SC2016
  run_ctr ro-run run --rm "${husk[@]}" --mount "type=bind,src=$d,dst=/ro,options=rbind:ro" "$img" "$id" \
    sh -c 'echo x >/ro/f && echo wrote; echo x >/ro/new && echo created; cat /ro/f'
  want "the container ran" [ "$rc" = 0 ]
  want "it read the file" grep -qx keep <<<"$o"
  want "its writes failed" not grep -qE '^(wrote|created)$' <<<"$o"
  # A privileged container remounts the volume read-write in the guest:
  # the host side stays read-only.
  run_ctr ro-priv run --rm "${husk[@]}" --privileged --mount "type=bind,src=$d,dst=/ro,options=rbind:ro" \
    "$img" "$id-p" sh -c 'mount -o remount,rw /ro; echo remount=$?; echo x >/ro/new && echo created; echo y >/ro/f && echo wrote; true'
  want "the privileged container ran ($(head -n1 <<<"$o"))" [ "$rc" = 0 ]
  want "its writes failed too" not grep -qE '^(wrote|created)$' <<<"$o"
  want "the host's files are as they were" [ "$(cat "$d/f")" = keep ] && [ ! -e "$d/new" ]
}

check_durable() {
  local id=v-dur d vmm bg
  d=$(vol dur)
  # shellcheck disable=SC2016
  timeout "$limit" ctr run --rm "${husk[@]}" --mount "type=bind,src=$d,dst=/data,options=rbind:rw" "$img" "$id" \
    sh -c 'cd /data; i=0; while [ $i -lt 100 ]; do dd if=/dev/urandom of=f$i bs=4096 count=4 conv=fsync 2>/dev/null; i=$((i+1)); done;
           sha256sum f* >sums.tmp && dd if=sums.tmp of=sums conv=fsync 2>/dev/null && rm sums.tmp; sync; echo done >marker; sync; exec sleep 100000' \
    >/dev/null 2>"$work/dur.stderr" </dev/null &
  bg=$!
  want "the container runs" husk_wait_task "$id" "$limit" || return
  want "it wrote 100 files" wait_until 120 test -f "$d/marker"
  vmm=$(vmm_of "$id")
  want "its VMM found (${vmm:-none})" [ -n "$vmm" ] || return
  kill -KILL "$vmm"
  wait "$bg"
  want "100 files on the host" [ "$(find "$d" -name 'f*' | wc -l)" = 100 ]
  want "... every checksum right" sh -c "cd '$d' && sha256sum -c --quiet sums"
}

check_symlink() {
  local id=v-link d
  d=$(vol link)
  run_ctr link-run run --rm "${husk[@]}" --mount "type=bind,src=$d,dst=/data,options=rbind:rw" "$img" "$id" \
    sh -c 'ln -s /etc/shadow /data/evil; ln -s ../../../../../../etc /data/up;
           cat /data/evil >/data/copy 2>/dev/null; ls /data/up/ >/data/listing 2>/dev/null;
           echo pwned >/data/evil 2>/dev/null; echo pwned >/data/up/husk-pwned 2>/dev/null; true'
  want "the container ran" [ "$rc" = 0 ]
  want "the symlink is stored as it is" [ "$(readlink "$d/evil")" = /etc/shadow ]
  want "what it read is not the host's /etc/shadow" not cmp -s "$d/copy" /etc/shadow
  want "the host's /etc/shadow is untouched" not grep -q pwned /etc/shadow
  want "nothing was written in the host's /etc" [ ! -e /etc/husk-pwned ]
}

check_refused() {
  run_ctr ref-sock run --rm "${husk[@]}" --mount "type=bind,src=$HUSK_CTRD_ADDR,dst=/run/c.sock,options=rbind" "$img" v-ref true
  want "a socket volume fails" [ "$rc" != 0 ]
  want "... naming it and why" grep -q "containerd.sock.*a socket" <<<"$e"
  run_ctr ref-proc run --rm "${husk[@]}" --mount "type=bind,src=/proc/cpuinfo,dst=/x,options=rbind:ro" "$img" v-ref2 true
  want "a procfs file fails" [ "$rc" != 0 ]
  want "... naming it and why" grep -q "/proc/cpuinfo.*procfs" <<<"$e"
}

check_vfsd_death() {
  local id=v-vfsd d vfsd
  d=$(vol vfsd)
  echo data >"$d/x"
  run_ctr vfsd-run run -d "${husk[@]}" --mount "type=bind,src=$d,dst=/data,options=rbind:rw" "$img" "$id" sleep 100000
  want "run -d: exit 0" [ "$rc" = 0 ] || return
  want "the container runs" husk_wait_task "$id" "$limit" || return
  vfsd=$(vfsd_of "$id")
  want "its virtiofsd found (${vfsd:-none})" [ -n "$vfsd" ] || return
  kill -KILL "$vfsd"
  sleep 1
  run_ctr vfsd-io task exec --exec-id io "$id" sh -c 'cat /data/x; echo y >/data/y'
  want "its file I/O fails now (exec rc $rc)" [ "$rc" != 0 ]
  want "the shim logged virtiofsd's end" wait_until 10 grep -q "sandbox $id: virtiofsd exited" "$HUSK_CTRD_LOG"
  want "the VM itself goes on" [ "$(task_status "$id")" = RUNNING ]
  want "the host's file is intact" [ "$(cat "$d/x")" = data ]
  local shim
  shim=$(shim_of "$id")
  hctr tasks kill -s SIGKILL "$id" >/dev/null 2>&1
  wait_until 60 not task_is "$id" RUNNING
  hctr tasks rm "$id" >/dev/null 2>&1
  hctr containers rm "$id" >/dev/null 2>&1
  if ! wait_until 20 not test -d "/proc/${shim:-0}/task"; then
    echo "    shim $shim still there after delete; its threads:"
    local t
    for t in /proc/"$shim"/task/*; do
      echo "      $(cat "$t/comm" 2>/dev/null) $(cut -d' ' -f3 "$t/stat" 2>/dev/null) wchan=$(cat "$t/wchan" 2>/dev/null)"
      sed 's/^/        /' "$t/stack" 2>/dev/null | head -8
    done
    find "/proc/$shim/fd" -mindepth 1 -printf '      fd %f -> %l\n' 2>/dev/null | head -40
  fi
}

# The measurement of the issue: container start against image size.
check_bench() {
  [ "${HUSK_BENCH_VOLUMES:-0}" = 1 ] || { echo "    (skipped: HUSK_BENCH_VOLUMES=1 runs it)"; return; }
  local big=localhost/husk-big:latest runs=${HUSK_BENCH_RUNS:-3} tar
  tar=$(HUSK_IMAGE_BLOB_MIB=300 "$repo/tests/shim/make-image.sh" "$big") || true
  want "an image 300 MiB larger" [ -s "$tar" ] || return
  hctr images import --snapshotter "$HUSK_CTRD_SNAPSHOTTER" "$tar" >/dev/null 2>&1
  # one RUNTIME-ARGS IMAGE: the wall ms of one `ctr run --rm IMAGE true`.
  one() {
    local t0 t1
    t0=$(date +%s%3N)
    # shellcheck disable=SC2086
    timeout "$limit" ctr run --rm $1 "$2" "v-bench-$RANDOM" true >/dev/null 2>&1 </dev/null || echo -n "!"
    t1=$(date +%s%3N)
    echo $((t1 - t0))
  }
  median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
  local mode image r
  declare -A ms
  for mode in virtiofs block runc; do
    local rt
    case $mode in
      virtiofs) rt="${husk[*]}" ;;
      block) rt="${husk[*]} --runtime-config-path $work/block.toml" ;;
      runc) rt="${runc[*]}" ;;
    esac
    for image in "$img" "$big"; do
      one "$rt" "$image" >/dev/null # warm-up
      local all=""
      for ((r = 0; r < runs; r++)); do all="$all $(one "$rt" "$image")"; done
      ms[$mode,$image]=$(median <<<"$all")
      echo "    $mode $image:$all"
    done
  done
  echo
  printf '    %-22s %12s %18s %8s\n' "ctr run --rm (ms)" busybox "busybox+300MiB" ratio
  for mode in virtiofs block runc; do
    printf '    %-22s %12s %18s %8s\n' "$mode" "${ms[$mode,$img]}" "${ms[$mode,$big]}" \
      "$(awk -v a="${ms[$mode,$img]}" -v b="${ms[$mode,$big]}" 'BEGIN { if (a > 0) printf "%.2f", b / a }')"
  done
  want "virtio-fs: the large image within 10% of the small one" \
    awk -v a="${ms[virtiofs,$img]}" -v b="${ms[virtiofs,$big]}" 'BEGIN { exit !(b <= a * 1.10) }'
}

# I/O in a volume, timed inside the container by /proc/uptime (the
# guest's clock for husk, the host's for runc).
check_volio() {
  [ "${HUSK_BENCH_VOLUMES:-0}" = 1 ] || { echo "    (skipped: HUSK_BENCH_VOLUMES=1 runs it)"; return; }
  # shellcheck disable=SC2016
  local script='up() { cut -d" " -f1 /proc/uptime; }
    cd /v || exit 1
    t0=$(up); dd if=/dev/zero of=big bs=1M count=256 conv=fsync 2>/dev/null || exit 2
    t1=$(up); dd if=big of=/dev/null bs=1M 2>/dev/null || exit 3
    t2=$(up); i=0; while [ $i -lt 5000 ]; do : >f$i || exit 4; i=$((i + 1)); done
    t3=$(up); [ "$(ls -l . | wc -l)" -ge 5001 ] || exit 5
    t4=$(up); echo "VOLIO $t0 $t1 $t2 $t3 $t4"'
  local mode d line t0 t1 t2 t3 t4
  declare -A secs
  for mode in husk runc; do
    d=$(vol "io-$mode")
    local -a rt
    if [ "$mode" = husk ]; then rt=("${husk[@]}"); else rt=("${runc[@]}"); fi
    # The volume is on a tmpfs (/run): what virtiofsd writes there is memory
    # charged to the sandbox's cgroup, as a memory-backed volume counts
    # against a pod in Kubernetes. Without a limit the VM has 256 MiB and its
    # cgroup little more, so both runtimes get the same 768 MiB limit (husk
    # sizes the VM from it).
    line=$(timeout "$limit" ctr run --rm "${rt[@]}" --memory-limit $((768 << 20)) --mount "type=bind,src=$d,dst=/v,options=rbind:rw" \
      "$img" "v-io-$mode" sh -c "$script" </dev/null 2>&1 | grep '^VOLIO' | tr -d '\r')
    want "$mode: the I/O ran ($line)" [ -n "$line" ] || return
    want "$mode: 256 MiB on the host" [ "$(stat -c %s "$d/big")" = $((256 << 20)) ]
    read -r _ t0 t1 t2 t3 t4 <<<"$line"
    secs[$mode,write]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
    secs[$mode,read]=$(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.2f", b - a }')
    secs[$mode,create]=$(awk -v a="$t2" -v b="$t3" 'BEGIN { printf "%.2f", b - a }')
    secs[$mode,stat]=$(awk -v a="$t3" -v b="$t4" 'BEGIN { printf "%.2f", b - a }')
    rm -rf "$d"
  done
  echo
  printf '    %-34s %8s %8s %8s\n' "in a volume (s)" husk runc husk/runc
  local what label
  for what in write read create stat; do
    case $what in
      write) label="write 256 MiB (dd, fsync)" ;;
      read) label="read 256 MiB (dd)" ;;
      create) label="create 5,000 files" ;;
      stat) label="stat 5,000 files (ls -l)" ;;
    esac
    printf '    %-34s %8s %8s %8s\n' "$label" "${secs[husk,$what]}" "${secs[runc,$what]}" \
      "$(awk -v a="${secs[husk,$what]}" -v b="${secs[runc,$what]}" 'BEGIN { if (b > 0) printf "%.1f", a / b; else print "-" }')"
  done
}

ctr_run_checks live pod configmap readonly durable symlink refused vfsd-death bench volio
# (ctr_run_checks exits with the verdict: the volumes' folder goes with the
# test machine.)
