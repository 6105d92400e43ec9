#!/usr/bin/env python3
"""A read-only image registry on 127.0.0.1 for the CRI tests: serves the
OCI image layout tests/cri/make-images.sh builds over the parts of the OCI
distribution API a pull uses, GET and HEAD of

    /v2/                          200 (no authentication)
    /v2/NAME/manifests/TAG        the manifest index.json names NAME:TAG
    /v2/NAME/manifests/DIGEST     any manifest in the layout by digest
    /v2/NAME/blobs/DIGEST         a config or layer

with Content-Type, Content-Length and Docker-Content-Digest. NAME is the
reference's path without its host (e2e-test-images/busybox), so one
registry answers as every host containerd mirrors to it; the query string
containerd adds for a mirror (?ns=registry.k8s.io) is ignored.

    registry.py LAYOUT [--port N] [--port-file FILE] [--log FILE]

Port 0 (the default) takes a free port; the port goes to --port-file (once
the socket listens) and to stdout. SIGTERM ends it.
"""
import argparse, http.server, json, os, re, signal, sys

ap = argparse.ArgumentParser()
ap.add_argument("layout")
ap.add_argument("--port", type=int, default=0)
ap.add_argument("--port-file")
ap.add_argument("--log")
args = ap.parse_args()

layout = os.path.abspath(args.layout)
blobs = os.path.join(layout, "blobs", "sha256")
with open(os.path.join(layout, "index.json")) as fh:
    index = json.load(fh)
tags = {}          # (name, tag) -> descriptor
media = {}         # digest -> media type of manifests
for m in index["manifests"]:
    ref = m.get("annotations", {}).get("org.opencontainers.image.ref.name", "")
    media[m["digest"]] = m["mediaType"]
    host, _, rest = ref.partition("/")
    name, _, tag = rest.rpartition(":")
    if not name or "/" in tag:
        sys.exit("registry.py: index.json names %r, not HOST/NAME:TAG" % ref)
    if (name, tag) in tags and tags[(name, tag)]["digest"] != m["digest"]:
        sys.exit("registry.py: %s:%s names two images" % (name, tag))
    tags[(name, tag)] = m
logf = open(args.log, "a", buffering=1) if args.log else sys.stderr

PATH_RE = re.compile(r"^/v2/(?P<name>[a-z0-9._/-]+)/(?P<kind>manifests|blobs)/(?P<ref>[A-Za-z0-9._:+-]+)$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "husk-test-registry/1"

    def log_message(self, fmt, *a):
        logf.write("%s %s\n" % (self.log_date_time_string(), fmt % a))

    def reply(self, code, body=b"", ctype="application/json", digest=None, head=False):
        self.send_response(code)
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if digest:
            self.send_header("Docker-Content-Digest", digest)
            self.send_header("ETag", '"%s"' % digest)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def error(self, code, what, msg, head):
        body = json.dumps({"errors": [{"code": what, "message": msg}]}).encode()
        self.reply(code, body, head=head)

    def serve(self, head):
        path = self.path.split("?", 1)[0]
        if path in ("/v2", "/v2/"):
            return self.reply(200, b"{}", head=head)
        m = PATH_RE.match(path)
        if not m:
            return self.error(404, "NOT_FOUND", "no such endpoint: " + path, head)
        name, kind, ref = m.group("name", "kind", "ref")
        if kind == "manifests":
            if DIGEST_RE.match(ref):
                digest, ctype = ref, media.get(ref)
                if not ctype:
                    return self.error(404, "MANIFEST_UNKNOWN", "unknown manifest " + ref, head)
            else:
                desc = tags.get((name, ref))
                if not desc:
                    return self.error(404, "MANIFEST_UNKNOWN", "unknown manifest %s:%s" % (name, ref), head)
                digest, ctype = desc["digest"], desc["mediaType"]
        else:
            if not DIGEST_RE.match(ref):
                return self.error(400, "DIGEST_INVALID", "not a sha256 digest: " + ref, head)
            digest, ctype = ref, "application/octet-stream"
        try:
            with open(os.path.join(blobs, digest[7:]), "rb") as fh:
                body = fh.read()
        except FileNotFoundError:
            code = "MANIFEST_UNKNOWN" if kind == "manifests" else "BLOB_UNKNOWN"
            return self.error(404, code, "unknown " + digest, head)
        self.reply(200, body, ctype, digest, head)

    def do_GET(self):
        self.serve(False)

    def do_HEAD(self):
        self.serve(True)


srv = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
srv.daemon_threads = True
port = srv.server_address[1]
if args.port_file:
    with open(args.port_file + ".tmp", "w") as fh:
        fh.write("%d\n" % port)
    os.rename(args.port_file + ".tmp", args.port_file)
print(port, flush=True)
logf.write("registry.py: serving %s (%d tags) on 127.0.0.1:%d\n" % (layout, len(tags), port))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
try:
    srv.serve_forever()
finally:
    srv.server_close()
