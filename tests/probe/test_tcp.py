"""bpf/tcp.bpf.c in the running kernel: per-connection TCP health against traffic we made.

Traffic comes from tests/tcp_traffic.py processes with names of their own (this test process
is excluded by the probe, as kubesight's own processes are). Lossy, blackholed and slow paths
lead into network namespaces created here (tests/netns.py), with iptables rules and a tbf
qdisc that exist only for the test and are removed with the namespace.
"""

from __future__ import annotations

import ctypes
import errno
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from enum import IntEnum
from pathlib import Path
from typing import Any

import msgpack
import pytest
from kubesight.probe import tcp
from kubesight.probe.tcp import TcpConnection, TcpFlag, TcpProbe, TcpRole
from kubesight.probe.tcp_publisher import TcpPublisher
from kubesight.schemas import validate

from tests.netns import NetNs

REPO = Path(__file__).resolve().parents[2]


# --- layout: the Python view of bpf/tcp.h against the object's BTF ----------------------------

@pytest.fixture(scope="module")
def btf(bpf_dir: Path) -> dict[str, dict[str, Any]]:
    out = subprocess.run(["bpftool", "-j", "btf", "dump", "file", str(bpf_dir / "tcp.bpf.o")],
                         check=True, capture_output=True, text=True).stdout
    return {t["name"]: t for t in json.loads(out)["types"]
            if t.get("name") and t["kind"] in ("STRUCT", "ENUM")}


@pytest.mark.parametrize(("c_name", "py_struct"), [
    ("ks_tcp_conn", tcp.KsTcpConn),
    ("ks_tcp_proc", tcp.KsTcpProc),
    ("ks_tcp_listen_key", tcp.KsTcpListenKey),
])
def test_structs_match_btf(btf: dict[str, dict[str, Any]], c_name: str,
                           py_struct: type[ctypes.Structure]) -> None:
    members = btf[c_name]["members"]
    assert [name for name, *_ in py_struct._fields_] == [m["name"] for m in members]
    ends = [m["bits_offset"] // 8 for m in members[1:]] + [btf[c_name]["size"]]
    for m, end in zip(members, ends, strict=True):
        field = getattr(py_struct, m["name"])
        assert field.offset * 8 == m["bits_offset"], m["name"]
        assert field.offset + field.size == end, m["name"]  # explicit pads: no holes
    assert ctypes.sizeof(py_struct) == btf[c_name]["size"]


@pytest.mark.parametrize(("enum_name", "prefix", "py_enum"), [
    ("ks_tcp_kind", "KS_TCP_", tcp.TcpKind),
    ("ks_tcp_role", "KS_TCP_ROLE_", tcp.TcpRole),
    ("ks_tcp_flag", "KS_TCP_F_", tcp.TcpFlag),
])
def test_enums_match_btf(btf: dict[str, dict[str, Any]], enum_name: str, prefix: str,
                         py_enum: type[IntEnum]) -> None:
    assert {v["name"]: v["val"] for v in btf[enum_name]["values"]} == {
        prefix + member.name: int(member) for member in py_enum}


def test_counter_names_match_btf(btf: dict[str, dict[str, Any]]) -> None:
    values = sorted(btf["ks_tcp_counter"]["values"], key=lambda v: v["val"])
    names = [v["name"].removeprefix("KS_TCP_CNT_").lower() for v in values]
    assert names == [*tcp.COUNTER_NAMES, "_max"]
    assert [v["val"] for v in values] == list(range(len(names)))


def test_rtt_slots_match_the_histogram() -> None:
    hist = tcp.KsTcpConn.rtt_hist
    assert hist.size == 4 * tcp.RTT_SLOTS


# --- the kernel side, with real connections --------------------------------------------------

class Collector:
    """Every final record the probe drained, kept for the tests to search."""

    def __init__(self, probe: TcpProbe) -> None:
        self.probe = probe
        self.records: list[TcpConnection] = []

    def until(self, what: str, pick: Callable[[TcpConnection], bool], n: int = 1,
              timeout: float = 10.0) -> list[TcpConnection]:
        deadline = time.monotonic() + timeout
        while True:
            self.records += self.probe.drain()
            found = [r for r in self.records if pick(r)]
            if len(found) >= n:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: {len(found)} of {n} records after {timeout}s")
            time.sleep(0.02)


@pytest.fixture(scope="module")
def probe(bpf_root: Path) -> Iterator[Collector]:
    with TcpProbe(bpf_dir=bpf_root) as p:
        yield Collector(p)


def traffic(*argv: str, timeout: float = 120) -> Any:
    out = subprocess.run([sys.executable, "-m", "tests.tcp_traffic", *argv], cwd=REPO,
                         capture_output=True, text=True, timeout=timeout, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.fixture
def netns() -> Iterator[NetNs]:
    with NetNs() as ns:
        yield ns


def serve_in(ns: NetNs, comm: str) -> int:
    srv = ns.python("-m", "tests.tcp_traffic", "serve", comm, ns.ns_ip, "0")
    assert srv.stdout is not None
    return int(srv.stdout.readline().split()[1])


@pytest.mark.bpf
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_loopback_connection_counts_bytes_exactly_at_both_ends(probe: Collector,
                                                               host: str) -> None:
    comm = "kst-xfer4" if "." in host else "kst-xfer6"
    out = traffic("transfer", comm, host, "100000", "7777", "3")
    by_port = {c["lport"]: c for c in out["clients"]}
    ports = set(by_port)
    clients = probe.until("client ends", lambda r: r.comm == comm and r.lport in ports, 3)
    servers = probe.until("server ends", lambda r: r.lport == out["port"] and r.rport in ports
                          and r.role == TcpRole.PASSIVE, 3)
    for c in clients:
        assert (c.role, c.kind, c.raddr, c.rport) == (TcpRole.ACTIVE, 1, host, out["port"])
        assert (c.bytes_sent, c.bytes_received) == (100000, 7777)
        assert c.retransmits == by_port[c.lport]["retrans"]
        assert c.peer_comm == comm  # the loopback listener, named at connect
        assert c.flags & TcpFlag.ESTABLISHED and c.flags & TcpFlag.CLOSED
        assert 0 < c.opened_ns < c.established_ns < c.closed_ns
        assert c.family == (socket.AF_INET if "." in host else socket.AF_INET6)
    for s in servers:
        assert (s.bytes_sent, s.bytes_received) == (7777, 100000)
        assert (s.comm, s.peer_comm) == (comm, comm)  # listener's process; same-node client
        assert s.resets_sent == s.resets_received == 0
        # Its own kernel's count: 0 unless a stalled core fired a loss probe.
        assert s.retransmits == out["server_retrans"][str(s.rport)]
    samples = [r for r in clients + servers if sum(r.rtt_hist)]
    assert samples, "no RTT sample on any end"
    for r in samples:
        assert 0 < r.srtt_min_us <= r.srtt_last_us <= r.srtt_max_us < 50_000  # loopback
        assert r.srtt_sum_us >= sum(r.rtt_hist) * r.srtt_min_us


@pytest.mark.bpf
def test_own_process_is_excluded(probe: Collector) -> None:
    before = probe.probe.counters()["excluded"]
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as cli:
            conn, _ = srv.accept()
            cli.sendall(b"hello")
            conn.close()
            mine = cli.getsockname()[1]
    traffic("transfer", "kst-after", "127.0.0.1", "10", "10", "1")  # a marker after ours
    probe.until("the marker connection", lambda r: r.comm == "kst-after")
    assert not [r for r in probe.records if port in (r.lport, r.rport) or mine == r.lport]
    assert probe.probe.counters()["excluded"] >= before + 2  # our connect and our accept


@pytest.mark.bpf
def test_connect_to_a_closed_port_is_refused(probe: Collector) -> None:
    with socket.socket() as s:  # a port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    no_socket = probe.probe.counters()["rst_sent_no_socket"]
    assert traffic("send", "kst-refused", "127.0.0.1", str(port), "10", "5", "2") == [
        {"error": "refused"}] * 2
    for r in probe.until("refused connects", lambda r: r.comm == "kst-refused", 2):
        assert (r.role, r.rport, r.sk_err) == (TcpRole.ACTIVE, port, errno.ECONNREFUSED)
        assert r.flags & TcpFlag.RST_SYN_SENT and not r.flags & TcpFlag.ESTABLISHED
        assert (r.resets_received, r.bytes_sent, r.established_ns) == (1, 0, 0)
    assert probe.probe.counters()["rst_sent_no_socket"] >= no_socket + 2


@pytest.mark.bpf
def test_connect_to_a_blackhole_times_out_after_syn_retransmits(probe: Collector,
                                                                netns: NetNs) -> None:
    netns.iptables("INPUT", "-p", "tcp", "--dport", "9", "-j", "DROP")
    assert traffic("send", "kst-blackhole", netns.ns_ip, "9", "10", "2.5", "1") == [
        {"error": "timeout"}]
    [r] = probe.until("the abandoned connect", lambda r: r.comm == "kst-blackhole")
    assert (r.raddr, r.rport, r.sk_err, r.resets_received) == (netns.ns_ip, 9, 0, 0)
    assert not r.flags & (TcpFlag.ESTABLISHED | TcpFlag.RST_SYN_SENT)
    # The kernel did retry the SYN (first retransmit after the initial 1 s RTO).
    assert r.retransmits >= 1
    assert r.closed_ns - r.opened_ns >= 2.4e9


@pytest.mark.bpf
def test_loss_shows_as_retransmits_and_bytes_stay_exact(probe: Collector,
                                                        netns: NetNs) -> None:
    port = serve_in(netns, "kst-srv")
    [clean] = traffic("send", "kst-clean", netns.ns_ip, str(port), "1000000", "10", "1")
    netns.iptables("INPUT", "-p", "tcp", "--dport", str(port), "-m", "statistic",
                   "--mode", "random", "--probability", "0.3", "-j", "DROP")
    [lossy] = traffic("send", "kst-lossy", netns.ns_ip, str(port), "1000000", "60", "1")
    assert clean["received"] == lossy["received"] == 8
    [c] = probe.until("clean transfer", lambda r: r.comm == "kst-clean")
    [lo] = probe.until("lossy transfer", lambda r: r.comm == "kst-lossy")
    # Segments sent again, as the client's own kernel counted them (TCP_INFO): how many
    # varies with the drops (they hit GSO-sized skbs); the clean path has none unless a stalled
    # core fired a loss probe, and then both counts show it.
    assert lo.retransmits == lossy["retrans"] > 0
    assert c.retransmits == clean["retrans"] < lo.retransmits
    assert c.bytes_sent == lo.bytes_sent == 1_000_000
    # The server end, inside the namespace, was named by its listener there.
    [srv] = probe.until("server end", lambda r: r.comm == "kst-srv" and r.rport == lo.lport)
    assert srv.bytes_received == 1_000_000 and srv.netns != c.netns


@pytest.mark.bpf
def test_rtt_reflects_queueing_delay(probe: Collector, netns: NetNs) -> None:
    """No netem here: a 4 Mbit/s tbf with 300 ms of queue on the path fills under a bulk
    transfer, and the smoothed RTT rises from tens of µs to tens of ms."""
    port = serve_in(netns, "kst-srv")
    traffic("send", "kst-fast", netns.ns_ip, str(port), "1000000", "10", "1")
    netns.shape("rate", "4mbit", "burst", "16kb", "latency", "300ms")
    traffic("send", "kst-slow", netns.ns_ip, str(port), "1000000", "60", "1")
    [fast] = probe.until("unshaped transfer", lambda r: r.comm == "kst-fast")
    [slow] = probe.until("shaped transfer", lambda r: r.comm == "kst-slow")
    assert fast.srtt_max_us < 5_000
    assert slow.srtt_max_us > 50_000 and slow.bytes_sent == 1_000_000
    slots = [i for i, n in enumerate(slow.rtt_hist) if n]
    assert max(slots) >= 15  # ≥ 32 ms


@pytest.mark.bpf
def test_abortive_close_counts_the_reset_at_both_ends(probe: Collector) -> None:
    out = traffic("abort", "kst-abort", "127.0.0.1")
    [cli] = probe.until("aborting client", lambda r: r.comm == "kst-abort"
                        and r.lport == out["lport"])
    [srv] = probe.until("reset server end", lambda r: r.lport == out["port"]
                        and r.rport == out["lport"])
    # The reset goes out after the socket entered CLOSE: counted all the same.
    assert (cli.resets_sent, cli.resets_received) == (1, 0)
    assert (srv.resets_sent, srv.resets_received) == (0, 1)
    assert srv.sk_err == errno.ECONNRESET


@pytest.mark.bpf
def test_a_connection_marked_excluded_is_never_reported(probe: Collector) -> None:
    """What the user side does with kubesight's own connections it finds in /proc."""
    server = subprocess.Popen([sys.executable, "-m", "tests.tcp_traffic", "serve", "kst-msrv",
                               "127.0.0.1", "0"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    client = None
    try:
        assert server.stdout is not None
        port = server.stdout.readline().split()[1]
        client = subprocess.Popen([sys.executable, "-m", "tests.tcp_traffic", "hold", "kst-mark",
                                   "127.0.0.1", port, "1000", "1000"], cwd=REPO,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert client.stdout is not None and client.stdin is not None
        lport = json.loads(client.stdout.readline())["lport"]
        [(key, raw, _conn)] = [(k, v, c) for k, v, c in probe.probe.connections()
                               if c.comm == "kst-mark" and c.lport == lport]
        probe.probe.mark_excluded(key, raw)
        assert not [c for _k, _v, c in probe.probe.connections() if c.lport == lport]
        client.stdin.write("go\n")
        client.stdin.flush()
        assert json.loads(client.stdout.readline()) == {"server_received": 2000}
        [srv] = probe.until("the server end", lambda r: r.comm == "kst-msrv"
                            and r.rport == lport)
        assert srv.bytes_received == 2000  # the other end was not marked
        traffic("transfer", "kst-after2", "127.0.0.1", "10", "10", "1")
        probe.until("a later connection", lambda r: r.comm == "kst-after2")
        assert not [r for r in probe.records if r.comm == "kst-mark"]
    finally:
        for proc in (client, server):
            if proc is not None:
                proc.kill()
                proc.wait()
                for stream in (proc.stdin, proc.stdout):
                    if stream is not None:
                        stream.close()


class FakeProducer:
    def __init__(self) -> None:
        self.messages: list[tuple[str, str, bytes]] = []

    def produce(self, topic: str, key: str, value: bytes, on_delivery: Any = None) -> None:
        self.messages.append((topic, key, value))

    def poll(self, _timeout: float) -> int:
        return 0


@pytest.mark.bpf
def test_intervals_of_a_long_lived_connection_add_up(bpf_root: Path) -> None:
    """A snapshot while the connection lives, the final record at close: the intervals sum
    to what was sent, the connection counts as opened once, and the batches match tcp.v1."""
    producer = FakeProducer()
    pub = TcpPublisher(TcpProbe(bpf_dir=bpf_root), producer=producer,  # type: ignore[arg-type]
                       topic="t", node_name="n1", probe_id="p1", excluded=set(),
                       snapshot_interval_s=3600, flush_interval_s=3600)
    pub.start()
    server = subprocess.Popen([sys.executable, "-m", "tests.tcp_traffic", "serve", "kst-lsrv",
                               "127.0.0.1", "0"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    client = None
    try:
        assert server.stdout is not None
        port = server.stdout.readline().split()[1]
        client = subprocess.Popen([sys.executable, "-m", "tests.tcp_traffic", "hold", "kst-hold",
                                   "127.0.0.1", port, "300000", "200000"], cwd=REPO,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert client.stdout is not None and client.stdin is not None
        lport = json.loads(client.stdout.readline())["lport"]

        def mine() -> list[dict[str, Any]]:
            pub.flush()
            return [rec for _t, _k, value in producer.messages
                    for rec in msgpack.unpackb(value)["connections"]
                    if rec["comm"] == "kst-hold" and rec["lport"] == lport]

        deadline = time.monotonic() + 10
        while not any(r["bytes_sent"] for r in mine()):
            assert time.monotonic() < deadline, "no snapshot saw the first 300000 bytes"
            pub.snapshot()
            time.sleep(0.05)
        client.stdin.write("go\n")
        client.stdin.flush()
        assert json.loads(client.stdout.readline()) == {"server_received": 500000}
        deadline = time.monotonic() + 10
        while not any(r["event"] == "close" for r in mine()):
            assert time.monotonic() < deadline, "no close record"
            pub.drain()
            time.sleep(0.02)
        records = mine()
        assert records[-1]["event"] == "close" and records[0]["event"] == "snapshot"
        assert sum(r["bytes_sent"] for r in records) == 500000
        assert [r["new"] for r in records].count(True) == 1 and records[0]["new"]
        for _t, _k, value in producer.messages:
            validate("tcp.v1", msgpack.unpackb(value))
        assert any("conntrack" in msgpack.unpackb(v) for _t, _k, v in producer.messages)
    finally:
        for proc in (client, server):
            if proc is not None:
                proc.kill()
                proc.wait()
                for stream in (proc.stdin, proc.stdout):
                    if stream is not None:
                        stream.close()
        pub.close()
