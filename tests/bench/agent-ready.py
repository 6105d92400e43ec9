#!/usr/bin/env python3
"""Boot-to-agent-ready of a bare micro-VM: starts the monitor with the guest
kernel, the agent initramfs, vsock and rng (the devices the shim gives a VM,
minus the container disk), and polls the agent until its Check call answers
SERVING. Then ends the VM. Prints one JSON line:

  {"connect_ms": ..., "ready_ms": ..., "exit_ms": ..., "snapshot_ms": ...}

  connect_ms   spawn -> the guest accepted the vsock connection
  ready_ms     spawn -> AgentService.Check answered SERVING
  exit_ms      spawn -> the monitor process ended after SIGTERM
  snapshot_ms  (--snapshot) the control socket's snapshot call, start to reply

Monitors:
  husk-vmm (default)  the VMM's hybrid vsock: `CONNECT <port>` on its Unix
                      socket, then ttrpc;
  --restore DIR       husk-vmm restoring the snapshot in DIR instead of
                      booting (made by an earlier --snapshot DIR run);
  --qemu              qemu-system-x86_64 -M microvm -accel kvm with
                      vhost-vsock-device (guest CID --cid) and
                      virtio-rng-device; AF_VSOCK from the host.
--snapshot DIR makes husk-vmm snapshot the VM into DIR once the agent has
answered (the VM is then ended, not resumed).

    agent-ready.py --vmm PATH --kernel PATH --initrd PATH [--cmdline S]
                   [--memory-mib N] [--vcpus N] [--port N] [--timeout S] [--dir D]
                   [--snapshot DIR | --restore DIR | --qemu [--cid N]]
"""
import argparse
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

SERVICE = "husk.agent.v1.AgentService"


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_bytes(num, data):
    return varint(num << 3 | 2) + varint(len(data)) + data


def parse(buf):
    """Protobuf message -> {field: [values]} (varints as int, others as bytes)."""
    out, i = {}, 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = read_varint(buf, i)
        elif wt == 2:
            n, i = read_varint(buf, i)
            v, i = buf[i:i + n], i + n
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wt}")
        out.setdefault(num, []).append(v)
    return out


def read_varint(buf, i):
    n = shift = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def recv_exact(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def ttrpc_call(s, method, payload=b"", stream=1):
    """One unary ttrpc call; returns the response payload or raises."""
    req = (field_bytes(1, SERVICE.encode()) + field_bytes(2, method.encode())
           + field_bytes(3, payload))
    s.sendall(struct.pack(">IIBB", len(req), stream, 1, 0) + req)
    length, sid, mtype, _flags = struct.unpack(">IIBB", recv_exact(s, 10))
    body = recv_exact(s, length)
    if mtype != 2 or sid != stream:
        raise ConnectionError(f"unexpected ttrpc message type {mtype} stream {sid}")
    resp = parse(body)
    if 1 in resp:
        status = parse(resp[1][0])
        code = status.get(1, [0])[0]
        if code:
            raise RuntimeError(f"{method}: status {code} {status.get(2, [b''])[0].decode()}")
    return resp.get(2, [b""])[0]


def husk_connect(uds, port):
    """A stream to the guest's `port` through husk-vmm's hybrid vsock."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(30)
        s.connect(uds)
        s.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n"):
            c = s.recv(1)
            if not c:
                raise ConnectionError("closed during CONNECT (guest not listening yet)")
            line += c
        if not line.startswith(b"OK "):
            raise ConnectionError(f"CONNECT answer {line!r}")
        return s
    except BaseException:
        s.close()
        raise


def vsock_connect(cid, port):
    """A stream to the guest's `port` over AF_VSOCK (vhost-vsock)."""
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        s.settimeout(30)
        s.connect((cid, port))
        return s
    except BaseException:
        s.close()
        raise


def control(path, request):
    """One husk-vmm control-socket request; its JSON reply."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(300)
    s.connect(path)
    s.sendall(json.dumps(request).encode() + b"\n")
    reply = json.loads(s.makefile("rb").readline())
    s.close()
    return reply


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vmm", required=True)
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--cmdline", default="console=ttyS0 reboot=k panic=-1 husk.agent_port=1024 quiet")
    ap.add_argument("--memory-mib", type=int, default=256)
    ap.add_argument("--vcpus", type=int, default=1)
    ap.add_argument("--port", type=int, default=1024)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--dir", help="keep the VM description, console and VMM log here")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--snapshot", help="snapshot the ready VM into this folder")
    mode.add_argument("--restore", help="restore the snapshot in this folder")
    mode.add_argument("--qemu", action="store_true", help="QEMU microvm instead of husk-vmm")
    ap.add_argument("--cid", type=int, default=3, help="the QEMU guest's vsock CID")
    a = ap.parse_args()

    work = a.dir or tempfile.mkdtemp(prefix="husk-agent-ready-")
    os.makedirs(work, exist_ok=True)
    uds = os.path.join(work, "vsock.sock")
    ctl = os.path.join(work, "control.sock")
    console = os.path.join(work, "console.log")
    for p in (uds, ctl):
        if os.path.exists(p):
            os.unlink(p)
    if a.qemu:
        # reboot=t: microvm has no i8042, so the guest resets by triple fault.
        # acpi=off: the guest has no ACPI, so its virtio-mmio devices must be
        # on the command line, which QEMU adds only without ACPI.
        cmd = ["qemu-system-x86_64", "-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host",
               "-smp", str(a.vcpus), "-m", str(a.memory_mib), "-nodefaults", "-no-user-config",
               "-display", "none", "-no-reboot", "-serial", f"file:{console}",
               "-device", f"vhost-vsock-device,guest-cid={a.cid}",
               "-device", "virtio-rng-device",
               "-kernel", a.kernel, "-initrd", a.initrd, "-append", a.cmdline + " reboot=t"]
        connect = lambda: vsock_connect(a.cid, a.port)
    else:
        cfg = {
            "vcpus": a.vcpus,
            "memory_mib": a.memory_mib,
            "kernel": {"path": a.kernel, "initrd": a.initrd, "cmdline": a.cmdline},
            "serial": {"output": "file", "path": console},
            "vsock": {"guest_cid": 3, "uds_path": uds},
            "rng": True,
            "control_socket": ctl,
        }
        with open(os.path.join(work, "vm.json"), "w") as f:
            json.dump(cfg, f)
        cmd = [a.vmm, "--config", os.path.join(work, "vm.json"), "--log-level", "warn"]
        if a.restore:
            cmd += ["--restore", a.restore]
        connect = lambda: husk_connect(uds, a.port)
    log = open(os.path.join(work, "vmm.log"), "w")
    t0 = time.monotonic()
    vmm = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    ms = lambda: round((time.monotonic() - t0) * 1000, 1)
    connect_ms = ready_ms = snapshot_ms = None
    err = None
    try:
        while ready_ms is None:
            if time.monotonic() - t0 > a.timeout:
                raise TimeoutError(f"no agent answer in {a.timeout:.0f} s (last: {err})")
            if vmm.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {vmm.returncode} before the agent answered")
            s = None
            try:
                s = connect()
                if connect_ms is None:
                    connect_ms = ms()
                health = parse(ttrpc_call(s, "Check", field_bytes(1, b"")))
                if health.get(1, [0])[0] != 1:
                    raise RuntimeError(f"Check: not SERVING: {health}")
                ready_ms = ms()
            except (OSError, ConnectionError) as e:
                err = e
                time.sleep(0.01)
            finally:
                if s is not None:
                    s.close()
        if a.snapshot:
            t = time.monotonic()
            reply = control(ctl, {"op": "snapshot", "path": a.snapshot})
            if not reply.get("ok"):
                raise RuntimeError(f"snapshot: {reply}")
            snapshot_ms = round((time.monotonic() - t) * 1000, 1)
    except Exception as e:  # noqa: BLE001 - reported with the logs
        vmm.kill()
        vmm.wait()
        sys.stderr.write(f"agent-ready: {e}\n--- vmm.log:\n{open(os.path.join(work, 'vmm.log')).read()[-3000:]}"
                         f"\n--- console.log:\n"
                         f"{open(console, errors='replace').read()[-3000:] if os.path.exists(console) else ''}\n")
        sys.exit(1)
    vmm.send_signal(signal.SIGTERM)
    try:
        vmm.wait(timeout=30)
    except subprocess.TimeoutExpired:
        vmm.kill()
        vmm.wait()
    exit_ms = ms()
    print(json.dumps({"connect_ms": connect_ms, "ready_ms": ready_ms, "exit_ms": exit_ms,
                      "snapshot_ms": snapshot_ms}), flush=True)
    if not a.dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
