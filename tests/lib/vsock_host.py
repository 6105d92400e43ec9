#!/usr/bin/env python3
"""Host side of the VMM's vsock scenario (Firecracker's hybrid vsock).

    vsock_host.py serve UDS_PATH PORT          answer one guest connection to
                                               host port PORT (the VMM connects
                                               to UDS_PATH_PORT): read a line,
                                               reply `pong:<line>`, print it
    vsock_host.py connect UDS_PATH PORT MSG    connect to guest port PORT through
                                               the VMM's socket (`CONNECT PORT`,
                                               `OK ...`), send MSG, print the reply;
                                               retries until the guest listens
    vsock_host.py open UDS_PATH PORT           connect to guest port PORT, print
                                               `open` after the handshake, send
                                               nothing, and print `closed` when
                                               the VMM closes the connection
    vsock_host.py hold UDS_PATH PORT COUNT_FILE
                                               accept every guest connection to
                                               host port PORT and hold it open
                                               (until killed), keeping the count
                                               in COUNT_FILE
"""
import os
import socket
import sys
import time


def serve(uds, port):
    path = f"{uds}_{port}"
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    srv.settimeout(240)
    conn, _ = srv.accept()
    line = conn.makefile("rb").readline().decode().rstrip("\n")
    conn.sendall(f"pong:{line}\n".encode())
    print(f"host served guest line {line!r}", flush=True)
    conn.close()
    srv.close()
    os.unlink(path)


def hold(uds, port, count_file):
    path = f"{uds}_{port}"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4096)
    held = []
    while True:
        conn, _ = srv.accept()
        held.append(conn)
        with open(count_file + ".tmp", "w") as f:
            f.write(f"{len(held)}\n")
        os.replace(count_file + ".tmp", count_file)


def connect(uds, port, msg, deadline_s=240):
    deadline = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < deadline:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(30)
            s.connect(uds)
            s.sendall(f"CONNECT {port}\n".encode())
            f = s.makefile("rb")
            ok = f.readline().decode()
            if not ok.startswith("OK "):
                raise OSError(f"handshake answer {ok!r}")
            s.sendall(f"{msg}\n".encode())
            reply = f.readline().decode().rstrip("\n")
            print(f"host got reply {reply!r} (handshake {ok.strip()!r})", flush=True)
            s.close()
            return reply
        except OSError as e:
            last = e
            time.sleep(0.5)
    sys.exit(f"vsock connect to guest port {port} failed: {last}")


def hold_open(uds, port):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(uds)
    s.sendall(f"CONNECT {port}\n".encode())
    ok = s.makefile("rb").readline().decode()
    if not ok.startswith("OK "):
        sys.exit(f"handshake answer {ok!r}")
    print("open", flush=True)
    while s.recv(4096):
        pass
    print("closed", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) == 5 and sys.argv[1] == "hold":
        hold(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif len(sys.argv) == 4 and sys.argv[1] == "open":
        hold_open(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) == 5 and sys.argv[1] == "connect":
        connect(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit(__doc__)
