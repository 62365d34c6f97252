"""The topology sink: edges from golden and network windows, views, aging, topology.v1."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import msgpack
import pytest
from kubesight.schemas import validate
from kubesight.sinks import NetworkRecord, SinkConfigError, WindowRecord, build_sinks
from kubesight.sinks.prometheus import PrometheusSink
from kubesight.sinks.topology import TopologyConfig, TopologySink
from kubesight.streams.sketch import LatencySketch

from kubesight.config import PrometheusSinkConfig, SinksConfig

T0 = 1_700_000_000


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def golden(start: int, latencies: Sequence[float], *, side: str = "client", src: str = "gateway",
           dst: str = "product", ns: str = "shop", errors: int = 0, slow: int = 0,
           protocol: str = "http", **extra: str) -> WindowRecord:
    series = {"side": side, "protocol": protocol, "src_namespace": ns, "src_workload": src,
              "dst_namespace": ns, "dst_workload": dst, "endpoint": "/items/{id}",
              "status": "200", **extra}
    return {"v": 1, "series": series, "window_start": start,  # type: ignore[typeddict-item]
            "window_seconds": 10, "count": len(latencies), "errors": errors, "slow": slow,
            "sum_seconds": sum(latencies), "sketch": LatencySketch.of(latencies).to_wire(),
            "revision": 0}


def network(start: int, *, kind: str = "edge", side: str = "client", src: str = "gateway",
            dst: str = "product", ns: str = "shop", node: str = "n1", rtt: Sequence[float] = (),
            src_pod: str = "", dst_pod: str = "", dst_service: str = "",
            **counts: int) -> NetworkRecord:
    if kind == "workload":
        labels = {"node": node, "side": side, "namespace": ns, "workload": src}
    else:
        labels = {"node": node, "side": side, "src_namespace": ns, "src_workload": src,
                  "src_pod": src_pod, "dst_namespace": ns, "dst_workload": dst,
                  "dst_pod": dst_pod, "dst_service": dst_service, "dst_port": "8080"}
    all_counts = dict.fromkeys(("opened", "closed", "failed_refused", "failed_timeout",
                                "failed_unreachable", "retransmits", "resets_sent",
                                "resets_received", "bytes_sent", "bytes_received",
                                "rtt_sum_us"), 0) | counts
    return {"v": 1, "kind": kind, "labels": labels, "window_start": start, "window_seconds": 10,
            "counts": all_counts, "rtt": LatencySketch.of(list(rtt)).to_wire(), "revision": 0}


def sink(clock: Clock, **config: Any) -> TopologySink:
    return TopologySink(TopologyConfig.from_mapping(config), clock=clock)


def edges(graph: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(e["src"], e["dst"], e["protocol"]): e for e in graph["edges"]}


def test_edge_merges_sketches_across_windows_never_averaging_percentiles() -> None:
    topo = sink(Clock(T0 + 30))
    fast, slow = [0.001] * 60, [1.0] * 60
    topo.write([golden(T0, fast), golden(T0 + 10, slow, errors=3, slow=60)])
    topo.write([golden(T0 + 10, [1.0] * 10, slow=10)])  # a later revision of the same window
    edge = edges(topo.graph("workload", 60))[("shop/gateway", "shop/product", "http")]
    assert (edge["requests"], edge["errors"], edge["slow"]) == (130, 3, 70)
    want = LatencySketch.of(fast + slow + [1.0] * 10).quantiles([0.5, 0.9, 0.95, 0.99])
    assert list(edge["latency_seconds"].values()) == pytest.approx(want)
    assert edge["latency_seconds"]["p50"] == pytest.approx(1.0, rel=0.01)  # not (0.001+1)/2
    assert edge["side"] == "client" and set(edge["by_side"]) == {"client"}
    assert edge["tcp"] == {}
    assert edge["last_seen"] == T0 + 20


def test_client_side_is_the_headline_and_server_side_is_kept() -> None:
    topo = sink(Clock(T0 + 20))
    topo.write([golden(T0, [0.5] * 4, side="client"), golden(T0, [0.002] * 4, side="server")])
    edge = edges(topo.graph())[("shop/gateway", "shop/product", "http")]
    assert edge["latency_seconds"]["p50"] == pytest.approx(0.5, rel=0.01)
    assert edge["by_side"]["server"]["latency_seconds"]["p50"] == pytest.approx(0.002, rel=0.01)
    assert edge["by_side"]["server"]["requests"] == 4


def test_tcp_signals_go_on_the_pairs_edges_and_tcp_only_pairs_get_a_tcp_edge() -> None:
    topo = sink(Clock(T0 + 20))
    topo.write([golden(T0, [0.01]), golden(T0, [0.01], protocol="grpc")])
    topo.write_network([
        network(T0, retransmits=4, bytes_sent=1000, bytes_received=300, opened=2,
                failed_refused=1, rtt=[0.001, 0.002, 0.1]),
        network(T0, side="server", bytes_received=1000),
        network(T0, src="gateway", dst="10.0.0.9", bytes_sent=7),
        network(T0, kind="workload", side="client", rtt=[0.001]),
        {"v": 1, "kind": "conntrack", "node": "n1", "ts": 1.0, "entries": 1, "max": 9,
         "drop": 0, "early_drop": 0, "insert_failed": 0},
    ])
    got = edges(topo.graph())
    for proto in ("http", "grpc"):
        tcp = got[("shop/gateway", "shop/product", proto)]["tcp"]
        assert tcp["client"]["retransmits"] == 4
        assert tcp["client"]["bytes_sent"] == 1000 and tcp["client"]["bytes_received"] == 300
        assert tcp["client"]["connect_failures"] == {"refused": 1, "timeout": 0,
                                                     "unreachable": 0}
        assert tcp["client"]["rtt_seconds"]["p50"] == pytest.approx(0.002, rel=0.01)
        assert tcp["server"]["bytes_received"] == 1000
    external = got[("shop/gateway", "10.0.0.9", "tcp")]
    assert external["requests"] == 0 and external["tcp"]["client"]["bytes_sent"] == 7
    nodes = {n["id"]: n["kind"] for n in topo.graph()["nodes"]}
    assert nodes == {"shop/gateway": "workload", "shop/product": "workload",
                     "10.0.0.9": "external"}


def test_levels() -> None:
    topo = sink(Clock(T0 + 20))
    topo.write([
        golden(T0, [0.01] * 2, src_pod="gateway-1", dst_pod="product-a", dst_service="products"),
        golden(T0, [0.9] * 3, src_pod="gateway-1", dst_pod="product-b", dst_service="products"),
        golden(T0, [0.01], src="curl", dst="nginx", ns=""),  # a bare host: processes
    ])
    topo.write_network([network(T0, kind="workload", src="gateway", node="node-a"),
                        network(T0, kind="workload", src="product", node="node-b")])
    pods = edges(topo.graph("pod"))
    assert pods[("shop/gateway-1", "shop/product-b", "http")]["latency_seconds"]["p50"] == \
        pytest.approx(0.9, rel=0.01)
    assert pods[("shop/gateway-1", "shop/product-a", "http")]["requests"] == 2
    assert set(edges(topo.graph("service"))) == {("shop/gateway", "shop/products", "http"),
                                                 ("curl", "nginx", "http")}
    assert set(edges(topo.graph("namespace"))) == {("shop", "shop", "http"),
                                                   ("curl", "nginx", "http")}
    assert edges(topo.graph("namespace"))[("shop", "shop", "http")]["requests"] == 5
    assert ("node-a", "node-b", "http") in edges(topo.graph("node"))
    # TCP edges carry the same pods and service: their signals land on the same edges
    topo.write_network([
        network(T0, src_pod="gateway-1", dst_pod="product-b", dst_service="products",
                retransmits=9, rtt=[0.2]),
        network(T0, src_pod="gateway-1", dst_pod="product-a", dst_service="products",
                rtt=[0.0001]),
    ])
    pods = edges(topo.graph("pod"))
    slow_tcp = pods[("shop/gateway-1", "shop/product-b", "http")]["tcp"]["client"]
    fast_tcp = pods[("shop/gateway-1", "shop/product-a", "http")]["tcp"]["client"]
    assert (slow_tcp["retransmits"], fast_tcp["retransmits"]) == (9, 0)
    assert slow_tcp["rtt_seconds"]["p50"] == pytest.approx(0.2, rel=0.01)
    assert not [k for k in pods if k[2] == "tcp"]  # no TCP signals left on an edge of their own
    service = edges(topo.graph("service"))[("shop/gateway", "shop/products", "http")]
    assert service["tcp"]["client"]["retransmits"] == 9
    with pytest.raises(ValueError, match="level must be one of"):
        topo.graph("cluster")
    with pytest.raises(ValueError, match="window must be within"):
        topo.graph("workload", 10_000)


def test_window_selects_recent_windows_and_quiet_edges_age_out() -> None:
    clock = Clock(T0 + 20)
    topo = sink(clock, idle_seconds=60)
    topo.write([golden(T0, [0.01] * 5, dst="old"), golden(T0 + 10, [0.01] * 2)])
    clock.now = T0 + 55
    assert set(edges(topo.graph("workload", 40))) == {("shop/gateway", "shop/product", "http")}
    assert len(topo.graph("workload", 60)["edges"]) == 2
    clock.now = T0 + 75  # "old" ended at T0+10: quiet for 65 s
    assert set(edges(topo.graph("workload", 300))) == {("shop/gateway", "shop/product", "http")}
    clock.now = T0 + 100
    assert topo.graph("workload", 300)["edges"] == []


def test_published_edges_match_the_schema_and_tombstone_when_aged_out() -> None:
    clock = Clock(T0 + 20)
    topo = sink(clock, idle_seconds=60, publish_interval_s=5, publish_window_s=60)
    topo.write([golden(T0, [0.01] * 3)])
    topo.write_network([network(T0, bytes_sent=10, rtt=[0.001])])
    first = topo.published()
    key = b"shop/gateway -> shop/product [http]"
    assert [(t, k) for t, k, _ in first] == [("topology.v1", key)]
    record = msgpack.unpackb(first[0][2], raw=False)
    validate("topology.v1", record)
    assert record["requests"] == 3 and record["tcp"]["client"]["bytes_sent"] == 10
    assert record["src_node"] == {"id": "shop/gateway", "kind": "workload", "namespace": "shop",
                                  "name": "gateway"}
    assert topo.published() == []  # not due yet
    clock.now += 5
    assert topo.published() == []  # due, but nothing new
    topo.write([golden(T0 + 10, [0.01])])
    clock.now += 5
    assert [msgpack.unpackb(v, raw=False)["requests"] for _, _, v in topo.published()
            if v is not None] == [4]
    clock.now = T0 + 200
    assert topo.published() == [("topology.v1", key, None)]


def test_malformed_records_are_counted_not_raised() -> None:
    topo = sink(Clock(T0))
    topo.write([{"series": {}}])  # type: ignore[list-item,typeddict-item]
    topo.write_network([{"v": 1, "kind": "edge"}])
    assert topo.rejected == 2
    assert "2 malformed" in topo.healthcheck().detail


def test_config_names_the_key() -> None:
    with pytest.raises(SinkConfigError, match=r"^sinks\.topology\.publish_window_s: must be <="):
        TopologyConfig.from_mapping({"publish_window_s": 1000, "retention_seconds": 900})
    with pytest.raises(SinkConfigError, match=r"^sinks\.topology\.idle_seconds: must be > 0"):
        TopologyConfig.from_mapping({"idle_seconds": 0})


def test_served_as_json_on_the_prometheus_sinks_server() -> None:
    sinks = build_sinks(SinksConfig(prometheus=PrometheusSinkConfig(listen="127.0.0.1:0")))
    try:
        prom = next(s for s in sinks if isinstance(s, PrometheusSink))
        topo = next(s for s in sinks if isinstance(s, TopologySink))
        topo.write([golden(int(topo._clock()) - 20, [0.01] * 7)])
        base = f"http://127.0.0.1:{prom.address[1]}/topology"
        with urllib.request.urlopen(base + "?level=workload&window=120", timeout=5) as resp:
            assert resp.headers["Content-Type"] == "application/json"
            graph = json.load(resp)
        assert [(e["src"], e["requests"]) for e in graph["edges"]] == [("shop/gateway", 7)]
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(base + "?level=galaxy", timeout=5)
        assert bad.value.code == 400
        bad.value.close()
    finally:
        for s in sinks:
            s.close()
