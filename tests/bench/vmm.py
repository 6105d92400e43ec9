#!/usr/bin/env python3
"""husk-vmm against QEMU (-M microvm -accel kvm), side by side in one run.

Needs a /dev/kvm that boots Linux (run it through `tests/run.sh bench/vmm`).
Prints a table of medians over HUSK_BENCH_RUNS runs (default 5):
  - process start to the first console byte and to the init's marker line,
    for the same kernel, initramfs, 1 vCPU and 128 MiB;
  - process start to husk's first guest instruction (the VMM logs the first
    KVM_RUN entry of vCPU 0; QEMU has no such event);
  - the monitor's own resident memory: process RSS minus the RSS of the guest
    memory mapping, with the guest idle after boot.
"""
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime

HERE = os.path.dirname(os.path.abspath(__file__))
BOOTTIME = os.path.join(HERE, "..", "lib", "boottime.py")
MEM_MIB = 128
KERNEL = os.path.join(os.environ["HUSK_GUEST_KERNEL"], "vmlinux")
INITRD = os.environ["HUSK_INITRD"]
TEST_INITRD = os.environ["HUSK_TEST_INITRD"]
VMM = os.environ["HUSK_VMM"]
RUNS = int(os.environ.get("HUSK_BENCH_RUNS", "5"))
# Under HUSK_OUT, the runner keeps the logs next to its own.
work = tempfile.mkdtemp(prefix="husk-bench-", dir=os.environ.get("HUSK_OUT"))


def husk_cmd(initrd, cmdline):
    cfg = {
        "vcpus": 1,
        "memory_mib": MEM_MIB,
        "kernel": {"path": KERNEL, "initrd": initrd, "cmdline": cmdline},
        "serial": {"output": "stdout"},
    }
    path = os.path.join(work, "vm.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return [VMM, "--config", path, "--log-format", "json", "--log-level", "debug"]


def qemu_cmd(initrd, cmdline):
    # reboot=t: microvm has no i8042, so the guest resets by triple fault.
    return ["qemu-system-x86_64", "-M", "microvm", "-accel", "kvm", "-cpu", "host",
            "-smp", "1", "-m", str(MEM_MIB), "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-serial", "stdio",
            "-kernel", KERNEL, "-initrd", initrd, "-append", cmdline + " reboot=t"]


STALL_S = 60
stalls = {"husk": 0, "qemu": 0}


def boot_once(name, cmd, log):
    """One boot to the marker. A boot whose guest prints nothing at all (the
    nested PVH-entry stall, see tests/lib/common.sh) is retried, up to three
    attempts, and counted."""
    console = log.replace(".log", ".console")
    for _ in range(3):
        out = subprocess.run([sys.executable, BOOTTIME, "--timeout", "120",
                              "--stall", str(STALL_S), "--log", log,
                              "--console", console, "--"] + cmd,
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out)
        if r["first_byte_ms"] is not None:
            break
        stalls[name] += 1
        print(f"{name}: the boot stalled (no console byte in {STALL_S} s); retrying", flush=True)
    if r["rc"] != 0 or r["marker_ms"] is None:
        sys.exit(f"{cmd[0]}: no clean boot to the marker: {r}; log {log}")
    return r


def first_instruction_ms(log, spawn_unix_us):
    """Milliseconds from spawn to the VMM's first KVM_RUN of vCPU 0."""
    with open(log) as f:
        for line in f:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("fields", {}).get("message") == "first KVM_RUN":
                ts = datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00"))
                return (ts.timestamp() * 1e6 - spawn_unix_us) / 1000
    return None


def overhead_kib(cmd):
    """RSS of the monitor minus the RSS of guest memory, guest idle."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    seen = b""
    deadline = time.monotonic() + 300
    while b"HUSK_TEST idle" not in seen and time.monotonic() < deadline:
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        seen = (seen + chunk)[-4096:]
    time.sleep(1)
    total = guest = 0
    best = None
    size = rss = 0
    with open(f"/proc/{proc.pid}/smaps") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k == "Size":
                size = int(v.split()[0])
            elif k == "Rss":
                rss = int(v.split()[0])
                total += rss
                # The guest memory mapping: the smallest one that holds it.
                if size >= MEM_MIB * 1024 and (best is None or size < best[0]):
                    best = (size, rss)
    guest = best[1] if best else 0
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return total - guest, total, guest


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


results = {"husk": [], "qemu": []}
cmdline = "console=ttyS0 panic=-1"
for i in range(RUNS):
    for name, build in (("husk", husk_cmd), ("qemu", qemu_cmd)):
        log = os.path.join(work, f"{name}-{i}.log")
        print(f"run {i + 1}/{RUNS}: {name} ...", flush=True)
        r = boot_once(name, build(INITRD, cmdline), log)
        print(f"run {i + 1}/{RUNS}: {name} {r}", flush=True)
        if name == "husk":
            r["first_insn_ms"] = first_instruction_ms(log, r["spawn_unix_us"])
        results[name].append(r)

print("memory: booting idle guests", flush=True)
idle = cmdline + " husk.test=idle"
mem = {"husk": overhead_kib(husk_cmd(TEST_INITRD, idle)),
       "qemu": overhead_kib(qemu_cmd(TEST_INITRD, idle))}


def row(label, husk, qemu, unit):
    fmt = lambda v: "-" if v is None else f"{v:,.1f} {unit}"
    ratio = "-" if husk is None or qemu is None or qemu == 0 else f"{husk / qemu:.2f}x"
    print(f"| {label:<40} | {fmt(husk):>14} | {fmt(qemu):>14} | {ratio:>8} |")


print(f"\nhusk-vmm vs qemu-system-x86_64 -M microvm -accel kvm: 1 vCPU, {MEM_MIB} MiB, "
      f"median of {RUNS} runs, environment: {os.environ.get('HUSK_TEST_MODE', '?')}")
print(f"| {'metric':<40} | {'husk-vmm':>14} | {'qemu microvm':>14} | {'husk/qemu':>8} |")
print(f"|{'-' * 42}|{'-' * 16}|{'-' * 16}|{'-' * 10}|")
m = lambda name, key: median(r.get(key) for r in results[name])
row("start -> first guest instruction", m("husk", "first_insn_ms"), None, "ms")
row("start -> first console byte", m("husk", "first_byte_ms"), m("qemu", "first_byte_ms"), "ms")
row("start -> init marker (boot-to-marker)", m("husk", "marker_ms"), m("qemu", "marker_ms"), "ms")
row("start -> VMM exit after guest reset", m("husk", "exit_ms"), m("qemu", "exit_ms"), "ms")
row("monitor RSS minus guest RSS", mem["husk"][0] / 1024, mem["qemu"][0] / 1024, "MiB")
row("total RSS (guest idle after boot)", mem["husk"][1] / 1024, mem["qemu"][1] / 1024, "MiB")
row("guest memory RSS", mem["husk"][2] / 1024, mem["qemu"][2] / 1024, "MiB")
print(f"stalled boots retried (not timed): husk {stalls['husk']}, qemu {stalls['qemu']}")
subprocess.run(["rm", "-rf", work])
