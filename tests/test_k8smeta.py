"""The metadata watcher: compact records, and the real thing against a real API server.

The first tests turn API objects (as the API server returns them) into records. The others run
``kubesight meta`` as its own process against the session's etcd + kube-apiserver and a real
Kafka broker, create Deployments, ReplicaSets, Pods, Services and EndpointSlices the way the
controllers and a kubelet would, and read the records back from the compacted topic.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubesight.schemas import validate

from kubesight import k8smeta
from kubesight.config import load
from kubesight.topics import ensure_topics
from tests.e2e.harness import Component, wait_for
from tests.k8s_fixture import Kube, KubeAPIServer, read_latest

CID = "a" * 64

POD = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "web-7d9f-x2x", "namespace": "shop", "uid": "u-1",
                 "labels": {"app": "web"}, "resourceVersion": "41",
                 "ownerReferences": [{"kind": "ReplicaSet", "name": "web-7d9f",
                                      "controller": True, "uid": "rs-1"}]},
    "spec": {"nodeName": "n1", "containers": [{"name": "app", "image": "x"}]},
    "status": {"phase": "Running", "podIP": "10.244.1.5",
               "podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00::5"}],
               "initContainerStatuses": [{"name": "init", "containerID": f"cri-o://{'b' * 64}"}],
               "containerStatuses": [{"name": "app", "containerID": f"containerd://{CID}"},
                                     {"name": "waiting"}]},
}


def test_pod_record() -> None:
    rec = k8smeta.pod_record(POD)
    validate("k8s.v1", rec)
    assert rec["ips"] == ["10.244.1.5", "fd00::5"]
    assert rec["containers"] == [{"name": "init", "id": "b" * 64}, {"name": "app", "id": CID}]
    assert (rec["node"], rec["owner_kind"], rec["owner_name"]) == ("n1", "ReplicaSet",
                                                                   "web-7d9f")
    assert k8smeta.record_key(rec) == "pod/shop/web-7d9f-x2x"
    bare = k8smeta.pod_record({"metadata": {"name": "p", "namespace": "ns"}})
    validate("k8s.v1", bare)
    assert (bare["workload_kind"], bare["workload_name"], bare["ips"]) == ("Pod", "p", [])


def test_service_endpointslice_node_records() -> None:
    svc = k8smeta.service_record({
        "metadata": {"name": "web", "namespace": "shop", "uid": "s"},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
                 "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
    validate("k8s.v1", svc)
    assert svc["cluster_ips"] == ["10.96.0.20"]
    assert svc["ports"] == [{"name": "http", "protocol": "TCP", "port": 80,
                             "target_port": "8080"}]
    headless = k8smeta.service_record({"metadata": {"name": "h", "namespace": "shop"},
                                       "spec": {"clusterIP": "None"}})
    assert headless["cluster_ips"] == []
    eps = k8smeta.endpointslice_record({
        "metadata": {"name": "web-abc", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": ["10.244.1.5"], "nodeName": "n1",
                       "targetRef": {"kind": "Pod", "name": "web-7d9f-x2x"}},
                      {"addresses": ["10.244.2.9"], "conditions": {"ready": False}}]})
    validate("k8s.v1", eps)
    assert eps["service"] == "web"
    assert [(e["pod"], e["ready"]) for e in eps["endpoints"]] == [("web-7d9f-x2x", True),
                                                                 ("", False)]
    node = k8smeta.node_record({"metadata": {"name": "n1"}, "spec": {"podCIDRs": ["10.244.1.0/24"]},
                                "status": {"addresses": [{"type": "InternalIP",
                                                          "address": "192.168.0.4"}]}})
    validate("k8s.v1", node)
    assert k8smeta.record_key(node) == "node/n1"


def test_pods_are_named_through_replicaset_and_job_owners() -> None:
    sent: dict[str, Any] = {}
    watcher = k8smeta.MetadataWatcher(None, sent.__setitem__, known_keys={"pod/shop/old"})
    pods = next(r for r in k8smeta.RESOURCES if r.name == "pods")
    replicasets = next(r for r in k8smeta.RESOURCES if r.name == "replicasets")
    jobs = next(r for r in k8smeta.RESOURCES if r.name == "jobs")
    # The pod first: named by its ReplicaSet until that is known, then by the Deployment.
    watcher._upsert(pods, POD)
    assert sent["pod/shop/web-7d9f-x2x"]["workload_name"] == "web-7d9f"
    watcher._upsert(replicasets, {"metadata": {
        "name": "web-7d9f", "namespace": "shop",
        "ownerReferences": [{"kind": "Deployment", "name": "web", "controller": True}]}})
    assert (sent["pod/shop/web-7d9f-x2x"]["workload_kind"],
            sent["pod/shop/web-7d9f-x2x"]["workload_name"]) == ("Deployment", "web")
    watcher._upsert(jobs, {"metadata": {
        "name": "nightly-29", "namespace": "shop",
        "ownerReferences": [{"kind": "CronJob", "name": "nightly", "controller": True}]}})
    job_pod = {**POD, "metadata": {**POD["metadata"], "name": "nightly-29-abc", "ownerReferences": [
        {"kind": "Job", "name": "nightly-29", "controller": True}]}}
    watcher._upsert(pods, job_pod)
    assert sent["pod/shop/nightly-29-abc"]["workload_kind"] == "CronJob"
    # An unchanged object is not sent again; a key left from before is tombstoned by a list.
    sent.clear()
    watcher._upsert(pods, POD)
    assert sent == {}
    watcher._delete(pods, "pod/shop/old")
    assert sent == {"pod/shop/old": None}


def test_a_cluster_is_configured_by_kubeconfig_or_service_account(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not k8smeta.cluster_configured()
    assert not k8smeta.cluster_configured(str(tmp_path / "missing"))
    (tmp_path / ".kube").mkdir()
    (tmp_path / ".kube" / "config").write_text("not: a kubeconfig\n")
    assert k8smeta.cluster_configured()  # `kubesight up` would start the watcher
    with pytest.raises(k8smeta.MetadataConfigError, match="no usable Kubernetes configuration"):
        k8smeta.load_api_client()


# -- against a real API server ----------------------------------------------------------------
class MetaProcess:
    """``kubesight meta`` as its own process, on its own topic prefix."""

    def __init__(self, kafka_bootstrap: str, api: KubeAPIServer, workdir: Path,
                 kubeconfig: Path | None = None) -> None:
        tree = {"node_name": "meta-test", "state_dir": str(workdir / "state"),
                "kafka": {"bootstrap_servers": kafka_bootstrap, "partitions": 2,
                          "topic_prefix": f"ksm{uuid.uuid4().hex[:8]}."},
                "kubernetes": {"kubeconfig": str(kubeconfig or api.kubeconfig),
                               "watch_timeout_s": 30}}
        path = workdir / "kubesight.yaml"
        path.write_text(yaml.safe_dump(tree))
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBESIGHT_")}
        env["KUBESIGHT_CONFIG"] = str(path)
        self.config = load(path, environ=env)
        ensure_topics(self.config)
        self.component = Component("meta", [sys.executable, "-m", "kubesight.cli", "meta"],
                                   env, workdir / "meta.log")

    def start(self) -> None:
        self.component.start()
        wait_for("the watcher to list every kind", lambda: self._alive_and(
            "synced: every kind listed"), timeout=60)

    def _alive_and(self, marker: str) -> bool:
        if not self.component.alive():
            raise AssertionError(f"kubesight meta exited:\n{self.component.log_text()[-4000:]}")
        return self.component.log_text().count(marker) >= 1

    def wait_record(self, key: str, check: Any, timeout: float = 60) -> Any:
        """Poll the topic until ``check(latest value of key)`` is true; returns that value."""
        seen: list[Any] = []

        def look() -> bool:
            value = read_latest(self.config).get(key, "absent")
            seen.append(value)
            return bool(check(value))

        try:
            wait_for(f"{key} on k8s.v1", look, timeout=timeout, interval=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last: {seen[-1:]}\n"
                                 f"{self.component.log_text()[-3000:]}") from None
        return seen[-1]


@pytest.fixture
def meta(kube_apiserver: KubeAPIServer, kafka_bootstrap: str, tmp_path: Path
         ) -> Iterator[MetaProcess]:
    proc = MetaProcess(kafka_bootstrap, kube_apiserver, tmp_path)
    try:
        proc.start()
        yield proc
    finally:
        proc.component.stop()


@pytest.fixture
def kube(kube_apiserver: KubeAPIServer) -> Kube:
    return Kube(kube_apiserver.api_client())


@pytest.fixture
def namespace(kube: Kube) -> Iterator[str]:
    ns = f"shop-{uuid.uuid4().hex[:6]}"
    kube.namespace(ns)
    try:
        yield ns
    finally:
        kube.delete_namespace(ns)


def _make_app(kube: Kube, ns: str, node: str) -> None:
    deploy = kube.deployment(ns, "web", {"app": "web"})
    rs = kube.replicaset(ns, deploy, "7d9f")
    kube.pod(ns, "web-7d9f-aaaaa", labels={"app": "web", "pod-template-hash": "7d9f"},
             owner=rs, node=node, ip="10.244.7.11", container_id=CID)
    svc = kube.service(ns, "web", selector={"app": "web"}, port=80, target_port=8080)
    assert svc["spec"]["clusterIP"].startswith("10.96.")
    kube.endpointslice(ns, "web", port=8080,
                       endpoints=[("10.244.7.11", "web-7d9f-aaaaa", node)])


@pytest.mark.kafka
def test_records_follow_the_api_server(meta: MetaProcess, kube: Kube, namespace: str) -> None:
    ns, node = namespace, f"node-{namespace}"
    kube.node(node, "192.168.77.2", pod_cidr="10.244.7.0/24")
    try:
        _make_app(kube, ns, node)
        pod_key = f"pod/{ns}/web-7d9f-aaaaa"
        pod = meta.wait_record(pod_key, lambda r: isinstance(r, dict) and r["containers"])
        assert (pod["ips"], pod["node"], pod["containers"]) == (
            ["10.244.7.11"], node, [{"name": "app", "id": CID}])
        assert (pod["workload_kind"], pod["workload_name"]) == ("Deployment", "web")
        svc = meta.wait_record(f"service/{ns}/web", lambda r: isinstance(r, dict))
        assert svc["cluster_ips"][0].startswith("10.96.") and svc["ports"][0]["port"] == 80
        eps = meta.wait_record(f"endpointslice/{ns}/web-abcde", lambda r: isinstance(r, dict))
        assert eps["service"] == "web" and eps["endpoints"][0]["pod"] == "web-7d9f-aaaaa"
        nrec = meta.wait_record(f"node/{node}", lambda r: isinstance(r, dict) and r["addresses"])
        assert {"type": "InternalIP", "address": "192.168.77.2"} in nrec["addresses"]
        meta.wait_record(f"workload/ReplicaSet/{ns}/web-7d9f",
                         lambda r: isinstance(r, dict) and r["owner_name"] == "web")

        # An update (the pod got a new sandbox and IP), then a delete (a tombstone).
        kube.pod_status(ns, "web-7d9f-aaaaa", ip="10.244.7.12", container_id="c" * 64)
        meta.wait_record(pod_key, lambda r: isinstance(r, dict) and r["ips"] == ["10.244.7.12"])
        kube.delete_pod(ns, "web-7d9f-aaaaa")
        meta.wait_record(pod_key, lambda r: r is None)

        for key, record in read_latest(meta.config).items():
            if record is not None:
                validate("k8s.v1", record)
                assert k8smeta.record_key(record) == key
    finally:
        kube.delete_node(node)


@pytest.mark.kafka
def test_watcher_survives_an_api_server_restart_and_its_own(
        meta: MetaProcess, kube: Kube, kube_apiserver: KubeAPIServer, namespace: str) -> None:
    ns = namespace
    kube.pod(ns, "before", labels={"app": "x"}, node="n", ip="10.244.8.1")
    meta.wait_record(f"pod/{ns}/before", lambda r: isinstance(r, dict))

    kube_apiserver.stop_apiserver()
    kube_apiserver.start_apiserver()
    kube = Kube(kube_apiserver.api_client())
    kube.pod(ns, "after", labels={"app": "x"}, node="n", ip="10.244.8.2")
    meta.wait_record(f"pod/{ns}/after", lambda r: isinstance(r, dict) and r["ips"])
    assert meta.component.alive()

    # Down for a while: what was deleted meanwhile is tombstoned when it is back.
    meta.component.stop()
    kube.delete_pod(ns, "before")
    meta.start()
    meta.wait_record(f"pod/{ns}/before", lambda r: r is None)
    assert read_latest(meta.config)[f"pod/{ns}/after"]["ips"] == ["10.244.8.2"]


# -- the shipped RBAC, on an API server that enforces it -----------------------------------------
META_YAML = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes" / "meta.yaml"


def _account(kube: Kube, api: KubeAPIServer, docs: list[dict[str, Any]], workdir: Path
             ) -> tuple[Kube, Path]:
    """Apply a manifest's ServiceAccount, ClusterRole and binding; a client and a kubeconfig
    with that account's token."""
    from kubernetes import config as kube_config

    try:
        kube.namespace("kubesight")
    except RuntimeError as exc:
        if "HTTP 409" not in str(exc):
            raise
    for doc in docs:
        kube.apply(doc)
    [sa] = [d for d in docs if d["kind"] == "ServiceAccount"]
    path = api.kubeconfig_for(kube.token("kubesight", sa["metadata"]["name"]),
                              workdir / "sa-kubeconfig")
    return Kube(kube_config.new_client_from_config(config_file=str(path))), path


def _rbac_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(META_YAML.read_text())
            if d and d["kind"] in Kube.COLLECTIONS]


@pytest.mark.kafka
def test_the_shipped_role_is_all_the_watcher_needs(
        kube_apiserver: KubeAPIServer, kube: Kube, kafka_bootstrap: str, tmp_path: Path,
        namespace: str) -> None:
    """deploy/kubernetes/meta.yaml's ServiceAccount, ClusterRole and binding on an API server
    with RBAC on: `kubesight meta` with that account's token lists every kind and follows a
    new pod; the same account is refused what the role does not grant (so RBAC is enforced
    here, and the role is not wider than it says)."""
    account, kubeconfig = _account(kube, kube_apiserver, _rbac_docs(), tmp_path)
    for path in ("/api/v1/secrets", "/api/v1/configmaps",
                 f"/api/v1/namespaces/{namespace}/pods/any"):  # a get, not a list
        with pytest.raises(RuntimeError, match="HTTP 403"):
            account.request("GET", path)
    with pytest.raises(RuntimeError, match="HTTP 403"):
        account.request("POST", f"/api/v1/namespaces/{namespace}/services", {
            "metadata": {"name": "x"}, "spec": {"ports": [{"port": 1}]}})
    meta = MetaProcess(kafka_bootstrap, kube_apiserver, tmp_path, kubeconfig=kubeconfig)
    try:
        meta.start()  # "synced: every kind listed"
        kube.pod(namespace, "rbac-web", labels={"app": "x"}, node="n", ip="10.244.9.1")
        meta.wait_record(f"pod/{namespace}/rbac-web",
                         lambda r: isinstance(r, dict) and r["ips"] == ["10.244.9.1"])
        assert "refuses" not in meta.component.log_text()
    finally:
        meta.component.stop()


@pytest.mark.kafka
def test_a_kind_the_role_leaves_out_is_named_in_the_log(
        kube_apiserver: KubeAPIServer, kube: Kube, kafka_bootstrap: str,
        tmp_path: Path) -> None:
    """The same role without EndpointSlices, for an account of its own: the watcher keeps
    following the rest and says, as an error, which collection it may not read and why."""
    docs = []
    for doc in _rbac_docs():
        doc = yaml.safe_load(yaml.safe_dump(doc))  # a copy
        doc["metadata"]["name"] = "kubesight-meta-partial"
        if doc["kind"] == "ClusterRole":
            doc["rules"] = [r for r in doc["rules"] if "endpointslices" not in r["resources"]]
        if doc["kind"] == "ClusterRoleBinding":
            doc["roleRef"]["name"] = "kubesight-meta-partial"
            doc["subjects"][0]["name"] = "kubesight-meta-partial"
        docs.append(doc)
    _, kubeconfig = _account(kube, kube_apiserver, docs, tmp_path)
    meta = MetaProcess(kafka_bootstrap, kube_apiserver, tmp_path, kubeconfig=kubeconfig)
    meta.component.start()
    try:
        wait_for("the refusal in the log", lambda: meta._alive_and(  # noqa: SLF001
            "endpointslices: the API server refuses to let this account list and watch "
            "/apis/discovery.k8s.io/v1/endpointslices (HTTP 403"), timeout=60)
        wait_for("pods listed all the same", lambda: meta._alive_and(  # noqa: SLF001
            "pods: listed"), timeout=60)
        assert "synced: every kind listed" not in meta.component.log_text()
    finally:
        meta.component.stop()
