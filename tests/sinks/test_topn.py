"""Node CPU, memory and top-N in the Prometheus sink: gauges of the latest sample, and /top
with a time series per top process (when did it start burning CPU?)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from kubesight.schemas import validate
from kubesight.sinks import NodeRecord, PrometheusConfig, PrometheusSink
from kubesight.sinks.topn import NodeView

from tests.promtext import parse

POD = "8d1e6a52-93c4-4f0b-b7a1-2c5e9f3d4a60"
CID = "ab" * 32


def proc(rank: int, pid: int, comm: str, cores: float, *, pod: str = "", cid: str = "",
         start: float = 1_700_000_000.0) -> dict[str, Any]:
    return {"rank": rank, "pid": pid, "comm": comm, "exe": f"/usr/bin/{comm}",
            "cpu_cores": cores, "start_time": start, "pod_uid": pod, "container_id": cid,
            "runtime": "containerd" if cid else "", "qos": "burstable" if pod else ""}


def record(ts: float, top: list[dict[str, Any]], node: str = "node-a",
           cpu: dict[str, float] | None = None) -> NodeRecord:
    pods = sorted({p["pod_uid"] for p in top if p["pod_uid"]})
    rec: NodeRecord = {
        "v": 1, "node": node, "instance": "probe-1", "ts": ts, "interval_s": 5.0,
        "cpu": cpu or {"0": 0.97, "1": 0.91}, "cpu_all": 0.94,
        "memory_bytes": {"total": 8 << 30, "available": 5 << 30, "used": 3 << 30,
                         "free": 1 << 30},
        "processes": 120, "scan_seconds": 0.002, "top": top,
        "pods": [{"rank": i, "pod_uid": uid, "processes": 1,
                  "cpu_cores": sum(p["cpu_cores"] for p in top if p["pod_uid"] == uid)}
                 for i, uid in enumerate(pods, start=1)]}
    validate("node.v1", rec)
    return rec


@pytest.fixture
def sink() -> Iterator[PrometheusSink]:
    s = PrometheusSink(PrometheusConfig(listen="127.0.0.1:0"))
    yield s
    s.close()


def get(sink: PrometheusSink, path: str) -> tuple[str, str]:
    host, port = sink.address
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as response:
        return response.headers["Content-Type"], response.read().decode()


def test_latest_sample_as_gauges(sink: PrometheusSink) -> None:
    hog = proc(1, 4242, "hog", 0.98, pod=POD, cid=CID)
    sink.write_node([record(100.0, [proc(1, 7, "nginx", 0.2)]),
                     record(105.0, [hog, proc(2, 7, "nginx", 0.1)])])
    sink.write_node([record(101.0, [proc(1, 9, "late", 5.0)])])  # older than the latest
    samples, _helps, types = parse(get(sink, "/metrics")[1])

    def gauge(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    assert gauge("kubesight_node_cpu_utilisation", node="node-a", cpu="0") == 0.97
    assert gauge("kubesight_node_memory_bytes", node="node-a", kind="used") == 3 << 30
    top = {dict(lab)["rank"]: (dict(lab), v) for (name, lab), v in samples.items()
           if name == "kubesight_top_process_cpu_cores"}
    assert sorted(top) == ["1", "2"]  # the latest sample only
    assert top["1"] == ({"node": "node-a", "rank": "1", "pid": "4242", "comm": "hog",
                         "exe": "/usr/bin/hog", "namespace": "", "pod": "", "pod_uid": POD,
                         "container_id": CID}, 0.98)
    assert gauge("kubesight_top_pod_cpu_cores", node="node-a", rank="1", namespace="", pod="",
                 workload="", pod_uid=POD) == 0.98
    first_seen = {dict(lab)["pid"]: v for (name, lab), v in samples.items()
                  if name == "kubesight_top_process_first_seen_timestamp_seconds"}
    assert first_seen == {"4242": 105.0, "7": 100.0}
    assert gauge("kubesight_node_sample_timestamp_seconds", node="node-a") == 105.0
    assert {types[n] for n in types if n.startswith(("kubesight_node", "kubesight_top"))} == {
        "gauge"}
    assert gauge("kubesight_sink_records_total", sink="prometheus", kind="node",
                 outcome="written") == 2
    assert gauge("kubesight_sink_records_total", sink="prometheus", kind="node",
                 outcome="rejected") == 1


def test_top_serves_each_process_time_series(sink: PrometheusSink) -> None:
    quiet = proc(1, 7, "nginx", 0.1)
    sink.write_node([record(100.0, [quiet])])
    for i, cores in enumerate((0.5, 0.99, 0.98)):  # the hog starts at ts 105
        sink.write_node([record(105.0 + 5 * i, [proc(1, 4242, "hog", cores, pod=POD),
                                                proc(2, 7, "nginx", 0.1)])])
    sink.write_node([record(120.0, [proc(1, 4242, "hog", 0.97, pod=POD)], node="node-b")])
    content_type, body = get(sink, "/top?node=node-a")
    assert content_type == "application/json"
    (node,) = json.loads(body)["nodes"]
    assert node["node"] == "node-a" and node["ts"] == 115.0
    hog = node["top"][0]
    assert (hog["pid"], hog["pod_uid"], hog["first_seen"]) == (4242, POD, 105.0)
    assert hog["series"] == [[105.0, 0.5], [110.0, 0.99], [115.0, 0.98]]
    assert node["top"][1]["series"][0] == [100.0, 0.1]

    sink.write_node([record(125.0, [quiet])])  # the hog stopped
    (node,) = json.loads(get(sink, "/top?node=node-a")[1])["nodes"]
    assert [p["pid"] for p in node["top"]] == [7]
    assert [(p["pid"], p["first_seen"], p["last_seen"]) for p in node["earlier"]] == [
        (4242, 105.0, 115.0)]
    assert len(json.loads(get(sink, "/top")[1])["nodes"]) == 2


def test_pods_are_named_from_k8s_v1_when_the_runner_knows_their_uid(
        sink: PrometheusSink) -> None:
    """The probe knows a pod by the UID in its cgroup path; the sink runner names it from the
    k8s.v1 table (namespace, pod, workload) before the sink sees the sample."""
    from kubesight.sinks.runner import name_pods
    from kubesight.streams.identity import IdentityTable

    from kubesight.k8smeta import pod_record, record_key

    identity = IdentityTable()
    pod = pod_record({"metadata": {"name": "cruncher-5c6d7-x1", "namespace": "batch", "uid": POD,
                                   "ownerReferences": [{"kind": "Job", "name": "cruncher",
                                                        "controller": True}]},
                      "spec": {"nodeName": "node-a"}, "status": {"phase": "Running"}})
    first = record(100.0, [proc(1, 4242, "hog", 0.98, pod=POD, cid=CID),
                           proc(2, 7, "nginx", 0.1)])
    name_pods(first, identity)  # not known yet: left unnamed
    sink.write_node([first])
    identity.apply(record_key(pod), pod)
    second = record(105.0, [proc(1, 4242, "hog", 0.99, pod=POD, cid=CID),
                            proc(2, 7, "nginx", 0.1), proc(3, 99, "sidecar", 0.05, pod="other")])
    name_pods(second, identity)
    sink.write_node([second])
    samples, _, _ = parse(get(sink, "/metrics")[1])
    top = {dict(lab)["rank"]: dict(lab) for (name, lab), _ in samples.items()
           if name == "kubesight_top_process_cpu_cores"}
    assert (top["1"]["namespace"], top["1"]["pod"]) == ("batch", "cruncher-5c6d7-x1")
    assert (top["2"]["pod"], top["3"]["pod"], top["3"]["pod_uid"]) == ("", "", "other")
    pods = {dict(lab)["pod_uid"]: dict(lab) for (name, lab), _ in samples.items()
            if name == "kubesight_top_pod_cpu_cores"}
    assert {k: pods[POD][k] for k in ("rank", "namespace", "pod", "workload")} == {
        "rank": "1", "namespace": "batch", "pod": "cruncher-5c6d7-x1", "workload": "cruncher"}
    assert pods["other"]["pod"] == ""
    (node,) = json.loads(get(sink, "/top?node=node-a")[1])["nodes"]
    hog = node["top"][0]  # tracked since the first sample, named since the pod was known
    assert (hog["pod"], hog["namespace"], hog["first_seen"]) == ("cruncher-5c6d7-x1", "batch",
                                                                 100.0)
    assert node["pods"][0]["pod"] == "cruncher-5c6d7-x1"


def test_history_and_tracked_processes_are_bounded() -> None:
    view = NodeView(history=3, tracked=4)
    for i in range(10):  # a new process every sample, each in the top-N once or more
        view.apply([record(float(i), [proc(1, 100 + i, f"p{i}", 1.0), proc(2, 1, "init", 0.1)])])
    node = view.nodes["node-a"]
    assert len(node.tracked) == 4
    init = node.tracked[(1, 1_700_000_000.0)]
    assert [ts for ts, _ in init.samples] == [7.0, 8.0, 9.0] and init.first_seen == 0.0


@pytest.mark.parametrize("bad", [
    {"node": "n"},  # fields missing
    {**record(1.0, []), "cpu": {"cpu0": 0.5}},  # not a CPU number
    {**record(1.0, []), "ts": "yesterday"},
    {**record(1.0, [proc(1, 2, "x", 0.5)]), "top": [{"rank": 1, "pid": "2"}]},
])
def test_malformed_records_are_counted_not_fatal(bad: Any) -> None:
    view = NodeView()
    assert view.apply([bad, record(2.0, [])]) == (1, 1)
    assert list(view.samples())  # the good one is served
