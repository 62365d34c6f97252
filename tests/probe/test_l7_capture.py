"""Real BPF programs on this kernel, watching real curl / wrk talking to a real nginx."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
from kubesight.probe.l7 import (
    L7_ACCEPT,
    L7_CLOSE,
    L7_CONNECT,
    L7_DATA_IN,
    L7_DATA_OUT,
    L7_ROLE_CLIENT,
    L7_ROLE_SERVER,
    L7Probe,
    RawEvent,
)
from kubesight.probe.libbpf import BpfObject, ProbeLoadError
from kubesight.probe.publisher import Publisher

from .conftest import Nginx, poll_until, wrk_while_draining

pytestmark = pytest.mark.bpf

N_CURLS = 5


def curl(url: str) -> int:
    """Run curl to completion; returns its pid (= the tgid its events carry)."""
    proc = subprocess.Popen(["curl", "-sS", "-o", "/dev/null", "--http1.1", url])
    assert proc.wait(timeout=10) == 0
    return proc.pid


def of(events: list[RawEvent], kind: int, tgids: set[int]) -> list[RawEvent]:
    return [e for e in events if e.kind == kind and e.tgid in tgids]


def test_curl_and_nginx_seen_from_both_sides(bpf_root: Path, nginx: Nginx) -> None:
    with L7Probe(bpf_dir=bpf_root) as probe:
        pids = {curl(nginx.url()) for _ in range(N_CURLS)}
        events = poll_until(probe, lambda evs: len(of(evs, L7_CLOSE, pids)) >= N_CURLS
                            and len(of(evs, L7_CLOSE, nginx.workers)) >= N_CURLS)

    # Client side: one connection per curl process, request out, response in, then close.
    connects = of(events, L7_CONNECT, pids)
    assert sorted(e.tgid for e in connects) == sorted(pids)
    assert {(e.role, e.rport, e.raddr, e.laddr) for e in connects} == {
        (L7_ROLE_CLIENT, nginx.port, "127.0.0.1", "127.0.0.1")}
    client_conns = {e.conn_id for e in connects}
    assert len(client_conns) == N_CURLS
    sent, received = of(events, L7_DATA_OUT, pids), of(events, L7_DATA_IN, pids)
    assert len(sent) == N_CURLS and all(e.payload.startswith(b"GET / HTTP/1.1\r\n") for e in sent)
    assert {e.conn_id for e in received} == client_conns
    assert all(e.payload.startswith(b"HTTP/1.1 200") for e in received)
    assert {e.conn_id for e in of(events, L7_CLOSE, pids)} == client_conns
    assert all(e.comm == "curl" and e.role == L7_ROLE_CLIENT for e in sent + received)

    # Server side: the nginx worker accepts each one, reads the request, writes the response.
    accepts = of(events, L7_ACCEPT, nginx.workers)
    assert len(accepts) == N_CURLS
    assert all(e.role == L7_ROLE_SERVER and e.lport == nginx.port and e.raddr == "127.0.0.1"
               for e in accepts)
    # The two ends pair up by the client's ephemeral port.
    assert {e.rport for e in accepts} == {e.lport for e in connects}
    server_conns = {e.conn_id for e in accepts}
    requests = of(events, L7_DATA_IN, nginx.workers)
    responses = of(events, L7_DATA_OUT, nginx.workers)
    assert [e.payload[:4] for e in requests] == [b"GET "] * N_CURLS
    assert len(responses) == N_CURLS
    for resp in responses:
        # nginx writes headers and body as two iovecs: both land in one payload, in order.
        assert resp.payload.startswith(b"HTTP/1.1 200")
        assert resp.payload.endswith(b"\r\n\r\nhello\n")
        assert resp.size == len(resp.payload)
    assert {e.conn_id for e in requests + responses} == server_conns
    assert {e.conn_id for e in of(events, L7_CLOSE, nginx.workers)} == server_conns
    assert server_conns.isdisjoint(client_conns)

    # Per connection, the kernel's monotonic timestamps follow the syscall order.
    first = {e.conn_id: e.ts_ns for e in connects + accepts}
    assert all(e.ts_ns > first[e.conn_id] for e in sent + received + requests + responses)


# A client that uses the vectored calls nginx and curl do not: sendmsg and writev out, a
# MSG_PEEK that must not count as data, then readv (into a small first buffer) and recvmsg in.
VECTORED_CLIENT = """
import json, os, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
got = []
s.sendmsg([b"GET / HTTP/1.1\\r\\n", b"Host: t\\r\\n", b"\\r\\n"])
s.recv(5, socket.MSG_PEEK)
small, big = bytearray(10), bytearray(4096)
n = os.readv(s.fileno(), [small, big])
got.append((small + big)[:n].hex())
os.writev(s.fileno(), [b"GET / HTTP/1.1\\r\\n", b"Host: t\\r\\nConnection: close\\r\\n\\r\\n"])
got.append(s.recvmsg(4096)[0].hex())
s.close()
print(json.dumps(got))
"""


def test_vectored_calls_capture_every_iovec_in_order(bpf_root: Path, nginx: Nginx) -> None:
    with L7Probe(bpf_dir=bpf_root) as probe:
        client = subprocess.Popen([sys.executable, "-c", VECTORED_CLIENT, str(nginx.port)],
                                  stdout=subprocess.PIPE, text=True)
        out, _ = client.communicate(timeout=10)
        assert client.returncode == 0
        received = [bytes.fromhex(h) for h in json.loads(out)]
        events = poll_until(probe, lambda evs: bool(of(evs, L7_CLOSE, {client.pid})))

    sent = [e.payload for e in of(events, L7_DATA_OUT, {client.pid})]
    assert sent == [b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
                    b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"]
    got = of(events, L7_DATA_IN, {client.pid})
    assert [e.payload for e in got] == received  # the MSG_PEEK is not data: not seen
    assert [e.size for e in got] == [len(r) for r in received]
    assert all(r.startswith(b"HTTP/1.1 200") for r in received)


def test_ipv6_connections_carry_ipv6_addresses(bpf_root: Path, nginx: Nginx) -> None:
    if not nginx.ipv6:
        pytest.skip("no IPv6 loopback here")
    with L7Probe(bpf_dir=bpf_root) as probe:
        pid = curl(f"http://[::1]:{nginx.port}/")
        events = poll_until(probe, lambda evs: bool(of(evs, L7_CLOSE, {pid}))
                            and bool(of(evs, L7_CLOSE, nginx.workers)))

    ends = of(events, L7_CONNECT, {pid}) + of(events, L7_ACCEPT, nginx.workers)
    assert len(ends) == 2
    assert all((e.family, e.laddr, e.raddr) == (socket.AF_INET6, "::1", "::1") for e in ends)
    assert ends[0].rport == ends[1].lport == nginx.port and ends[0].lport == ends[1].rport
    assert [e.payload[:4] for e in of(events, L7_DATA_IN, nginx.workers)] == [b"GET "]


def test_payload_longer_than_capture_is_truncated_and_counted(bpf_root: Path,
                                                              nginx: Nginx) -> None:
    with L7Probe(capture_bytes=256, bpf_dir=bpf_root) as probe:
        pid = curl(nginx.url("/big"))
        events = poll_until(probe, lambda evs: bool(of(evs, L7_CLOSE, {pid})))
        counters = probe.counters()

    responses = of(events, L7_DATA_OUT, nginx.workers)
    assert len(responses) == 1
    assert responses[0].size > 2000 and len(responses[0].payload) == 256
    assert responses[0].payload.startswith(b"HTTP/1.1 200")
    received = of(events, L7_DATA_IN, {pid})
    assert sum(e.size for e in received) > 2000
    assert all(len(e.payload) == min(256, e.size) for e in received)
    assert counters["truncated"] >= 2  # at least nginx's write and curl's first read


def test_filter_all_attaches_but_emits_nothing(bpf_root: Path, nginx: Nginx) -> None:
    # A capturing probe runs alongside: once it has seen the exchange, the filtering probe's
    # programs have run for the very same syscalls.
    with L7Probe(bpf_dir=bpf_root) as witness, \
            L7Probe(filter_all=True, bpf_dir=bpf_root) as silent:
        pid = curl(nginx.url())
        seen = poll_until(witness, lambda evs: bool(of(evs, L7_CLOSE, {pid})))
        assert of(seen, L7_DATA_IN, {pid})
        assert silent.poll(0) == []
        assert silent.counters()["events"] == 0


def test_excluded_processes_emit_nothing(bpf_root: Path, nginx: Nginx) -> None:
    with L7Probe(exclude_tgids=(nginx.master,), bpf_dir=bpf_root) as probe:
        before = curl(nginx.url())
        events = poll_until(probe, lambda evs: len(of(evs, L7_DATA_OUT, nginx.workers)) == 1
                            and bool(of(evs, L7_CLOSE, {before})))
        probe.exclude_tgid(next(iter(nginx.workers)))
        after = curl(nginx.url())
        events += poll_until(probe, lambda evs: bool(of(evs, L7_CLOSE, {after})))

        # Included again (an excluded process exited and its pid went to another): seen.
        probe.include_tgid(next(iter(nginx.workers)))
        again = curl(nginx.url())
        events += poll_until(probe, lambda evs: bool(of(evs, L7_CLOSE, {again})))

    assert of(events, L7_DATA_IN, {after})  # curl itself is still seen
    late = [e for e in events if e.tgid in nginx.workers and e.rport in
            {c.lport for c in of(events, L7_CONNECT, {after})}]
    assert late == []
    assert not [e for e in events if e.tgid == nginx.master]
    again_port = {c.lport for c in of(events, L7_CONNECT, {again})}
    assert [e.payload[:4] for e in of(events, L7_DATA_IN, nginx.workers)
            if e.rport in again_port] == [b"GET "]


class GetCounter:
    """Stands in for the Kafka producer behind the probe's own publisher: counts, per
    process, the sends and receives that start an HTTP GET in every message it is handed
    (msgpack decoded in C: a Python object per event could not keep up with wrk)."""

    def __init__(self) -> None:
        self.gets: Counter[tuple[int, int]] = Counter()  # (tgid, kind) -> GETs

    def produce(self, _topic: str, value: bytes, key: bytes, on_delivery: object) -> None:
        msg = msgpack.unpackb(value)
        tgid = msg["conn"]["tgid"]
        for kind in (L7_DATA_OUT, L7_DATA_IN):
            self.gets[tgid, kind] += sum(
                1 for e in msg["events"] if e[0] == kind and e[3][:4] == b"GET ")

    def poll(self, _timeout: float) -> int:
        return 0


def test_wrk_load_loses_no_request(bpf_root: Path, nginx: Nginx) -> None:
    """Under wrk at full speed (two threads, eight connections), the probe's production path
    (drain grouped in C, batches made into messages and released every 100 ms) delivers
    every request both ends made. test_l7_records: the same through a ring that wraps."""
    tally = GetCounter()
    pub = Publisher(producer=tally, topic="raw", node="test", probe_id="test")
    flushed = [time.monotonic()]

    def drain(probe: L7Probe) -> None:  # what kubesight.probe.main.ProbeRunner does
        probe.drain_into(pub.open, pub.sealed, offset_ns=pub.clock_offset_ns(),
                             max_events=pub.batch_max_events, max_bytes=pub.batch_max_bytes)
        if time.monotonic() - flushed[0] >= 0.1:
            pub.flush()
            flushed[0] = time.monotonic()

    # 64 MiB of ring absorbs the drain thread being descheduled on a busy 2-CPU machine.
    with L7Probe(ringbuf_bytes=64 << 20, bpf_dir=bpf_root) as probe:
        def step(_wrk: subprocess.Popen[str]) -> None:
            drain(probe)
            time.sleep(0.01)  # the probe's own poll interval

        out, wrk_pid = wrk_while_draining(nginx.url(), ["-t2", "-c8", "-d2s"], step)
        completed = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]

        def counts() -> tuple[int, int]:
            pub.flush()
            return (tally.gets[wrk_pid, L7_DATA_OUT],
                    sum(tally.gets[w, L7_DATA_IN] for w in nginx.workers))

        # Every request wrk completed was sent by wrk and read by nginx: drain (bounded) until
        # both sides have seen as many.
        deadline = time.monotonic() + 10
        while min(counts()) < completed and time.monotonic() < deadline:
            drain(probe)
            time.sleep(0.01)
        wrk_sent, nginx_read = counts()
        counters = probe.counters()

    seen = (f"wrk completed {completed}, sent {wrk_sent}, nginx read {nginx_read}, "
            f"publisher {dict(pub.counters)}, kernel counters {counters}")
    assert completed > 1000, seen
    assert counters["ringbuf_drops"] == 0, seen
    # wrk stops with at most one request in flight per connection (8) and closes with the
    # answer unread, which resets the connection: nginx may never read such a request (7 of
    # 171,900 once, with both cores busy), so it can count fewer than wrk sent, never more.
    assert completed <= nginx_read <= wrk_sent <= completed + 8, seen


def test_without_drain_helper_the_ctypes_callback_path_delivers(bpf_root: Path, nginx: Nginx,
                                                                 tmp_path: Path) -> None:
    shutil.copy(bpf_root / "l7.bpf.o", tmp_path)  # no libksdrain.so next to it
    with L7Probe(bpf_dir=tmp_path) as probe:
        assert probe.drain_mode == "ctypes-callback"
        pid = curl(nginx.url())
        events = poll_until(probe, lambda evs: bool(of(evs, L7_CLOSE, {pid})))
    assert [e.payload[:12] for e in of(events, L7_DATA_IN, {pid})] == [b"HTTP/1.1 200"]


def test_fast_build_attaches_no_syscall_tracepoint(bpf_root: Path) -> None:
    """With any syscalls:* or raw_syscalls:* tracepoint attached, every syscall of every task
    on the node takes the kernel's tracing slow path (bench/syscall_tax: dd keeps 0.87 of its
    rate): the fast build hooks the socket layer, TCP and cgroups instead."""
    with L7Probe(bpf_dir=bpf_root, build="l7.bpf.o") as probe:
        hooks = probe.hooks
    assert {"tp_btf/sock_send_length", "tp_btf/inet_sock_set_state", "tp_btf/tcp_destroy_sock",
            "cgroup/recvmsg4", "cgroup/sock_release"} <= set(hooks)
    assert [h for h in hooks if "syscalls" in h] == []


def test_missing_object_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ProbeLoadError, match="l7.bpf.o") as info:
        L7Probe(bpf_dir=tmp_path).start()
    assert isinstance(info.value.__cause__, OSError)


BAD_PROGRAM = """
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 1);
         __type(key, __u32); __type(value, __u64); } slots SEC(".maps");
SEC("tp/syscalls/sys_enter_getpid")
int no_null_check(void *ctx) { __u32 k = 0; return *(__u64 *)bpf_map_lookup_elem(&slots, &k); }
char LICENSE[] SEC("license") = "GPL";
"""


def test_verifier_rejection_carries_the_verifier_log(bpf_root: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.bpf.c").write_text(BAD_PROGRAM)
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu",
                    "-c", "bad.bpf.c", "-o", "bad.bpf.o"], cwd=tmp_path, check=True)
    obj = BpfObject.open(tmp_path / "bad.bpf.o")
    try:
        with pytest.raises(ProbeLoadError, match="map_value_or_null") as info:
            obj.load()
    finally:
        obj.close()
    assert isinstance(info.value.__cause__, OSError)


def test_compat_build_captures_like_the_fast_build(bpf_root: Path, nginx: Nginx) -> None:
    """The build for kernels before 6.4 (field-by-field reads, hash-map stash) sees the same."""
    with L7Probe(bpf_dir=bpf_root, build="l7_compat.bpf.o") as probe:
        assert probe.build == "l7_compat.bpf.o"
        pid = curl(nginx.url())
        events = poll_until(probe, lambda evs: bool(of(evs, L7_CLOSE, {pid})))
    assert [e.payload[:4] for e in of(events, L7_DATA_OUT, {pid})] == [b"GET "]
    assert [e.payload[:12] for e in of(events, L7_DATA_IN, {pid})] == [b"HTTP/1.1 200"]


def fast_build_stand_in_falls_back(source: str, bpf_root: Path, nginx: Nginx,
                                   tmp_path: Path) -> list[RawEvent]:
    """Build ``source`` as the fast build next to the real compat build; the probe must end
    up on the compat build and see curl's response. Returns curl's data-in events."""
    (tmp_path / "stand_in.bpf.c").write_text(source)
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu",
                    "-c", "stand_in.bpf.c", "-o", "l7.bpf.o"], cwd=tmp_path, check=True)
    shutil.copy(bpf_root / "l7_compat.bpf.o", tmp_path)
    shutil.copy(bpf_root / "libksdrain.so", tmp_path)
    with L7Probe(bpf_dir=tmp_path) as probe:
        assert probe.build == "l7_compat.bpf.o"
        pid = curl(nginx.url())
        events = poll_until(probe, lambda evs: bool(of(evs, L7_CLOSE, {pid})))
    return of(events, L7_DATA_IN, {pid})


def test_a_kernel_refusing_the_fast_build_gets_the_compat_build(bpf_root: Path, nginx: Nginx,
                                                                tmp_path: Path) -> None:
    received = fast_build_stand_in_falls_back(BAD_PROGRAM, bpf_root, nginx, tmp_path)
    assert [e.payload[:12] for e in received] == [b"HTTP/1.1 200"]


# Loads (a tracepoint program's hook is looked up only at attach) but cannot attach: stands in
# for a kernel that loads the fast build's BTF tracepoint and refuses to attach it.
UNATTACHABLE_PROGRAM = r"""
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
const volatile __u32 capture_bytes = 0;
const volatile _Bool filter_all = 0;
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 4096); } events SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1);
         __type(key, __u32); __type(value, __u64); } excluded_tgids SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1);
         __type(key, __u32); __type(value, __u64); } tls_tgids SEC(".maps");
SEC("tp/syscalls/sys_enter_kubesight_no_such_syscall")
int nowhere(void *ctx) { return capture_bytes + filter_all; }
char LICENSE[] SEC("license") = "GPL";
"""


def test_a_kernel_refusing_to_attach_the_fast_build_gets_the_compat_build(
        bpf_root: Path, nginx: Nginx, tmp_path: Path) -> None:
    received = fast_build_stand_in_falls_back(UNATTACHABLE_PROGRAM, bpf_root, nginx, tmp_path)
    assert [e.payload[:12] for e in received] == [b"HTTP/1.1 200"]


# One process: a UDP "server" socket receiving from two client sockets, with recvfrom and
# recvmsg, then answering each with sendto. Prints the ports as JSON once done.
UDP_PEERS = r"""
import json, socket, struct
query = (struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
         + b"\x07example\x03com\x00\x00\x01\x00\x01")
server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
server.bind(("127.0.0.1", 0))
a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); a.bind(("127.0.0.1", 0))
b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); b.bind(("127.0.0.1", 0))
a.sendto(query, server.getsockname())
b.sendto(query, server.getsockname())
_, first = server.recvfrom(512)
_, _, _, second = server.recvmsg(512)
server.sendto(query, first)
server.sendto(query, second)
print(json.dumps({"server": server.getsockname()[1], "a": a.getsockname()[1],
                  "b": b.getsockname()[1], "first": first[1], "second": second[1]}))
"""


def run_udp_script(bpf_root: Path, build: str, script: str,
                   done: Callable[[list[RawEvent], dict[str, int]], bool],
                   ) -> tuple[dict[str, int], list[RawEvent]]:
    """Run ``script`` (it prints its ports as JSON) under the probe; poll until ``done`` holds
    for the script's own events. Returns its ports and its events."""
    with L7Probe(bpf_dir=bpf_root, build=build) as probe:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                text=True)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        ports, pid = json.loads(out), proc.pid
        events = poll_until(probe, lambda evs: done([e for e in evs if e.tgid == pid], ports))
    return ports, [e for e in events if e.tgid == pid]


@pytest.mark.parametrize("build", ["l7.bpf.o", "l7_compat.bpf.o"])
def test_udp_datagrams_carry_each_senders_address(bpf_root: Path, build: str) -> None:
    """A received datagram is attributed to the peer that sent it: the kernel writes the
    sender's address to recvfrom's src_addr / recvmsg's msg_name only as the syscall returns,
    after the socket layer has handed over the data."""
    ports, mine = run_udp_script(
        bpf_root, build, UDP_PEERS, lambda evs, _: len(evs) >= 6)
    received = [(e.lport, e.rport) for e in mine
                if e.kind == L7_DATA_IN and e.lport == ports["server"]]
    assert received == [(ports["server"], ports["first"]), (ports["server"], ports["second"])]
    assert {ports["first"], ports["second"]} == {ports["a"], ports["b"]}
    sent = [(e.lport, e.rport) for e in mine
            if e.kind == L7_DATA_OUT and e.lport == ports["server"]]
    assert sent == received
    assert all(e.payload[:2] == b"\x12\x34" for e in mine if e.kind in (L7_DATA_IN, L7_DATA_OUT))


# One process, two rounds: a connected UDP client sends two DNS queries with one sendmmsg, a
# server takes them with recvmmsg (vlen 4, MSG_WAITFORONE: the call ends at the EAGAIN of the
# third) and answers both with one sendmmsg to the senders it was told; the client takes the
# answers with recvmmsg. Each slot of the arrays has its own buffer, so a datagram reported
# from the wrong slot shows the wrong query id. Prints the ports as JSON.
UDP_MMSG = r"""
import ctypes, json, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
class msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(iovec)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]
class mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", msghdr), ("len", ctypes.c_uint)]
class Slots:
    def __init__(self, n):
        self.vec = (mmsghdr * n)()
        self.bufs = [ctypes.create_string_buffer(512) for _ in range(n)]
        self.names = [ctypes.create_string_buffer(16) for _ in range(n)]
        self.iovs = (iovec * n)()
    def arm(self, payloads=None, names=False):
        for i in range(len(self.bufs)):
            if payloads is not None and i < len(payloads):
                ctypes.memmove(self.bufs[i], payloads[i], len(payloads[i]))
            n = len(payloads[i]) if payloads is not None and i < len(payloads) else 512
            self.iovs[i] = iovec(ctypes.addressof(self.bufs[i]), n)
            self.vec[i].hdr.iov = ctypes.pointer(self.iovs[i])
            self.vec[i].hdr.iovlen = 1
            self.vec[i].hdr.name = ctypes.addressof(self.names[i]) if names else None
            self.vec[i].hdr.namelen = 16 if names else 0
def call(fn, sock, slots, n, flags=0):
    got = fn(sock.fileno(), slots.vec, n, flags, None) if fn is libc.recvmmsg else fn(
        sock.fileno(), slots.vec, n, flags)
    assert got >= 0, ctypes.get_errno()
    return got
def query(qid):
    return (struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
            + b"\x07example\x03com\x00\x00\x01\x00\x01")
server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); server.bind(("127.0.0.1", 0))
server.setblocking(False)
client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); client.connect(server.getsockname())
out, inbox, answers, replies = Slots(2), Slots(4), Slots(2), Slots(2)
for first in (1, 3):
    out.arm([query(first), query(first + 1)])
    assert call(libc.sendmmsg, client, out, 2) == 2
    inbox.arm(names=True)
    assert call(libc.recvmmsg, server, inbox, 4, 0x10000) == 2  # MSG_WAITFORONE
    answers.arm([inbox.bufs[i].raw[:inbox.vec[i].len] for i in range(2)], names=True)
    for i in range(2):
        ctypes.memmove(answers.names[i], inbox.names[i], 16)
    assert call(libc.sendmmsg, server, answers, 2) == 2
    replies.arm()
    assert call(libc.recvmmsg, client, replies, 2) == 2
print(json.dumps({"server": server.getsockname()[1], "client": client.getsockname()[1]}))
client.close()
server.close()
"""


@pytest.mark.parametrize("build", ["l7.bpf.o", "l7_compat.bpf.o"])
def test_sendmmsg_and_recvmmsg_report_each_datagram_from_its_slot(bpf_root: Path,
                                                                  build: str) -> None:
    """glibc's resolver sends A and AAAA with one sendmmsg; servers take datagrams in bulk
    with recvmmsg. Each datagram is reported once, with its own payload and sender, and a
    call that ends early (MSG_WAITFORONE) does not shift the next one. The client's close
    ends its flow."""
    ports, mine = run_udp_script(bpf_root, build, UDP_MMSG, lambda evs, ports: any(
        e.kind == L7_CLOSE and e.lport == ports["client"] for e in evs))

    def ids(kind: int, lport: int) -> list[tuple[int, int]]:
        return [(int.from_bytes(e.payload[:2], "big"), e.rport) for e in mine
                if e.kind == kind and e.lport == lport]

    client, server = ports["client"], ports["server"]
    assert ids(L7_DATA_OUT, client) == [(q, server) for q in (1, 2, 3, 4)]
    assert ids(L7_DATA_IN, server) == [(q, client) for q in (1, 2, 3, 4)]
    assert ids(L7_DATA_OUT, server) == [(q, client) for q in (1, 2, 3, 4)]
    assert ids(L7_DATA_IN, client) == [(q, server) for q in (1, 2, 3, 4)]
    flows = {e.conn_id for e in mine if e.lport == client and e.kind != L7_CLOSE}
    assert len(flows) == 1
    assert {e.conn_id for e in mine if e.kind == L7_CLOSE and e.lport == client} == flows
