#!/usr/bin/env python3
"""Builds the images critest v1.26.1 pulls as one OCI image layout (a folder:
oci-layout, index.json, blobs/sha256/...), for tests/cri/registry.py to serve.

    images.py OUT BUSYBOX BINDIR

BUSYBOX is Debian's static busybox; BINDIR holds the static programs
tests/cri/make-images.sh compiled (pause, nnp, nginx). Every image but
pause starts from one busybox layer (busybox, a hard link per applet, the
/etc/passwd and /etc/group of the busybox:1.29 image, and pgrep and ipcs,
which critest runs and Debian's busybox lacks, as small scripts); each
adds a layer of its own. index.json names each image's manifest with the
annotation org.opencontainers.image.ref.name = the full reference
(registry.k8s.io/e2e-test-images/busybox:1.29-2). Reproducible: fixed
times, owners and order, gzip without a time stamp.
"""
import gzip, hashlib, io, json, os, sys, tarfile

out, busybox, bindir = sys.argv[1:4]
EPOCH = 0
PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def sha(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def blob(b):
    d = sha(b)
    p = os.path.join(out, "blobs", "sha256", d[7:])
    if not os.path.exists(p):
        with open(p + ".tmp", "wb") as f:
            f.write(b)
        os.rename(p + ".tmp", p)
    return d


def entry(path, kind, mode, data=None, uid=0, gid=0, **kw):
    t = tarfile.TarInfo(path)
    t.type, t.mode, t.mtime, t.uid, t.gid = kind, mode, EPOCH, uid, gid
    t.uname = t.gname = "root" if uid == 0 else ""
    if data is not None:
        t.size = len(data)
    for k, v in kw.items():
        setattr(t, k, v)
    return (path, t, data)


def d(path, mode=0o755):
    return entry(path, tarfile.DIRTYPE, mode)


def f(path, data, mode=0o644, **kw):
    if isinstance(data, str):
        data = data.encode()
    return entry(path, tarfile.REGTYPE, mode, data, **kw)


def layer(entries):
    """(compressed blob digest, size, diff_id) of a layer of these entries;
    the parents of every path are added."""
    have = {e[0] for e in entries}
    extra = []
    for p, _, _ in entries:
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            q = "/".join(parts[:i])
            if q not in have:
                have.add(q)
                extra.append(d(q))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        # By path, but a hard link after the file it names (tar extracts in
        # order).
        order = lambda e: (e[1].type == tarfile.LNKTYPE, e[0])
        for _, t, data in sorted(entries + extra, key=order):
            tf.addfile(t, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, filename="", compresslevel=6) as g:
        g.write(raw)
    z = gz.getvalue()
    return {"digest": blob(z), "size": len(z), "diff_id": sha(raw)}


def read(path):
    with open(path, "rb") as fh:
        return fh.read()


# ---- the busybox layer ------------------------------------------------------
PASSWD = """root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
sync:x:4:100:sync:/bin:/bin/sync
mail:x:8:8:mail:/var/spool/mail:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
operator:x:37:37:Operator:/var:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
"""
GROUP = """root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
wheel:x:10:root
mail:x:12:
www-data:x:33:
users:x:100:
nogroup:x:65534:
"""
# critest's execSync-timeout spec runs `pgrep sleep`, the HostIPC specs
# `ipcs -m`: applets Debian's busybox-static is built without.
PGREP = r"""#!/bin/sh
# pgrep PATTERN: the pids whose process name matches PATTERN (a regular
# expression), as busybox's pgrep (Debian's busybox-static has none).
[ $# -eq 1 ] || { echo "usage: pgrep PATTERN" >&2; exit 2; }
rc=1
for p in /proc/[0-9]*; do
  [ "${p#/proc/}" != $$ ] || continue
  n=$(cat "$p/comm" 2>/dev/null) || continue
  if echo "$n" | grep -q -e "$1"; then echo "${p#/proc/}"; rc=0; fi
done
exit $rc
"""
IPCS = r"""#!/bin/sh
# ipcs -m: the System V shared memory segments of this IPC namespace, from
# /proc/sysvipc/shm (Debian's busybox-static has no ipcs).
echo
echo "------ Shared Memory Segments --------"
echo "key        shmid      owner      perms      bytes      nattch"
awk 'NR > 1 { printf "0x%08x %-10s %-10s %-10s %-10s %-10s\n", $1, $2, $8, $3, $4, $7 }' /proc/sysvipc/shm
"""


def busybox_layer():
    applets = sorted(set(a for a in os.popen(busybox + " --list-full").read().split()
                         if a and a != "bin/busybox"))
    es = [d(p, m) for p, m in {"bin": 0o755, "sbin": 0o755, "usr": 0o755, "usr/bin": 0o755,
                               "usr/sbin": 0o755, "etc": 0o755, "dev": 0o755, "proc": 0o555,
                               "sys": 0o555, "run": 0o755, "tmp": 0o1777, "var": 0o755,
                               "var/run": 0o755, "var/tmp": 0o1777, "var/www": 0o755,
                               "root": 0o700, "home": 0o755}.items()]
    es.append(f("bin/busybox", read(busybox), 0o755))
    es += [f("etc/passwd", PASSWD), f("etc/group", GROUP), f("etc/hosts", "127.0.0.1\tlocalhost\n"),
           f("bin/pgrep", PGREP, 0o755), f("usr/bin/ipcs", IPCS, 0o755)]
    taken = {"bin/pgrep", "usr/bin/pgrep", "usr/bin/ipcs", "bin/ipcs"}
    # Hard links, as the busybox image has: critest's MaskedPaths spec masks
    # /bin/ls and expects /bin/sh still to run (with symlinks the mask would
    # land on /bin/busybox itself).
    es += [entry(a, tarfile.LNKTYPE, 0o755, linkname="bin/busybox") for a in applets if a not in taken]
    return layer(es)


BASE = busybox_layer()
INDEX = []


def image(refs, layers, config, history):
    cfg = {"Env": [PATH]}
    cfg.update(config)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    c = json.dumps({
        "created": "1970-01-01T00:00:00Z", "architecture": "amd64", "os": "linux",
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [l["diff_id"] for l in layers]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "husk tests/cri/images.py: " + h}
                    for h in history],
    }, sort_keys=True, separators=(",", ":")).encode()
    m = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blob(c), "size": len(c)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": l["digest"], "size": l["size"]} for l in layers],
    }, sort_keys=True, separators=(",", ":")).encode()
    md = blob(m)
    for r in refs:
        INDEX.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md,
                      "size": len(m), "platform": {"architecture": "amd64", "os": "linux"},
                      "annotations": {"org.opencontainers.image.ref.name": r}})


def busybox_image(refs, extra=None, config=None, what="busybox"):
    layers = [BASE] + ([layer(extra)] if extra else [])
    image(refs, layers, dict({"Cmd": ["sh"]}, **(config or {})), ["Debian busybox-static", what][:len(layers)])


K8S = "registry.k8s.io/"
E2E = K8S + "e2e-test-images/"
CRI = "gcr.io/k8s-staging-cri-tools/"

# The default test image.
busybox_image([E2E + "busybox:1.29-2"])

# The sandbox image: /pause alone, run as 65535 like the real pause:3.6.
image([K8S + "pause:3.6"], [layer([f("pause", read(os.path.join(bindir, "pause")), 0o755)])],
      {"Entrypoint": ["/pause"], "User": "65535:65535"}, ["static pause"])


def nginx_layer(port):
    return [f("usr/sbin/nginx", read(os.path.join(bindir, "nginx")), 0o755),
            f("usr/share/nginx/html/index.html", "<html><body><h1>Welcome to nginx!</h1></body></html>\n"),
            f("etc/nginx/conf.d/default.conf", "server { listen %d; root /usr/share/nginx/html; }\n" % port)]


nginx_cfg = {"Cmd": ["nginx", "-g", "daemon off;"], "ExposedPorts": {"80/tcp": {}}, "StopSignal": "SIGTERM"}
busybox_image([E2E + "nginx:1.14-2"], nginx_layer(80), nginx_cfg, "nginx on busybox httpd, port 80")
busybox_image([CRI + "hostnet-nginx-amd64:latest"], nginx_layer(12003),
              dict(nginx_cfg, Env=[PATH, "NGINX_PORT=12003"], ExposedPorts={"12003/tcp": {}}),
              "nginx on busybox httpd, port 12003")

# httpd: logs what Apache's httpd logs at start (critest looks for
# "httpd -D FOREGROUND" in the container's log) and runs busybox's httpd,
# process name httpd, on port 80.
HTTPD_FG = """#!/bin/sh
echo "[core:notice] [pid $$] AH00094: Command line: 'httpd -D FOREGROUND'" >&2
exec httpd -f -p 80 -h /usr/local/apache2/htdocs
"""
busybox_image([E2E + "httpd:2.4.39-4"],
              [f("usr/local/apache2/bin/httpd-foreground", HTTPD_FG, 0o755),
               f("usr/local/apache2/htdocs/index.html", "<html><body><h1>It works!</h1></body></html>\n")],
              {"Cmd": ["httpd-foreground"], "WorkingDir": "/usr/local/apache2",
               "Env": ["PATH=/usr/local/apache2/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
               "ExposedPorts": {"80/tcp": {}}, "StopSignal": "SIGWINCH"},
              "httpd on busybox httpd, port 80")

# nonewprivs: a setuid-root program that prints its effective uid.
busybox_image([E2E + "nonewprivs:1.3"], [f("usr/local/bin/nnp", read(os.path.join(bindir, "nnp")), 0o4755)],
              {"Entrypoint": ["/usr/local/bin/nnp"], "Cmd": None}, "setuid-root nnp")

# cri-tools' images/image-user: busybox with USER set.
for name, user in [("test-image-user-uid", "1002"), ("test-image-user-username", "www-data"),
                   ("test-image-user-uid-group", "1003:1004"), ("test-image-user-username-group", "www-data:1004")]:
    busybox_image([CRI + name + ":latest"], None, {"User": user})

# images/image-predefined-group: default-user (1000) in group 50000.
busybox_image([CRI + "test-image-predefined-group:latest"],
              [f("etc/passwd", PASSWD + "default-user:x:1000:1000:Linux User,,,:/home/default-user:/bin/sh\n"),
               f("etc/group", GROUP + "default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n"),
               d("home/default-user")],
              {"User": "1000"}, "default-user 1000 in group-defined-in-image 50000")

# images/image-test: busybox plus an empty file named by the build (ADD ${TEST}).
for name in ["test-image-1", "test-image-2", "test-image-3", "test-image-latest", "test-image-digest"]:
    busybox_image([CRI + name + ":latest"], [f(name, "")], None, "ADD " + name)
busybox_image([CRI + "test-image-tags:%d" % i for i in (1, 2, 3)], [f("same-image", "")], None, "ADD same-image")
for tag in ["test", "all"]:
    busybox_image([CRI + "test-image-tag:" + tag], [f(tag, "")], None, "ADD " + tag)

with open(os.path.join(out, "oci-layout"), "w") as fh:
    fh.write('{"imageLayoutVersion":"1.0.0"}')
with open(os.path.join(out, "index.json"), "w") as fh:
    json.dump({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
               "manifests": INDEX}, fh, sort_keys=True, indent=1)
print("%d references, %d blobs" % (len(INDEX), len(os.listdir(os.path.join(out, "blobs", "sha256")))),
      file=sys.stderr)
