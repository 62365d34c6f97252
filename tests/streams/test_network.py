"""NetworkAggregator and NetworkWindowStore: naming, counting, windows, the RTT sketch."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from kubesight.schemas import validate
from kubesight.streams.network import (
    MalformedNetworkBatch,
    NetworkAggregator,
    NetworkWindow,
    NetworkWindowStore,
    failure_kind,
    rtt_sketch,
)
from kubesight.streams.sketch import LatencySketch

NODE = "n1"
T0 = 1_700_000_000  # a window boundary for 10 s windows


def interval(**over: Any) -> dict[str, Any]:
    """A tcp.v1 interval: by default a loopback client connection that closed cleanly."""
    rec: dict[str, Any] = {
        "id": 1, "event": "close", "ts": (T0 + 3) * 10**9, "role": "client", "family": 2,
        "netns": 4026531840, "laddr": "127.0.0.1", "lport": 40000, "raddr": "127.0.0.1",
        "rport": 8080, "tgid": 10, "comm": "curl", "peer_tgid": 20, "peer_comm": "nginx",
        "new": True, "opened_ts": (T0 + 2) * 10**9, "established": True, "refused": False,
        "sk_err": 0, "bytes_sent": 100, "bytes_received": 2000, "retransmits": 0,
        "resets_sent": 0, "resets_received": 0,
        "rtt": {"samples": 0, "sum_us": 0, "min_us": 0, "max_us": 0, "last_us": 0,
                "hist": [0] * 32},
    }
    rec.update(over)
    return rec


def rtt(values_us: list[int]) -> dict[str, Any]:
    hist = [0] * 32
    for v in values_us:
        hist[v.bit_length() - 1] += 1
    return {"samples": len(values_us), "sum_us": sum(values_us), "min_us": min(values_us),
            "max_us": max(values_us), "last_us": values_us[-1], "hist": hist}


def batch(*intervals: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"v": 1, "node": NODE, "probe": "p", "seq": 0, "ts": (T0 + 5) * 10**9,
            "connections": list(intervals), **extra}


def partials(agg: NetworkAggregator) -> dict[tuple[str, ...], dict[int, dict[str, int]]]:
    """(kind, *label values) → window start → counts, from take_partials()."""
    out = {}
    for _key, msg in agg.take_partials():
        validate("netseries.v1", msg)
        out[(msg["kind"], *msg["labels"].values())] = {
            w["window_start"]: w["counts"] for w in msg["windows"]}
    return out


def test_client_and_server_ends_of_one_connection_report_one_edge_per_side() -> None:
    agg = NetworkAggregator(window_seconds=10)
    server_end = interval(role="server", laddr="127.0.0.1", lport=8080, rport=40000,
                          comm="nginx", peer_comm="curl", bytes_sent=2000, bytes_received=100)
    agg.on_batch(batch(interval(), server_end))
    got = partials(agg)
    edge = ("", "curl", "", "", "nginx", "", "", "8080")  # bare host: no pods, no service
    client = got[("edge", NODE, "client", *edge)][T0]
    server = got[("edge", NODE, "server", *edge)][T0]
    assert (client["bytes_sent"], client["bytes_received"]) == (100, 2000)
    assert (server["bytes_sent"], server["bytes_received"]) == (2000, 100)
    assert client["opened"] == client["closed"] == server["closed"] == 1
    assert got[("workload", NODE, "client", "", "curl")][T0]["bytes_sent"] == 100
    assert got[("workload", NODE, "server", "", "nginx")][T0]["bytes_sent"] == 2000


@pytest.mark.parametrize(("over", "listeners", "expected"), [
    # the kernel named the peer: taken as is
    ({}, {}, ("client", ("", "curl"), ("", "nginx"), 8080)),
    # no peer process: the listener of the address (loopback falls back to the wildcard)
    ({"peer_comm": ""}, {("0.0.0.0", 8080): "envoy"},
     ("client", ("", "curl"), ("", "envoy"), 8080)),
    # nobody known: private addresses stay, public ones are "external"
    ({"peer_comm": "", "raddr": "10.1.2.3"}, {}, ("client", ("", "curl"), ("", "10.1.2.3"), 8080)),
    ({"peer_comm": "", "raddr": "8.8.8.8"}, {}, ("client", ("", "curl"), ("", "external"), 8080)),
    # a server end without processes: named by its listener, the client by address
    ({"role": "server", "comm": "", "peer_comm": "", "laddr": "10.0.0.5", "lport": 5432,
      "raddr": "10.0.0.9", "rport": 50000}, {("10.0.0.5", 5432): "postgres"},
     ("server", ("", "10.0.0.9"), ("", "postgres"), 5432)),
    # adopted (open before the probe): a listening local port makes it the server end
    ({"role": "unknown", "comm": "", "peer_comm": "", "laddr": "10.0.0.5", "lport": 5432,
      "raddr": "10.0.0.9", "rport": 50000}, {("10.0.0.5", 5432): "postgres"},
     ("server", ("", "10.0.0.9"), ("", "postgres"), 5432)),
    ({"role": "unknown", "comm": "", "peer_comm": "", "laddr": "10.0.0.5", "lport": 50000,
      "raddr": "10.0.0.9", "rport": 443}, {}, ("client", ("", "10.0.0.5"), ("", "10.0.0.9"), 443)),
])
def test_names(over: dict[str, Any], listeners: dict[tuple[str, int], str],
               expected: tuple[str, tuple[str, str], tuple[str, str], int]) -> None:
    agg = NetworkAggregator(window_seconds=10)
    for (addr, port), comm in listeners.items():
        agg.on_listener({"node": NODE, "addr": addr, "port": port, "comm": comm,
                         "workload": comm})
    side, src, dst, port = expected  # a bare host: no pods, no service
    assert agg.names(NODE, interval(**over)) == (side, (*src, ""), (*dst, ""), "", port)


@pytest.mark.parametrize(("over", "kind"), [
    ({"refused": True, "sk_err": errno.ECONNREFUSED}, "refused"),
    ({"sk_err": errno.ECONNREFUSED}, "refused"),
    ({"sk_err": errno.ETIMEDOUT}, "timeout"),
    ({"sk_err": 0}, "timeout"),  # the application gave up before any answer
    ({"sk_err": errno.EHOSTUNREACH}, "unreachable"),
])
def test_failed_connects_by_kind(over: dict[str, Any], kind: str) -> None:
    failed = interval(established=False, new=False, bytes_sent=0, bytes_received=0,
                      retransmits=2, peer_comm="", **over)
    assert failure_kind(failed) == kind
    agg = NetworkAggregator(window_seconds=10)
    agg.on_batch(batch(failed))
    edge = ("edge", NODE, "client", "", "curl", "", "", "127.0.0.1", "", "", "8080")
    counts = partials(agg)[edge][T0]
    assert counts[f"failed_{kind}"] == 1 and counts["retransmits"] == 2
    assert counts["opened"] == counts["closed"] == 0
    assert sum(counts[f"failed_{k}"] for k in ("refused", "timeout", "unreachable")) == 1


def test_opened_counts_in_its_own_window_and_snapshots_add_up() -> None:
    agg = NetworkAggregator(window_seconds=10)
    opened = (T0 - 4) * 10**9  # the window before the one the snapshot falls in
    agg.on_batch(batch(
        interval(event="snapshot", opened_ts=opened, bytes_sent=10, retransmits=1),
        interval(event="snapshot", new=False, ts=(T0 + 6) * 10**9, bytes_sent=5,
                 resets_received=1),
        interval(new=False, ts=(T0 + 12) * 10**9, bytes_sent=1),
    ))
    windows = partials(agg)[("edge", NODE, "client", "", "curl", "", "", "nginx", "", "", "8080")]
    assert windows[T0 - 10]["opened"] == 1 and windows[T0 - 10]["bytes_sent"] == 0
    assert (windows[T0]["opened"], windows[T0]["closed"]) == (0, 0)
    assert (windows[T0]["bytes_sent"], windows[T0]["retransmits"],
            windows[T0]["resets_received"]) == (15, 1, 1)
    assert (windows[T0 + 10]["closed"], windows[T0 + 10]["bytes_sent"]) == (1, 1)
    assert agg.take_partials() == []  # handed over once


def test_rtt_sketch_is_exact_for_one_slot_and_bounded_by_min_max_for_several() -> None:
    steady = rtt([300] * 10)  # one slot: the mean
    assert rtt_sketch(steady).quantile(0.5) == pytest.approx(300e-6, rel=0.01)
    spread = rtt([100] * 50 + [3000] * 50)
    sketch = rtt_sketch(spread)
    assert sketch.count == 100
    assert sketch.quantile(0.0) >= 100e-6 * 0.99 and sketch.quantile(1.0) <= 3000e-6 * 1.01
    assert sketch.quantile(0.25) < 200e-6 and sketch.quantile(0.75) > 2048e-6
    assert rtt_sketch({"samples": 0, "sum_us": 0, "min_us": 0, "max_us": 0, "last_us": 0,
                       "hist": [0] * 32}).count == 0


def test_rtt_sum_and_samples_reach_the_window() -> None:
    agg = NetworkAggregator(window_seconds=10)
    agg.on_batch(batch(interval(rtt=rtt([500, 520, 510]))))
    [(_key, msg), *_] = [kv for kv in agg.take_partials() if kv[1]["kind"] == "edge"]
    [w] = msg["windows"]
    assert w["counts"]["rtt_sum_us"] == 1530
    assert LatencySketch.from_wire(w["rtt"]).count == 3


def test_conntrack_is_passed_on_as_a_node_record() -> None:
    agg = NetworkAggregator(window_seconds=10)
    record = agg.on_batch(batch(conntrack={"entries": 7, "max": 262144, "drop": 1,
                                           "early_drop": 0, "insert_failed": 2}))
    assert record is not None
    validate("network.v1", record)
    assert (record["node"], record["entries"], record["max"], record["ts"]) == (
        NODE, 7, 262144, T0 + 5)
    assert agg.on_batch(batch()) is None


@pytest.mark.parametrize("bad", [
    {"v": 1, "node": NODE},
    batch({"event": "close"}),
    batch(interval(rtt=None)),
    {"v": 1, "node": NODE, "connections": "nope"},
])
def test_malformed_batches_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(MalformedNetworkBatch):
        NetworkAggregator(window_seconds=10).on_batch(bad)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_windows_merge_close_after_grace_and_reopen_as_revisions() -> None:
    agg = NetworkAggregator(window_seconds=10)
    clock = Clock(T0 + 5)
    store = NetworkWindowStore(window_seconds=10, grace_seconds=2, clock=clock)
    for rec in (interval(rtt=rtt([400])), interval(id=2, new=False, rtt=rtt([800]))):
        agg.on_batch(batch(rec))
        for key, msg in agg.take_partials():
            store.merge(key, msg, partition=0)
    clock.now = T0 + 11.9
    assert store.due() == []
    clock.now = T0 + 12
    emitted = {w.kind: w for _k, w in store.due()}
    edge = emitted["edge"].to_record(10)
    validate("network.v1", edge)
    assert (edge["counts"]["opened"], edge["counts"]["closed"], edge["revision"]) == (1, 2, 0)
    assert LatencySketch.from_wire(edge["rtt"]).count == 2
    assert emitted["workload"].labels == {"node": NODE, "side": "client", "namespace": "",
                                          "workload": "curl"}
    # A late interval for the closed window: emitted again as a delta with the next revision.
    agg.on_batch(batch(interval(id=3, new=False)))
    for key, msg in agg.take_partials():
        store.merge(key, msg, partition=0)
    late = {w.kind: w for _k, w in store.due()}["edge"].to_record(10)
    assert (late["counts"]["closed"], late["revision"]) == (1, 1)
    assert store.late_partials == 2  # edge and workload


def test_window_state_round_trips() -> None:
    win = NetworkWindow(kind="edge", labels={"node": NODE, "side": "client"}, start=T0,
                        partition=1)
    win.merge({"window_start": T0, "counts": {"opened": 2, "bytes_sent": 9},
               "rtt": rtt_sketch(rtt([100, 5000])).to_wire()})
    again = NetworkWindow.from_state(win.to_state())
    assert again == win
    # 5000 µs shares its log2 slot [4096, 8192) with nothing: narrowed to [4096, max].
    assert 4096e-6 <= again.rtt.quantile(1.0) <= 5000e-6 * 1.01


def test_pod_addresses_and_cluster_ips_are_named_by_their_kubernetes_workload() -> None:
    """A TCP edge between pods carries the same names as the requests on it."""
    from .test_identity import pod, service, slice_of, table

    identity = table(pod("gw-0", "10.244.0.5", workload="gateway"),
                     pod("api-0", "10.244.0.7", workload="api"),
                     service("api", "10.96.0.10", 80),
                     slice_of("api", [("api-0", "10.244.0.7")]))
    agg = NetworkAggregator(window_seconds=10, identity=identity)
    by_pod_ip = interval(comm="gw", peer_comm="", laddr="10.244.0.5", raddr="10.244.0.7")
    by_cluster_ip = interval(comm="gw", peer_comm="", laddr="10.244.0.5", raddr="10.96.0.10",
                             rport=80)
    server_end = interval(role="server", comm="api", peer_comm="", laddr="10.244.0.7",
                          lport=8080, raddr="10.244.0.5", rport=40000)
    gateway, api = ("shop", "gateway", "gw-0"), ("shop", "api", "api-0")
    assert agg.names(NODE, by_pod_ip) == ("client", gateway, api, "api", 8080)
    # through the cluster IP: the service, and its one workload, but no pod (conntrack's
    # answer is the L7 probe's)
    assert agg.names(NODE, by_cluster_ip) == ("client", gateway, ("shop", "api", ""), "api", 80)
    assert agg.names(NODE, server_end) == ("server", gateway, api, "api", 8080)
    agg.on_batch({"v": 1, "node": NODE, "ts": T0 * 10**9, "connections": [by_pod_ip]})
    edges = [m["labels"] for _k, m in agg.take_partials() if m["kind"] == "edge"]
    assert edges == [{"node": NODE, "side": "client", "src_namespace": "shop",
                      "src_workload": "gateway", "src_pod": "gw-0", "dst_namespace": "shop",
                      "dst_workload": "api", "dst_pod": "api-0", "dst_service": "api",
                      "dst_port": "8080"}]


def test_a_pod_end_also_reports_under_its_pod() -> None:
    from .test_identity import pod, table

    agg = NetworkAggregator(window_seconds=10, identity=table(
        pod("api-7f-x", "10.244.0.7", workload="api")))
    agg.on_batch({"v": 1, "node": NODE, "ts": T0 * 10**9, "connections": [interval(
        role="server", comm="api", peer_comm="", laddr="10.244.0.7", lport=8080,
        raddr="10.244.0.5", rport=40000, retransmits=3)]})
    got = partials(agg)
    assert got[("pod", NODE, "server", "shop", "api", "api-7f-x")][T0]["retransmits"] == 3
    assert got[("workload", NODE, "server", "shop", "api")][T0]["retransmits"] == 3


def test_pod_series_are_windowed_like_the_others() -> None:
    from .test_identity import pod, table

    agg = NetworkAggregator(window_seconds=10, identity=table(
        pod("api-7f-x", "10.244.0.7", workload="api")))
    agg.on_batch(batch(interval(role="server", comm="api", peer_comm="", laddr="10.244.0.7",
                                lport=8080, raddr="10.244.0.5", rport=40000)))
    store = NetworkWindowStore(window_seconds=10, grace_seconds=0, clock=lambda: T0 + 100)
    for key, msg in agg.take_partials():
        store.merge(key, msg, partition=0)
    [pod_window] = [w for _k, w in store.due() if w.kind == "pod"]
    record = pod_window.to_record(10)
    validate("network.v1", record)
    assert record["labels"]["pod"] == "api-7f-x" and record["counts"]["bytes_received"] == 2000
