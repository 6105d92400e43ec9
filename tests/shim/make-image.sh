#!/usr/bin/env bash
# Builds the busybox OCI image the shim tests and benchmarks run, without a
# registry: Debian's static busybox (/bin/busybox from busybox-static) plus a
# symlink for each of its applets, one gzip layer, as an OCI image layout
# archive that `ctr images import` takes. Prints the archive's path.
#
#   tests/shim/make-image.sh [NAME]     # NAME default localhost/husk-busybox:latest
#
# HUSK_IMAGE_EXTRA="/usr/bin/iperf3 ..." adds host programs, each with the
# shared libraries `ldd` names, at the same paths (the benchmarks' tools).
# HUSK_IMAGE_BLOB_MIB=N adds /data/blob, N MiB of random bytes (an image that
# is large for the start-time benchmark of tests/scenarios/shim-volumes.sh).
#
# The archive is reproducible (fixed times, owners and order; gzip without a
# time stamp) and cached under $HUSK_CACHE/images (default ~/.cache/husk),
# keyed by the busybox binary, this script and the image name: a second run
# with the same inputs prints the same path and builds nothing.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
name=${1:-localhost/husk-busybox:latest}
busybox=${HUSK_BUSYBOX:-/bin/busybox}
[ -x "$busybox" ] || { echo "make-image: no $busybox (apt-get install busybox-static)" >&2; exit 1; }
! command -v file >/dev/null || ! file -L "$busybox" | grep -q 'dynamically linked' ||
  { echo "make-image: $busybox is dynamically linked; the image needs busybox-static" >&2; exit 1; }

# The extra programs and their libraries (ldd's "=> /path" and the loader).
extra=()
libs() { ldd "$1" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'; }
for p in ${HUSK_IMAGE_EXTRA:-}; do
  [ -x "$p" ] || { echo "make-image: HUSK_IMAGE_EXTRA names $p, which is not an executable" >&2; exit 1; }
  # (No process substitution: the test machine has no /dev/fd.)
  # shellcheck disable=SC2207
  extra+=("$p" $(libs "$p"))
done
if [ ${#extra[@]} -gt 0 ]; then
  # shellcheck disable=SC2207
  extra=($(printf '%s\n' "${extra[@]}" | sort -u))
fi

cache=${HUSK_CACHE:-$HOME/.cache/husk}/images
key=$( { sha256sum "$busybox" "$here/make-image.sh" ${extra[@]+"${extra[@]}"} | cut -d' ' -f1; echo "$name ${extra[*]} ${HUSK_IMAGE_BLOB_MIB:-0}"; } | sha256sum | cut -c1-16)
out="$cache/husk-busybox-$key.tar"
if [ -s "$out" ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$cache"
tmp=$(mktemp "$out.XXXXXX")
trap 'rm -f "$tmp"' EXIT

# The applets, as paths relative to the root (bin/sh, usr/bin/awk, ...).
HUSK_APPLETS=$("$busybox" --list-full) HUSK_EXTRA_FILES="${extra[*]}" HUSK_BLOB_MIB=${HUSK_IMAGE_BLOB_MIB:-0} python3 - "$busybox" "$name" "$tmp" <<'PY'
import gzip, hashlib, io, json, os, sys, tarfile

busybox, name, out = sys.argv[1:4]
applets = sorted(set(a for a in os.environ["HUSK_APPLETS"].split() if a and a != "bin/busybox"))
EPOCH = 0


def info(path, kind, mode, **kw):
    t = tarfile.TarInfo(path)
    t.type, t.mode, t.mtime = kind, mode, EPOCH
    t.uid = t.gid = 0
    t.uname = t.gname = "root"
    for k, v in kw.items():
        setattr(t, k, v)
    return t


def files():
    """(TarInfo, bytes or None) for the layer, parents before children."""
    dirs = {"bin": 0o755, "sbin": 0o755, "usr": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755,
            "etc": 0o755, "dev": 0o755, "proc": 0o555, "sys": 0o555, "run": 0o755,
            "tmp": 0o1777, "var": 0o755, "var/tmp": 0o1777, "root": 0o700, "home": 0o755}
    for a in applets:
        parts = a.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.setdefault("/".join(parts[:i]), 0o755)
    entries = [(d, info(d, tarfile.DIRTYPE, m), None) for d, m in dirs.items()]
    with open(busybox, "rb") as f:
        data = f.read()
    entries.append(("bin/busybox", info("bin/busybox", tarfile.REGTYPE, 0o755, size=len(data)), data))
    etc = {
        "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        "etc/group": b"root:x:0:\nnogroup:x:65534:\n",
        "etc/hosts": b"127.0.0.1\tlocalhost\n",
    }
    for p, d in etc.items():
        entries.append((p, info(p, tarfile.REGTYPE, 0o644, size=len(d)), d))
    extra = [p.lstrip("/") for p in os.environ.get("HUSK_EXTRA_FILES", "").split()]
    for p in extra:
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs[d] = 0o755
                entries.append((d, info(d, tarfile.DIRTYPE, 0o755), None))
        with open("/" + p, "rb") as f:
            data = f.read()
        entries.append((p, info(p, tarfile.REGTYPE, 0o755, size=len(data)), data))
    blob = int(os.environ.get("HUSK_BLOB_MIB", "0")) << 20
    if blob:
        dirs["data"] = 0o755
        entries.append(("data", info("data", tarfile.DIRTYPE, 0o755), None))
        data = os.urandom(blob)
        entries.append(("data/blob", info("data/blob", tarfile.REGTYPE, 0o644, size=len(data)), data))
    for a in applets:
        if a not in extra:
            entries.append((a, info(a, tarfile.SYMTYPE, 0o777, linkname="/bin/busybox"), None))
    # Sorted by path: a parent directory sorts before what it holds.
    return [(t, d) for _, t, d in sorted(entries, key=lambda e: e[0])]


def tar_bytes(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for t, d in entries:
            tf.addfile(t, io.BytesIO(d) if d is not None else None)
    return buf.getvalue()


def sha(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


layer = tar_bytes(files())
gz = io.BytesIO()
with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, filename="", compresslevel=6) as g:
    g.write(layer)
layer_gz = gz.getvalue()

config = json.dumps({
    "created": "1970-01-01T00:00:00Z",
    "architecture": "amd64",
    "os": "linux",
    "config": {
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": ["sh"],
        "WorkingDir": "/",
    },
    "rootfs": {"type": "layers", "diff_ids": [sha(layer)]},
    "history": [{"created": "1970-01-01T00:00:00Z",
                 "created_by": "husk tests/shim/make-image.sh: Debian busybox-static"}],
}, sort_keys=True, separators=(",", ":")).encode()
manifest = json.dumps({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
               "digest": sha(config), "size": len(config)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": sha(layer_gz), "size": len(layer_gz)}],
}, sort_keys=True, separators=(",", ":")).encode()
tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
index = json.dumps({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": sha(manifest), "size": len(manifest),
        "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {"io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": tag},
    }],
}, sort_keys=True, separators=(",", ":")).encode()

outer = [(info("blobs", tarfile.DIRTYPE, 0o755), None),
         (info("blobs/sha256", tarfile.DIRTYPE, 0o755), None)]
for blob in sorted((config, manifest, layer_gz), key=sha):
    p = "blobs/sha256/" + sha(blob)[7:]
    outer.append((info(p, tarfile.REGTYPE, 0o644, size=len(blob)), blob))
layout = b'{"imageLayoutVersion":"1.0.0"}'
outer.append((info("oci-layout", tarfile.REGTYPE, 0o644, size=len(layout)), layout))
outer.append((info("index.json", tarfile.REGTYPE, 0o644, size=len(index)), index))
with open(out, "wb") as f:
    f.write(tar_bytes(outer))
print(f"make-image: {name}: manifest {sha(manifest)}, layer {len(layer_gz)} bytes, "
      f"{len(applets)} applets", file=sys.stderr)
PY
chmod 0644 "$tmp"
mv "$tmp" "$out"
trap - EXIT
echo "$out"
