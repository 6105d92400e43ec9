#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/<target>/: small, real examples of
what each target parses (a vm.json as the shim writes it, control lines, an
OCI spec, agent requests in protobuf, guest memory holding well-formed
virtqueue requests, a driver's virtio-mmio set-up sequence). Re-run after
changing a format; libFuzzer adds what it finds next to these.

Guest memory layout (fuzz/src/lib.rs): queue i's descriptor table at
i*0x400, its available ring 0x100 further, used ring 0x200 further; data
from 0x1000."""
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
F_NEXT, F_WRITE = 1, 2


def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


class Mem:
    def __init__(self):
        self.b = bytearray()

    def write(self, addr, data):
        if len(self.b) < addr + len(data):
            self.b.extend(b"\0" * (addr + len(data) - len(self.b)))
        self.b[addr:addr + len(data)] = data

    def desc(self, q, i, addr, ln, flags, nxt):
        self.write(q * 0x400 + 16 * i, struct.pack("<QIHH", addr, ln, flags, nxt))

    def avail(self, q, heads):
        ring = b"".join(struct.pack("<H", h) for h in heads)
        self.write(q * 0x400 + 0x100, struct.pack("<HH", 0, len(heads)) + ring)

    def chain(self, q, first, descs):
        """descs: (addr, len, write) in slots first, first+1, ..."""
        for k, (addr, ln, w) in enumerate(descs):
            last = k == len(descs) - 1
            flags = (F_WRITE if w else 0) | (0 if last else F_NEXT)
            self.desc(q, first + k, addr, ln, flags, 0 if last else first + k + 1)


# --- vm.json and the control socket ---------------------------------------
vm = {
    "vcpus": 1, "memory_mib": 256,
    "kernel": {"path": "/usr/share/husk/vmlinux",
               "cmdline": "console=ttyS0 reboot=k panic=-1 husk.agent_port=1024",
               "initrd": "/usr/share/husk/initrd.img"},
    "serial": {"output": "file", "path": "/run/husk/s1/console.log"},
    "block": [{"id": "rootfs0", "path": "/run/husk/s1/c1.erofs", "read_only": True, "serial": "c1"}],
    "vsock": {"guest_cid": 3, "uds_path": "/run/husk/s1/vsock.sock"},
    "net": [{"id": "eth0", "tap": "husk0", "mac": "02:00:00:00:00:01"}],
    "rng": True,
    "balloon": {"free_page_reporting": True},
    "control_socket": "/run/husk/s1/control.sock",
}
put("vm_config", "shim-vm.json", json.dumps(vm, indent=2))
put("vm_config", "minimal.json", json.dumps({"vcpus": 1, "memory_mib": 128, "kernel": {"path": "/k"}}))
put("vm_control", "requests", '{"op":"status"}\n{"op":"pause"}\n{"op":"resume"}\n{"op":"shutdown","timeout_ms":250}\n')
put("vm_control", "replies", '{"ok":true,"state":"running"}\n{"ok":false,"error":"no"}\n{"ok":true}\n')
# A snapshot state file's payload (the target frames it itself too): the
# shape of a 1-vCPU VM, with parts that do not add up.
put("snapshot_state", "shape", '{"shape":{"vcpus":1,"memory_mib":128,"devices":[{"kind":"virtio-rng","id":"rng"}],"kernel_bytes":null},"vm":null,"vcpus":[],"serial":null,"devices":[]}')

# --- virtio-blk through a queue ---------------------------------------------
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8


def blk_request(m, slot, kind, sector, data_len, data_write, hdr_at, data_at, status_at):
    m.write(hdr_at, struct.pack("<IIQ", kind, 0, sector))
    descs = [(hdr_at, 16, False)]
    if data_len:
        descs.append((data_at, data_len, data_write))
    descs.append((status_at, 1, True))
    m.chain(0, slot, descs)
    return len(descs)


m = Mem()
blk_request(m, 0, T_IN, 1, 512, True, 0x1000, 0x1200, 0x1010)
m.avail(0, [0])
put("block", "read-sector-1", bytes(m.b))
m = Mem()
m.write(0x1200, b"\xab" * 1024)
blk_request(m, 0, T_OUT, 2, 1024, False, 0x1000, 0x1200, 0x1010)
m.avail(0, [0])
put("block", "write-2-sectors", bytes(m.b))
m = Mem()
n = blk_request(m, 0, T_FLUSH, 0, 0, False, 0x1000, 0, 0x1010)
n2 = blk_request(m, n, T_GET_ID, 0, 20, True, 0x1020, 0x1100, 0x1030)
blk_request(m, n + n2, T_IN, 63, 512, True, 0x1040, 0x1400, 0x1050)
m.avail(0, [0, n, n + n2])
put("block", "flush-getid-read", bytes(m.b))

# --- virtio-fs requests answered with EIO (the backend is gone) --------------
FUSE_GETATTR, FUSE_INIT, FUSE_FORGET = 3, 26, 2


def fuse_in(opcode, unique, nodeid, arg):
    return struct.pack("<IIQQIIII", 40 + len(arg), opcode, unique, nodeid, 0, 0, 0, 0) + arg


m = Mem()
m.write(0x1000, fuse_in(FUSE_INIT, 1, 0, struct.pack("<IIII", 7, 31, 0, 0)))
m.chain(0, 0, [(0x1000, 56, False), (0x1100, 256, True)])
m.write(0x1200, fuse_in(FUSE_GETATTR, 2, 1, b"\0" * 16))
# The in header over two buffers, the answer over two.
m.chain(0, 2, [(0x1200, 12, False), (0x120c, 44, False), (0x1300, 10, True), (0x1380, 6, True)])
m.write(0x1400, fuse_in(FUSE_FORGET, 3, 2, struct.pack("<Q", 1)))
m.chain(0, 6, [(0x1400, 48, False)])
m.avail(0, [0, 2, 6])
put("fs_error", "init-getattr-forget", bytes(m.b))
# The backend completed the first request before it died: used idx 1.
m.write(0x200 + 2, struct.pack("<H", 1))
put("fs_error", "resume-after-one", bytes(m.b))

# --- virtio-vsock: tx queue 1, rx queue 0 ------------------------------------
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = 1, 2, 3, 4, 5, 6, 7


def vsock_hdr(op, ln=0, src_cid=3, dst_cid=2, src_port=1234, dst_port=1024):
    return struct.pack("<QQIIIHHIII", src_cid, dst_cid, src_port, dst_port, ln, 1, op, 0, 65536, 0)


def vsock_mem(packets):
    m = Mem()
    m.chain(0, 0, [(0x3000, 4096, True)])
    m.chain(0, 1, [(0x4000, 4096, True)])
    m.avail(0, [0, 1])
    slot, heads, at = 0, [], 0x1000
    for hdr, payload in packets:
        m.write(at, hdr + payload)
        if payload:
            m.chain(1, slot, [(at, 44, False), (at + 44, len(payload), False)])
            heads.append(slot)
            slot += 2
        else:
            m.chain(1, slot, [(at, 44, False)])
            heads.append(slot)
            slot += 1
        at += 0x100
    m.avail(1, heads)
    return bytes(m.b)


put("vsock", "request", vsock_mem([(vsock_hdr(OP_REQUEST), b"")]))
put("vsock", "rw-shutdown-rst", vsock_mem([
    (vsock_hdr(OP_RW, 5, dst_port=52), b"hello"),
    (vsock_hdr(OP_CREDIT_REQUEST, dst_port=52), b""),
    (vsock_hdr(OP_SHUTDOWN, dst_port=52), b""),
    (vsock_hdr(OP_RST, dst_port=52), b""),
]))
put("vsock", "connection-life", vsock_mem([
    (vsock_hdr(OP_REQUEST), b""),
    (vsock_hdr(OP_RW, 5), b"hello"),
    (vsock_hdr(OP_CREDIT_UPDATE), b""),
    (vsock_hdr(OP_SHUTDOWN), b""),
    (vsock_hdr(OP_RST), b""),
]))
put("vsock", "connect-line", "CONNECT 1024\n")

# --- virtio-net tx ------------------------------------------------------------
m = Mem()
frame = bytes.fromhex("ffffffffffff020000000001") + b"\x08\x06" + b"\0" * 46
m.write(0x1000, b"\0" * 12)
m.write(0x1100, frame)
m.chain(0, 0, [(0x1000, 12, False), (0x1100, len(frame), False)])
m.write(0x1200, b"\0" * 12 + frame)
m.chain(0, 2, [(0x1200, 12 + len(frame), False)])
m.avail(0, [0, 2])
put("net_tx", "two-frames", bytes(m.b))

# --- virtio-mmio: a driver setting up virtio-blk, then a read -----------------
ops = bytearray()


def rd(off):
    ops.extend(struct.pack("<BHB", 0, off, 2))


def wr(off, v):
    ops.extend(struct.pack("<BHBI", 1, off, 2, v))


def memw(addr, data):
    ops.extend(struct.pack("<BHB", 2, addr, len(data)) + data)


for off in (0x0, 0x4, 0x8, 0xc):
    rd(off)
wr(0x70, 0)
wr(0x70, 1)
wr(0x70, 3)
wr(0x14, 0); rd(0x10)
wr(0x14, 1); rd(0x10)
wr(0x24, 0); wr(0x20, 0)
wr(0x24, 1); wr(0x20, 1)
wr(0x70, 0xb); rd(0x70)
wr(0x30, 0); rd(0x34)
wr(0x38, 16)
wr(0x80, 0); wr(0x84, 0)
wr(0x90, 0x100); wr(0x94, 0)
wr(0xa0, 0x200); wr(0xa4, 0)
wr(0x44, 1)
wr(0x70, 0xf)
rd(0x100); rd(0x108); rd(0xfc)
bm = Mem()
blk_request(bm, 0, T_IN, 1, 512, True, 0x1000, 0x1200, 0x1010)
bm.avail(0, [0])
memw(0, bytes(bm.b[0:0x30]))
memw(0x100, bytes(bm.b[0x100:0x106]))
memw(0x1000, bytes(bm.b[0x1000:0x1010]))
wr(0x50, 0)
ops.append(3)
rd(0x60); wr(0x64, 1)
wr(0x70, 0)
put("mmio", "driver-init-and-read", bytes(ops))

# --- agent requests (protobuf) ------------------------------------------------
def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7f
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(num, data):
    if isinstance(data, str):
        data = data.encode()
    return varint(num << 3 | 2) + varint(len(data)) + data


oci = {
    "ociVersion": "1.0.2",
    "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": ["/bin/sh", "-c", "echo hi"],
                "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "cwd": "/",
                "capabilities": {"bounding": ["CAP_CHOWN", "CAP_KILL"], "effective": ["CAP_CHOWN", "CAP_KILL"],
                                 "permitted": ["CAP_CHOWN", "CAP_KILL"]},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}], "noNewPrivileges": True},
    "root": {"path": "rootfs"},
    "hostname": "c1",
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/shm", "type": "bind", "source": "/run/husk/shm", "options": ["rbind", "nosuid", "noexec", "nodev"]},
        {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/kubelet/pods/x/etc-hosts-file", "options": ["rbind", "ro"]},
        {"destination": "/data", "type": "bind", "source": "/var/lib/kubelet/pods/x/volumes/dir", "options": ["rbind"]},
        {"destination": "/cache", "type": "bind", "source": "/var/lib/kubelet/pods/x/empty", "options": ["rbind", "ro"]},
    ],
    "annotations": {"io.kubernetes.cri.container-type": "sandbox",
                    "io.kubernetes.cri.sandbox-memory": "268435456",
                    "io.kubernetes.cri.sandbox-cpu-quota": "150000",
                    "io.kubernetes.cri.sandbox-cpu-period": "100000"},
    "linux": {
        "resources": {"devices": [{"allow": False, "access": "rwm"}],
                      "memory": {"limit": 134217728}, "cpu": {"shares": 1024, "quota": 50000, "period": 100000},
                      "pids": {"limit": 100}},
        "cgroupsPath": "/kubepods/pod1/c1",
        "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                       {"type": "network", "path": "/var/run/netns/cni-1"}],
        "maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"],
        "sysctl": {"net.ipv4.ip_forward": "1"},
        "seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"],
                    "syscalls": [{"names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW"}]},
    },
}
oci_json = json.dumps(oci)
put("shim_spec", "cri-container.json", json.dumps(oci, indent=1))
agent_oci = json.loads(oci_json)
agent_oci["mounts"] = agent_oci["mounts"][:2]
agent_oci["linux"]["namespaces"] = agent_oci["linux"]["namespaces"][:4]
put("agent_request", "create-rootfs-path",
    b"\0" + field(1, "c1") + field(2, json.dumps(agent_oci)) + field(6, "/run/husk/containers/c1/rootfs"))
storage = field(1, "c1") + field(2, "erofs")
put("agent_request", "create-rootfs-storage",
    b"\0" + field(1, "c1") + field(2, json.dumps(agent_oci)) + field(5, storage))
put("agent_request", "exec",
    b"\x01" + field(1, "c1") + field(2, "e1") + field(3, json.dumps(oci["process"])))
put("agent_request", "update",
    b"\x02" + field(1, "c1") + field(2, json.dumps(oci["linux"]["resources"])))

put("agent_paths", "plain", "/etc/hosts")
put("agent_paths", "through-links", "/rel/up/abs/file")
put("agent_paths", "escape", "/a/b/c/out/x")
put("agent_paths", "loop", "/ping/x")

# --- shim configuration -------------------------------------------------------
with open(os.path.join(HERE, "..", "configs", "configuration.toml"), "rb") as f:
    toml = f.read()
put("shim_config", "configuration-pod", toml + b"\0" + json.dumps(oci).encode())
put("shim_config", "sizes", b"vcpus = 1\nmemory_mib = 256\nmax_vcpus = 4\nmax_memory_mib = 2048\n\0"
    + json.dumps({"annotations": oci["annotations"], "linux": {"resources": oci["linux"]["resources"]}}).encode())
print("seeds written under", os.path.join(HERE, "corpus"), file=sys.stderr)
