# shellcheck shell=bash
# The CRI harness, shared by tests/cri/critest.sh and tests/cri/pods.sh
# (source it): containerd's CRI plugin as Kubernetes drives it, with the
# images served locally and a CNI bridge network, and its teardown.
#
#   cri_up NAME [husk]   sets up; results go to $HUSK_OUT/NAME ($work);
#                        with husk, also the shim's configuration
#                        ($HUSK_CONFIG, state folder $state). Sets
#                        $tools (crictl, critest), $endpoint, $work and
#                        installs cri_down as the EXIT trap.
#   cri_down             tears everything down (see below)
#   cri NAME ARGS...     crictl against it
#
# What it sets up, and tears down (nothing is left):
#   - crictl and critest (tests/cri/tools.sh, built once and cached);
#   - the images (tests/cri/make-images.sh, cached) served by
#     tests/cri/registry.py on 127.0.0.1 (a free port);
#   - containerd in CRI mode (tests/shim/containerd.sh, HUSK_CTRD_CRI=1):
#     registry.k8s.io and gcr.io mirrored to that registry over http, the
#     sandbox image registry.k8s.io/pause:3.6, the CNI network
#     tests/cri/cni.conflist (bridge husk-cri0, host-local 10.88.0.0/16,
#     portmap) with Debian's plugins;
#   - for husk, the shim's configuration (the build's VMM, kernel, initrd).
# Teardown: every pod (crictl rmp --force --all), containerd and its shims, the VMs,
# the registry, then what a pod may leave when a runtime fails: CNI netns,
# the bridge, host-local's leases and the CNI result cache, the network's
# iptables chains, mounts.
# shellcheck disable=SC2034 # the variables are the caller's
cri_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=${HUSK_REPO:-$(cd "$cri_here/../.." && pwd)}
# shellcheck source=../shim/containerd.sh
source "$repo/tests/shim/containerd.sh"
# shellcheck source=../shim/lib.sh
source "$repo/tests/shim/lib.sh"
# shellcheck source=../lib/common.sh
source "$repo/tests/lib/common.sh"

network=husk-cri bridge=husk-cri0
registry_pid='' sampler='' cni_dir=/run/husk-cri-cni

# ---- teardown ------------------------------------------------------------
# shellcheck disable=SC2317 # called by the EXIT trap
cri_down() {
  local left=0 ns c
  stall_unwatch
  [ -z "$sampler" ] || { kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null; }
  if [ -S "${HUSK_CTRD_ADDR:-/nonexistent}" ]; then
    timeout 300 "$tools/crictl" --runtime-endpoint "unix://$HUSK_CTRD_ADDR" rmp --force --all >"$work/teardown-rmp.log" 2>&1 ||
      { say "crictl rmp --force --all failed:"; indent '    ' <"$work/teardown-rmp.log"; }
  fi
  husk_ctrd_stop || left=1
  for p in $(husk_procs | awk '{ print $1 }'); do kill -KILL "$p" 2>/dev/null; left=1; done
  [ -z "$registry_pid" ] || { kill "$registry_pid" 2>/dev/null; wait "$registry_pid" 2>/dev/null; }
  # What a failed pod can leave: its network namespace (containerd names
  # them cni-UUID), the bridge, host-local's leases, libcni's result cache,
  # the bridge plugin's masquerade chains and rules.
  for ns in /var/run/netns/cni-*; do
    [ -e "$ns" ] || continue
    say "left behind: network namespace $ns"
    umount "$ns" 2>/dev/null; rm -f "$ns"; left=1
  done
  ! ip link show "$bridge" >/dev/null 2>&1 || ip link delete "$bridge"
  rm -rf "/var/lib/cni/networks/$network" "${cni_dir:?}"
  rm -f /var/lib/cni/results/"$network"-*
  if command -v iptables >/dev/null; then
    # The bridge plugin's masquerade rules carry the network's name in
    # their comment and jump to a chain of their own.
    iptables -t nat -S POSTROUTING 2>/dev/null | grep -F "name: \\\"$network\\\"" | while read -r _ chain rest; do
      say "left behind: iptables rule $chain $rest"
      eval "iptables -t nat -D $chain $rest" 2>/dev/null
      c=$(sed -n 's/.* -j \(CNI-[0-9a-f]*\).*/\1/p' <<<"$rest")
      [ -z "$c" ] || { iptables -t nat -F "$c" && iptables -t nat -X "$c"; } 2>/dev/null
    done
  fi
  findmnt -rn -o TARGET | awk -v d="$state" 'index($0, d) == 1' | sort -r | xargs -r -n1 umount -l
  rm -rf "$state"
  [ "$left" = 0 ] || say "the teardown found leftovers (above)"
}

# ---- set-up --------------------------------------------------------------
cri_up() {
  out=${HUSK_OUT:-$(mktemp -d /tmp/husk-cri.XXXXXX)}
  export HUSK_OUT=$out
  work=$out/$1
  state=${HUSK_SHIM_STATE:-/run/husk-cri}
  # The CNI config folder on a local file system: containerd watches it
  # (inotify), which $HUSK_OUT on the test machine's 9p cannot tell.
  cni_dir=/run/husk-cri-cni
  mkdir -p "$work/vm-logs" "$cni_dir"
  export HUSK_SHIM_STATE_DIR=$state

  t=$(now_ms)
  tools=$("$cri_here/tools.sh") || { echo "FAIL: no crictl/critest (tests/cri/tools.sh)"; return 1; }
  say "crictl and critest: $tools ($(( ($(now_ms) - t) / 1000 )) s)"
  t=$(now_ms)
  layout=$("$cri_here/make-images.sh") || { echo "FAIL: the test images (tests/cri/make-images.sh)"; return 1; }
  say "images: $layout ($(( ($(now_ms) - t) / 1000 )) s)"

  trap cri_down EXIT

  # ---- registry, CNI, husk configuration, containerd -------------------------
  python3 "$cri_here/registry.py" "$layout" --port-file "$work/registry.port" --log "$work/registry.log" >/dev/null &
  registry_pid=$!
  wait_until 30 test -s "$work/registry.port" || { echo "FAIL: the registry did not start"; cat "$work/registry.log"; return 1; }
  port=$(cat "$work/registry.port")
  say "registry 127.0.0.1:$port (pid $registry_pid, log $work/registry.log)"
  cp "$cri_here/cni.conflist" "$cni_dir/10-$network.conflist"

  if [ "${2:-}" = husk ]; then
    for f in "${HUSK_VMM:-}" "${HUSK_GUEST_KERNEL:-}/bzImage" "${HUSK_INITRD:-}" "${HUSK_BIN:-}/containerd-shim-husk-v2"; do
      [ -e "$f" ] || { echo "FAIL preflight: no $f (scripts/build.sh, target/husk-artifacts.env)"; return 1; }
    done
    mkdir -p "$state"
    export HUSK_CONFIG=${HUSK_CONFIG:-$work/configuration.toml}
    # HUSK_CRI_SHIM_EXTRA: more KEY=VALUE settings (cri-pods: template=true).
    # shellcheck disable=SC2086
    [ -f "$HUSK_CONFIG" ] || husk_shim_config "$HUSK_CONFIG" "$state" boot_timeout_secs=120 request_timeout_secs=120 ${HUSK_CRI_SHIM_EXTRA:-}
  fi
  export HUSK_CTRD_CRI=1 HUSK_CTRD_CNI_CONF_DIR=$cni_dir HUSK_CTRD_REGISTRY=127.0.0.1:$port
  export HUSK_CTRD_DIR=${HUSK_CTRD_DIR:-/var/lib/husk-test/cri-containerd} HUSK_CTRD_LOG=${HUSK_CTRD_LOG:-$work/containerd.log}
  husk_ctrd_start || { echo "FAIL: containerd did not start"; return 1; }
  cp "$HUSK_CTRD_DIR/config.toml" "$work/containerd.toml"
  endpoint=unix://$HUSK_CTRD_ADDR

  # The VMs' consoles and VMM logs, copied while they live (the shim removes
  # them with the sandbox), and the nested machine's stall watch.
  if [ -d "$state" ]; then
    (
      while :; do
        for f in "$state"/*/console.log "$state"/*/vmm.log; do
          [ -f "$f" ] && cp -f "$f" "$work/vm-logs/$(basename "$(dirname "$f")").$(basename "$f")" 2>/dev/null
        done
        sleep 1
      done
    ) &
    sampler=$!
    stall_watch "$state"
  fi
}

# cri ARGS...: crictl against the harness's containerd.
cri() { "$tools/crictl" --runtime-endpoint "$endpoint" --image-endpoint "$endpoint" "$@"; }
