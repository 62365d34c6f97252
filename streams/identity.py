"""Kubernetes identity for the stream workers: who an address or a container is.

Fed with the records of ``k8s.v1`` (the metadata watcher's compacted topic, read from its start
by every worker) and asked by the reassembler while it names the two ends of a request:

    pod IP            → pod (namespace, workload, pod, node)     host-network pods excluded:
    container id      → pod                                        their IPs are the node's
    pod UID           → pod
    cluster IP, port  → service, and the one workload behind it when its endpoints agree
    endpoint IP, port → the service whose EndpointSlices list it, when exactly one does (the
                        service a pod serves, seen from the server side or a direct call)

Plain Python on plain data, no Faust: a record replaces what its key said before, and a
tombstone (None) removes it. An index entry is removed only if it still points at the record
being replaced, so a pod IP reused by a newer pod survives the older pod's late tombstone.
``K8sFollower`` reads the topic into a table; the stream workers and the sink runner (which
names top-N pods) each keep one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .follow import CompactedFollower

__all__ = ["IdentityTable", "K8sFollower", "PodIdentity", "ServiceIdentity"]

_TERMINATED = ("Succeeded", "Failed")  # their IPs may already belong to another pod


@dataclasses.dataclass(frozen=True, slots=True)
class PodIdentity:
    key: str  # the k8s.v1 key it came from
    namespace: str
    workload: str  # the Deployment/StatefulSet/DaemonSet/Job/CronJob name, or the pod's
    workload_kind: str
    pod: str
    node: str
    uid: str


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceIdentity:
    key: str
    namespace: str
    name: str


class IdentityTable:
    def __init__(self) -> None:
        self._records: dict[str, dict[str, Any]] = {}
        self._pods: dict[str, PodIdentity] = {}  # k8s.v1 key → identity
        self.pods_by_ip: dict[str, PodIdentity] = {}
        self.pods_by_container: dict[str, PodIdentity] = {}
        self.pods_by_uid: dict[str, PodIdentity] = {}
        self.services_by_address: dict[tuple[str, int], ServiceIdentity] = {}
        # service key → pod names behind it (from its endpointslices), per slice
        self._backends: dict[str, dict[str, set[str]]] = {}
        # (endpoint IP, port) → the endpointslice keys listing it → their service
        self._endpoints: dict[tuple[str, int], dict[str, ServiceIdentity]] = {}
        self.applied = 0

    def __len__(self) -> int:
        return len(self._records)

    # -- feeding ----------------------------------------------------------------------------
    def apply(self, key: str, record: dict[str, Any] | None) -> None:
        """One k8s.v1 message: the latest record for ``key``, or None when deleted."""
        old = self._records.pop(key, None)
        if old is not None:
            self._unindex(key, old)
        if record is not None:
            self._records[key] = record
            self._index(key, record)
        self.applied += 1

    def _index(self, key: str, rec: dict[str, Any]) -> None:
        kind = rec.get("kind")
        if kind == "pod":
            ident = PodIdentity(key, rec["namespace"], rec["workload_name"],
                                rec["workload_kind"], rec["name"], rec["node"], rec["uid"])
            self._pods[key] = ident
            if not rec["host_network"] and rec["phase"] not in _TERMINATED:
                for ip in rec["ips"]:
                    self.pods_by_ip[ip] = ident
            for c in rec["containers"]:
                self.pods_by_container[c["id"]] = ident
            if rec["uid"]:
                self.pods_by_uid[rec["uid"]] = ident
        elif kind == "service":
            svc = ServiceIdentity(key, rec["namespace"], rec["name"])
            for ip in rec["cluster_ips"]:
                for port in rec["ports"]:
                    self.services_by_address[(ip, int(port["port"]))] = svc
        elif kind == "endpointslice":
            svc_key = f"service/{rec['namespace']}/{rec['service']}"
            pods = {e["pod"] for e in rec["endpoints"] if e["pod"]}
            self._backends.setdefault(svc_key, {})[key] = pods
            svc = ServiceIdentity(svc_key, rec["namespace"], rec["service"])
            for address in _slice_addresses(rec):
                self._endpoints.setdefault(address, {})[key] = svc

    def _unindex(self, key: str, rec: dict[str, Any]) -> None:
        kind = rec.get("kind")
        if kind == "pod":
            ident = self._pods.pop(key, None)
            for ip in rec["ips"]:
                _drop(self.pods_by_ip, ip, ident)
            for c in rec["containers"]:
                _drop(self.pods_by_container, c["id"], ident)
            _drop(self.pods_by_uid, rec["uid"], ident)
        elif kind == "service":
            for ip in rec["cluster_ips"]:
                for port in rec["ports"]:
                    address = (ip, int(port["port"]))
                    if (found := self.services_by_address.get(address)) and found.key == key:
                        del self.services_by_address[address]
        elif kind == "endpointslice":
            svc_key = f"service/{rec['namespace']}/{rec['service']}"
            slices = self._backends.get(svc_key, {})
            slices.pop(key, None)
            if not slices:
                self._backends.pop(svc_key, None)
            for address in _slice_addresses(rec):
                listed = self._endpoints.get(address, {})
                listed.pop(key, None)
                if not listed:
                    self._endpoints.pop(address, None)

    # -- asking -----------------------------------------------------------------------------
    def pod_for_ip(self, ip: str) -> PodIdentity | None:
        return self.pods_by_ip.get(ip)

    def pod_for_container(self, container_id: str) -> PodIdentity | None:
        return self.pods_by_container.get(container_id) if container_id else None

    def pod_for_uid(self, uid: str) -> PodIdentity | None:
        return self.pods_by_uid.get(uid) if uid else None

    def service_for(self, ip: str, port: int) -> ServiceIdentity | None:
        return self.services_by_address.get((ip, port))

    def service_of_endpoint(self, ip: str, port: int) -> ServiceIdentity | None:
        """The service whose EndpointSlices list ip:port (a pod's IP and target port), when
        exactly one service does; None for none or several (ambiguous: left unnamed)."""
        services = {svc.key: svc for svc in self._endpoints.get((ip, port), {}).values()}
        return next(iter(services.values())) if len(services) == 1 else None

    def called_service(self, addr: str, port: int, *, cluster_ip: bool) -> str:
        """The name of the service a call to addr:port went to, or "": the owner of that
        cluster IP (when ``cluster_ip``: the caller's view), else the one service listing it as
        an endpoint (a pod called directly, or the server's own address)."""
        svc = ((self.service_for(addr, port) if cluster_ip else None)
               or self.service_of_endpoint(addr, port))
        return svc.name if svc is not None else ""

    def service_workload(self, svc: ServiceIdentity) -> tuple[str, str] | None:
        """(namespace, workload) behind a service when all its known endpoints belong to one
        workload (a Deployment's replicas); None when they differ or none is known."""
        names: set[str] = set()
        for pods in self._backends.get(svc.key, {}).values():
            names |= pods
        workloads = set()
        for name in names:
            ident = self._pods.get(f"pod/{svc.namespace}/{name}")
            if ident is not None:
                workloads.add(ident.workload)
        if len(workloads) == 1:
            return svc.namespace, workloads.pop()
        return None


def _slice_addresses(rec: dict[str, Any]) -> set[tuple[str, int]]:
    """(IP, port) of every endpoint × port of an endpointslice record (DNS serves UDP too)."""
    ports = [int(p["port"]) for p in rec["ports"] if int(p["port"])]
    return {(ip, port) for e in rec["endpoints"] for ip in e.get("addresses", ()) for port in ports}


def _drop(index: dict[str, PodIdentity], k: str, ident: PodIdentity | None) -> None:
    if ident is not None and index.get(k) is ident:
        del index[k]


class K8sFollower(CompactedFollower):
    """Reads every partition of ``k8s.v1`` from its start into ``table`` (see
    ``streams/follow.py``: a group member would see only its share of the objects, and one
    restarted would resume after its committed offset with an empty table). The compacted
    topic is small (one record per object) and read whole.

    ``poll()`` blocks up to ``timeout`` seconds; run it in a thread or an executor. Until the
    topic exists (the watcher creates it) it returns 0 and tries again on the next call.
    """

    def __init__(self, librdkafka: dict[str, Any], topic: str, group: str,
                 table: IdentityTable) -> None:
        super().__init__(librdkafka, topic, group)
        self.table = table

    def poll(self, timeout: float = 1.0) -> int:
        """Apply what arrived; returns the number of messages applied."""
        applied = 0
        for key, value in self.fetch(timeout):
            try:
                self.table.apply(key, value)
                applied += 1
            except (ValueError, KeyError, TypeError, AttributeError):
                self.malformed += 1
        return applied
