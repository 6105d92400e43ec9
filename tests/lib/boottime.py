#!/usr/bin/env python3
"""Times a VM monitor from process start to its guest's console output.

    boottime.py [--marker TEXT] [--console FILE] [--log FILE] [--timeout S] [--stall S] -- COMMAND...

Starts COMMAND with its stdout (the guest's serial console) on a pipe and
prints one JSON object: milliseconds from the spawn to the first console byte,
to the first line containing TEXT, and to the process's exit, and its exit
code. The same measurement serves husk-vmm and QEMU alike, so the two can be
set side by side. With --log, the command's stderr goes to FILE and the spawn
time (Unix microseconds) is reported too, so log timestamps can be set
against it.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--marker", default="HUSK_GUEST_READY")
    ap.add_argument("--console", help="also write the console here")
    ap.add_argument("--log", help="the command's stderr")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--stall", type=float, default=None,
                    help="stop the monitor if the guest printed nothing after this many seconds")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        sys.exit("no command")
    stderr = open(args.log, "wb") if args.log else subprocess.DEVNULL
    console = open(args.console, "wb") if args.console else None
    spawn_unix_us = time.time_ns() // 1000
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
    first_byte = marker = None
    buf = b""
    fd = proc.stdout.fileno()
    # A guest that prints nothing must not hang the measurement: stop the
    # monitor (SIGTERM, so it can log where its vCPUs were) at the timeout.
    killer = threading.Timer(args.timeout, proc.terminate)
    killer.start()
    staller = None
    if args.stall:
        def stop_if_silent():
            if first_byte is None:
                proc.terminate()
        staller = threading.Timer(args.stall, stop_if_silent)
        staller.start()
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        now = time.monotonic()
        if first_byte is None:
            first_byte = now
        if console:
            console.write(chunk)
        if marker is None:
            buf += chunk
            if args.marker.encode() in buf:
                marker = now
            buf = buf[-len(args.marker) :]
    killer.cancel()
    if staller:
        staller.cancel()
    rc = proc.wait()
    end = time.monotonic()
    ms = lambda t: None if t is None else round((t - t0) * 1000, 1)
    print(json.dumps({
        "first_byte_ms": ms(first_byte),
        "marker_ms": ms(marker),
        "exit_ms": ms(end),
        "rc": rc,
        "spawn_unix_us": spawn_unix_us,
    }))


if __name__ == "__main__":
    main()
