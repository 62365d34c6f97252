"""Kubernetes identity end to end: pods on a real API server, traffic between them, labels out.

A real kube-apiserver (with etcd) holds a Deployment → ReplicaSet → Pod for a frontend and a
backend, a Service with its EndpointSlice, and the Node. The pods are real network namespaces
on a bridge with processes in kubelet-style cgroups (``k8spods.py``); the service's cluster IP
is DNATed to the backend pod as kube-proxy does. kubesight's probe, metadata watcher, stream
worker and sink run as in production, and the metrics and request records must name both ends
by namespace, workload and pod, whether the frontend called the pod IP or the cluster IP.
"""

from __future__ import annotations

import json
import sys
import tempfile
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubesight.schemas import validate

from kubesight.config import Config, KafkaConfig
from tests.k8s_fixture import SERVICE_CIDR, Kube, KubeAPIServer, read_latest

from .conftest import _need_root_and_bpf, broker_pid
from .harness import Component, Pipeline, read_topic, wait_for
from .k8spods import Pod, PodNode

pytestmark = [pytest.mark.e2e, pytest.mark.bpf, pytest.mark.kafka]

REQ = "kubesight_requests_total"
CALLS = 6  # per path (pod IP, cluster IP)


@pytest.fixture(scope="module")
def pod_node() -> Iterator[PodNode]:
    _need_root_and_bpf()
    with PodNode() as node:
        yield node


@pytest.fixture(scope="module")
def k8s_pipeline(kube_apiserver: KubeAPIServer, kafka_bootstrap: str, pod_node: PodNode,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """probe + worker + sink, and the metadata watcher on the session's API server; the
    probe asks the pod node's conntrack where calls to cluster IPs went."""
    base = Config(kafka=KafkaConfig(bootstrap_servers=kafka_bootstrap,
                                    topic_prefix=f"kse{uuid.uuid4().hex[:8]}."))
    pipe = Pipeline(base, tmp_path_factory.mktemp("k8s-pipeline"),
                    extra={"kubernetes": {"kubeconfig": str(kube_apiserver.kubeconfig),
                                          "watch_timeout_s": 60,
                                          "service_cidrs": [SERVICE_CIDR],
                                          "conntrack_netns": pod_node.netns}})
    worker_env = pipe.components["worker"].env
    meta = Component("meta", [sys.executable, "-m", "kubesight.cli", "meta"], worker_env,
                     pipe.workdir / "logs" / "meta.log")
    pid = broker_pid(kafka_bootstrap)
    if pid is not None:
        pipe.exclude("kafka", pid)
    try:
        pipe.start()
        meta.start()
        pipe.components["meta"] = meta  # for diagnostics
        yield pipe
    finally:
        meta.stop()
        pipe.stop()


def _deploy(kube: Kube, node: PodNode, ns: str, name: str, node_name: str) -> tuple[str, Pod]:
    """What `kubectl create deployment` leaves once the controllers and the kubelet have done
    their part: Deployment → ReplicaSet → Pod, the pod's sandbox (named by the Pod's UID), and
    the pod's status with its IP and container id. Returns the pod's name and sandbox."""
    labels = {"app": name}
    rs = kube.replicaset(ns, kube.deployment(ns, name, labels), "5c6d7")
    pod_name = f"{name}-5c6d7-{uuid.uuid4().hex[:5]}"
    obj = kube.pod(ns, pod_name, labels={**labels, "pod-template-hash": "5c6d7"}, owner=rs,
                   node=node_name)
    sandbox = node.pod(name, uid=obj["metadata"]["uid"])
    kube.pod_status(ns, pod_name, ip=sandbox.ip, container_id=sandbox.container_id)
    return pod_name, sandbox


def topology(pipe: Pipeline, level: str, window: int = 600) -> dict[str, Any]:
    url = pipe.metrics_url.replace("/metrics", f"/topology?level={level}&window={window}")
    with urllib.request.urlopen(url, timeout=5) as resp:
        graph: dict[str, Any] = json.load(resp)
    return graph


def _worker_counter(pipe: Pipeline, name: str) -> float:
    return pipe.total("kubesight_pipeline_counter_total", component="worker", name=name)


def _k8s_messages(pipe: Pipeline) -> int:
    from confluent_kafka import Consumer, TopicPartition

    topic = pipe.config.topic("k8s.v1")
    consumer = Consumer({**pipe.config.kafka.librdkafka(), "group.id": "kubesight-tests"})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(h - lo for lo, h in (consumer.get_watermark_offsets(
            TopicPartition(topic, p), timeout=10) for p in parts))
    finally:
        consumer.close()


def test_calls_by_pod_ip_and_cluster_ip_carry_namespace_workload_and_pod(
        k8s_pipeline: Pipeline, kube_apiserver: KubeAPIServer, pod_node: PodNode) -> None:
    pipe, node = k8s_pipeline, pod_node
    kube = Kube(kube_apiserver.api_client())
    ns = f"shop-{uuid.uuid4().hex[:6]}"
    node_name = pipe.config.node_name
    kube.namespace(ns)
    with tempfile.TemporaryDirectory() as docroot:
        if not any(n["metadata"]["name"] == node_name
                   for n in kube.request("GET", "/api/v1/nodes")["items"]):
            kube.node(node_name, node.gateway, pod_cidr=node.cidr)
        backend_pod, backend = _deploy(kube, node, ns, "backend", node_name)
        frontend_pod, frontend = _deploy(kube, node, ns, "frontend", node_name)
        svc = kube.service(ns, "backend", selector={"app": "backend"}, port=80,
                           target_port=8080)
        cluster_ip = svc["spec"]["clusterIP"]
        kube.endpointslice(ns, "backend", port=8080,
                           endpoints=[(backend.ip, backend_pod, node_name)])

        # The watcher has published them and the worker has read everything published.
        wait_for("the pods on k8s.v1", lambda: all(
            isinstance(read_latest(pipe.config).get(f"pod/{ns}/{p}"), dict)
            for p in (backend_pod, frontend_pod)) and read_latest(pipe.config).get(
            f"endpointslice/{ns}/backend-abcde"), timeout=60)
        published = _k8s_messages(pipe)
        wait_for("the worker to read k8s.v1", lambda: _worker_counter(
            pipe, "k8s_records") >= published, timeout=60)

        Path(docroot, "index.html").write_text("backend\n")
        backend.spawn("python3", "-m", "http.server", "8080", "--bind", "0.0.0.0",
                      "--directory", docroot)
        wait_for("the backend to listen", lambda: ":8080" in backend.run("ss", "-ltnH"),
                 timeout=30)
        curl = ("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10")
        by_ip = [frontend.run(*curl, f"http://{backend.ip}:8080/") for _ in range(CALLS)]
        with node.service_dnat(cluster_ip, 80, backend, 8080):
            by_vip = [frontend.run(*curl, f"http://{cluster_ip}/") for _ in range(CALLS)]
        assert by_ip == by_vip == ["200"] * CALLS
        assert cluster_ip not in node.nat_rules()  # the rule is gone again

        names = {"src_namespace": ns, "src_workload": "frontend", "dst_namespace": ns,
                 "dst_workload": "backend"}
        pipe.wait_total(2 * CALLS, REQ, side="client", **names)
        pipe.wait_total(2 * CALLS, REQ, side="server", **names)
        assert pipe.total(REQ, src_namespace=ns, src_workload="curl") == 0
        # Pods are metric labels too, and the TCP signals exist per pod: one replica's
        # latency and network can be told from its siblings'.
        pipe.wait_total(2 * CALLS, REQ, side="server", dst_pod=backend_pod, **names)
        # Every call, by pod IP or cluster IP, was a call to the backend service: the client
        # knows it from the cluster IP or the EndpointSlice, the server from its own address.
        for side in ("client", "server"):
            assert pipe.total(REQ, side=side, dst_service="backend", **names) == 2 * CALLS
        graph = wait_for("the service view", lambda: (g := topology(pipe, "service")) and any(
            e["src"] == f"{ns}/frontend" and e["dst"] == f"{ns}/backend" for e in g["edges"])
            and g, timeout=60)
        kinds = {n["id"]: n["kind"] for n in graph["nodes"]}
        assert (kinds[f"{ns}/frontend"], kinds[f"{ns}/backend"]) == ("workload", "service")
        [edge] = [e for e in graph["edges"] if e["dst"] == f"{ns}/backend"]
        assert {side: v["requests"] for side, v in edge["by_side"].items()} == {
            "client": 2 * CALLS, "server": 2 * CALLS}
        wait_for("the backend pod's TCP signals", lambda: pipe.series(
            "kubesight_tcp_pod_bytes_total", namespace=ns, workload="backend", pod=backend_pod,
            side="server", direction="received"), timeout=90)
        # ...and per edge, with the pods and the service the requests carry: the calls by
        # pod IP from both ends (through the cluster IP, the client's TCP side has no pod).
        for side in ("client", "server"):
            wait_for(f"the {side}'s pod-to-pod TCP edge", lambda side=side: pipe.total(
                "kubesight_tcp_connections_opened_total", side=side, src_pod=frontend_pod,
                dst_pod=backend_pod, dst_service="backend") >= CALLS, timeout=90)

        records = [r for m in read_topic(pipe.config, "requests.v1") for r in m["requests"]
                   if r["src_namespace"] == ns]
        for rec in records:
            assert (rec["src_pod"], rec["dst_workload"], rec["dst_service"]) == (
                frontend_pod, "backend", "backend"), rec
        # Every call names the backend pod, those to the cluster IP through conntrack.
        assert [r["dst_pod"] for r in records] == [backend_pod] * (4 * CALLS)

        # The probe tagged the server's connections with its container and pod (from its
        # cgroup). A curl that has exited by the time its batch is published cannot be read
        # any more (the probe resolves pids from /proc); it is named by its pod IP instead.
        raw = [b["conn"] for b in read_topic(pipe.config, "raw.v1")]
        tagged = {(c["comm"], c.get("container_id"), c.get("pod_uid")) for c in raw
                  if c["laddr"] in (frontend.ip, backend.ip)}
        assert ("python3", backend.container_id, backend.uid) in tagged
        assert tagged <= {("python3", backend.container_id, backend.uid),
                          ("curl", frontend.container_id, frontend.uid), ("curl", None, None)}
        # ...and the frontend's calls to the cluster IP with the backend conntrack chose.
        natted = {(c.get("backend_addr"), c.get("backend_port")) for c in raw
                  if c["raddr"] == cluster_ip}
        assert natted == {(backend.ip, 8080)}
        for batch in read_topic(pipe.config, "raw.v1")[:500]:
            validate("raw.v1", batch)
