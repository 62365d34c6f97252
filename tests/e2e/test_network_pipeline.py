"""Network health end to end: kernel → tcp.v1 → Faust → network.v1 → Prometheus.

Traffic comes from tests/tcp_traffic.py processes with names of their own, on loopback and
into network namespaces created here (a blackholed port, a lossy path); the counts asserted
are what those processes did, exactly where the kernel can know them exactly.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubesight.schemas import validate

from tests.netns import NetNs

from .harness import REPO, Pipeline, read_topic, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.bpf, pytest.mark.kafka]

BYTES = "kubesight_tcp_bytes_total"
FAILURES = "kubesight_tcp_connect_failures_total"
RETRANSMITS = "kubesight_tcp_retransmits_total"


def traffic(*argv: str) -> Any:
    out = subprocess.run([sys.executable, "-m", "tests.tcp_traffic", *argv], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.fixture
def loopback_server() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.tcp_traffic", "serve", "kse-srv",
                             "127.0.0.1", "0"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        yield int(proc.stdout.readline().split()[1])
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_loopback_edge_counts_connections_and_bytes_exactly(pipeline: Pipeline,
                                                            loopback_server: int) -> None:
    results = traffic("send", "kse-cli", "127.0.0.1", str(loopback_server), "123456", "10", "5")
    assert [r["received"] for r in results] == [8] * 5  # the server's byte count, 8 bytes
    edge = {"src_workload": "kse-cli", "dst_workload": "kse-srv", "node": "e2e-node"}
    pipeline.wait_total(5 * 123456, BYTES, side="client", direction="sent", **edge)
    pipeline.wait_total(5 * 8, BYTES, side="client", direction="received", **edge)
    pipeline.wait_total(5 * 123456, BYTES, side="server", direction="received", **edge)
    for side in ("client", "server"):
        pipeline.wait_total(5, "kubesight_tcp_connections_opened_total", side=side, **edge)
        pipeline.wait_total(5, "kubesight_tcp_connections_closed_total", side=side, **edge)
    assert pipeline.total("kubesight_tcp_rtt_seconds_count", side="client", **edge) > 0
    p50 = pipeline.series("kubesight_tcp_rtt_seconds", side="client", quantile="0.5", **edge)
    # Loopback: tens of µs, unless both cores are saturated for a while.
    assert p50 and all(0 < v < 0.1 for v in p50.values()), p50
    workload = pipeline.series("kubesight_tcp_workload_rtt_seconds_count", side="client",
                               workload="kse-cli")
    assert workload and all(v > 0 for v in workload.values())


def test_connect_failures_are_counted_by_kind(pipeline: Pipeline) -> None:
    with socket.socket() as s:  # a port that has no listener
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    assert traffic("send", "kse-refused", "127.0.0.1", str(closed_port), "1", "5", "3") == [
        {"error": "refused"}] * 3
    with NetNs() as ns:
        ns.iptables("INPUT", "-p", "tcp", "--dport", "9", "-j", "DROP")
        assert traffic("send", "kse-blackhole", ns.ns_ip, "9", "1", "2.5", "1") == [
            {"error": "timeout"}]
        pipeline.wait_total(3, FAILURES, kind="refused", src_workload="kse-refused",
                            dst_workload="127.0.0.1", dst_port=str(closed_port))
        pipeline.wait_total(1, FAILURES, kind="timeout", src_workload="kse-blackhole",
                            dst_workload=ns.ns_ip, dst_port="9")
        assert pipeline.total(FAILURES, kind="timeout", src_workload="kse-refused") == 0
        assert pipeline.total(FAILURES, kind="refused", src_workload="kse-blackhole") == 0
        # The SYN was retried before the client gave up.
        assert pipeline.total(RETRANSMITS, src_workload="kse-blackhole") >= 1
        assert pipeline.total("kubesight_tcp_connections_opened_total",
                              src_workload="kse-refused") == 0


def test_lossy_edge_shows_retransmits_and_the_clean_edge_does_not(pipeline: Pipeline) -> None:
    with NetNs() as ns:
        srv = ns.python("-m", "tests.tcp_traffic", "serve", "kse-nssrv", ns.ns_ip, "0")
        assert srv.stdout is not None
        port = srv.stdout.readline().split()[1]
        [clean] = traffic("send", "kse-clean", ns.ns_ip, port, "1000000", "10", "1")
        ns.iptables("INPUT", "-p", "tcp", "--dport", port, "-m", "statistic", "--mode",
                    "random", "--probability", "0.3", "-j", "DROP")
        [lossy] = traffic("send", "kse-lossy", ns.ns_ip, port, "1000000", "60", "1")
        for src in ("kse-clean", "kse-lossy"):
            pipeline.wait_total(1000000, BYTES, side="client", src_workload=src,
                                direction="sent")
        # Segments sent again, as each client's own kernel counted them (TCP_INFO): how many
        # varies with the drops (they hit GSO-sized skbs). The clean path has none unless a
        # stalled core fired a loss probe (one CI run saw 2), and then both counts show it.
        assert lossy["retrans"] > clean["retrans"]
        pipeline.wait_total(lossy["retrans"], RETRANSMITS, side="client",
                            src_workload="kse-lossy")
        assert pipeline.total(RETRANSMITS, side="client",
                              src_workload="kse-clean") == clean["retrans"]
        # The server end, in its own namespace, is named by its listener there, and its
        # client by the same-node connect.
        pipeline.wait_total(1000000, BYTES, side="server", src_workload="kse-lossy",
                            dst_workload="kse-nssrv", direction="received")


def test_kubesight_own_connections_are_left_out(pipeline: Pipeline) -> None:
    """The worker's and the sink's Kafka connections were open before the probe started: the
    probe adopts them without a process, finds them among kubesight's sockets and drops them;
    the broker's accepted connections are dropped in the kernel (an excluded listener)."""
    def probe_counter(name: str) -> float:
        return pipeline.total("kubesight_pipeline_counter_total", component="probe",
                              name=name)

    wait_for("own connections dropped", lambda: probe_counter("tcp_own_connections_dropped"),
             timeout=60)
    assert probe_counter("tcp_kernel_excluded") > 0
    assert probe_counter("tcp_kernel_ringbuf_drops") == 0


def test_conntrack_usage_against_its_maximum(pipeline: Pipeline) -> None:
    limit = int(Path("/proc/sys/net/netfilter/nf_conntrack_max").read_text())
    wait_for("conntrack gauges", lambda: pipeline.series("kubesight_conntrack_max",
                                                         node="e2e-node"), timeout=60)
    assert pipeline.total("kubesight_conntrack_max", node="e2e-node") == limit
    assert 0 <= pipeline.total("kubesight_conntrack_entries", node="e2e-node") <= limit
    assert pipeline.series("kubesight_conntrack_drops_total", node="e2e-node", reason="drop")


@pytest.mark.parametrize("topic", ["tcp.v1", "netseries.v1", "network.v1"])
def test_real_network_records_match_their_schema(pipeline: Pipeline, loopback_server: int,
                                                 topic: str) -> None:
    traffic("send", "kse-schema", "127.0.0.1", str(loopback_server), "10", "10", "1")
    records = wait_for(f"records on {topic}", lambda: [
        r for r in read_topic(pipeline.config, topic) if r is not None], timeout=60)
    for record in records[:2000]:
        validate(topic, record)
    if topic == "network.v1":
        assert {r["kind"] for r in records} >= {"edge", "workload", "conntrack"}
