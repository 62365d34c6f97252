"""TCP traffic of known shape, from a process with a name of its own (for the TCP probe tests).

    python -m tests.tcp_traffic transfer COMM HOST N M CONNS   server and clients in-process:
                                                               each client sends N, gets M
    python -m tests.tcp_traffic serve COMM HOST PORT           prints "listening PORT"; per
                                                               connection: read to EOF, answer
                                                               the byte count (8 bytes), close
    python -m tests.tcp_traffic send COMM HOST PORT N TIMEOUT CONNS
                                                               connect, send N, read the answer
    python -m tests.tcp_traffic hold COMM HOST PORT N M        send N, print "sent", wait for a
                                                               line on stdin, send M, finish
    python -m tests.tcp_traffic abort COMM HOST                connect, send, close with
                                                               SO_LINGER 0 (a reset)

Each prints one JSON line with what it did (ports, errors; ``send`` and ``transfer`` clients
also the kernel's own count of the segments they retransmitted, TCP_INFO's tcpi_total_retrans,
read once the peer has acknowledged everything, and ``transfer`` its server end's per client
port) and exits (``serve`` runs until killed).
The process names itself COMM (prctl) before it makes any thread or socket, so the kernel
reports its connections under that name.
"""

from __future__ import annotations

import ctypes
import json
import socket
import struct
import sys
import threading
import time
from typing import Any

PR_SET_NAME = 15


def _name(comm: str) -> None:
    ctypes.CDLL(None).prctl(PR_SET_NAME, comm.encode()[:15], 0, 0, 0)


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _read_all(sock: socket.socket) -> int:
    total = 0
    while chunk := sock.recv(65536):
        total += len(chunk)
    return total


def _total_retrans(sock: socket.socket) -> int:
    """tcpi_total_retrans of struct tcp_info (linux/tcp.h): offset 100, after 8 one-byte
    fields and 23 u32s."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("<I", info, 100)[0])


def _total_unacked(sock: socket.socket) -> int:
    """tcpi_unacked (offset 24): segments in flight, a FIN included."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("<I", info, 24)[0])


# Per client port: the segments the server end retransmitted, once the client acknowledged
# its answer and its FIN (after that nothing can go again).
_served: dict[int, int] = {}
_served_cond = threading.Condition()


def _answer(conn: socket.socket, reply: int | None) -> None:
    with conn:
        try:
            peer_port = conn.getpeername()[1]
            got = _read_all(conn)
            conn.sendall(b"y" * reply if reply is not None else struct.pack("<Q", got))
            conn.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 30
            while _total_unacked(conn) and time.monotonic() < deadline:
                time.sleep(0.001)
            with _served_cond:
                _served[peer_port] = _total_retrans(conn)
                _served_cond.notify_all()
        except OSError:
            pass  # the client reset the connection (the abort scenario)


def _server(host: str, port: int, reply: int | None) -> socket.socket:
    srv = socket.socket(_family(host))
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(128)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=_answer, args=(conn, reply), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv


def _send(host: str, port: int, n: int, timeout: float | None) -> dict[str, Any]:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        return {"error": "timeout"}
    except ConnectionRefusedError:
        return {"error": "refused"}
    except OSError as exc:
        return {"error": type(exc).__name__}
    with sock:
        sock.settimeout(120)
        lport = sock.getsockname()[1]
        sock.sendall(b"x" * n)
        sock.shutdown(socket.SHUT_WR)
        got = _read_all(sock)
        # The peer's FIN came after all we sent (it read to our FIN): nothing more can go again.
        retrans = _total_retrans(sock)
    return {"lport": lport, "received": got, "retrans": retrans}


def main(argv: list[str]) -> None:
    command, comm, host, *rest = argv
    _name(comm)
    out: Any
    if command == "transfer":
        n, m, conns = (int(x) for x in rest)
        srv = _server(host, 0, reply=m)
        port = srv.getsockname()[1]
        out = {"port": port, "clients": [_send(host, port, n, 30) for _ in range(conns)]}
        with _served_cond:
            _served_cond.wait_for(lambda: len(_served) >= conns, timeout=30)
            out["server_retrans"] = dict(_served)
        srv.close()
    elif command == "serve":
        srv = _server(host, int(rest[0]), reply=None)
        print(f"listening {srv.getsockname()[1]}", flush=True)
        threading.Event().wait()
    elif command == "send":
        port, n, timeout, conns = int(rest[0]), int(rest[1]), float(rest[2]), int(rest[3])
        out = [_send(host, port, n, timeout) for _ in range(conns)]
    elif command == "hold":
        port, n, m = (int(x) for x in rest)
        with socket.create_connection((host, port), timeout=30) as sock:
            sock.sendall(b"x" * n)
            print(json.dumps({"sent": n, "lport": sock.getsockname()[1]}), flush=True)
            sys.stdin.readline()
            sock.sendall(b"x" * m)
            sock.shutdown(socket.SHUT_WR)
            (count,) = struct.unpack("<Q", sock.recv(8))
        out = {"server_received": count}
    elif command == "abort":
        srv = _server(host, 0, reply=0)
        port = srv.getsockname()[1]
        sock = socket.create_connection((host, port), timeout=30)
        lport = sock.getsockname()[1]
        sock.sendall(b"x" * 10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        out = {"port": port, "lport": lport}
        srv.close()
    else:
        raise SystemExit(f"unknown command {command!r}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
