"""The Kubernetes metadata watcher (``kubesight meta``): API objects → compact records on k8s.v1.

One runs per cluster (`kubesight up` starts it when it finds a kubeconfig or an in-cluster
service account). It follows pods, services, endpointslices, nodes and the workload kinds the
way client-go's reflector does, one thread per kind::

    list (paginated, a consistent snapshot at resourceVersion R)
      → publish what changed since the last list, tombstone what is gone
      → watch from R (bookmarks on), R advancing with every event and bookmark
           server-side timeout       → watch again from R
           connection error, 5xx     → back off (0.5 s doubling to 30 s, jittered), watch from R
           410 Gone (R compacted)    → list again: a resync

Records are keyed ``<kind>/<namespace>/<name>`` on a compacted topic, so the topic holds the
latest record per object and a deleted object's tombstone (null value). A record is sent only
when its compact form changes (pod status churn that changes no IP or container id costs
nothing downstream). At start the watcher reads the topic's keys back, so objects deleted
while it was down are tombstoned by its first list.

Pods are named by their workload: the controller owner, followed through ReplicaSet →
Deployment and Job → CronJob, as ``kubectl`` shows them. ReplicaSets and Jobs are listed
before pods start; a pod that arrives before its ReplicaSet is re-published once the
ReplicaSet is known.

Errors from the client library (``kubernetes.client.ApiException``, urllib3's connection
errors) stay inside the per-kind loop; only a bad configuration at start raises
(``MetadataConfigError``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack

from .config import Config
from .logs import RdkafkaLog

log = logging.getLogger("kubesight.meta")

PAGE_SIZE = 500
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 30.0
PREREQUISITE_WAIT_S = 30.0  # how long pods wait for the first list of ReplicaSets and Jobs
HEALTH_INTERVAL_S = 5.0
MAX_LABELS = 32
IN_CLUSTER_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


class MetadataConfigError(RuntimeError):
    """No usable Kubernetes client configuration; the message says what was tried."""


class Gone(Exception):
    """The resourceVersion a watch asked for has been compacted away (HTTP 410)."""


class Refused(Exception):
    """The API server will not let this account read a collection (HTTP 401 or 403)."""

    def __init__(self, path: str, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.path, self.status, self.message = path, status, message


# -- compact records ------------------------------------------------------------------------------
def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = obj.get("metadata") or {}
    return meta


def controller_of(obj: dict[str, Any]) -> tuple[str, str]:
    """(kind, name) of the object's controlling owner, or ("", "")."""
    refs = _meta(obj).get("ownerReferences") or []
    for ref in refs:
        if ref.get("controller"):
            return str(ref.get("kind", "")), str(ref.get("name", ""))
    return ("", "")


def _labels(meta: dict[str, Any]) -> dict[str, str]:
    labels = meta.get("labels") or {}
    return {str(k): str(v) for k, v in list(labels.items())[:MAX_LABELS]}


def container_id(raw: str) -> str:
    """``containerd://<64 hex>`` → the bare id that cgroup paths carry."""
    return raw.rpartition("://")[2]


def pod_record(obj: dict[str, Any]) -> dict[str, Any]:
    """The compact pod record; ``workload_kind``/``workload_name`` are filled by the watcher."""
    meta, spec, status = _meta(obj), obj.get("spec") or {}, obj.get("status") or {}
    ips = [str(p["ip"]) for p in status.get("podIPs") or [] if p.get("ip")]
    if not ips and status.get("podIP"):
        ips = [str(status["podIP"])]
    containers = []
    for field in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for cs in status.get(field) or []:
            if cs.get("containerID"):
                containers.append({"name": str(cs.get("name", "")),
                                   "id": container_id(str(cs["containerID"]))})
    owner_kind, owner_name = controller_of(obj)
    return {
        "v": 1, "kind": "pod", "uid": str(meta.get("uid", "")),
        "namespace": str(meta.get("namespace", "")), "name": str(meta.get("name", "")),
        "node": str(spec.get("nodeName") or ""), "ips": ips,
        "host_network": bool(spec.get("hostNetwork")), "phase": str(status.get("phase", "")),
        "containers": containers, "labels": _labels(meta),
        "owner_kind": owner_kind, "owner_name": owner_name,
        "workload_kind": owner_kind or "Pod",
        "workload_name": owner_name or str(meta.get("name", "")),
    }


def service_record(obj: dict[str, Any]) -> dict[str, Any]:
    meta, spec = _meta(obj), obj.get("spec") or {}
    ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    return {
        "v": 1, "kind": "service", "uid": str(meta.get("uid", "")),
        "namespace": str(meta.get("namespace", "")), "name": str(meta.get("name", "")),
        "type": str(spec.get("type", "ClusterIP")),
        "cluster_ips": [str(ip) for ip in ips if ip and ip != "None"],
        "ports": [{"name": str(p.get("name", "")), "protocol": str(p.get("protocol", "TCP")),
                   "port": int(p.get("port", 0)), "target_port": str(p.get("targetPort", ""))}
                  for p in spec.get("ports") or []],
        "selector": {str(k): str(v) for k, v in (spec.get("selector") or {}).items()},
    }


def endpointslice_record(obj: dict[str, Any]) -> dict[str, Any]:
    meta = _meta(obj)
    endpoints = []
    for ep in obj.get("endpoints") or []:
        ref = ep.get("targetRef") or {}
        cond = ep.get("conditions") or {}
        endpoints.append({
            "addresses": [str(a) for a in ep.get("addresses") or []],
            "ready": cond.get("ready") is not False,  # unset means ready
            "pod": str(ref.get("name", "")) if ref.get("kind") == "Pod" else "",
            "node": str(ep.get("nodeName") or ""),
        })
    return {
        "v": 1, "kind": "endpointslice", "uid": str(meta.get("uid", "")),
        "namespace": str(meta.get("namespace", "")), "name": str(meta.get("name", "")),
        "service": str(_labels(meta).get("kubernetes.io/service-name", "")),
        "address_type": str(obj.get("addressType", "")),
        "ports": [{"name": str(p.get("name") or ""), "protocol": str(p.get("protocol", "TCP")),
                   "port": int(p.get("port") or 0)} for p in obj.get("ports") or []],
        "endpoints": endpoints,
    }


def node_record(obj: dict[str, Any]) -> dict[str, Any]:
    meta, spec, status = _meta(obj), obj.get("spec") or {}, obj.get("status") or {}
    return {
        "v": 1, "kind": "node", "uid": str(meta.get("uid", "")),
        "namespace": "", "name": str(meta.get("name", "")),
        "addresses": [{"type": str(a.get("type", "")), "address": str(a.get("address", ""))}
                      for a in status.get("addresses") or []],
        "pod_cidrs": [str(c) for c in spec.get("podCIDRs") or []],
    }


def workload_record(kind: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def build(obj: dict[str, Any]) -> dict[str, Any]:
        meta, spec = _meta(obj), obj.get("spec") or {}
        owner_kind, owner_name = controller_of(obj)
        selector = (spec.get("selector") or {}).get("matchLabels") or {}
        return {
            "v": 1, "kind": "workload", "workload_kind": kind, "uid": str(meta.get("uid", "")),
            "namespace": str(meta.get("namespace", "")), "name": str(meta.get("name", "")),
            "owner_kind": owner_kind, "owner_name": owner_name,
            "selector": {str(k): str(v) for k, v in selector.items()},
        }
    return build


def record_key(record: dict[str, Any]) -> str:
    kind = record["kind"]
    if kind == "node":
        return f"node/{record['name']}"
    if kind == "workload":
        return f"workload/{record['workload_kind']}/{record['namespace']}/{record['name']}"
    return f"{kind}/{record['namespace']}/{record['name']}"


@dataclasses.dataclass(frozen=True)
class Resource:
    """One kind the watcher follows: where it lives in the API and how it becomes a record."""

    name: str  # for logs and counters: "pods"
    path: str  # the cluster-wide collection: "/api/v1/pods"
    build: Callable[[dict[str, Any]], dict[str, Any]]
    key_prefix: str  # every key of this kind starts with it (relists tombstone by prefix)


RESOURCES: tuple[Resource, ...] = (
    Resource("replicasets", "/apis/apps/v1/replicasets", workload_record("ReplicaSet"),
             "workload/ReplicaSet/"),
    Resource("jobs", "/apis/batch/v1/jobs", workload_record("Job"), "workload/Job/"),
    Resource("deployments", "/apis/apps/v1/deployments", workload_record("Deployment"),
             "workload/Deployment/"),
    Resource("statefulsets", "/apis/apps/v1/statefulsets", workload_record("StatefulSet"),
             "workload/StatefulSet/"),
    Resource("daemonsets", "/apis/apps/v1/daemonsets", workload_record("DaemonSet"),
             "workload/DaemonSet/"),
    Resource("nodes", "/api/v1/nodes", node_record, "node/"),
    Resource("services", "/api/v1/services", service_record, "service/"),
    Resource("endpointslices", "/apis/discovery.k8s.io/v1/endpointslices", endpointslice_record,
             "endpointslice/"),
    Resource("pods", "/api/v1/pods", pod_record, "pod/"),
)
_ABSENT, _ON_TOPIC = object(), object()  # not published / published by an earlier run
# Pods are named through these owners: their first list completes before pods are listed.
PREREQUISITES = ("replicasets", "jobs")
# An intermediate owner → the kind that owns it in turn names the workload.
_OWNED_THROUGH = {"ReplicaSet": "workload/ReplicaSet/", "Job": "workload/Job/"}


# -- the API server -------------------------------------------------------------------------------
def load_api_client(kubeconfig: str = "") -> Any:
    """A ``kubernetes.client.ApiClient``: the given kubeconfig, else $KUBECONFIG or
    ~/.kube/config, else the in-cluster service account."""
    from kubernetes import client as kube_client
    from kubernetes import config as kube_config

    path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    if not path and (Path.home() / ".kube" / "config").exists():
        path = str(Path.home() / ".kube" / "config")
    try:
        if path:
            return kube_config.new_client_from_config(  # type: ignore[no-untyped-call]
                config_file=path)
        configuration = kube_client.Configuration()
        kube_config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration)
        return kube_client.ApiClient(configuration)
    except (kube_config.ConfigException, OSError, ValueError) as exc:
        where = path or "the in-cluster service account"
        raise MetadataConfigError(f"no usable Kubernetes configuration in {where}: {exc}"
                                  ) from exc


def cluster_configured(kubeconfig: str = "") -> bool:
    """Whether a metadata watcher would find an API server to talk to (cheap: files only)."""
    if kubeconfig:
        return Path(kubeconfig).exists()
    env = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    if env:
        return Path(env).exists()
    if (Path.home() / ".kube" / "config").exists():
        return True
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and IN_CLUSTER_TOKEN.exists()


class _API:
    """GET a collection as plain JSON (no model classes: a pod is a dict, cheaply)."""

    def __init__(self, api_client: Any) -> None:
        self.client = api_client

    def _get(self, path: str, query: list[tuple[str, Any]], timeout: tuple[float, float]) -> Any:
        from kubernetes.client.exceptions import ApiException

        req = self.client.param_serialize(
            method="GET", resource_path=path, query_params=query,
            header_params={"Accept": "application/json"}, auth_settings=["BearerToken"])
        resp = self.client.call_api(*req, _request_timeout=timeout)
        if not 200 <= resp.status <= 299:
            data = resp.read()
            if resp.status == 410:
                raise Gone(path)
            if resp.status in (401, 403):
                try:
                    message = str(json.loads(data).get("message", ""))
                except (ValueError, AttributeError):
                    message = ""
                raise Refused(path, resp.status, message or (data or b"")[:300].decode(
                    "utf-8", "replace"))
            raise ApiException.from_response(http_resp=resp, body=None, data=None)
        return resp.response

    def list(self, path: str) -> tuple[list[dict[str, Any]], str]:
        """Every object of the collection (paginated) and the list's resourceVersion."""
        items: list[dict[str, Any]] = []
        token, version = "", ""
        while True:
            query: list[tuple[str, Any]] = [("limit", PAGE_SIZE)]
            if token:
                query.append(("continue", token))
            resp = self._get(path, query, (10.0, 60.0))
            try:
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            items += body.get("items") or []
            meta = body.get("metadata") or {}
            version = version or str(meta.get("resourceVersion", ""))
            token = str(meta.get("continue") or "")
            if not token:
                return items, version

    def watch(self, path: str, version: str, timeout_s: int) -> Iterator[dict[str, Any]]:
        """Watch events from ``version`` until the server ends the request."""
        query: list[tuple[str, Any]] = [
            ("watch", "true"), ("resourceVersion", version), ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", timeout_s)]
        resp = self._get(path, query, (10.0, timeout_s + 30.0))
        try:
            pending = b""
            for chunk in resp.stream(64 * 1024, decode_content=True):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
        finally:
            resp.release_conn()


# -- the watcher ----------------------------------------------------------------------------------
class MetadataWatcher:
    """Follows every kind in ``RESOURCES`` and publishes compact records through ``publish``.

    ``publish(key, record_or_None)`` is called from the per-kind threads (a Kafka producer is
    thread-safe); the runner below wires it to ``k8s.v1``.
    """

    def __init__(self, api_client: Any, publish: Callable[[str, dict[str, Any] | None], None], *,
                 watch_timeout_s: int = 300, known_keys: set[str] | None = None) -> None:
        self._api = _API(api_client)
        self._publish = publish
        self.watch_timeout_s = watch_timeout_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # key → record as last published; keys found on the topic at start: _ON_TOPIC.
        self._published: dict[str, object] = dict.fromkeys(known_keys or (), _ON_TOPIC)
        self._records: dict[str, dict[str, Any]] = {}  # key → latest record, all kinds
        self._listed = {r.name: threading.Event() for r in RESOURCES}
        self._threads: list[threading.Thread] = []
        self.counters: dict[str, int] = {}

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + n

    # -- life cycle -----------------------------------------------------------------------------
    def start(self) -> None:
        for res in RESOURCES:
            t = threading.Thread(target=self._follow, args=(res,), name=f"meta-{res.name}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()

    def synced(self) -> bool:
        """Every kind has been listed at least once."""
        return all(e.is_set() for e in self._listed.values())

    # -- one kind -------------------------------------------------------------------------------
    def _follow(self, res: Resource) -> None:
        if res.name == "pods":
            for name in PREREQUISITES:  # name pods by Deployment/CronJob from the first list
                self._listed[name].wait(PREREQUISITE_WAIT_S)
        backoff = BACKOFF_MIN_S
        version = ""
        while not self._stop.is_set():
            try:
                if not version:
                    version = self._relist(res)
                    self._listed[res.name].set()
                for event in self._api.watch(res.path, version, self.watch_timeout_s):
                    version = self._on_event(res, event) or version
                    backoff = BACKOFF_MIN_S
                    if self._stop.is_set():
                        return
            except Gone:
                log.info("%s: resourceVersion %s is gone; listing again", res.name, version)
                self.count(f"{res.name}_resyncs")
                version = ""
            except Refused as exc:  # not a passing fault: say what the account lacks
                self.count(f"{res.name}_errors")
                log.error("%s: the API server refuses to let this account list and watch %s "
                          "(%s); it needs the verbs list and watch on them, as the "
                          "ClusterRole in deploy/kubernetes/meta.yaml grants; retrying in "
                          "%.1fs", res.name, res.path, exc, backoff)
                self._stop.wait(backoff * random.uniform(0.8, 1.2))
                backoff = min(BACKOFF_MAX_S, backoff * 2)
            except Exception as exc:  # noqa: BLE001 - connection errors, 5xx, bad JSON: retry
                self.count(f"{res.name}_errors")
                log.warning("%s: %s: %s; retrying in %.1fs", res.name, type(exc).__name__,
                            str(exc)[:300], backoff)
                self._stop.wait(backoff * random.uniform(0.8, 1.2))
                backoff = min(BACKOFF_MAX_S, backoff * 2)

    def _relist(self, res: Resource) -> str:
        items, version = self._api.list(res.path)
        seen = set()
        for obj in items:
            seen.add(self._upsert(res, obj))
        with self._lock:
            gone = [k for k in self._published if k.startswith(res.key_prefix) and k not in seen]
        for key in gone:
            self._delete(res, key)
        self.count(f"{res.name}_lists")
        log.info("%s: listed %d at resourceVersion %s (%d gone)", res.name, len(items), version,
                 len(gone))
        return version

    def _on_event(self, res: Resource, event: dict[str, Any]) -> str:
        """Apply one watch event; returns the resourceVersion it carries."""
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone(res.path)
            raise RuntimeError(f"watch error: {obj.get('message', obj)}")
        if kind != "BOOKMARK":
            self.count(f"{res.name}_events")
        if kind in ("ADDED", "MODIFIED"):
            self._upsert(res, obj)
        elif kind == "DELETED":
            self._delete(res, record_key(res.build(obj)))
        return str(_meta(obj).get("resourceVersion", ""))

    # -- records --------------------------------------------------------------------------------
    def _upsert(self, res: Resource, obj: dict[str, Any]) -> str:
        record = res.build(obj)
        key = record_key(record)
        with self._lock:
            self._records[key] = record
        if record["kind"] == "pod":
            self._send(key, self._resolve_pod(record))
        else:
            self._send(key, record)
            if record["kind"] == "workload" and record["workload_kind"] in _OWNED_THROUGH:
                self._renew_owned_pods(record)
        return key

    def _delete(self, res: Resource, key: str) -> None:
        with self._lock:
            self._records.pop(key, None)
        self._send(key, None)

    def _resolve_pod(self, pod: dict[str, Any]) -> dict[str, Any]:
        """Name the pod by the workload at the top of its controller chain."""
        kind, name = pod["owner_kind"], pod["owner_name"]
        prefix = _OWNED_THROUGH.get(kind)
        if prefix is not None:
            with self._lock:
                owner = self._records.get(f"{prefix}{pod['namespace']}/{name}")
            if owner is not None and owner["owner_kind"]:
                kind, name = owner["owner_kind"], owner["owner_name"]
        if not kind:
            kind, name = "Pod", pod["name"]
        return {**pod, "workload_kind": kind, "workload_name": name}

    def _renew_owned_pods(self, owner: dict[str, Any]) -> None:
        """A ReplicaSet or Job (re)appeared: pods it owns may now resolve to its owner."""
        with self._lock:
            pods = [r for k, r in self._records.items()
                    if k.startswith("pod/") and r["namespace"] == owner["namespace"]
                    and (r["owner_kind"], r["owner_name"]) == (owner["workload_kind"],
                                                               owner["name"])]
        for pod in pods:
            self._send(record_key(pod), self._resolve_pod(pod))

    def _send(self, key: str, record: dict[str, Any] | None) -> None:
        with self._lock:
            previous = self._published.get(key, _ABSENT)
            if record is None:
                if previous is _ABSENT:
                    return
                del self._published[key]
            else:
                if previous == record:
                    return
                self._published[key] = record
        self._publish(key, record)
        self.count("tombstones" if record is None else "records")


# -- the component ------------------------------------------------------------------------------
def read_keys(config: Config, timeout: float = 30.0) -> set[str]:
    """The live keys on k8s.v1 (latest value not a tombstone), read to the end of the topic."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    topic = config.topic("k8s.v1")
    consumer = Consumer({**config.kafka.librdkafka(), "logger": RdkafkaLog("kubesight.meta.kafka"),
                         "group.id": "kubesight-meta-keys",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    live: dict[str, bool] = {}
    try:
        meta = consumer.list_topics(topic, timeout=10)
        parts = meta.topics[topic].partitions if topic in meta.topics else {}
        assign, ends = [], {}
        for p in parts:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                assign.append(TopicPartition(topic, p, low))
                ends[p] = high
        if assign:
            consumer.assign(assign)
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            for m in consumer.consume(num_messages=1000, timeout=0.5):
                if m.error():
                    continue
                key, offset, partition = m.key(), m.offset() or 0, m.partition() or 0
                if isinstance(key, bytes):
                    live[key.decode()] = m.value() is not None
                if offset + 1 >= ends.get(partition, 0):
                    ends.pop(partition, None)
        if ends:
            log.warning("k8s.v1 not read to its end within %.0fs; stale keys may remain",
                        timeout)
    except KafkaException as exc:
        log.warning("cannot read k8s.v1 back (%s); stale keys may remain", exc)
    finally:
        consumer.close()
    return {k for k, alive in live.items() if alive}


class MetaRunner:
    """``kubesight meta``: the watcher, a Kafka producer, health records."""

    def __init__(self, config: Config) -> None:
        from confluent_kafka import Producer

        self.config = config
        self.instance = f"{int(time.time())}-{os.getpid()}"
        self._stop = threading.Event()
        self._api_client = load_api_client(config.kubernetes.kubeconfig)
        self._producer = Producer({**config.kafka.librdkafka(), "enable.idempotence": True,
                                   "logger": RdkafkaLog("kubesight.meta.kafka"),
                                   "linger.ms": 50, "compression.type": "lz4"})
        self._topic = config.topic("k8s.v1")
        self._delivery_errors = 0
        self._next_health = 0.0
        self.watcher = MetadataWatcher(
            self._api_client, self._produce,
            watch_timeout_s=config.kubernetes.watch_timeout_s,
            known_keys=read_keys(config))

    def _on_delivery(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self._delivery_errors += 1
            log.error("k8s.v1 delivery failed: %s", err)

    def _produce(self, key: str, record: dict[str, Any] | None) -> None:
        value = None if record is None else msgpack.packb(record)
        while True:
            try:
                self._producer.produce(self._topic, key=key.encode(), value=value,
                                       on_delivery=self._on_delivery)
                break
            except BufferError:  # the local queue is full (broker down): wait, never drop
                self._producer.poll(0.5)
        self._producer.poll(0)

    def stop(self, *_: Any) -> None:
        self._stop.set()

    def run(self) -> None:
        self.watcher.start()
        log.info("metadata watcher %s following %s into %s", self.instance,
                 ", ".join(r.name for r in RESOURCES), self._topic)
        announced = False
        try:
            while not self._stop.wait(0.2):
                self._producer.poll(0)
                if not announced and self.watcher.synced():
                    log.info("synced: every kind listed")
                    announced = True
                if time.monotonic() >= self._next_health:
                    self._publish_health()
                    self._next_health = time.monotonic() + HEALTH_INTERVAL_S
        finally:
            self.watcher.stop()
            self._publish_health()
            left = self._producer.flush(30)
            if left:
                log.error("%d k8s.v1 messages not acknowledged at exit", left)

    def _publish_health(self) -> None:
        counters = dict(self.watcher.counters)
        counters["delivery_errors"] = self._delivery_errors
        record = {"v": 1, "component": "meta", "node": self.config.node_name,
                  "instance": self.instance, "ts": time.time(), "counters": counters}
        self._producer.produce(self.config.topic("health.v1"),
                               key=f"{self.config.node_name}/meta".encode(),
                               value=msgpack.packb(record))


def run(config: Config) -> None:
    from .process import run_component

    run_component("meta", config, MetaRunner)
