#!/usr/bin/env python3
"""husk-vmm against QEMU (-M microvm -accel kvm), side by side in one run.

Needs a /dev/kvm that boots Linux (run it through `tests/run.sh bench/vmm`).
Prints a table of medians over HUSK_BENCH_RUNS runs (default 5):
  - process start to the first console byte and to the init's marker line,
    for the same kernel, initramfs, 1 vCPU and 128 MiB;
  - process start to husk's first guest instruction (the VMM logs the first
    KVM_RUN entry of vCPU 0; QEMU has no such event);
  - first console byte to the marker: the guest kernel's boot (its banner
    is its first byte) and init, on the host's clock; and the guest's own
    uptime in the marker line, for reference only (the guest's clock starts
    at a point of its boot that differs between the monitors);
  - husk-vmm's vCPU exits during the boot by kind and port/address
    (`--exit-stats`), the medians of the most frequent;
  - the monitor's own resident memory: process RSS minus the RSS of the guest
    memory mapping, with the guest idle after boot.
Then, unless HUSK_BENCH_AGENT=0, boot-to-agent-ready (tests/bench/agent-ready.py):
spawn -> the agent (husk's initramfs) answers Check over vsock, for husk-vmm
cold, husk-vmm restoring a snapshot taken at agent-ready, and QEMU microvm
cold (vhost-vsock-device and virtio-rng-device, the devices husk's VM has),
same kernel, command line and memory, HUSK_BENCH_RUNS each, alternating.
Then, unless HUSK_BENCH_INITCALLS=0, one more boot of each with
`printk.time=1 initcall_debug loglevel=8` for the guest kernel's boot-time
breakdown: its phases and slowest initcalls (the debug lines themselves
lengthen that boot, not the initcalls' own times).

HUSK_BENCH_BASELINE_VMM=PATH adds a column for another husk-vmm build (say,
the one before a change) on the same kernel and command line.
HUSK_BENCH_CMDLINE replaces the kernel command line of all boots (default
"console=ttyS0 panic=-1"); HUSK_BENCH_MEMORY=0 skips the memory rows.
"""
import json
import os
import re
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
BASELINE_VMM = os.environ.get("HUSK_BENCH_BASELINE_VMM") or None
INITCALLS = os.environ.get("HUSK_BENCH_INITCALLS", "1") != "0"
MEMORY = os.environ.get("HUSK_BENCH_MEMORY", "1") != "0"
AGENT = os.environ.get("HUSK_BENCH_AGENT", "1") != "0"
AGENT_READY = os.path.join(HERE, "agent-ready.py")
CMDLINE = os.environ.get("HUSK_BENCH_CMDLINE", "console=ttyS0 panic=-1")
BREAKDOWN_PARAMS = "printk.time=1 initcall_debug loglevel=8"
# Under HUSK_OUT, the runner keeps the logs next to its own.
work = tempfile.mkdtemp(prefix="husk-bench-", dir=os.environ.get("HUSK_OUT"))


def husk_cmd(initrd, cmdline, vmm=VMM, exit_stats=True):
    cfg = {
        "vcpus": 1,
        "memory_mib": MEM_MIB,
        "kernel": {"path": KERNEL, "initrd": initrd, "cmdline": cmdline},
        "serial": {"output": "stdout"},
    }
    path = os.path.join(work, "vm.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    cmd = [vmm, "--config", path, "--log-format", "json", "--log-level", "debug"]
    return cmd + ["--exit-stats"] if exit_stats else cmd


def baseline_cmd(initrd, cmdline):
    return husk_cmd(initrd, cmdline, vmm=BASELINE_VMM, exit_stats=False)


def qemu_cmd(initrd, cmdline):
    # reboot=t: microvm has no i8042, so the guest resets by triple fault.
    return ["qemu-system-x86_64", "-M", "microvm", "-accel", "kvm", "-cpu", "host",
            "-smp", "1", "-m", str(MEM_MIB), "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-serial", "stdio",
            "-kernel", KERNEL, "-initrd", initrd, "-append", cmdline + " reboot=t"]


STALL_S = 60
VMMS = [("husk", husk_cmd)] + ([("baseline", baseline_cmd)] if BASELINE_VMM else []) \
    + [("qemu", qemu_cmd)]
stalls = {name: 0 for name, _ in VMMS}


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


def log_events(log, message):
    """The JSON log lines of husk-vmm whose message is `message`."""
    with open(log) as f:
        for line in f:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("fields", {}).get("message") == message:
                yield ev


def first_instruction_ms(log, spawn_unix_us):
    """Milliseconds from spawn to the VMM's first KVM_RUN of vCPU 0."""
    for ev in log_events(log, "first KVM_RUN"):
        ts = datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00"))
        return (ts.timestamp() * 1e6 - spawn_unix_us) / 1000
    return None


def exit_counts(log):
    """{(kind, address): count} and the total of `--exit-stats`, all vCPUs."""
    counts, total = {}, 0
    for ev in log_events(log, "exit counts"):
        total += int(ev["fields"]["total"])
        for m in re.finditer(r"(\w+)(?: (\S+))?=(\d+)", ev["fields"]["counts"]):
            key = (m.group(1), m.group(2) or "")
            counts[key] = counts.get(key, 0) + int(m.group(3))
    return (counts, total) if total else (None, None)


def guest_uptime_s(console):
    """The guest's uptime in the marker line (`... uptime=S`)."""
    with open(console, errors="replace") as f:
        for line in f:
            if "HUSK_GUEST_READY" in line:
                m = re.search(r"uptime=([0-9.]+)", line)
                return float(m.group(1)) if m else None
    return None


# What answers at the ports a boot touches, to name them in the exit table.
PORTS = [(0x3f8, 0x3ff, "serial"), (0x60, 0x60, "i8042 data"), (0x64, 0x64, "i8042 cmd"),
         (0x70, 0x71, "rtc/cmos (none)"), (0x40, 0x43, "pit"), (0x61, 0x61, "pit gate"),
         (0xcf8, 0xcff, "pci config (none)"), (0x80, 0x80, "post code"),
         (0x20, 0x21, "pic"), (0xa0, 0xa1, "pic"), (0x4d0, 0x4d1, "elcr")]


def port_name(kind, addr):
    if not addr:
        return ""
    a = int(addr, 16)
    if kind.startswith("pio"):
        return next((n for lo, hi, n in PORTS if lo <= a <= hi), "none")
    if 0xd000_0000 <= a < 0xe000_0000:
        return f"virtio-mmio {(a - 0xd000_0000) >> 12} +{a & 0xfff:#x}"
    if 0xfec0_0000 <= a < 0xfec0_1000:
        return "ioapic"
    if 0xfee0_0000 <= a < 0xfee0_1000:
        return "lapic"
    return "none"


LINE_TS = re.compile(r"^\[\s*([0-9]+\.[0-9]+)\] (.*)$")
INITCALL = re.compile(r"initcall (\S+) returned (-?\d+) after (\d+) usecs")


def breakdown(console):
    """Phases (guest seconds) and initcalls [(usecs, name)] of a boot with
    printk.time=1 initcall_debug."""
    phases, calls = {}, []
    with open(console, errors="replace") as f:
        for raw in f:
            line = raw.rstrip("\r\n")
            m = LINE_TS.match(line)
            if not m:
                continue
            ts, text = float(m.group(1)), m.group(2)
            phases.setdefault("first message", ts)
            c = INITCALL.search(text)
            if c:
                calls.append((int(c.group(3)), c.group(1).split("+")[0]))
                phases["initcalls done"] = ts
            elif "Run /init as init process" in text:
                phases["init started"] = ts
    calls.sort(reverse=True)
    return phases, calls


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


results = {name: [] for name, _ in VMMS}
for i in range(RUNS):
    for name, build in VMMS:
        log = os.path.join(work, f"{name}-{i}.log")
        print(f"run {i + 1}/{RUNS}: {name} ...", flush=True)
        r = boot_once(name, build(INITRD, CMDLINE), log)
        up = guest_uptime_s(log.replace(".log", ".console"))
        r["guest_uptime_ms"] = None if up is None else up * 1000
        r["kernel_ms"] = r["marker_ms"] - r["first_byte_ms"]
        if name != "qemu":
            r["first_insn_ms"] = first_instruction_ms(log, r["spawn_unix_us"])
            r["exits"], r["exits_total"] = exit_counts(log)
        print(f"run {i + 1}/{RUNS}: {name} {({k: v for k, v in r.items() if k != 'exits'})}",
              flush=True)
        results[name].append(r)

mem = None
if MEMORY:
    print("memory: booting idle guests", flush=True)
    idle = CMDLINE + " husk.test=idle"
    mem = {"husk": overhead_kib(husk_cmd(TEST_INITRD, idle, exit_stats=False)),
           "qemu": overhead_kib(qemu_cmd(TEST_INITRD, idle))}



def agent_ready(tag, *mode):
    """One agent-ready.py run: its JSON result. Its folder holds sockets, so
    it is on /run (tmpfs), not under HUSK_OUT (9p in the test machine)."""
    d = tempfile.mkdtemp(prefix=f"husk-bench-agent-{tag}-", dir="/run")
    cmd = [sys.executable, AGENT_READY, "--vmm", VMM, "--kernel", KERNEL, "--initrd", INITRD,
           "--memory-mib", str(MEM_MIB), "--cmdline", CMDLINE + " husk.agent_port=1024",
           "--timeout", "300", "--dir", d, *mode]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"agent-ready {tag} failed:\n{p.stderr[-4000:]}")
    subprocess.run(["rm", "-rf", d])
    return json.loads(p.stdout)


agent = None
if AGENT:
    snap = tempfile.mkdtemp(prefix="husk-bench-snapshot-", dir="/run")
    os.rmdir(snap)  # the VMM makes the folder (0700) itself
    print("agent-ready: a husk-vmm boot snapshotted at agent-ready ...", flush=True)
    made = agent_ready("snapshot", "--snapshot", snap)
    snap_bytes = os.path.getsize(os.path.join(snap, "memory"))
    snap_disk = os.stat(os.path.join(snap, "memory")).st_blocks * 512
    agent = {"husk cold": [], "husk restored": [], "qemu cold": []}
    for i in range(RUNS):
        for name, mode in (("husk cold", ()), ("husk restored", ("--restore", snap)),
                           ("qemu cold", ("--qemu", "--cid", str(100 + i)))):
            r = agent_ready(f"{name.replace(' ', '-')}-{i}", *mode)
            print(f"agent-ready run {i + 1}/{RUNS}: {name} {r}", flush=True)
            agent[name].append(r)
    subprocess.run(["rm", "-rf", snap])

breakdowns = {}
if INITCALLS:
    for name, build in VMMS:
        log = os.path.join(work, f"{name}-breakdown.log")
        print(f"breakdown: {name} with {BREAKDOWN_PARAMS} ...", flush=True)
        boot_once(name, build(INITRD, CMDLINE + " " + BREAKDOWN_PARAMS), log)
        breakdowns[name] = breakdown(log.replace(".log", ".console"))

cols = [name for name, _ in VMMS]
title = {"husk": "husk-vmm", "baseline": "husk baseline", "qemu": "qemu microvm"}


def row(label, values, unit):
    fmt = lambda v: "-" if v is None else f"{v:,.1f} {unit}"
    q = values.get("qemu")
    ratios = [f"{values[c] / q:.2f}x" if values.get(c) is not None and q else "-"
              for c in cols if c != "qemu"]
    cells = " | ".join(f"{fmt(values.get(c)):>14}" for c in cols)
    print(f"| {label:<42} | {cells} | " + " | ".join(f"{r:>13}" for r in ratios) + " |")


def header(first):
    ratio_cols = [f"{c}/qemu" for c in cols if c != "qemu"]
    print(f"| {first:<42} | " + " | ".join(f"{title[c]:>14}" for c in cols) + " | "
          + " | ".join(f"{r:>13}" for r in ratio_cols) + " |")
    print("|" + "-" * 44 + "|" + "|".join("-" * 16 for _ in cols) + "|"
          + "|".join("-" * 15 for _ in ratio_cols) + "|")


print(f"\nhusk-vmm vs qemu-system-x86_64 -M microvm -accel kvm: 1 vCPU, {MEM_MIB} MiB, "
      f"median of {RUNS} runs, environment: {os.environ.get('HUSK_TEST_MODE', '?')}")
print(f"kernel command line: {CMDLINE}" + (f"; baseline VMM: {BASELINE_VMM}" if BASELINE_VMM else ""))
header("metric")
m = lambda key: {c: median(r.get(key) for r in results[c]) for c in cols}
row("start -> first guest instruction", m("first_insn_ms"), "ms")
row("start -> first console byte", m("first_byte_ms"), "ms")
row("start -> init marker (boot-to-marker)", m("marker_ms"), "ms")
row("first console byte -> init marker", m("kernel_ms"), "ms")
row("guest's uptime in the marker (its clock)", m("guest_uptime_ms"), "ms")
row("start -> VMM exit after guest reset", m("exit_ms"), "ms")
if mem:
    row("monitor RSS minus guest RSS", {k: v[0] / 1024 for k, v in mem.items()}, "MiB")
    row("total RSS (guest idle after boot)", {k: v[1] / 1024 for k, v in mem.items()}, "MiB")
    row("guest memory RSS", {k: v[2] / 1024 for k, v in mem.items()}, "MiB")
print("stalled boots retried (not timed): "
      + ", ".join(f"{c} {stalls[c]}" for c in cols))

if agent:
    print(f"\nboot (or restore) to agent-ready: spawn -> the agent answers Check over vsock; "
          f"1 vCPU, {MEM_MIB} MiB, vsock + rng, median of {RUNS} runs")
    cols_a = list(agent)
    print(f"| {'metric':<34} | " + " | ".join(f"{c:>14}" for c in cols_a)
          + f" | {'husk cold/qemu':>14} | {'restored/qemu':>14} |")
    print(f"|{'-' * 36}|" + "|".join("-" * 16 for _ in cols_a) + f"|{'-' * 16}|{'-' * 16}|")
    for key, label in (("connect_ms", "spawn -> vsock connection accepted"),
                       ("ready_ms", "spawn -> agent answers Check")):
        v = {c: median(r[key] for r in agent[c]) for c in cols_a}
        q = v["qemu cold"]
        ratio = lambda c: f"{v[c] / q:.2f}x" if v[c] is not None and q else "-"
        print(f"| {label:<34} | " + " | ".join(
            f"{'-' if v[c] is None else f'{v[c]:,.0f} ms':>14}" for c in cols_a)
            + f" | {ratio('husk cold'):>14} | {ratio('husk restored'):>14} |")
    print(f"snapshot at agent-ready: {made['snapshot_ms']:,.0f} ms; memory file "
          f"{snap_bytes / 2**20:.0f} MiB, {snap_disk / 2**20:.1f} MiB of it data")

# Exits: the medians over the timed boots, most frequent first.
runs = [r for r in results["husk"] if r.get("exits")]
if runs:
    keys = {k for r in runs for k in r["exits"]}
    med = sorted(((median(r["exits"].get(k, 0) for r in runs), k) for k in keys), reverse=True)
    total = median(r["exits_total"] for r in runs)
    print(f"\nhusk-vmm vCPU exits to the VMM during a boot (median of {len(runs)}): "
          f"{total:,.0f} in all")
    print(f"| {'exit':<12} | {'port/address':<12} | {'device':<26} | {'count':>9} |")
    print(f"|{'-' * 14}|{'-' * 14}|{'-' * 28}|{'-' * 11}|")
    for n, (kind, addr) in med[:15]:
        print(f"| {kind:<12} | {addr:<12} | {port_name(kind, addr):<26} | {n:>9,.0f} |")

if breakdowns:
    print(f"\nguest kernel boot breakdown (one boot each with {BREAKDOWN_PARAMS}; "
          "guest seconds)")
    # The printk clock; the marker's uptime is another clock, left out.
    phase_names = ["first message", "initcalls done", "init started"]
    print(f"| {'phase':<16} | " + " | ".join(f"{title[c]:>14}" for c in breakdowns) + " |")
    print(f"|{'-' * 18}|" + "|".join("-" * 16 for _ in breakdowns) + "|")
    for p in phase_names:
        cells = [breakdowns[c][0].get(p) for c in breakdowns]
        print(f"| {p:<16} | " + " | ".join(
            f"{'-' if v is None else f'{v:.3f} s':>14}" for v in cells) + " |")
    for c, (phases, calls) in breakdowns.items():
        total = sum(u for u, _ in calls)
        print(f"\n{title[c]}: slowest initcalls ({len(calls)} initcalls, "
              f"{total / 1000:,.1f} ms in all)")
        print(f"| {'initcall':<40} | {'ms':>9} |")
        print(f"|{'-' * 42}|{'-' * 11}|")
        for u, fn in calls[:15]:
            print(f"| {fn:<40} | {u / 1000:>9,.1f} |")
subprocess.run(["rm", "-rf", work])
