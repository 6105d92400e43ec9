#!/usr/bin/env python3
"""One test machine's share of the nested-boot stall soak (tests/soak/stall.sh).

    nested-boot.py OUT_DIR [--boots N] [--stall S] [--vcpus N]

Runs inside an L1 test machine. Records what the L1 is (clocksource, TSC
messages, kvm_amd parameters, SVM features) in OUT_DIR/l1-info.json, then
boots husk-vmm with the guest bzImage and the test initramfs N times, each to
the init's marker and the guest's reset. A boot whose console stays empty
for S seconds is a stall. At the first stall its evidence is kept
(tests/lib/common.sh stall_evidence: the VMM's threads, KVM's exit counters
and trace, in $HUSK_OUT/stalls/), and then the L1 is probed: a
boot with the vCPU thread pinned to CPU 0, one pinned to CPU 1, and one with
QEMU -accel kvm. After three stalls in a row the L1 is called broken and its
remaining boots are not run. Writes one JSON line per boot to
OUT_DIR/boots.jsonl and a summary to OUT_DIR/summary.json.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time



def sh(cmd):
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    return (r.stdout + r.stderr).strip()


def l1_info():
    cs = "/sys/devices/system/clocksource/clocksource0"
    params = {}
    for p in sorted(glob.glob("/sys/module/kvm_amd/parameters/*")):
        try:
            params[os.path.basename(p)] = open(p).read().strip()
        except OSError:
            pass
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo")
                  if line.startswith("flags")), [])
    svm_flags = [f for f in flags if f in {
        "svm", "npt", "lbrv", "svm_lock", "nrip_save", "tsc_scale", "vmcb_clean",
        "flushbyasid", "decodeassists", "pausefilter", "pfthreshold", "avic",
        "v_vmsave_vmload", "vgif", "v_spec_ctrl", "constant_tsc", "nonstop_tsc",
        "tsc_known_freq", "rdtscp", "x2apic", "tsc_deadline_timer"}]
    dmesg = sh("dmesg | grep -iE 'tsc|clocksource|clock|kvm|svm|hpet|apic|timer' | head -n 60")
    return {
        "clocksource": open(f"{cs}/current_clocksource").read().strip(),
        "available_clocksource": open(f"{cs}/available_clocksource").read().strip(),
        "cmdline": open("/proc/cmdline").read().strip(),
        "kvm_amd": params,
        "cpu_flags": svm_flags,
        "cpus": os.cpu_count(),
        "dmesg": dmesg.splitlines(),
    }


def vm_json(work, console, vcpus):
    kernel = os.environ["HUSK_GUEST_KERNEL"] + "/bzImage"
    cfg = {
        "vcpus": vcpus,
        "memory_mib": 128,
        "kernel": {
            "path": kernel,
            "initrd": os.environ["HUSK_TEST_INITRD"],
            # earlyprintk: the decompressor and early boot print at once, so a
            # stall shows how far the guest got.
            "cmdline": "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1",
        },
        "serial": {"output": "file", "path": console},
    }
    path = os.path.join(work, "vm.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def evidence(pid, name):
    """The shared stall evidence (tests/lib/common.sh stall_evidence): the
    monitor's threads, KVM's exit counters and trace, the L1's clock."""
    common = os.path.join(os.environ["HUSK_REPO"], "tests/lib/common.sh")
    subprocess.run(["bash", "-c", 'source "$0"; stall_evidence "$1" "$2"', common, str(pid), name])


def boot(work, vcpus, stall_s, limit_s, pin=None, sample=False, name="boot"):
    """One husk-vmm boot; returns its record."""
    console = os.path.join(work, "console.log")
    open(console, "w").close()
    cfg = vm_json(work, console, vcpus)
    cmd = [os.environ["HUSK_VMM"], "--config", cfg]
    if pin is not None:
        cmd = ["taskset", "-c", str(pin)] + cmd
    t0 = time.monotonic()
    log = open(os.path.join(work, "vmm.log"), "wb")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    first = marker = None
    while proc.poll() is None:
        now = time.monotonic() - t0
        size = os.path.getsize(console)
        if first is None and size:
            first = now
        if marker is None and size:
            with open(console, "rb") as f:
                if b"HUSK_GUEST_READY" in f.read():
                    marker = now
        if first is None and now > stall_s:
            if sample:
                evidence(proc.pid, name)
            break
        if now > limit_s:
            break
        time.sleep(0.05)
    stalled = first is None
    if marker is None and os.path.getsize(console):
        # The guest may have printed the marker and reset between two looks.
        with open(console, "rb") as f:
            if b"HUSK_GUEST_READY" in f.read():
                marker = time.monotonic() - t0
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = open(console, "rb").read().decode("utf-8", "replace")
    lines = [l for l in text.replace("\r", "").split("\n") if l.strip()]
    rec = {
        "pin": pin,
        "stalled": stalled,
        "first_byte_ms": None if first is None else round(first * 1000),
        "marker_ms": None if marker is None else round(marker * 1000),
        "rc": proc.returncode,
        "console_lines": len(lines),
        "last_line": lines[-1][:200] if lines else "",
    }
    if stalled:
        rec["vmm_log_tail"] = sh(f"tail -n 5 {work}/vmm.log").splitlines()
    return rec


def qemu_boot(work, stall_s):
    console = os.path.join(work, "qemu.console")
    cmd = ["timeout", str(stall_s + 60), "qemu-system-x86_64", "-accel", "kvm", "-M", "pc",
           "-cpu", "host", "-smp", "1", "-m", "128", "-nodefaults", "-no-user-config",
           "-display", "none", "-no-reboot", "-serial", f"file:{console}",
           "-kernel", os.environ["HUSK_GUEST_KERNEL"] + "/bzImage",
           "-initrd", os.environ["HUSK_TEST_INITRD"],
           "-append", "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        if time.monotonic() - t0 > stall_s and not os.path.getsize(console):
            proc.terminate()
            break
        time.sleep(0.1)
    proc.wait()
    size = os.path.getsize(console) if os.path.exists(console) else 0
    return {"qemu": True, "stalled": size == 0, "console_bytes": size}


def census(line):
    """One line of the runner's stall census (tests/lib/common.sh census_add)."""
    out = os.environ.get("HUSK_OUT")
    if out:
        with open(os.path.join(out, "census"), "a") as f:
            f.write(line + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--boots", type=int, default=20)
    ap.add_argument("--stall", type=float, default=20)
    ap.add_argument("--limit", type=float, default=120)
    ap.add_argument("--vcpus", type=int, default=1)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    info = l1_info()
    with open(os.path.join(args.out, "l1-info.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(f"soak: L1 clocksource {info['clocksource']} (of {info['available_clocksource']}); "
          f"kvm_amd {' '.join(f'{k}={v}' for k, v in info['kvm_amd'].items())}", flush=True)
    work = tempfile.mkdtemp(prefix="husk-soak.")
    boots = stalls = failed = in_a_row = 0
    broken = False
    probes = []
    marker_ms = []
    with open(os.path.join(args.out, "boots.jsonl"), "w") as log:
        for i in range(1, args.boots + 1):
            rec = boot(work, args.vcpus, args.stall, args.limit, sample=(stalls == 0), name=f"soak-{i}")
            rec["boot"] = i
            boots += 1
            census(("stall" if rec["stalled"] else "boot") + f" soak-{i}")
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if rec["stalled"]:
                stalls += 1
                in_a_row += 1
                print(f"soak: boot {i}: STALL (no console byte in {args.stall:.0f} s)", flush=True)
                if stalls == 1:
                    for pin in range(min(2, os.cpu_count() or 1)):
                        p = boot(work, args.vcpus, args.stall, args.limit, pin=pin)
                        p["probe"] = f"pinned to CPU {pin}"
                        probes.append(p)
                    q = qemu_boot(work, args.stall)
                    q["probe"] = "QEMU -accel kvm"
                    probes.append(q)
                    for p in probes:
                        print(f"soak:   probe {p['probe']}: {'STALL' if p['stalled'] else 'boots'}", flush=True)
                if in_a_row >= 3:
                    broken = True
                    print(f"soak: three stalls in a row: this L1 runs no nested guest; "
                          f"{args.boots - i} boots not run", flush=True)
                    break
            else:
                in_a_row = 0
                if rec["marker_ms"] is not None:
                    marker_ms.append(rec["marker_ms"])
                else:
                    failed += 1
                print(f"soak: boot {i}: first byte {rec['first_byte_ms']} ms, marker {rec['marker_ms']} ms, "
                      f"rc {rec['rc']}", flush=True)
    marker_ms.sort()
    summary = {
        "clocksource": info["clocksource"],
        "cmdline": info["cmdline"],
        "boots": boots,
        "stalls": stalls,
        "broken": broken,
        "failed": failed,
        "marker_median_ms": marker_ms[len(marker_ms) // 2] if marker_ms else None,
        "probes": probes,
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    subprocess.run(["rm", "-rf", work])
    print(f"SOAK_RESULT boots={boots} stalls={stalls} failed={failed} broken={int(broken)} "
          f"marker_median_ms={summary['marker_median_ms']} clocksource={info['clocksource']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
