#!/usr/bin/env bash
# timeout: 2700
# More of containerd-shim-husk-v2 end to end, beyond tests/scenarios/shim-ctr.sh:
# pause/resume, ps, metrics, update, OOM events, no output lost at exit
# (init and exec), host bind mounts copied into the guest, a VMM that dies
# under its container, pod disk slots running out, a VM that does not boot
# in time, a bad configuration, SIGTERM to a PID 1 that handles it (husk
# and runc), a pod network namespace's network in the VM (node <-> pod
# ping and HTTP), and the bad network inputs. After each check nothing may
# be left.
#
# Templates are on (template = true), as in shim-ctr: the first sandbox of a
# VM shape boots and leaves its template, the later ones are restored from
# it. HUSK_SHIM_TEMPLATE=0 boots every sandbox.
#
#   tests/run.sh shim-extra   (after scripts/build.sh, which builds the
#                              shim-client example it uses)
# The frame (containerd, sampler, check machinery, verdict) is
# tests/shim/ctr.sh; this file holds the checks.
# check_* functions are called by name (check in tests/shim/ctr.sh).
# shellcheck disable=SC2317
set -uo pipefail
HUSK_SHIM_TEMPLATE=${HUSK_SHIM_TEMPLATE:-1}
repo=${HUSK_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
# shellcheck source=../shim/ctr.sh
source "$repo/tests/shim/ctr.sh"

ctr_setup shim-extra /run/husk-x 300
# Under the ctr timeout ($limit), so that a VM that does not boot fails
# Create with its console rather than a killed ctr.
tmo=(boot_timeout_secs=240 request_timeout_secs=120)
husk_shim_config "$HUSK_CONFIG" "$state" "${tmo[@]}"
# Slots hold images: only a block rootfs uses them.
husk_shim_config "$work/one-slot.toml" "$state" pod_disk_slots=1 rootfs='"block"' "${tmo[@]}"
husk_shim_config "$work/no-boot.toml" "$state" boot_timeout_secs=2
husk_shim_config "$work/bad.toml" "$state" vcpus=0
ctr_start

check_lifecycle() {
  local id=x-life n1 n2
  hctr events >"$work/events.log" 2>&1 &
  local ev=$!
  # The shell in the container counts.
  # shellcheck disable=SC2016
  run_ctr life-run run -d "${husk[@]}" "$img" "$id" sh -c 'i=0; while :; do i=$((i+1)); echo $i >/tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.1; done'
  want "run -d: exit 0" [ "$rc" = 0 ] || return
  want "the container runs" husk_wait_task "$id" "$limit" || return
  run_ctr life-ps task ps "$id"
  want "ps: exit 0" [ "$rc" = 0 ]
  want "ps lists guest pids" grep -qE '^[0-9]+' <<<"$(tail -n +2 <<<"$o")"
  run_ctr life-pause task pause "$id"
  want "pause: exit 0" [ "$rc" = 0 ]
  want "the task is PAUSED" [ "$(task_status "$id")" = PAUSED ]
  run_ctr life-resume task resume "$id"
  want "resume: exit 0" [ "$rc" = 0 ]
  want "the task is RUNNING" [ "$(task_status "$id")" = RUNNING ]
  # The counter file is replaced by rename, so a read never catches it
  # truncated: an empty read is lost output.
  run_ctr life-n1 task exec --exec-id n1 "$id" cat /tmp/n
  n1=$o
  sleep 2
  run_ctr life-n2 task exec --exec-id n2 "$id" cat /tmp/n
  n2=$o
  want "it goes on after resume ($n1 -> $n2)" [ "${n2:-0}" -gt "${n1:-0}" ]
  # ctr 1.6 has no `task update`: the shim's Update straight over its socket.
  local addr
  addr=$(cat "$HUSK_CTRD_DIR/state/io.containerd.runtime.v2.task/$HUSK_CTRD_NS/$id/address")
  echo "    \$ shim-client $addr update $id 134217728"
  "${HUSK_BIN:-$repo/target/release}/examples/shim-client" "$addr" update "$id" 134217728 2>&1 | indent '      | '
  want "Update (memory limit 128 MiB): ok" [ "${PIPESTATUS[0]}" = 0 ]
  run_ctr life-metrics task metrics "$id"
  want "metrics: exit 0" [ "$rc" = 0 ]
  want "metrics show the new memory limit" grep -qE 'memory.limit_in_bytes +134217728' <<<"$o"
  want "metrics show a memory usage" grep -qE 'memory.usage_in_bytes +[1-9]' <<<"$o"
  want "metrics show pids" grep -qE 'pids.current +[1-9]' <<<"$o"
  run_ctr life-kill task kill -s SIGKILL "$id"
  wait_until 20 task_is "$id" STOPPED
  run_ctr life-rm task delete "$id"
  want "delete: exit 0" [ "$rc" = 0 ]
  want "... reports 137" grep -q "exit code 137" <<<"$e"
  kill "$ev" 2>/dev/null
  wait "$ev" 2>/dev/null
  for t in create start exec-added exec-started paused resumed exit delete; do
    want "event /tasks/$t for $id" grep -q "/tasks/$t.*$id" "$work/events.log"
  done
}

check_oom() {
  local id=x-oom
  hctr events >"$work/oom-events.log" 2>&1 &
  local ev=$!
  run_ctr oom-run run --rm --memory-limit 33554432 "${husk[@]}" "$img" "$id" sh -c 'tail /dev/zero'
  want "the OOM-killed container exits 137" [ "$rc" = 137 ]
  sleep 1
  kill "$ev" 2>/dev/null
  wait "$ev" 2>/dev/null
  want "event /tasks/oom for $id" grep -q "/tasks/oom.*$id" "$work/oom-events.log"
}

check_output_at_exit() {
  local id=x-out bg
  run_ctr out-init run --rm "${husk[@]}" "$img" "$id" sh -c 'seq 1 100000; seq 1 50000 >&2; exit 4'
  want "exit 4" [ "$rc" = 4 ]
  want "all 100000 stdout lines" [ "$(wc -l <"$work/out-init.stdout")" = 100000 ]
  want "... ending with 100000" [ "$(tail -n 1 "$work/out-init.stdout")" = 100000 ]
  want "all 50000 stderr lines" [ "$(wc -l <"$work/out-init.stderr")" -ge 50000 ]
  timeout "$limit" ctr run --rm "${husk[@]}" "$img" "$id-2" sleep 1000 >/dev/null 2>&1 </dev/null &
  bg=$!
  want "a container runs" husk_wait_task "$id-2" "$limit" || return
  run_ctr out-exec task exec --exec-id big "$id-2" sh -c 'seq 1 100000; exit 6'
  want "exec: exit 6" [ "$rc" = 6 ]
  want "exec: all 100000 lines" [ "$(wc -l <"$work/out-exec.stdout")" = 100000 ]
  hctr tasks kill -s SIGKILL "$id-2" >/dev/null 2>&1
  wait "$bg"
}

check_bind_mounts() {
  local id=x-bind d=$work/binds
  mkdir -p "$d/dir/sub"
  echo "host-file-content" >"$d/file.txt"
  echo "in-dir" >"$d/dir/a"
  echo "in-sub" >"$d/dir/sub/b"
  run_ctr bind-run run --rm "${husk[@]}" \
    --mount "type=bind,src=$d/file.txt,dst=/etc/husk-file,options=rbind:ro" \
    --mount "type=bind,src=$d/dir,dst=/mnt/dir,options=rbind:rw" \
    "$img" "$id" sh -c 'cat /etc/husk-file /mnt/dir/a /mnt/dir/sub/b; echo x >/etc/husk-file || echo ro-ok'
  want "exit 0" [ "$rc" = 0 ]
  want "the files' contents reached the guest" [ "$(head -n 3 <<<"$o")" = $'host-file-content\nin-dir\nin-sub' ]
  want "the ro file bind is read-only" grep -q ro-ok <<<"$o"
  run_ctr bind-sock run --rm "${husk[@]}" \
    --mount "type=bind,src=$HUSK_CTRD_ADDR,dst=/run/c.sock,options=rbind" "$img" "$id-s" true
  want "a socket bind fails" [ "$rc" != 0 ]
  want "... naming the mount" grep -q "containerd.sock" <<<"$e"
}

check_vmm_death() {
  local id=x-die bg bgrc vmm
  timeout "$limit" ctr run --rm "${husk[@]}" "$img" "$id" sleep 1000 >/dev/null 2>"$work/die.stderr" </dev/null &
  bg=$!
  want "the container runs" husk_wait_task "$id" "$limit" || return
  vmm=$(vmm_of "$id")
  want "a VMM runs (pid ${vmm:-none})" [ -n "$vmm" ]
  kill -KILL "$vmm"
  wait "$bg"
  bgrc=$?
  want "ctr run reports the container exited 255 (got $bgrc)" [ "$bgrc" = 255 ]
}

check_slots() {
  local sandbox=x-pod
  run_ctr slot-sb run -d "${husk[@]}" --runtime-config-path "$work/one-slot.toml" \
    --annotation io.kubernetes.cri.container-type=sandbox --annotation io.kubernetes.cri.sandbox-id="$sandbox" \
    "$img" "$sandbox" sleep 100000
  want "the sandbox starts" [ "$rc" = 0 ] || return
  want "the sandbox runs" husk_wait_task "$sandbox" "$limit" || return
  run_ctr slot-c1 run -d "${husk[@]}" --runtime-config-path "$work/one-slot.toml" \
    --annotation io.kubernetes.cri.container-type=container --annotation io.kubernetes.cri.sandbox-id="$sandbox" \
    "$img" "$sandbox-c1" sleep 100000
  want "the first pod container takes the one slot" [ "$rc" = 0 ]
  run_ctr slot-c2 run -d "${husk[@]}" --runtime-config-path "$work/one-slot.toml" \
    --annotation io.kubernetes.cri.container-type=container --annotation io.kubernetes.cri.sandbox-id="$sandbox" \
    "$img" "$sandbox-c2" sleep 100000
  want "the second fails" [ "$rc" != 0 ]
  want "... saying the slots are used up" grep -q "pod_disk_slots" <<<"$e"
  run_ctr slot-exec task exec --exec-id e "$sandbox-c1" echo still-fine
  want "the pod goes on" [ "$o" = still-fine ]
}

# VMs sized by what they run: the base (1 vCPU, 256 MiB) plus a lone
# container's limits, or plus a pod's totals (the annotations containerd's
# CRI plugin writes); a pod container that does not fit what is left is
# refused before it takes anything, and what a deleted one reserved is
# given back.
# between N LO HI: LO < N <= HI.
between() { [ "$1" -gt "$2" ] && [ "$1" -le "$3" ]; }

check_sizing() {
  run_ctr size-alone run --rm "${husk[@]}" --memory-limit 536870912 --cpus 1 "$img" x-size \
    sh -c 'grep -c ^processor /proc/cpuinfo; grep MemTotal /proc/meminfo'
  want "a container with limits runs" [ "$rc" = 0 ] || return
  local cpus mem
  cpus=$(sed -n 1p <<<"$o")
  mem=$(awk '/MemTotal/ {print $2}' <<<"$o")
  want "its VM has 1 + 1 vCPUs ($cpus)" [ "$cpus" = 2 ]
  want "its VM has 256 + 512 MiB (MemTotal ${mem:-?} kB)" between "${mem:-0}" $((640 * 1024)) $((768 * 1024))
  local sandbox=x-sized pod
  pod=(--annotation io.kubernetes.cri.container-type=container --annotation io.kubernetes.cri.sandbox-id="$sandbox")
  run_ctr size-sb run -d "${husk[@]}" \
    --annotation io.kubernetes.cri.container-type=sandbox --annotation io.kubernetes.cri.sandbox-id="$sandbox" \
    --annotation io.kubernetes.cri.sandbox-memory=1073741824 "$img" "$sandbox" sleep 100000
  want "a pod of 1 GiB starts" [ "$rc" = 0 ] || return
  want "the pod runs" husk_wait_task "$sandbox" "$limit" || return
  run_ctr size-big run -d "${husk[@]}" "${pod[@]}" --memory-limit 2147483648 "$img" "$sandbox-big" sleep 100000
  want "a 2 GiB container in it is refused" [ "$rc" != 0 ]
  want "... saying it does not fit the pod's 1024 MiB" grep -q "2048 MiB does not fit the 1024 MiB" <<<"$e"
  # A 900 MiB container fits. (That it can touch 800 MiB in the pod's VM
  # is cri-pods' check, through CRI: a minute of the nested machine's time
  # is spent once, not twice.)
  run_ctr size-fit run --rm "${husk[@]}" "${pod[@]}" --memory-limit 943718400 "$img" "$sandbox-fit" \
    grep MemTotal /proc/meminfo
  want "a 900 MiB container in it runs (rc $rc)" [ "$rc" = 0 ]
  mem=$(awk '/MemTotal/ {print $2}' <<<"$o")
  want "the pod's VM has 256 + 1024 MiB (MemTotal ${mem:-?} kB)" between "${mem:-0}" $((1152 * 1024)) $((1280 * 1024))
  run_ctr size-again run --rm "${husk[@]}" "${pod[@]}" --memory-limit 943718400 "$img" "$sandbox-again" true
  want "after it is deleted, its 900 MiB fit again" [ "$rc" = 0 ]
  # Bad input: a pod whose size annotation is not a number.
  run_ctr size-garbage run --rm "${husk[@]}" --annotation io.kubernetes.cri.container-type=sandbox \
    --annotation io.kubernetes.cri.sandbox-id=x-garbage --annotation io.kubernetes.cri.sandbox-memory=lots \
    "$img" x-garbage true
  want "a pod sized 'lots' is refused" [ "$rc" != 0 ]
  want "... naming the annotation" grep -q 'annotation io.kubernetes.cri.sandbox-memory: "lots" is not a number' <<<"$e"
}

# A pod container that names a PID namespace to join (CRI's
# shareProcessNamespace: the pause container's) shares the pod's first
# container's; one that does not has its own.
check_pod_pid() {
  local sandbox=x-pidpod pod
  pod=(--annotation io.kubernetes.cri.container-type=container --annotation io.kubernetes.cri.sandbox-id="$sandbox")
  run_ctr pid-sb run -d "${husk[@]}" \
    --annotation io.kubernetes.cri.container-type=sandbox --annotation io.kubernetes.cri.sandbox-id="$sandbox" \
    "$img" "$sandbox" sleep 424242
  want "the pod starts" [ "$rc" = 0 ] || return
  want "the pod runs" husk_wait_task "$sandbox" "$limit" || return
  run_ctr pid-shared run --rm "${husk[@]}" "${pod[@]}" --with-ns pid:/proc/1/ns/pid "$img" "$sandbox-shared" \
    sh -c 'tr "\0" " " </proc/1/cmdline'
  want "sharing the pod's PID namespace, its PID 1 is the pod's first process ($o)" grep -q '^sleep 424242' <<<"$o"
  run_ctr pid-own run --rm "${husk[@]}" "${pod[@]}" "$img" "$sandbox-own" sh -c 'tr "\0" " " </proc/1/cmdline'
  # sh execs its one command: PID 1 is that tr.
  want "without, it is its own PID 1 ($o)" grep -q '^tr ' <<<"$o"
}

# StopContainer's first step: SIGTERM to a container whose PID 1 handles it
# (busybox top) ends it at once, with husk as with runc.
check_stop_sigterm() {
  local rt id t0 rts=("${husk[@]}")
  for rt in husk runc; do
    id=x-term-$rt
    [ "$rt" = husk ] || rts=(--runtime io.containerd.runc.v2)
    run_ctr "term-run-$rt" run -d "${rts[@]}" "$img" "$id" top
    want "$rt: top runs" husk_wait_task "$id" "$limit" || return
    # As critest's stop spec: the signal about a second after start.
    sleep 1
    t0=$(now_ms)
    run_ctr "term-kill-$rt" task kill "$id"
    want "$rt: kill: exit 0" [ "$rc" = 0 ]
    want "$rt: top (PID 1) ends on SIGTERM within 10 s" wait_until 10 task_is "$id" STOPPED
    echo "    $rt: stopped $(( $(now_ms) - t0 )) ms after SIGTERM"
    hctr task delete "$id" >/dev/null 2>&1
    hctr container delete "$id" >/dev/null 2>&1
  done
}

# A container given a network namespace to join (what CRI gives a pod:
# CNI's veth, addresses and routes in it) gets the namespace's network in
# its VM: the node pings it and fetches from its HTTP server, the guest
# sees the interface as CNI left it and reaches the node; afterwards the
# tap and the redirects are gone and the namespace is as CNI left it.
check_pod_net() {
  local ns=husk-x-net id=x-net peer=hx-net0 before after
  ip netns add "$ns"
  ip link add "$peer" type veth peer name eth0 netns "$ns"
  ip addr add 10.77.0.1/24 dev "$peer"
  ip link set "$peer" up
  ip -n "$ns" link set eth0 address 02:42:0a:4d:00:02 up
  ip -n "$ns" addr add 10.77.0.2/24 dev eth0
  ip -n "$ns" route add default via 10.77.0.1
  before=$(ip -n "$ns" -d -o link show; ip netns exec "$ns" tc qdisc show)
  # shellcheck disable=SC2016
  run_ctr net-run run -d "${husk[@]}" --with-ns "network:/var/run/netns/$ns" "$img" "$id" \
    sh -c 'echo hello-from-husk >/tmp/index.html; exec httpd -f -p 8080 -h /tmp'
  want "run -d with the netns: exit 0" [ "$rc" = 0 ] || { ip netns del "$ns"; return; }
  want "the container runs" husk_wait_task "$id" "$limit"
  want "the node pings the pod" busybox ping -c 3 -W 10 10.77.0.2
  # curl, not busybox wget: Debian's static busybox wget crashes resolving
  # (static glibc), with any runtime.
  want "the node fetches from the pod's HTTP server" \
    wait_until 20 sh -c 'curl -s -m 5 http://10.77.0.2:8080/ | grep -q hello-from-husk'
  # shellcheck disable=SC2016
  run_ctr net-http task exec --exec-id h "$id" sh -c 'printf "GET / HTTP/1.0\r\n\r\n" | nc 127.0.0.1 8080'
  want "... as it does in the guest ($(tail -1 <<<"$o"))" grep -q hello-from-husk <<<"$o"
  run_ctr net-addr task exec --exec-id a "$id" ip -o addr show eth0
  want "the guest has eth0 10.77.0.2/24 ($o)" grep -q 'inet 10.77.0.2/24' <<<"$o"
  run_ctr net-link task exec --exec-id l "$id" cat /sys/class/net/eth0/address
  want "... with the veth's MAC ($o)" [ "$o" = 02:42:0a:4d:00:02 ]
  run_ctr net-route task exec --exec-id r "$id" ip route
  want "... and CNI's default route ($o)" grep -q 'default via 10.77.0.1' <<<"$o"
  run_ctr net-ping task exec --exec-id p "$id" ping -c 2 -W 10 10.77.0.1
  want "the pod pings the node" [ "$rc" = 0 ]
  hctr task kill -s KILL "$id" >/dev/null 2>&1
  wait_until 30 task_is "$id" STOPPED
  hctr task delete "$id" >/dev/null 2>&1
  hctr container delete "$id" >/dev/null 2>&1
  wait_until 20 sh -c "! ip -n $ns -o link show | grep -q husk_tap"
  after=$(ip -n "$ns" -d -o link show; ip netns exec "$ns" tc qdisc show)
  want "after delete the namespace is as CNI left it (no tap, no redirect)" [ "$before" = "$after" ]
  ip netns del "$ns"
  # Bad input: a namespace that does not exist, and the host's.
  run_ctr net-missing run --rm "${husk[@]}" --with-ns network:/var/run/netns/husk-no-such "$img" x-net-missing true
  want "a netns that does not exist: refused" [ "$rc" != 0 ]
  want "... naming it" grep -q "pod network namespace /var/run/netns/husk-no-such" <<<"$e"
  ip netns add husk-x-empty
  run_ctr net-empty run --rm "${husk[@]}" --with-ns network:/var/run/netns/husk-x-empty "$img" x-net-empty true
  ip netns del husk-x-empty
  want "a netns with no interface (lo only): refused" [ "$rc" != 0 ]
  want "... saying so" grep -q "no Ethernet interface: CNI set up none" <<<"$e"
  run_ctr net-host run --rm "${husk[@]}" --net-host "$img" x-net-host true
  want "the host's network (--net-host): refused" [ "$rc" != 0 ]
  want "... saying why" grep -q "host's network namespace" <<<"$e"
}

# The VMM runs jailed (shim-v2/src/sandbox/jail.rs) in its sandbox's
# cgroup (cgroup.rs): as the unprivileged jail user with no capability, in
# its own mount namespace whose root holds only the jail's entries and its
# own PID namespace (PID 1 there), in the cgroup of its spec's cgroupsPath
# (ctr: /NAMESPACE/ID) with memory.max = guest + 64 MiB + 1/32 and one CPU
# per vCPU; after delete no cgroup, mount or jail folder is left.
# names DIR: the names in DIR, sorted, each followed by a space.
names() { find "$1/" -mindepth 1 -maxdepth 1 -printf '%f\n' | LC_ALL=C sort | tr '\n' ' '; }

check_jail() {
  local id=x-jail vmm st root cg mem cpu
  run_ctr jail-run run -d "${husk[@]}" "$img" "$id" sleep 100000
  want "run -d: exit 0" [ "$rc" = 0 ] || return
  want "the container runs" husk_wait_task "$id" "$limit" || return
  vmm=$(vmm_of "$id")
  want "its VMM found (${vmm:-none})" [ -n "$vmm" ] || return
  st=/proc/$vmm/status
  echo "    VMM $vmm: $(grep -E '^(Uid|Gid|Groups|CapEff|CapBnd|NoNewPrivs|NSpid):' "$st" | tr '\t\n' '  ')"
  want "its uid is the jail's 65500, not root" grep -qE '^Uid:\s+65500\s+65500\s+65500\s+65500$' "$st"
  want "its gid is 65500, no supplementary groups" \
    sh -c "grep -qE '^Gid:\s+65500\s+65500\s+65500\s+65500\$' $st && grep -qE '^Groups:\s*\$' $st"
  want "CapEff 0" grep -qx 'CapEff:.0000000000000000' "$st"
  want "CapPrm, CapInh, CapBnd and CapAmb 0" \
    [ "$(grep -cE '^Cap(Prm|Inh|Bnd|Amb):.0000000000000000$' "$st")" = 4 ]
  want "no_new_privs" grep -qE '^NoNewPrivs:\s+1$' "$st"
  want "its own mount namespace" [ "$(readlink "/proc/$vmm/ns/mnt")" != "$(readlink /proc/self/ns/mnt)" ]
  want "its own PID namespace, PID 1 there" \
    sh -c "[ \"\$(readlink /proc/$vmm/ns/pid)\" != \"\$(readlink /proc/self/ns/pid)\" ] && grep -qE '^NSpid:\s+$vmm\s+1\$' $st"
  root=$(names "/proc/$vmm/root")
  echo "    its root: $root; /dev: $(names "/proc/$vmm/root/dev")"
  want "its root lists only the jail's entries ($root)" \
    [ "$root" = "console.log dev husk-vmm initrd kernel run vm.json " ]
  want "its /run holds its sockets and virtiofsd's" [ "$(names "/proc/$vmm/root/run")" = "ctl.sock virtiofsd.sock vsock " ]
  want "only stdin, stdout, stderr and what it opened: no fd of the shim" \
    not sh -c "ls -l /proc/$vmm/fd | grep -qE 'containerd|\\.sock|/bundle|fifo'"
  cg=$(cat "/proc/$vmm/cgroup")
  echo "    its cgroups: $(tr '\n' ' ' <<<"$cg")"
  want "it is in its spec's cgroup /$HUSK_CTRD_NS/$id" grep -qE ":(memory|)?:/$HUSK_CTRD_NS/$id\$" <<<"$cg"
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    mem=$(cat "/sys/fs/cgroup/$HUSK_CTRD_NS/$id/memory.max" 2>/dev/null)
    cpu=$(cat "/sys/fs/cgroup/$HUSK_CTRD_NS/$id/cpu.max" 2>/dev/null)
  else
    mem=$(cat "/sys/fs/cgroup/memory/$HUSK_CTRD_NS/$id/memory.limit_in_bytes" 2>/dev/null)
    cpu="$(cat "/sys/fs/cgroup/cpu/$HUSK_CTRD_NS/$id/cpu.cfs_quota_us" 2>/dev/null) 100000"
  fi
  echo "    memory limit $mem, cpu $cpu"
  # The VM (guest, overhead, 1/32 of the guest) and the sandbox's
  # virtiofsd (64 MiB; shim-v2/src/sandbox/cgroup.rs).
  want "memory limit = 256 MiB guest + 64 MiB + 8 MiB + 64 MiB virtiofsd ($mem)" \
    [ "$mem" = $(((256 + 64 + 8 + 64) << 20)) ]
  want "cpu quota = 1 vCPU ($cpu)" [ "$cpu" = "100000 100000" ]
  run_ctr jail-exec task exec --exec-id e "$id" echo fine
  want "the container works ($o)" [ "$o" = fine ]
  run_ctr jail-kill task kill -s SIGKILL "$id"
  wait_until 30 task_is "$id" STOPPED
  run_ctr jail-rm task delete "$id"
  want "delete: exit 0" [ "$rc" = 0 ]
  hctr container delete "$id" >/dev/null 2>&1
  want "no cgroup left" not sh -c "ls -d /sys/fs/cgroup/$HUSK_CTRD_NS/$id /sys/fs/cgroup/*/$HUSK_CTRD_NS/$id 2>/dev/null | grep -q ."
  want "no jail mount left" not sh -c "grep -q '$state' /proc/self/mountinfo"
  want "no state (or jail) folder left" [ ! -e "$state/$id" ]
}

check_no_boot() {
  run_ctr noboot run --rm "${husk[@]}" --runtime-config-path "$work/no-boot.toml" "$img" x-noboot true
  want "create fails" [ "$rc" != 0 ]
  want "... saying the agent did not answer in time" grep -q "boot_timeout_secs" <<<"$e"
  want "... with the guest console" grep -q "guest console" <<<"$e"
}

check_bad_config() {
  run_ctr badcfg run --rm "${husk[@]}" --runtime-config-path "$work/bad.toml" "$img" x-bad true
  want "create fails" [ "$rc" != 0 ]
  want "... naming the key" grep -q "vcpus: must be between 1 and 64, got 0" <<<"$e"
}

# The agent's vsock port cannot be reached from inside a container: the
# guest kernel has no vsock loopback (guest-kernel/guest.config), so a
# connect to VMADDR_CID_LOCAL (1) or the guest's own CID (3, the shim's
# vsock.guest_cid) fails with ENODEV; and the agent would close any peer
# but the host (CID 2) anyway (agent/src/server.rs). A connect that
# succeeded would print "reply:" and exit 0.
check_agent_port() {
  local probe="$repo/target/x86_64-unknown-linux-gnu/release/husk-vsock-probe" tar
  want "the vsock probe is built (scripts/build.sh)" [ -x "$probe" ] || return
  tar=$(HUSK_IMAGE_EXTRA="$probe" "$repo/tests/shim/make-image.sh" localhost/husk-vsock:latest) || true
  want "an image with the probe" [ -s "$tar" ] || return
  hctr images import --snapshotter "$HUSK_CTRD_SNAPSHOTTER" "$tar" >/dev/null 2>&1
  run_ctr agent-port run --rm "${husk[@]}" localhost/husk-vsock:latest x-agent-port sh -c \
    "for cid in 1 3; do $probe connect \$cid 1024 hello 2>&1; echo cid\$cid=\$?; done"
  want "the container ran: exit 0" [ "$rc" = 0 ]
  want "CID 1 (local) port 1024: the connect fails" grep -q "^cid1=1" <<<"$o"
  want "CID 3 (the guest's own) port 1024: the connect fails" grep -q "^cid3=1" <<<"$o"
  want "... at connect, not after" [ "$(grep -c 'connect:' <<<"$o")" = 2 ]
  want "... never connected" not grep -q "reply:" <<<"$o"
}

ctr_run_checks agent-port jail lifecycle oom output-at-exit bind-mounts vmm-death slots sizing pod-pid stop-sigterm pod-net no-boot bad-config
