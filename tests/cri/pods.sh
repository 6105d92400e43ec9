#!/usr/bin/env bash
# Pods as Kubernetes runs them, through containerd's CRI plugin with crictl
# (the harness: tests/cri/lib.sh): two husk pods and one runc pod on the
# CNI bridge (tests/cri/cni.conflist).
#   - an HTTP server in husk pod A answers the node, husk pod B and runc
#     pod C; A and B ping each other, and C pings A;
#   - A's DNS config and hostname reach its container (resolv.conf, uname);
#   - A is a 1 GiB pod: a 900 MiB container in it allocates and touches
#     800 MiB; a 2 GiB container is refused, saying why;
#   - A shares one PID namespace (shareProcessNamespace): its containers'
#     PID 1 is the pod's pause; and one /dev/shm;
#   - bad input: a CNI network that gives a pod no interface (loopback
#     only) fails RunPodSandbox with the reason, leaving nothing;
#   - VM templates (template = true): B, the first pod of the default size,
#     boots cold and leaves a template; husk pod D of the same size is
#     restored from it, and is its own machine on the bridge: its own MAC
#     (not B's, which the template had), hostname and IP; it fetches A's
#     page, A and the node ping it;
#   - after `crictl rmp`, no VMM, shim, tap, CNI netns, mount or state
#     folder of husk's is left (templates are a cache and stay).
#
#   tests/run.sh cri-pods      (in the test machine; needs KVM)
# Results in $HUSK_OUT/cri-pods: pod configs, crictl output, containerd's
# log with the shim's, the VMs' consoles.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"
say() { echo "[cri-pods] $*"; }

HUSK_CRI_SHIM_EXTRA="template=true" cri_up cri-pods husk || exit 1
img=registry.k8s.io/e2e-test-images/busybox:1.29-2
# Every call may wait for a VM to boot in the nested machine.
crit() { cri --timeout 600s "$@"; }
crit pull "$img" >/dev/null || { echo "FAIL: pulling $img"; exit 1; }

# pod NAME HANDLER [JSON of extra PodSandboxConfig fields]: runs a pod;
# prints its id.
pod() {
  local name=$1 handler=$2 extra=${3:-'{}'}
  mkdir -p "$work/logs/$name"
  python3 - "$name" "$work/logs/$name" "$extra" >"$work/pod-$name.json" <<'PY'
import json, sys
name, logs, extra = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cfg = {"metadata": {"name": name, "namespace": "husk-test", "uid": name + "-uid", "attempt": 0},
       "log_directory": logs, "linux": {}}
cfg.update(extra)
print(json.dumps(cfg))
PY
  crit runp --runtime "$handler" "$work/pod-$name.json" 2>"$work/runp-$name.err"
}

# ctr_in POD_ID POD_NAME NAME [MEMORY_BYTES] -- COMMAND...: creates and starts
# a container; prints its id.
ctr_in() {
  local pid=$1 pname=$2 name=$3 mem=$4 id
  shift 5
  python3 - "$name" "$img" "$mem" "$@" >"$work/ctr-$pname-$name.json" <<'PY'
import json, sys
name, img, mem, cmd = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
cfg = {"metadata": {"name": name}, "image": {"image": img}, "command": cmd,
       "log_path": name + ".log", "linux": {"resources": {}}}
if mem:
    cfg["linux"]["resources"]["memory_limit_in_bytes"] = mem
print(json.dumps(cfg))
PY
  id=$(crit create "$pid" "$work/ctr-$pname-$name.json" "$work/pod-$pname.json" 2>"$work/create-$pname-$name.err") || return 1
  crit start "$id" >/dev/null 2>>"$work/create-$pname-$name.err" || return 1
  echo "$id"
}
pod_ip() { crit inspectp -o json "$1" | python3 -c 'import json, sys; print(json.load(sys.stdin)["status"]["network"]["ip"])'; }
# ex CONTAINER COMMAND...: crictl exec, output in $o, exit code in $rc.
ex() { o=$(crit exec "$@" 2>&1); rc=$?; }

t0=$(now_ms)
a=$(pod a husk '{"hostname": "husk-pod-a",
  "dns_config": {"servers": ["10.88.0.1"], "searches": ["husk.test"], "options": ["ndots:2"]},
  "linux": {"resources": {"memory_limit_in_bytes": 1073741824},
            "security_context": {"namespace_options": {"pid": 0}}}}')
want "husk pod A (1 GiB, shared PID namespace) runs ($(( ($(now_ms) - t0) / 1000 )) s)" [ -n "$a" ] ||
  { cat "$work/runp-a.err"; exit 1; }
b=$(pod b husk)
want "husk pod B runs" [ -n "$b" ] || cat "$work/runp-b.err"
c=$(pod c runc)
want "runc pod C runs" [ -n "$c" ] || cat "$work/runp-c.err"
ip_a=$(pod_ip "$a") ip_b=$(pod_ip "$b") ip_c=$(pod_ip "$c")
say "pod IPs: A $ip_a, B $ip_b, C $ip_c"

web=$(ctr_in "$a" a web 0 -- sh -c 'mkdir -p /www && echo hello-from-husk-pod-a >/www/index.html && exec httpd -f -p 80 -h /www')
want "A's web server starts" [ -n "$web" ] || cat "$work/create-a-web.err"
sb=$(ctr_in "$b" b sleeper 0 -- sleep 100000)
want "B's container starts" [ -n "$sb" ]
sc=$(ctr_in "$c" c sleeper 0 -- sleep 100000)
want "C's container starts" [ -n "$sc" ]

# curl on the node; nc in the pods (Debian's static busybox wget crashes
# resolving, with any runtime).
fetch() { curl -s -m 5 "http://$ip_a/" | grep -q hello-from-husk-pod-a; }
get() { ex "$1" sh -c "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 $ip_a 80"; }
want "the node fetches A's page" wait_until 30 fetch
get "$sb"
want "husk pod B fetches A's page ($o)" grep -q hello-from-husk-pod-a <<<"$o"
get "$sc"
want "runc pod C fetches A's page ($o)" grep -q hello-from-husk-pod-a <<<"$o"
ex "$web" ping -c 2 -W 10 "$ip_b"
want "A pings B" [ "$rc" = 0 ]
ex "$sb" ping -c 2 -W 10 "$ip_a"
want "B pings A" [ "$rc" = 0 ]
ex "$sc" ping -c 2 -W 10 "$ip_a"
want "C (runc) pings A" [ "$rc" = 0 ]
want "the node pings B" busybox ping -c 2 -W 10 "$ip_b"

# D: a pod of B's shape, restored from the template B's boot left.
t0=$(now_ms)
d=$(pod d husk '{"hostname": "husk-pod-d"}')
want "husk pod D runs ($(( ($(now_ms) - t0) / 1000 )) s)" [ -n "$d" ] || cat "$work/runp-d.err"
# The shim's lines reach containerd's log through a pipe: a moment later.
# (The pod id is an argument: inside want, $d is want's own.)
restored() { grep -a -q "sandbox $1: restored from template" "$HUSK_CTRD_LOG"; }
want "... restored from the template B left" wait_until 20 restored "$d"
ip_d=$(pod_ip "$d")
sd=$(ctr_in "$d" d sleeper 0 -- sleep 100000)
want "D's container starts (IP $ip_d)" [ -n "$sd" ]
ex "$sb" cat /sys/class/net/eth0/address
mac_b=$o
ex "$sd" cat /sys/class/net/eth0/address
mac_d=$o
own_mac() { [ -n "$mac_d" ] && [ "$mac_d" != "$mac_b" ]; }
want "D has a MAC of its own ($mac_d; B: $mac_b)" own_mac
ex "$sd" hostname
want "D's hostname is its own ($o)" [ "$o" = husk-pod-d ]
get "$sd"
want "D fetches A's page ($o)" grep -q hello-from-husk-pod-a <<<"$o"
ex "$web" ping -c 2 -W 10 "$ip_d"
want "A pings D" [ "$rc" = 0 ]
want "the node pings D" busybox ping -c 2 -W 10 "$ip_d"

ex "$web" cat /etc/resolv.conf
dns_ok() { grep -q "^nameserver 10.88.0.1" <<<"$o" && grep -q "^search husk.test" <<<"$o" && grep -q "ndots:2" <<<"$o"; }
want "A's resolv.conf has the pod's DNS server, search and options ($(tr '\n' ';' <<<"$o"))" dns_ok
ex "$web" hostname
want "A's hostname is the pod's ($o)" [ "$o" = husk-pod-a ]
ex "$web" sh -c 'tr "\0" " " </proc/1/cmdline'
want "A shares its PID namespace: PID 1 is the pause ($o)" grep -q pause <<<"$o"

ex "$web" sh -c 'echo shared-by-the-pod >/dev/shm/husk-shared'
shm_id=$(ctr_in "$a" a shm 0 -- cat /dev/shm/husk-shared)
exited() { crit inspect -o json "$1" 2>/dev/null | grep -q CONTAINER_EXITED; }
wait_until 120 exited "$shm_id"
o=$(crit logs "$shm_id" 2>&1)
want "A's containers share one /dev/shm ($o)" grep -q shared-by-the-pod <<<"$o"

touch_id=$(ctr_in "$a" a touch $((900 << 20)) -- sh -c 'dd if=/dev/zero of=/dev/null bs=800M count=1 2>&1; grep MemTotal /proc/meminfo')
want "a 900 MiB container starts in the 1 GiB pod" [ -n "$touch_id" ]
want "... and ends" wait_until 300 exited "$touch_id"
o=$(crit logs "$touch_id" 2>&1)
want "... it touches 800 MiB in one read ($(head -1 <<<"$o"))" grep -q "^1+0 records in" <<<"$o"
mem=$(awk '/MemTotal/ {print $2}' <<<"$o")
mem_ok() { [ "${mem:-0}" -ge $((1152 * 1024)) ] && [ "${mem:-0}" -le $((1280 * 1024)) ]; }
want "... in a VM of 256 + 1024 MiB (MemTotal ${mem:-?} kB)" mem_ok
big=$(ctr_in "$a" a big $((2048 << 20)) -- true)
want "a 2 GiB container in the 1 GiB pod is refused" [ -z "$big" ]
want "... saying it does not fit" grep -q "does not fit" "$work/create-a-big.err"

t0=$(now_ms)
crit rmp -f "$a" "$b" "$c" "$d" >/dev/null
want "crictl rmp of the four pods ($(( ($(now_ms) - t0) / 1000 )) s)" [ $? = 0 ]
want "nothing of husk's is left (VMM, shim, tap, mount, state folder)" husk_wait_clean "$state" 60
left_ns() { ls /var/run/netns/cni-* >/dev/null 2>&1; }
want "no CNI network namespace is left" wait_until 30 not left_ns

# A CNI network that sets up nothing but loopback: the pod has no
# interface to give its VM.
cp "$cni_dir/10-$network.conflist" "$work/bridge.conflist"
cat >"$cni_dir/10-$network.conflist" <<JSON
{"cniVersion": "1.0.0", "name": "$network", "plugins": [{"type": "loopback"}]}
JSON
sleep 3 # containerd reloads the CNI config on the change
nope=$(pod lo-only husk)
want "a pod whose network has no interface is refused" [ -z "$nope" ]
# containerd 1.6 refuses a CNI result without the pod's interface itself
# ("failed to find network info"); a netns without one that reaches the
# shim is refused by it ("no Ethernet interface": shim-extra pod-net).
want "... saying so ($(tail -c 200 "$work/runp-lo-only.err"))" \
  grep -qE "no Ethernet interface|failed to find network info" "$work/runp-lo-only.err"
want "... leaving nothing" husk_wait_clean "$state" 60
cp "$work/bridge.conflist" "$cni_dir/10-$network.conflist"
crit rmp --force --all >/dev/null 2>&1

say "$want_failed expectation(s) failed"
if [ "$want_failed" != 0 ]; then
  echo "FAIL cri-pods"
  exit 1
fi
echo "PASS cri-pods"
