"""The service map end to end: curl → nginx through probe, worker and sink, out as /topology
JSON and as topology.v1 records, with the counts curl and nginx themselves report.

curl runs from a copy named ``kstopocurl`` so its edge is this test's alone on a shared
machine (the probe sees every process on the host).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubesight.schemas import validate

from kubesight.config import Config, KafkaConfig

from .conftest import _need_root_and_bpf, broker_pid
from .harness import Nginx, Pipeline, read_topic, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.bpf, pytest.mark.kafka]

CALLS = 7
CLIENT = "kstopocurl"
EDGE = f"{CLIENT} -> nginx [http]"


@pytest.fixture(scope="module")
def topo_pipeline(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Pipeline]:
    _need_root_and_bpf()
    base = Config(kafka=KafkaConfig(bootstrap_servers=kafka_bootstrap,
                                    topic_prefix=f"kse{uuid.uuid4().hex[:8]}."))
    pipe = Pipeline(base, tmp_path_factory.mktemp("topology"), extra={
        "sinks": {"topology": {"publish_interval_s": 1.0, "publish_window_s": 600.0}}})
    pid = broker_pid(kafka_bootstrap)
    if pid is not None:
        pipe.exclude("kafka", pid)
    try:
        pipe.start()
        yield pipe
    finally:
        pipe.stop()


def topology(pipe: Pipeline, level: str = "workload", window: int = 600) -> dict[str, Any]:
    url = pipe.metrics_url.replace("/metrics", f"/topology?level={level}&window={window}")
    with urllib.request.urlopen(url, timeout=5) as resp:
        graph: dict[str, Any] = json.load(resp)
    return graph


def edge(pipe: Pipeline, edge_id: str, level: str = "workload") -> dict[str, Any] | None:
    return next((e for e in topology(pipe, level)["edges"] if e["id"] == edge_id), None)


def test_curl_to_nginx_is_an_edge_with_exact_requests_and_tcp_bytes(
        topo_pipeline: Pipeline, nginx: Nginx, tmp_path: Path) -> None:
    pipe = topo_pipeline
    client = tmp_path / CLIENT
    shutil.copy(shutil.which("curl") or "/usr/bin/curl", client)
    sent = received = 0
    for _ in range(CALLS):  # one connection per call
        out = subprocess.run([str(client), "-s", "-o", "/dev/null", "-w",
                              "%{http_code} %{size_request} %{size_header} %{size_download}",
                              f"{nginx.url}/small"], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        assert out[0] == "200"
        sent += int(out[1])
        received += int(out[2]) + int(out[3])
    logged = [line for line in nginx.access_log() if line.split()[2] == "/small"]
    assert sum(int(line.split()[3]) for line in logged[-CALLS:]) == sent  # $request_length

    def complete() -> dict[str, Any] | None:
        e = edge(pipe, EDGE)
        if e is None or e["requests"] != CALLS or set(e["tcp"]) != {"client", "server"}:
            return None
        tcp = e["tcp"]
        if (tcp["client"]["bytes_sent"], tcp["client"]["bytes_received"],
                tcp["server"]["bytes_received"]) != (sent, received, sent):
            return None
        return e if tcp["client"]["closed"] == CALLS else None

    try:
        got = wait_for(f"{EDGE} with {CALLS} requests, {sent}/{received} bytes", complete,
                       timeout=90, interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nedge now: {edge(pipe, EDGE)}\n{pipe.diagnostics()}"
                             ) from None
    assert got["side"] == "client" and got["by_side"]["server"]["requests"] == CALLS
    assert got["errors"] == 0 and got["slow"] == 0
    lat = got["latency_seconds"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] < 1.0
    tcp = got["tcp"]["client"]
    assert tcp["opened"] == CALLS and tcp["retransmits"] == 0 and tcp["resets_received"] == 0
    assert tcp["rtt_samples"] > 0 and 0 < tcp["rtt_seconds"]["p50"] < 0.1
    nodes = {n["id"]: n for n in topology(pipe)["nodes"]}
    assert nodes[CLIENT]["kind"] == nodes["nginx"]["kind"] == "workload"

    # Every view answers; on a bare host the namespace view keeps processes as they are and
    # the node view puts both ends on this node.
    assert edge(pipe, EDGE, "namespace")["requests"] == CALLS  # type: ignore[index]
    assert edge(pipe, EDGE, "pod")["requests"] == CALLS  # type: ignore[index]
    node_edges = topology(pipe, "node")["edges"]
    assert any(e["src"] == e["dst"] == "e2e-node" and e["tcp"] for e in node_edges), node_edges

    # topology.v1 holds the same edge, records matching the schema.
    def published() -> dict[str, Any] | None:
        records = [r for r in read_topic(pipe.config, "topology.v1") if r is not None]
        for r in records:
            validate("topology.v1", r)
        mine = [r for r in records if r["id"] == EDGE]
        return mine[-1] if mine and mine[-1]["requests"] == CALLS else None

    record = wait_for("the edge on topology.v1", published, timeout=30, interval=1.0)
    assert record["tcp"]["client"]["bytes_sent"] == sent
    assert record["src_node"]["name"] == CLIENT and record["dst_node"]["name"] == "nginx"
