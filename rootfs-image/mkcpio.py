#!/usr/bin/env python3
"""Writes a newc cpio archive from a manifest, byte for byte reproducibly.

Every entry gets mtime 0, uid/gid 0 and inode numbers in manifest order, so
the same inputs always give the same bytes (the kernel's gen_init_cpio format,
without its dependence on file times).

Manifest lines (like usr/gen_init_cpio):
    dir  <path> <mode>
    file <path> <source> <mode>
    nod  <path> <mode> c|b <major> <minor>
    slink <path> <target> <mode>
"""
import stat
import sys


def header(ino, mode, nlink, size, rmajor, rminor, name):
    fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rmajor, rminor, len(name) + 1, 0]
    return b"070701" + b"".join(b"%08X" % f for f in fields) + name + b"\0"


def pad(n):
    return b"\0" * ((4 - n % 4) % 4)


def entry(out, ino, mode, name, data=b"", rdev=(0, 0)):
    hdr = header(ino, mode, 1, len(data), rdev[0], rdev[1], name.encode())
    out.write(hdr + pad(len(hdr)) + data + pad(len(data)))


def main(manifest, dest):
    with open(dest, "wb") as out:
        ino = 1
        for lineno, line in enumerate(open(manifest), 1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            kind, path = words[0], words[1].lstrip("/")
            if kind == "dir":
                entry(out, ino, stat.S_IFDIR | int(words[2], 8), path)
            elif kind == "file":
                with open(words[2], "rb") as f:
                    data = f.read()
                entry(out, ino, stat.S_IFREG | int(words[3], 8), path, data)
            elif kind == "nod":
                ftype = stat.S_IFCHR if words[3] == "c" else stat.S_IFBLK
                rdev = (int(words[4]), int(words[5]))
                entry(out, ino, ftype | int(words[2], 8), path, rdev=rdev)
            elif kind == "slink":
                entry(out, ino, stat.S_IFLNK | int(words[3], 8), path, words[2].encode())
            else:
                sys.exit(f"{manifest}:{lineno}: unknown entry kind {kind!r}")
            ino += 1
        entry(out, ino, 0, "TRAILER!!!")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: mkcpio.py MANIFEST OUTPUT")
    main(sys.argv[1], sys.argv[2])
