#!/bin/bash
# PID 1 of the test machine (L1). Its root is the host's root, read-only over
# virtio-9p. Stage 1 lays a tmpfs overlay on it and pivots into that, so every
# host path (wherever the checkout and caches are) is visible and the L1 can
# write anywhere without touching the host. Stage 2 mounts the kernel file
# systems, runs one scenario, records its exit code in the shared results
# folder and resets the machine (QEMU runs with -no-reboot, so that ends it).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root

if [ "${1:-}" != stage2 ]; then
  mount -t tmpfs -o mode=0755 tmpfs /run
  mkdir -p /run/l1/upper /run/l1/work /run/l1/root
  mount -t overlay overlay -o lowerdir=/,upperdir=/run/l1/upper,workdir=/run/l1/work /run/l1/root
  cd /run/l1/root || exit 1
  mkdir -p .l1-oldroot
  pivot_root . .l1-oldroot
  exec chroot . /bin/bash "$0" stage2
fi

umount -l /.l1-oldroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup
# Transparent huge pages for shared memory where it is asked for (husk-vmm's
# memfd guest RAM, the virtio-fs VMs), as the README advises for hosts.
echo advise >/sys/kernel/mm/transparent_hugepage/shmem_enabled
# KVM's exit counters and tracepoints: the evidence of a stalled nested guest.
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /tmp/husk-out
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 husk-out /tmp/husk-out
hostname husk-testvm
ip link set lo up
# The runner's watchdog takes a stale heartbeat for a frozen machine.
# It holds the uptime and load, the last known state of a machine that froze.
(while :; do cat /proc/uptime /proc/loadavg >/tmp/husk-out/heartbeat; sleep 5; done) &
echo "HUSK_L1_READY uptime=$(cut -d' ' -f1 /proc/uptime) cpus=$(nproc) clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"

# shellcheck source=/dev/null
source /tmp/husk-out/env
cd "$HUSK_REPO" || exit 1
bash "$HUSK_SCENARIO"
rc=$?
echo "$rc" >/tmp/husk-out/rc
sync
echo "HUSK_SCENARIO_EXIT=$rc"
busybox reboot -f
sleep 10
