"""Processes for the DNS end-to-end tests: an upstream DNS server and a client, each with a comm
of its own so kubesight names them as workloads.

    python -m tests.e2e.dnsprocs upstream COMM DELAY_S [LOG]
        UDP and TCP on one loopback port (prints ``listening <port>``). Answers ``slow.test``
        after DELAY_S seconds (NOERROR; for type A 10.0.0.2, TTL 0), ``late.test`` the same
        way after LATE_S (past every client's patience), ``fail.test`` with SERVFAIL at once,
        and never answers ``hole.test`` (a blackholed upstream). Anything else: NXDOMAIN. LOG
        gets a line per query: ``received_ns answered_ns transport:peer id qtype name status``
        (answered_ns 0 and status "none" when it did not answer).

    python -m tests.e2e.dnsprocs forking COMM DELAY_S
        TCP only, a forking server (prints ``listening <port>``): the child reads a query and
        answers NOERROR after DELAY_S; the parent closes its copy of the connection 0.1 s
        after the fork, while the child still holds it (as dnsmasq and prefork servers do).

    python -m tests.e2e.dnsprocs client COMM PORT PLAN_JSON
        Sends the queries of PLAN_JSON to 127.0.0.1:PORT and prints one JSON line with what it
        saw: ``{"results": [[qtype, name, rcode name or "timeout", seconds], ...]}``. The plan:
        ``{"transport": "udp"|"tcp", "timeout": s, "hold": s, "pause": s,
        "conns": [[[qtype, name], ...]]}``; each inner list is one socket (a TCP connection, or
        a connected UDP socket) whose queries are sent one after another, each after the
        previous answer, the first ``pause`` seconds after connecting. A query that gets no
        answer within ``timeout`` keeps its socket open ``hold`` more seconds before close.

Stdlib only: the bytes are built here, independently of the parser under test.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import socket
import struct
import sys
import threading
import time
from typing import Any

LATE_S = 6.0  # late.test is answered after this: past kubesight's 5 s deadline
QTYPES = {"A": 1, "NS": 2, "CNAME": 5, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28, "SRV": 33}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def _set_comm(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_NAME = 15
    libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def encode_name(name: str) -> bytes:
    out = b"".join(bytes([len(p)]) + p.encode() for p in name.strip(".").split(".") if p)
    return out + b"\0"


def build_query(qid: int, name: str, qtype: str) -> bytes:
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)  # RD
    return header + encode_name(name) + struct.pack("!HH", QTYPES[qtype], 1)


def question_of(msg: bytes) -> tuple[int, str, bytes]:
    """(id, lower-case name, the question's bytes) of a query with one uncompressed question."""
    qid = struct.unpack_from("!H", msg)[0]
    pos, labels = 12, []
    while msg[pos]:
        labels.append(msg[pos + 1 : pos + 1 + msg[pos]].decode().lower())
        pos += 1 + msg[pos]
    return qid, ".".join(labels), msg[12 : pos + 5]


def build_answer(query: bytes, rcode: int, address: bytes | None = None) -> bytes:
    qid, _, question = question_of(query)
    flags = 0x8180 | rcode  # QR, RD, RA
    answer = b""
    if address is not None:  # A record, TTL 0, the name as a pointer to the question's
        answer = struct.pack("!HHHIH", 0xC00C, 1, 1, 0, 4) + address
    return struct.pack("!HHHHHH", qid, flags, 1, int(bool(answer)), 0, 0) + question + answer


class Upstream:
    def __init__(self, delay: float, log: str) -> None:
        self.delay = delay
        self.log = open(log, "a", buffering=1) if log else None  # noqa: SIM115
        self.lock = threading.Lock()

    def answer(self, query: bytes, source: str) -> bytes | None:
        received = time.time_ns()
        qid, name, question = question_of(query)
        qtype = struct.unpack("!H", question[-4:-2])[0]
        reply: bytes | None = None
        if name == "fail.test":
            reply = build_answer(query, 2)
        elif name in ("slow.test", "late.test"):
            time.sleep(self.delay if name == "slow.test" else LATE_S)
            reply = build_answer(query, 0, bytes([10, 0, 0, 2]) if qtype == 1 else None)
        elif name != "hole.test":
            reply = build_answer(query, 3)
        if self.log is not None:  # what this server did, to check kubesight against
            status = RCODES[reply[3] & 0xF] if reply is not None else "none"
            answered = time.time_ns() if reply is not None else 0
            with self.lock:
                self.log.write(f"{received} {answered} {source} {qid} {qtype} {name} {status}\n")
        return reply

    def serve(self) -> None:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("127.0.0.1", port))
        tcp.listen(64)
        threading.Thread(target=self._accept, args=(tcp,), daemon=True).start()
        print(f"listening {port}", flush=True)
        while True:
            data, peer = udp.recvfrom(4096)
            threading.Thread(target=self._udp_one, args=(udp, data, peer), daemon=True).start()

    def _udp_one(self, udp: socket.socket, data: bytes, peer: Any) -> None:
        reply = self.answer(data, f"udp:{peer[0]}:{peer[1]}")
        if reply is not None:
            udp.sendto(reply, peer)

    def _accept(self, tcp: socket.socket) -> None:
        while True:
            conn, _ = tcp.accept()
            threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True).start()

    def _tcp_conn(self, conn: socket.socket) -> None:
        peer = conn.getpeername()
        with conn:
            while True:
                head = _recv_exact(conn, 2)
                if head is None:
                    return
                query = _recv_exact(conn, struct.unpack("!H", head)[0])
                if query is None:
                    return
                reply = self.answer(query, f"tcp:{peer[0]}:{peer[1]}")
                if reply is not None:
                    conn.sendall(struct.pack("!H", len(reply)) + reply)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            return None
        buf += part
    return buf


def serve_forking(delay: float) -> None:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    print(f"listening {tcp.getsockname()[1]}", flush=True)
    while True:
        conn, _ = tcp.accept()
        if os.fork() == 0:
            tcp.close()
            head = _recv_exact(conn, 2)
            query = _recv_exact(conn, struct.unpack("!H", head)[0]) if head else None
            if query is not None:
                time.sleep(delay)
                reply = build_answer(query, 0)
                conn.sendall(struct.pack("!H", len(reply)) + reply)
            _recv_exact(conn, 1)  # until the client closes
            os._exit(0)
        time.sleep(0.1)  # the child has read the query by now
        conn.close()
        while True:  # reap finished children
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


def run_client(port: int, plan: dict[str, Any]) -> list[list[Any]]:
    tcp = plan["transport"] == "tcp"
    timeout, hold = float(plan["timeout"]), float(plan.get("hold", 0))
    pause = float(plan.get("pause", 0))
    results: list[list[Any]] = []
    for queries in plan["conns"]:
        kind = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
        sock = socket.socket(socket.AF_INET, kind)
        sock.connect(("127.0.0.1", port))
        time.sleep(pause)
        unanswered = False
        for qtype, name in queries:
            msg = build_query(random.randrange(1 << 16), name, qtype)
            sock.settimeout(timeout)
            start = time.monotonic()
            sock.sendall(struct.pack("!H", len(msg)) + msg if tcp else msg)
            try:
                if tcp:
                    head = _recv_exact(sock, 2)
                    reply = _recv_exact(sock, struct.unpack("!H", head)[0]) if head else None
                else:
                    reply = sock.recv(4096)
            except TimeoutError:
                reply = None
            elapsed = time.monotonic() - start
            if reply is None:
                results.append([qtype, name, "timeout", elapsed])
                unanswered = True
                break  # the connection is stuck behind this query
            rcode = struct.unpack_from("!H", reply, 2)[0] & 0xF
            results.append([qtype, name, RCODES.get(rcode, str(rcode)), elapsed])
        if unanswered and hold:
            time.sleep(hold)
        sock.close()
    return results


def main() -> None:
    role, comm = sys.argv[1], sys.argv[2]
    _set_comm(comm)
    if role == "upstream":
        Upstream(float(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "").serve()
    elif role == "forking":
        serve_forking(float(sys.argv[3]))
    elif role == "client":
        results = run_client(int(sys.argv[3]), json.loads(sys.argv[4]))
        print(json.dumps({"results": results}), flush=True)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()
