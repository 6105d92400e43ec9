#!/usr/bin/env python3
"""Runs a command on a new pseudo-terminal (80x24), as if typed at one: waits
until the terminal shows a prompt, types the input, copies everything the
terminal shows to stdout and exits with the command's exit code (124 on
timeout, after killing it).

    pty-run.py [--prompt REGEX] [--timeout S] --input TEXT -- CMD [ARG...]

Used for `ctr run -t` (a container with a terminal) in tests/scenarios/shim-ctr.sh.
"""
import argparse
import fcntl
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", default=r"[#$] $",
                    help="regex the output must match (at its end) before the input is typed")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--input", required=True, help="text to type; \\n is a newline")
    ap.add_argument("cmd", nargs="+")
    a = ap.parse_args()
    text = a.input.encode().decode("unicode_escape").encode()
    prompt = re.compile(a.prompt.encode(), re.M)

    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.execvp(a.cmd[0], a.cmd)
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    deadline = time.monotonic() + a.timeout
    seen = b""
    sent = False
    while True:
        if time.monotonic() > deadline:
            sys.stdout.write(f"\npty-run: timed out after {a.timeout:.0f} s "
                             f"({'input typed' if sent else 'no prompt seen'})\n")
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            sys.exit(124)
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            try:
                data = os.read(fd, 4096)
            except OSError:  # EIO: the other side is closed
                data = b""
            if not data:
                break
            seen += data
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        # Terminal control sequences (busybox's shell asks for the cursor
        # position and clears the line) do not count as output.
        if not sent and prompt.search(re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", seen)):
            os.write(fd, text)
            sent = True
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    sys.stdout.write("\n")
    rc = os.waitstatus_to_exitcode(status)
    sys.exit(128 - rc if rc < 0 else rc)


if __name__ == "__main__":
    main()
