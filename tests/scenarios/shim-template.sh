#!/usr/bin/env bash
# timeout: 1500
# VM templates (template = true) end to end with containerd and ctr: the
# first container of a VM shape boots its VM and leaves the template
# (root's, mode 0600) under <state_dir>/.templates; later ones restore it:
# they run, exec, are killed and clean up as booted ones do, each clone has
# its own entropy (different /dev/urandom bytes and random UUIDs) and the
# host's clock; a corrupted template and one of another shape are refused,
# removed, the container boots cold and a new template is made; a VM of
# another size gets a template of its own; with rootfs = "block" the image
# goes into a disk slot after the restore and the clone's RAM maps the
# template copy-on-write. Prints the start times (cold, restored). The frame
# is tests/shim/ctr.sh.
#
#   tests/run.sh shim-template
# shellcheck disable=SC2317
set -uo pipefail
repo=${HUSK_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
# shellcheck source=../shim/ctr.sh
source "$repo/tests/shim/ctr.sh"

ctr_setup shim-template /run/husk-t 300
husk_shim_config "$HUSK_CONFIG" "$state" template=true boot_timeout_secs=240 request_timeout_secs=120
ctr_start
templates=$state/.templates

# template_dirs: the templates there are, one a line.
template_dirs() { find "$templates" -mindepth 1 -maxdepth 1 -type d -not -name '.*' 2>/dev/null | sort; }
# shim_log PATTERN: the containerd log's lines since this check began.
shim_log() { tail -n +"$from" "$HUSK_CTRD_LOG" | grep -a -E "$1"; }
# start ID: `ctr run --rm ID true`; its exit code in $rc, its time in $ms.
start() {
  local t0
  t0=$(now_ms)
  run_ctr "$1" run --rm "${husk[@]}" "$img" "$1" true
  ms=$(( $(now_ms) - t0 ))
}
# guest SANDBOX CMD...: stdout of CMD run in the running container (an
# exec id of its own: this often runs in a subshell).
guest() {
  local id=$1 x
  shift
  x=g$(now_ms)$RANDOM
  run_ctr "$x" task exec --exec-id "$x" "$id" "$@" >/dev/null
  printf '%s' "$o"
}

check_template_made() {
  local d cold
  from=$(($(wc -l <"$HUSK_CTRD_LOG") + 1))
  start t-first
  cold=$ms
  want "the first container runs (cold boot, $cold ms)" [ "$rc" = 0 ]
  want "the shim made a template" shim_log "sandbox t-first: template [0-9a-f]+ made in [0-9]+ ms"
  d=$(template_dirs)
  want "one template: ${d:-none}" [ "$(wc -l <<<"$d")" = 1 ] || return
  want "its folder is root's, mode 700" [ "$(stat -c '%u %a' "$d")" = "0 700" ]
  for f in state memory template.json; do
    want "$f is root's, mode 600, one link" [ "$(stat -c '%u %g %a %h' "$d/$f")" = "0 0 600 1" ]
  done
  want "the memory file is the VM's size (256 MiB), sparse ($(du -k "$d/memory" | cut -f1) KiB)" \
    [ "$(stat -c %s "$d/memory")" = $((256 << 20)) ]
  echo "$cold" >"$work/cold.ms"
}

check_template_clones() {
  local a b ua ub t0 t1 guest_s warm
  from=$(($(wc -l <"$HUSK_CTRD_LOG") + 1))
  [ -n "$(template_dirs)" ] || start t-make
  start t-warm
  warm=$ms
  want "a container from the template runs ($warm ms; cold was $(cat "$work/cold.ms" 2>/dev/null) ms)" [ "$rc" = 0 ]
  echo "$warm" >"$work/warm.ms"
  for id in t-a t-b; do
    run_ctr "$id-run" run -d "${husk[@]}" "$img" "$id" sleep 1000
    want "$id: run -d: exit 0" [ "$rc" = 0 ]
    want "$id runs" husk_wait_task "$id" "$limit" || return
    want "$id was restored from the template" shim_log "sandbox $id: restored from template [0-9a-f]+ in [0-9]+ ms"
  done
  a=$(guest t-a sh -c 'head -c 16 /dev/urandom | od -An -tx1 | tr -d " \n"')
  b=$(guest t-b sh -c 'head -c 16 /dev/urandom | od -An -tx1 | tr -d " \n"')
  differ() { [ "${#1}" = "$3" ] && [ "${#2}" = "$3" ] && [ "$1" != "$2" ]; }
  want "the clones' /dev/urandom differ ($a, $b)" differ "$a" "$b" 32
  ua=$(guest t-a cat /proc/sys/kernel/random/uuid)
  ub=$(guest t-b cat /proc/sys/kernel/random/uuid)
  want "... and their random UUIDs ($ua, $ub)" differ "$ua" "$ub" 36
  # The guest's whole second G, read while the host's clock went from T0 to
  # T1: the guest is within a second of the host if [G, G+1) meets
  # [T0 - 1, T1 + 1].
  t0=$(date +%s.%N)
  guest_s=$(guest t-b date +%s)
  t1=$(date +%s.%N)
  near() { awk -v g="${guest_s:-0}" -v a="$t0" -v b="$t1" 'BEGIN { exit !(g + 1 >= a - 1 && g <= b + 1) }'; }
  want "the clone's clock is the host's within a second (guest $guest_s, host $t0 .. $t1)" near
  guest t-a sh -c 'exit 3' >/dev/null
  want "exec's exit code comes back (3)" [ "$rc" = 3 ]
  run_ctr t-a-kill task kill -s SIGKILL t-a
  wait_until 20 task_is t-a STOPPED
  run_ctr t-a-rm task delete t-a
  want "t-a: delete reports 137" grep -q "exit code 137" <<<"$e"
  run_ctr t-b-kill task kill -s SIGKILL t-b
  wait_until 20 task_is t-b STOPPED
  run_ctr t-b-rm task delete t-b
  want "t-b: delete: exit 0" [ "$rc" = 0 ]
}

# corrupt FILE: flips a byte in the middle of FILE.
corrupt() {
  python3 - "$1" <<'PY'
import os, sys
with open(sys.argv[1], "r+b") as f:
    size = os.fstat(f.fileno()).st_size
    f.seek(size // 2)
    b = f.read(1)
    f.seek(size // 2)
    f.write(bytes([b[0] ^ 0xff]))
PY
}

check_template_refused() {
  local d other
  from=$(($(wc -l <"$HUSK_CTRD_LOG") + 1))
  [ -n "$(template_dirs)" ] || start t-make2
  d=$(template_dirs | head -n 1)
  corrupt "$d/state"
  start t-corrupt
  want "with a corrupted template the container still runs" [ "$rc" = 0 ]
  want "... the restore was refused" shim_log "t-corrupt: template [0-9a-f]+ did not restore"
  want "... naming the corruption" shim_log "checksum mismatch"
  want "... it booted cold and made a new template" shim_log "sandbox t-corrupt: template [0-9a-f]+ made"
  # A VM of another size: a template of its own.
  from=$(($(wc -l <"$HUSK_CTRD_LOG") + 1))
  run_ctr t-big run --rm --memory-limit $((512 << 20)) "${husk[@]}" "$img" t-big true
  want "a bigger VM runs" [ "$rc" = 0 ]
  want "... and made a template of its own" shim_log "sandbox t-big: template [0-9a-f]+ made"
  want "two templates now" [ "$(template_dirs | wc -l)" = 2 ]
  # Another shape's files under this shape's key: the VMM refuses them.
  other=$(template_dirs | grep -v "^$d\$" | head -n 1)
  [ -n "$other" ] || return
  cp -p "$other/state" "$d/state"
  cp -p "$other/memory" "$d/memory"
  from=$(($(wc -l <"$HUSK_CTRD_LOG") + 1))
  start t-shape
  want "with another shape's template the container still runs" [ "$rc" = 0 ]
  want "... the restore was refused" shim_log "t-shape: template [0-9a-f]+ did not restore"
  want "... naming the shape" shim_log "the snapshot is of another VM"
  want "... and a new template was made" shim_log "sandbox t-shape: template [0-9a-f]+ made"
}

# rootfs = "block" (no virtiofsd): the VM boots with an empty disk slot, so
# the template's guest has seen no image; each container's image goes into
# that slot after the restore. The clone's RAM is the template's memory
# file mapped copy-on-write (no virtio-fs to share it with).
check_template_block() {
  local cfg=$work/configuration-block.toml pid maps
  husk_shim_config "$cfg" "$state" template=true rootfs='"block"' shared_fs='"none"' \
    boot_timeout_secs=240 request_timeout_secs=120
  local opt=(--runtime-config-path "$cfg")
  from=$(($(wc -l <"$HUSK_CTRD_LOG") + 1))
  run_ctr t-blk1 run --rm "${husk[@]}" "${opt[@]}" "$img" t-blk1 sh -c 'test -x /bin/busybox && echo image-ok'
  want "a block-rootfs container runs and sees its image ($o)" grep -q image-ok <<<"$o"
  want "... its boot made a template" shim_log "sandbox t-blk1: template [0-9a-f]+ made"
  run_ctr t-blk2 run -d "${husk[@]}" "${opt[@]}" "$img" t-blk2 sleep 1000
  want "t-blk2 runs" husk_wait_task t-blk2 "$limit" || return
  want "... restored from the block template" shim_log "sandbox t-blk2: restored from template [0-9a-f]+ in"
  o=$(guest t-blk2 sh -c 'echo written >/tmp/w && cat /tmp/w && ls /bin/busybox')
  want "... its image is there and its root writable ($(tr '\n' ' ' <<<"$o"))" grep -q "^/bin/busybox" <<<"$o"
  pid=$(husk_procs | awk '$2 ~ /husk-vmm$/ { print $1 }' | head -n 1)
  maps=$(grep -c "$state/.templates/.*/memory" "/proc/$pid/maps" 2>/dev/null)
  want "... its RAM maps the template's memory file copy-on-write (VMM $pid, ${maps:-0} mappings)" \
    [ "${maps:-0}" -ge 1 ]
  run_ctr t-blk2-kill task kill -s SIGKILL t-blk2
  wait_until 20 task_is t-blk2 STOPPED
  run_ctr t-blk2-rm task delete t-blk2
  want "t-blk2: delete reports 137" grep -q "exit code 137" <<<"$e"
}

ctr_run_checks template-made template-clones template-refused template-block
