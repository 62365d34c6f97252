"""A real Kubernetes control plane for the tests: Debian's etcd and the upstream kube-apiserver.

``make apiserver`` builds kube-apiserver from Go modules (``deploy/apiserver``) into ``.cache/``;
etcd is Debian's ``etcd-server``. Both run as this test session's children on loopback ports
chosen free at start, with their data, keys and logs in a temporary directory:

- etcd: a single member, its own data dir;
- kube-apiserver: TLS with a CA made here (so clients verify the server), an admin bearer token
  from a static token file (group ``system:masters``), RBAC authorization as in a real cluster
  (so a service account may do what its roles grant and nothing more), a generated
  service-account signing key (tokens come from the TokenRequest API), services from
  ``10.96.0.0/16``.

There is no kubelet, controller manager or scheduler: tests create what those would (ReplicaSets
owned by Deployments, pods with their status set through the status subresource, the
namespace's ``default`` service account).

The session fixture ``kube_apiserver`` (tests/conftest.py) skips with the reason when the binary
or etcd is missing.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

import yaml

from kubesight.config import Config

REPO = Path(__file__).resolve().parents[1]
APISERVER_BIN = Path(os.environ.get("KUBESIGHT_TEST_APISERVER", REPO / ".cache" / "kube-apiserver"))
ETCD_BIN = shutil.which("etcd") or "/usr/bin/etcd"
SERVICE_CIDR = "10.96.0.0/16"


def missing_reason() -> str | None:
    """Why a real API server cannot be had here, or None."""
    if not APISERVER_BIN.exists():
        return f"{APISERVER_BIN} is missing: run `make apiserver` (builds it from Go modules)"
    if not Path(ETCD_BIN).exists():
        return "etcd is missing: install Debian's etcd-server (`make apt`)"
    return None


def _free_ports(n: int) -> list[int]:
    from tests.conftest import free_ports

    return free_ports(n)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


class _Process:
    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name, self.argv, self.log = name, argv, log
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    def start(self) -> None:
        self._out = open(self.log, "ab")  # noqa: SIM115 (kept open for the child)
        self.proc = subprocess.Popen(self.argv, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._out is not None:
            self._out.close()
            self._out = None


class KubeAPIServer:
    """etcd + kube-apiserver on loopback. ``start()`` returns once ``/readyz`` says ok."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        etcd_client, etcd_peer, self.port = _free_ports(3)
        self.url = f"https://127.0.0.1:{self.port}"
        self.etcd_url = f"http://127.0.0.1:{etcd_client}"
        self.token = secrets.token_hex(16)
        self.ca_file = self.dir / "ca.crt"
        self.kubeconfig = self.dir / "kubeconfig"
        self._make_credentials()
        peer = f"http://127.0.0.1:{etcd_peer}"
        self.etcd = _Process("etcd", [
            ETCD_BIN, "--name", "kubesight-test", "--data-dir", str(self.dir / "etcd"),
            "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"kubesight-test={peer}", "--logger", "zap",
            "--log-level", "warn", "--quota-backend-bytes", str(1 << 30),
        ], self.dir / "etcd.log")
        self.apiserver = _Process("kube-apiserver", [
            str(APISERVER_BIN),
            "--etcd-servers", self.etcd_url,
            "--bind-address", "127.0.0.1", "--secure-port", str(self.port),
            "--advertise-address", "127.0.0.1",
            "--tls-cert-file", str(self.dir / "apiserver.crt"),
            "--tls-private-key-file", str(self.dir / "apiserver.key"),
            "--token-auth-file", str(self.dir / "tokens.csv"),
            "--authorization-mode", "RBAC",
            "--service-account-issuer", "https://kubernetes.default.svc",
            "--service-account-key-file", str(self.dir / "sa.key"),
            "--service-account-signing-key-file", str(self.dir / "sa.key"),
            "--service-cluster-ip-range", SERVICE_CIDR,
            # No kubelet answers on 127.0.0.1: keep the `kubernetes` service's endpoints out.
            "--endpoint-reconciler-type", "none",
            "--profiling=false",
        ], self.dir / "apiserver.log")

    def _make_credentials(self) -> None:
        d = self.dir
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
                 "-out", "ca.crt", "-days", "2", "-subj", "/CN=kubesight-test-ca", cwd=d)
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver.key",
                 "-out", "apiserver.csr", "-subj", "/CN=kube-apiserver", cwd=d)
        (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                   "extendedKeyUsage=serverAuth\n")
        _openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", "apiserver.crt", "-days", "2",
                 "-extfile", "san.ext", cwd=d)
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
        (d / "tokens.csv").write_text(f"{self.token},kubesight-admin,1,system:masters\n")
        kubeconfig = {
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {
                "server": self.url, "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
        }
        self.kubeconfig.write_text(yaml.safe_dump(kubeconfig))

    # -- life cycle -------------------------------------------------------------------------
    def start(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        if not self.etcd.alive():
            self.etcd.start()
            self._wait("etcd /health", self._etcd_healthy, deadline, self.etcd)
        self.start_apiserver(deadline - time.monotonic())

    def start_apiserver(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        self.apiserver.start()
        self._wait("kube-apiserver /readyz", self.ready, deadline, self.apiserver)

    def stop_apiserver(self) -> None:
        self.apiserver.stop()

    def stop(self) -> None:
        self.apiserver.stop()
        self.etcd.stop()

    def _wait(self, what: str, check: Any, deadline: float, proc: _Process) -> None:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited while waiting for {what}:\n"
                                   f"{proc.tail()}")
            if check():
                return
            time.sleep(0.25)
        raise RuntimeError(f"timed out waiting for {what}:\n{proc.tail()}")

    def _etcd_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as resp:
                return b'"true"' in resp.read()
        except (OSError, urllib.error.URLError):
            return False

    def ready(self) -> bool:
        """``GET /readyz`` answers ok (every readiness check passes)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        req = urllib.request.Request(f"{self.url}/readyz",
                                     headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=3, context=ctx) as resp:
                return resp.status == 200 and resp.read().strip() == b"ok"
        except (OSError, urllib.error.URLError):
            return False

    # -- clients ----------------------------------------------------------------------------
    def kubeconfig_for(self, token: str, path: Path) -> Path:
        """A kubeconfig for another identity (a service account's token) on this server."""
        config = yaml.safe_load(self.kubeconfig.read_text())
        config["users"] = [{"name": "admin", "user": {"token": token}}]
        path.write_text(yaml.safe_dump(config))
        return path

    def api_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` for the admin user (verifies the server's cert)."""
        from kubernetes import config as kube_config

        return kube_config.new_client_from_config(config_file=str(self.kubeconfig))


class Kube:
    """What the tests do with the API server, as plain JSON requests (the objects a
    kubelet, a scheduler and the controllers would create or update are made here)."""

    def __init__(self, api_client: Any) -> None:
        self.client = api_client

    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json") -> Any:
        import json

        req = self.client.param_serialize(
            method=method, resource_path=path, body=body, auth_settings=["BearerToken"],
            header_params={"Accept": "application/json", "Content-Type": content_type})
        resp = self.client.call_api(*req, _request_timeout=(5, 30))
        data = resp.read()
        if not 200 <= resp.status <= 299:
            raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {data[:2000]!r}")
        return json.loads(data) if data else None

    # -- objects ----------------------------------------------------------------------------
    COLLECTIONS = {  # kind → its collection (namespaced ones with {ns})
        "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
        "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
    }

    def apply(self, obj: dict[str, Any]) -> None:
        """Create ``obj`` (a manifest's document), or replace the one of that name."""
        meta = obj["metadata"]
        coll = self.COLLECTIONS[obj["kind"]].format(ns=meta.get("namespace", ""))
        try:
            self.request("POST", coll, obj)
        except RuntimeError as exc:
            if "HTTP 409" not in str(exc):
                raise
            current = self.request("GET", f"{coll}/{meta['name']}")
            body = {**obj, "metadata": {**meta, "resourceVersion":
                                        current["metadata"]["resourceVersion"]}}
            self.request("PUT", f"{coll}/{meta['name']}", body)

    def token(self, ns: str, service_account: str, seconds: int = 3600) -> str:
        """A token for a service account, from the TokenRequest API (as a kubelet gets one)."""
        resp = self.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts/"
                            f"{service_account}/token",
                            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                             "spec": {"expirationSeconds": seconds}})
        return str(resp["status"]["token"])

    def namespace(self, name: str) -> None:
        """A namespace and its ``default`` service account (the controller manager's job;
        the ServiceAccount admission plugin refuses pods without it)."""
        self.request("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
        self.request("POST", f"/api/v1/namespaces/{name}/serviceaccounts",
                     {"metadata": {"name": "default"}})

    def delete_namespace(self, name: str) -> None:
        self.request("DELETE", f"/api/v1/namespaces/{name}")

    def node(self, name: str, ip: str, pod_cidr: str = "") -> dict[str, Any]:
        body: dict[str, Any] = {"metadata": {"name": name}, "spec": {}}
        if pod_cidr:
            body["spec"] = {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]}
        node: dict[str, Any] = self.request("POST", "/api/v1/nodes", body)
        self.request("PATCH", f"/api/v1/nodes/{name}/status", {"status": {"addresses": [
            {"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}},
            "application/merge-patch+json")
        return node

    def delete_node(self, name: str) -> None:
        self.request("DELETE", f"/api/v1/nodes/{name}")

    @staticmethod
    def _template(labels: dict[str, str]) -> dict[str, Any]:
        return {"metadata": {"labels": labels},
                "spec": {"containers": [{"name": "app", "image": "kubesight.test/app:1"}]}}

    @staticmethod
    def owner(obj: dict[str, Any]) -> dict[str, Any]:
        """An ownerReference to ``obj`` as its controller."""
        return {"apiVersion": obj["apiVersion"], "kind": obj["kind"],
                "name": obj["metadata"]["name"], "uid": obj["metadata"]["uid"],
                "controller": True, "blockOwnerDeletion": True}

    def deployment(self, ns: str, name: str, labels: dict[str, str]) -> dict[str, Any]:
        body = {"metadata": {"name": name, "labels": labels},
                "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                         "template": self._template(labels)}}
        obj: dict[str, Any] = self.request("POST", f"/apis/apps/v1/namespaces/{ns}/deployments",
                                           body)
        return obj

    def replicaset(self, ns: str, deployment: dict[str, Any], pod_hash: str) -> dict[str, Any]:
        """The ReplicaSet the deployment controller would make for the current template."""
        labels = {**deployment["spec"]["selector"]["matchLabels"], "pod-template-hash": pod_hash}
        body = {"metadata": {"name": f"{deployment['metadata']['name']}-{pod_hash}",
                             "labels": labels, "ownerReferences": [self.owner(deployment)]},
                "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                         "template": self._template(labels)}}
        obj: dict[str, Any] = self.request("POST", f"/apis/apps/v1/namespaces/{ns}/replicasets",
                                           body)
        return obj

    def pod(self, ns: str, name: str, *, labels: dict[str, str], node: str,
            owner: dict[str, Any] | None = None, ip: str = "", container_id: str = "",
            host_network: bool = False) -> dict[str, Any]:
        """A pod bound to ``node``; with ``ip`` its status is set as the kubelet would once the
        sandbox and the container run."""
        meta: dict[str, Any] = {"name": name, "labels": labels}
        if owner is not None:
            meta["ownerReferences"] = [self.owner(owner)]
        spec = self._template(labels)["spec"]
        spec.update({"nodeName": node, "hostNetwork": host_network,
                     "automountServiceAccountToken": False})
        obj: dict[str, Any] = self.request("POST", f"/api/v1/namespaces/{ns}/pods",
                                           {"metadata": meta, "spec": spec})
        if ip:
            obj = self.pod_status(ns, name, ip=ip, container_id=container_id)
        return obj

    def pod_status(self, ns: str, name: str, *, ip: str, container_id: str = "") -> dict[str, Any]:
        status: dict[str, Any] = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                                  "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}]}
        if container_id:
            status["containerStatuses"] = [{
                "name": "app", "image": "kubesight.test/app:1", "imageID": "",
                "containerID": f"containerd://{container_id}", "ready": True,
                "restartCount": 0, "started": True,
                "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]
        obj: dict[str, Any] = self.request(
            "PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status", {"status": status},
            "application/merge-patch+json")
        return obj

    def delete_pod(self, ns: str, name: str) -> None:
        # No kubelet will confirm the container stopped: delete at once, as `--force` does.
        self.request("DELETE", f"/api/v1/namespaces/{ns}/pods/{name}",
                     {"gracePeriodSeconds": 0})

    def service(self, ns: str, name: str, *, selector: dict[str, str], port: int,
                target_port: int) -> dict[str, Any]:
        body = {"metadata": {"name": name},
                "spec": {"selector": selector, "ports": [
                    {"name": "http", "protocol": "TCP", "port": port,
                     "targetPort": target_port}]}}
        obj: dict[str, Any] = self.request("POST", f"/api/v1/namespaces/{ns}/services", body)
        return obj

    def endpointslice(self, ns: str, service: str, *, port: int,
                      endpoints: list[tuple[str, str, str]]) -> dict[str, Any]:
        """The slice the endpointslice controller would make: (ip, pod name, node) each."""
        body = {
            "metadata": {"name": f"{service}-abcde",
                         "labels": {"kubernetes.io/service-name": service,
                                    "endpointslice.kubernetes.io/managed-by": "kubesight-test"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "protocol": "TCP", "port": port}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": node,
                           "targetRef": {"kind": "Pod", "namespace": ns, "name": pod}}
                          for ip, pod, node in endpoints],
        }
        obj: dict[str, Any] = self.request(
            "POST", f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", body)
        return obj


def read_latest(config: Config, timeout: float = 20) -> dict[str, Any]:
    """key → latest value (None: tombstone) on k8s.v1, read to the end."""
    import msgpack
    from confluent_kafka import Consumer, TopicPartition

    topic = config.topic("k8s.v1")
    consumer = Consumer({**config.kafka.librdkafka(), "group.id": "kubesight-tests",
                         "enable.auto.commit": False})
    latest: dict[str, Any] = {}
    try:
        meta = consumer.list_topics(topic, timeout=10)
        ends, assign = {}, []
        for p in meta.topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
                assign.append(TopicPartition(topic, p, low))
        if assign:
            consumer.assign(assign)
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            for m in consumer.consume(num_messages=1000, timeout=0.5):
                if m.error():
                    continue
                value = m.value()
                latest[m.key().decode()] = msgpack.unpackb(value) if value else None
                if m.offset() + 1 >= ends.get(m.partition(), 0):
                    ends.pop(m.partition(), None)
        assert not ends, f"could not read {topic} to its end"
        return latest
    finally:
        consumer.close()
