#!/usr/bin/env python3
"""Runs human-monitor commands on a QEMU through its QMP socket and prints
their output: the evidence of a frozen test machine (tests/run.sh).

    qmp_hmp.py SOCKET COMMAND...     e.g. qmp_hmp.py qmp.sock "info cpus" "info registers -a"
"""
import json
import socket
import sys


def main():
    path, cmds = sys.argv[1], sys.argv[2:]
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    f = s.makefile("rw")
    f.readline()  # greeting

    def call(execute, **args):
        f.write(json.dumps({"execute": execute, "arguments": args} if args else {"execute": execute}) + "\n")
        f.flush()
        while True:
            r = json.loads(f.readline())
            if "return" in r or "error" in r:
                return r

    call("qmp_capabilities")
    for c in cmds:
        r = call("human-monitor-command", **{"command-line": c})
        print(f"(qemu) {c}")
        print(r.get("return", r.get("error")))


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:
        sys.exit(f"qmp: {e}")
