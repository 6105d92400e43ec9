#!/usr/bin/env bash
# Installs what husk's build and tests need on a fresh Debian 12 machine:
# Debian packages (kernel source and build tools, QEMU, containerd, runc,
# image tools, shellcheck) and the Rust components. Does nothing that is
# already there.
set -euo pipefail

packages=(
  # guest kernel build (guest-kernel/build.sh); build-essential's g++ also
  # compiles libFuzzer for the fuzz targets (fuzz/run.sh)
  linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev xz-utils python3
  # guest image and container images
  cpio gzip busybox-static erofs-utils e2fsprogs umoci
  # the test machine and the QEMU peer in benchmarks
  qemu-system-x86 iproute2
  # the container stack the shim plugs into, and the runc peer
  containerd runc
  # the shell scripts' lint (scripts/shellcheck.sh)
  shellcheck
  # the CRI conformance harness (tests/cri/): Go to build crictl and critest
  # from ../shared/tools/cri-tools, the CNI plugins (bridge, host-local,
  # loopback, portmap in /usr/lib/cni), util-linux's ipcmk for critest's
  # HostIPC spec, gcc's static libc for the test images' small programs;
  # iperf3 for the pod network benchmark
  golang-go containernetworking-plugins util-linux libc6-dev iptables iperf3
  # virtiofsd (built below) links libseccomp and libcap-ng
  libseccomp-dev libcap-ng-dev
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

for c in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c" >&2
done
# virtiofsd, the vhost-user backend of husk's virtio-fs devices: the Rust
# virtiofsd from crates.io, built with the installed toolchain into
# /usr/local/bin (where the shim looks for it, and which the test machine
# sees through the host's root). Pinned: a version bump is a deliberate
# change here. About 3 minutes on 2 cores.
virtiofsd_version=1.14.0
if [ "$(/usr/local/bin/virtiofsd --version 2>/dev/null | awk '{ print $2 }')" != "$virtiofsd_version" ]; then
  echo "[setup] cargo install virtiofsd $virtiofsd_version" >&2
  nice -n 19 cargo install virtiofsd --version "$virtiofsd_version" --locked --root /usr/local >&2
fi
echo "[setup] ready" >&2
