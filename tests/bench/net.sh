#!/usr/bin/env bash
# timeout: 1800
# alone: a benchmark; another test machine beside it would skew its numbers.
# Benchmark, not a test: a pod's network, node to pod, husk against runc in
# one run on one machine. Each runtime's container gets a network namespace
# as CNI's bridge plugin leaves one (a veth to the node, an address, a
# default route) and runs Debian's iperf3 server (the image is busybox plus
# /usr/bin/iperf3 and its libraries, tests/shim/make-image.sh). From the
# node: `ping` round trips and `iperf3 -c` TCP throughput (node -> pod and,
# with -R, pod -> node). Run it where KVM boots Linux: `tests/run.sh
# bench/net` (nested here). HUSK_BENCH_PINGS (default 20), HUSK_BENCH_SECS
# (iperf3 seconds, default 5). Raw output in $HUSK_OUT/bench-net/.
set -uo pipefail
repo=${HUSK_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
# shellcheck source=../shim/containerd.sh
source "$repo/tests/shim/containerd.sh"
# shellcheck source=../shim/lib.sh
source "$repo/tests/shim/lib.sh"

pings=${HUSK_BENCH_PINGS:-20}
secs=${HUSK_BENCH_SECS:-5}
out=${HUSK_OUT:-$(mktemp -d)}
work=$out/bench-net
mkdir -p "$work"
state=/run/husk-bench-net
export HUSK_SHIM_STATE_DIR=$state
husk_ctrd__init
img=localhost/husk-iperf:latest
say() { echo "[bench-net] $*"; }
die() { echo "bench-net: $*" >&2; exit 1; }
command -v iperf3 >/dev/null || die "no iperf3 on the node (scripts/setup.sh installs it)"
mkdir -p "$state"
export HUSK_CONFIG=$work/configuration.toml
husk_shim_config "$HUSK_CONFIG" "$state" debug_console=false boot_timeout_secs=600 request_timeout_secs=120

cleanup() {
  husk_ctrd_stop >/dev/null 2>&1 || true
  for rt in husk runc; do ip netns del "husk-bench-$rt" 2>/dev/null || true; done
}
trap cleanup EXIT
husk_ctrd_start || die "containerd did not start"
archive=$(HUSK_IMAGE_EXTRA=/usr/bin/iperf3 "$repo/tests/shim/make-image.sh" "$img") || die "image build failed"
hctr images import "$archive" >/dev/null || die "image import failed"

# measure RUNTIME N: a pod on 10.78.N.2 behind veth 10.78.N.1; prints
# "rtt_avg_ms up_mbps down_mbps".
measure() {
  local rt=$1 n=$2 ns=husk-bench-$1 peer=hb-$1 id=bench-net-$1 ip=10.78.$2.2 rtt up down
  ip netns add "$ns"
  ip link add "$peer" type veth peer name eth0 netns "$ns"
  ip addr add "10.78.$n.1/24" dev "$peer"
  ip link set "$peer" up
  ip -n "$ns" link set eth0 up
  ip -n "$ns" addr add "$ip/24" dev eth0
  ip -n "$ns" route add default via "10.78.$n.1"
  hctr run -d --runtime "io.containerd.$rt.v2" --with-ns "network:/var/run/netns/$ns" "$img" "$id" \
    iperf3 -s -p 5201 >"$work/$rt-run.out" 2>&1 || { cat "$work/$rt-run.out" >&2; die "$rt: run failed"; }
  husk_wait_task "$id" 600 || die "$rt: the container does not run"
  wait_until 120 sh -c "busybox ping -c 1 -W 2 $ip >/dev/null" || die "$rt: the pod does not answer ping"
  busybox ping -q -c "$pings" "$ip" >"$work/$rt-ping.out" 2>&1
  # "round-trip min/avg/max = 0.081/0.112/0.204 ms": the average.
  rtt=$(sed -n 's|.*= *[0-9.]*/\([0-9.]*\)/.*|\1|p' "$work/$rt-ping.out")
  iperf3 -c "$ip" -p 5201 -t "$secs" -J >"$work/$rt-up.json" 2>&1 || die "$rt: iperf3 failed: $(tail -3 "$work/$rt-up.json")"
  iperf3 -c "$ip" -p 5201 -t "$secs" -R -J >"$work/$rt-down.json" 2>&1 || die "$rt: iperf3 -R failed"
  mbps() { python3 -c 'import json, sys; print(round(json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"] / 1e6, 1))' "$1"; }
  up=$(mbps "$work/$rt-up.json")
  down=$(mbps "$work/$rt-down.json")
  hctr task kill -s KILL "$id" >/dev/null 2>&1
  wait_until 60 task_is "$id" STOPPED
  hctr task delete "$id" >/dev/null 2>&1
  hctr container delete "$id" >/dev/null 2>&1
  ip netns del "$ns"
  echo "${rtt:-nan} $up $down"
}

res=$(measure husk 1) || exit 1
read -r h_rtt h_up h_down <<<"$res"
say "husk: rtt ${h_rtt} ms, node->pod ${h_up} Mbit/s, pod->node ${h_down} Mbit/s"
res=$(measure runc 2) || exit 1
read -r r_rtt r_up r_down <<<"$res"
say "runc: rtt ${r_rtt} ms, node->pod ${r_up} Mbit/s, pod->node ${r_down} Mbit/s"
husk_wait_clean "$state" 60 >/dev/null || say "warning: husk left something behind"

python3 - "$h_rtt" "$h_up" "$h_down" "$r_rtt" "$r_up" "$r_down" "$pings" "$secs" "${HUSK_TEST_MODE:-?}" <<'PY'
import sys
h_rtt, h_up, h_down, r_rtt, r_up, r_down = map(float, sys.argv[1:7])
pings, secs, mode = sys.argv[7:]
print(f"\nnode <-> pod network: husk (VM NIC on a tap, tc redirect to the veth) vs runc (the veth), "
      f"ping x{pings}, iperf3 {secs} s TCP; environment: {mode}")
print(f"| {'metric':<34} | {'husk':>12} | {'runc':>12} | {'husk/runc':>9} |")
print(f"|{'-' * 36}|{'-' * 14}|{'-' * 14}|{'-' * 11}|")
def ratio(a, b):
    return f"{a / b:>8.2f}x" if b > 0 else f"{'n/a':>9}"
print(f"| {'ping round trip (avg)':<34} | {h_rtt:>9.3f} ms | {r_rtt:>9.3f} ms | {ratio(h_rtt, r_rtt)} |")
print(f"| {'TCP node -> pod':<34} | {h_up:>6.1f} Mbit/s | {r_up:>6.1f} Mbit/s | {ratio(h_up, r_up)} |")
print(f"| {'TCP pod -> node':<34} | {h_down:>6.1f} Mbit/s | {r_down:>6.1f} Mbit/s | {ratio(h_down, r_down)} |")
if r_rtt == 0 or h_rtt % 1 == 0:
    print("(busybox ping's round trips here are whole clock ticks: the test machine's L1 runs "
          "with highres=off, so a round trip under one tick reads 0)")
PY
