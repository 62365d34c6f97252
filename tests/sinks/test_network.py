"""kubesight_tcp_* and kubesight_conntrack_* from the Prometheus sink, scraped over HTTP."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from kubesight.schemas import validate
from kubesight.sinks import NetworkRecord, PrometheusConfig, PrometheusSink
from kubesight.streams.sketch import LatencySketch

from tests.promtext import parse

EDGE = {"node": "n1", "side": "client", "src_namespace": "", "src_workload": "gateway",
        "src_pod": "", "dst_namespace": "", "dst_workload": "product", "dst_pod": "",
        "dst_service": "", "dst_port": "8080"}
COUNTS = ("opened", "closed", "failed_refused", "failed_timeout", "failed_unreachable",
          "retransmits", "resets_sent", "resets_received", "bytes_sent", "bytes_received",
          "rtt_sum_us")


def window(start: int, rtts: list[float], revision: int = 0, kind: str = "edge",
           labels: dict[str, str] | None = None, **counts: int) -> NetworkRecord:
    record: NetworkRecord = {
        "v": 1, "kind": kind, "labels": labels or EDGE, "window_start": start,
        "window_seconds": 10, "revision": revision,
        "counts": {**dict.fromkeys(COUNTS, 0), "rtt_sum_us": round(sum(rtts) * 1e6), **counts},
        "rtt": LatencySketch.of(rtts).to_wire()}
    validate("network.v1", record)
    return record


@pytest.fixture
def sink() -> Iterator[PrometheusSink]:
    s = PrometheusSink(PrometheusConfig(listen="127.0.0.1:0"))
    yield s
    s.close()


def scrape(sink: PrometheusSink) -> tuple[dict[tuple[str, Any], float], dict[str, str]]:
    host, port = sink.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        samples, _helps, types = parse(response.read().decode())
    return samples, types


def test_edge_counters_sum_every_delta_and_rtt_follows_the_latest_window(
        sink: PrometheusSink) -> None:
    sink.write_network([
        window(100, [0.001] * 10, opened=3, closed=2, bytes_sent=500, bytes_received=70,
               retransmits=1, failed_refused=2, resets_received=1),
        window(110, [0.050] * 4, opened=1, failed_timeout=1, bytes_sent=5),
        window(110, [0.060] * 4, revision=1, closed=2, resets_sent=1),  # late delta, same window
        window(100, [0.5], revision=1, retransmits=4),  # older window: counts only
    ])
    samples, types = scrape(sink)
    key = frozenset(EDGE.items())

    def value(metric: str, **extra: str) -> float:
        return samples[(metric, key | frozenset(extra.items()))]

    assert value("kubesight_tcp_connections_opened_total") == 4
    assert value("kubesight_tcp_connections_closed_total") == 4
    assert value("kubesight_tcp_connect_failures_total", kind="refused") == 2
    assert value("kubesight_tcp_connect_failures_total", kind="timeout") == 1
    assert value("kubesight_tcp_connect_failures_total", kind="unreachable") == 0
    assert value("kubesight_tcp_retransmits_total") == 5
    assert value("kubesight_tcp_resets_total", direction="sent") == 1
    assert value("kubesight_tcp_resets_total", direction="received") == 1
    assert value("kubesight_tcp_bytes_total", direction="sent") == 505
    assert value("kubesight_tcp_bytes_total", direction="received") == 70
    assert value("kubesight_tcp_rtt_seconds_count") == 19
    assert value("kubesight_tcp_rtt_seconds_sum") == pytest.approx(0.01 + 0.2 + 0.24 + 0.5)
    for q in ("0.5", "0.99"):  # the latest window only: 0.050 and 0.060
        assert 0.049 <= value("kubesight_tcp_rtt_seconds", quantile=q) <= 0.0606
    assert types["kubesight_tcp_rtt_seconds"] == "summary"
    assert types["kubesight_tcp_bytes_total"] == "counter"


def test_workload_rtt_and_conntrack(sink: PrometheusSink) -> None:
    labels = {"node": "n1", "side": "server", "namespace": "", "workload": "product"}
    sink.write_network([
        window(100, [0.002] * 3, kind="workload", labels=labels),
        {"v": 1, "kind": "conntrack", "node": "n1", "ts": 10.0, "entries": 40, "max": 100,
         "drop": 3, "early_drop": 1, "insert_failed": 0},
        {"v": 1, "kind": "conntrack", "node": "n1", "ts": 5.0, "entries": 99, "max": 100,
         "drop": 0, "early_drop": 0, "insert_failed": 0},  # older report: ignored
    ])
    samples, types = scrape(sink)
    q50 = samples[("kubesight_tcp_workload_rtt_seconds",
                   frozenset({**labels, "quantile": "0.5"}.items()))]
    assert q50 == pytest.approx(0.002, rel=0.01)
    node = frozenset({("node", "n1")})
    assert samples[("kubesight_conntrack_entries", node)] == 40
    assert samples[("kubesight_conntrack_max", node)] == 100
    assert samples[("kubesight_conntrack_drops_total", node | {("reason", "drop")})] == 3
    assert types["kubesight_conntrack_entries"] == "gauge"


def test_malformed_network_records_are_counted_not_fatal(sink: PrometheusSink) -> None:
    bad: list[Any] = [{"kind": "edge", "labels": {"node": "n1"}}, {"kind": "nope"},
                      {"kind": "conntrack", "node": "n1"}]
    sink.write_network([*bad, window(100, [0.001])])
    samples, _types = scrape(sink)
    rejected = frozenset({("sink", "prometheus"), ("kind", "network"), ("outcome", "rejected")})
    written = rejected - {("outcome", "rejected")} | {("outcome", "written")}
    assert samples[("kubesight_sink_records_total", rejected)] == 3
    assert samples[("kubesight_sink_records_total", written)] == 1


def test_edges_from_before_pods_and_services_read_them_as_empty(sink: PrometheusSink) -> None:
    """network.v1 edges gained src_pod, dst_pod and dst_service after its first release: an
    edge written by an older worker still counts, under empty ones."""
    old = {k: v for k, v in EDGE.items() if k not in ("src_pod", "dst_pod", "dst_service")}
    sink.write_network([window(100, [0.001], labels=old, retransmits=2),
                        window(110, [0.001], retransmits=3)])
    samples, _types = scrape(sink)
    assert samples[("kubesight_tcp_retransmits_total", frozenset(EDGE.items()))] == 5


def test_pod_level_tcp_signals_single_out_one_replica(sink: PrometheusSink) -> None:
    def pod(name: str) -> dict[str, str]:
        return {"node": "n1", "side": "server", "namespace": "shop", "workload": "api",
                "pod": name}

    sink.write_network([
        window(100, [0.0002] * 5, kind="pod", labels=pod("api-a"), bytes_sent=10),
        window(100, [0.080] * 5, kind="pod", labels=pod("api-b"), retransmits=9,
               bytes_sent=10),
    ])
    samples, types = scrape(sink)

    def value(metric: str, name: str, **extra: str) -> float:
        return samples[(metric, frozenset({**pod(name), **extra}.items()))]

    assert value("kubesight_tcp_pod_retransmits_total", "api-b") == 9
    assert value("kubesight_tcp_pod_retransmits_total", "api-a") == 0
    assert value("kubesight_tcp_pod_rtt_seconds", "api-b", quantile="0.5") == pytest.approx(
        0.080, rel=0.01)
    assert value("kubesight_tcp_pod_rtt_seconds", "api-a", quantile="0.5") < 0.001
    assert value("kubesight_tcp_pod_bytes_total", "api-a", direction="sent") == 10
    assert types["kubesight_tcp_pod_rtt_seconds"] == "summary"
