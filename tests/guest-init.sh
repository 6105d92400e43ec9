#!/bin/busybox sh
# busybox's ash: checked as dash (the nearest shell shellcheck knows).
# shellcheck shell=dash
# /init of the VMM test image (rootfs-image/build.sh test). Runs the device
# checks named by `husk.test=a,b,...` on the kernel command line, printing
# HUSK_TEST lines the host side asserts on, then resets the VM.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "HUSK_GUEST_READY release=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"

tests=
# The kernel command line is one line of blank-separated words.
# shellcheck disable=SC2013
for word in $(cat /proc/cmdline); do
  case "$word" in husk.test=*) tests=$(echo "${word#husk.test=}" | tr , ' ') ;; esac
done

for t in $tests; do
  case "$t" in
    disk)
      # Write a known pattern at sector 8 of the first disk; the host reads it back.
      printf 'husk-disk-ok %s\n' "$(uname -r)" | dd of=/dev/vda bs=512 seek=8 conv=fsync,sync 2>/dev/null &&
        echo "HUSK_TEST disk written" || echo "HUSK_TEST disk FAILED"
      ;;
    disk-ro)
      # The second disk is read-only: a write must fail, a read must see the host's bytes.
      if printf x | dd of=/dev/vdb bs=512 conv=fsync 2>/dev/null; then
        echo "HUSK_TEST disk-ro FAILED (write succeeded)"
      else
        echo "HUSK_TEST disk-ro read: $(dd if=/dev/vdb bs=512 count=1 2>/dev/null | head -n1)"
      fi
      ;;
    disk-rate)
      # Reads every disk whole with direct I/O (no page cache, no
      # readahead), timing each by the guest's uptime; the host turns that
      # into rates. 1 MiB requests, or 4 KiB ones on a disk whose serial
      # says "ops" (for a request-rate limit).
      for d in /sys/block/vd*; do
        d=${d##*/}
        bs=1M
        case "$(cat "/sys/block/$d/serial" 2>/dev/null)" in ops*) bs=4k ;; esac
        t0=$(cut -d' ' -f1 /proc/uptime)
        if dd if="/dev/$d" of=/dev/null bs="$bs" iflag=direct 2>/dev/null; then
          t1=$(cut -d' ' -f1 /proc/uptime)
          echo "HUSK_TEST disk-rate $d bs=$bs bytes=$(($(cat "/sys/block/$d/size") * 512)) secs=$t0..$t1"
        else
          echo "HUSK_TEST disk-rate $d FAILED"
        fi
      done
      ;;
    rng)
      echo "HUSK_TEST rng $(cat /sys/class/misc/hw_random/rng_current) $(head -c 16 /dev/hwrng | od -An -tx1 | tr -d ' \n')"
      ;;
    vsock)
      husk-vsock-probe listen 5000 &
      listener=$!
      echo "HUSK_TEST vsock guest->host $(husk-vsock-probe connect 2 6000 hello-from-guest)"
      wait "$listener" && echo "HUSK_TEST vsock host->guest done"
      ;;
    net)
      # Link-local addresses: the peer is the tap in the machine running the VMM.
      if ip link set eth0 up && ip addr add 169.254.100.2/24 dev eth0 &&
        ping -c 3 -W 5 169.254.100.1 >/dev/null; then
        echo "HUSK_TEST net ping ok $(cat /sys/class/net/eth0/address)"
      else
        echo "HUSK_TEST net FAILED"
      fi
      ;;
    balloon)
      # Free page reporting: touch ~400 MiB (a tmpfs file), free it, and stay
      # up while the host watches husk-vmm's RSS fall; the host ends the VM.
      # The negotiated features first (bit 5: VIRTIO_BALLOON_F_REPORTING).
      for d in /sys/bus/virtio/devices/*; do
        [ "$(cat "$d/device")" = 0x0005 ] && echo "HUSK_TEST balloon features $(cat "$d/features")"
      done
      # The host samples its baseline on that line.
      sleep 3
      mkdir -p /mnt/fill && mount -t tmpfs -o size=450m fill /mnt/fill &&
        dd if=/dev/zero of=/mnt/fill/f bs=1M count=400 2>/dev/null &&
        echo "HUSK_TEST balloon touched" || echo "HUSK_TEST balloon FAILED"
      # The host samples the touched RSS meanwhile.
      sleep 5
      rm /mnt/fill/f && echo "HUSK_TEST balloon freed $(grep MemFree /proc/meminfo | tr -s ' ')"
      while :; do sleep 3600; done
      ;;
    vsock-serve)
      # Answer every host connection to vsock port 5000 (one line, then
      # `pong:<line>`) until the host ends the VM.
      echo "HUSK_TEST vsock-serve"
      while :; do husk-vsock-probe listen 5000 >/dev/null || sleep 1; done
      ;;
    virtiofs)
      # The host shares a folder over virtio-fs (tag husk-fs, virtiofsd):
      # read its file, write and fsync files it checks by checksum, see a
      # file it writes after the mount, time sequential reads against the
      # first disk, then keep doing I/O until the host kills virtiofsd: the
      # I/O must fail (not hang) and keep failing.
      m=/mnt/fs
      mkdir -p $m
      if ! mount -t virtiofs husk-fs $m; then
        echo "HUSK_TEST virtiofs FAILED mount"
        continue
      fi
      echo "HUSK_TEST virtiofs host-file $(cat $m/from-host.txt)"
      i=0
      while [ $i -lt 20 ]; do
        dd if=/dev/urandom of=$m/guest-$i bs=4k count=$((i + 1)) conv=fsync 2>/dev/null ||
          echo "HUSK_TEST virtiofs FAILED write guest-$i"
        i=$((i + 1))
      done
      (cd $m && md5sum guest-*) | while read -r sum f; do echo "HUSK_TEST virtiofs sum $f $sum"; done
      echo "HUSK_TEST virtiofs written"
      n=0
      while [ ! -e $m/late.txt ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
      echo "HUSK_TEST virtiofs late $(cat $m/late.txt 2>&1)"
      # Sequential reads of the same bytes through virtio-fs (no guest page
      # cache with virtiofsd's --cache never) and virtio-blk (O_DIRECT).
      if [ -e $m/big ]; then
        t0=$(cut -d' ' -f1 /proc/uptime)
        dd if=$m/big of=/dev/null bs=1M 2>/dev/null
        t1=$(cut -d' ' -f1 /proc/uptime)
        echo "HUSK_TEST virtiofs bench fs bytes=$(stat -c %s $m/big) secs=$t0..$t1"
      fi
      if [ -e /dev/vda ]; then
        t0=$(cut -d' ' -f1 /proc/uptime)
        dd if=/dev/vda of=/dev/null bs=1M iflag=direct 2>/dev/null
        t1=$(cut -d' ' -f1 /proc/uptime)
        echo "HUSK_TEST virtiofs bench blk bytes=$(($(cat /sys/block/vda/size) * 512)) secs=$t0..$t1"
      fi
      echo "HUSK_TEST virtiofs io-loop"
      n=0
      while [ $n -lt 1200 ]; do
        if ! cat $m/from-host.txt >/dev/null 2>&1 || ! echo $n >$m/loop 2>/dev/null; then
          echo "HUSK_TEST virtiofs io-error after $n rounds"
          break
        fi
        n=$((n + 1))
        sleep 0.05
      done
      # The host checks the VMM's control socket meanwhile.
      sleep 10
      if ls $m >/dev/null 2>&1 || cat $m/from-host.txt >/dev/null 2>&1; then
        echo "HUSK_TEST virtiofs FAILED I/O works again after the error"
      else
        echo "HUSK_TEST virtiofs still-failing"
      fi
      umount -l $m 2>/dev/null
      echo "HUSK_TEST virtiofs done"
      ;;
    hostile)
      # The hostile guest (tests/guest-tools/src/hostile): attacks the VMM
      # as root through vsock, the virtio-mmio registers, descriptor chains
      # and the serial port; `husk.hostile.KEY=VALUE` words set its options.
      # The host ends the VM.
      opts=
      # shellcheck disable=SC2013
      for word in $(cat /proc/cmdline); do
        case "$word" in husk.hostile.*=*) opts="$opts ${word#husk.hostile.}" ;; esac
      done
      # shellcheck disable=SC2086
      husk-hostile $opts
      while :; do sleep 3600; done
      ;;
    snapshot)
      # For snapshots (vmm-snapshot): a value kept in the guest's memory (a
      # tmpfs file), a tick a second with a counter, the uptime and that
      # value, and vsock port 5000 answered for every host connection. The
      # host snapshots, restores into new VMMs and checks that all of it
      # carries on; it ends the VMs.
      mkdir -p /mnt/snap && mount -t tmpfs snap /mnt/snap
      head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >/mnt/snap/value
      echo "HUSK_TEST snapshot value $(cat /mnt/snap/value)"
      # A connection the host left open ends in an error here when the
      # restored VMM resets the vsock transport.
      (while :; do husk-vsock-probe listen 5000 >/dev/null 2>&1 || {
        echo "HUSK_TEST snapshot vsock connection ended in an error"
        sleep 1
      }; done) &
      n=0
      while :; do
        n=$((n + 1))
        echo "HUSK_TEST snapshot tick $n uptime=$(cut -d' ' -f1 /proc/uptime) value=$(cat /mnt/snap/value)"
        sleep 1
      done
      ;;
    snapshot-fs)
      # For a snapshot of a VM with a virtio-fs device (vmm-snapshot): the
      # share is mounted only once the host connects to vsock port 5001,
      # so a snapshot taken before that has no FUSE session in virtiofsd.
      # Then the share's file "hello" goes to the console.
      echo "HUSK_TEST snapshot-fs waiting"
      husk-vsock-probe listen 5001 >/dev/null 2>&1 || true
      mkdir -p /mnt/fs
      if mount -t virtiofs husk-fs /mnt/fs; then
        echo "HUSK_TEST snapshot-fs hello=$(cat /mnt/fs/hello 2>&1)"
      else
        echo "HUSK_TEST snapshot-fs mount failed"
      fi
      while :; do sleep 3600; done
      ;;
    idle)
      # Stay up (for memory measurements); the host ends the VM.
      echo "HUSK_TEST idle"
      while :; do sleep 3600; done
      ;;
    *) echo "HUSK_TEST $t unknown" ;;
  esac
done
echo "HUSK_GUEST_DONE"
sync
reboot -f
