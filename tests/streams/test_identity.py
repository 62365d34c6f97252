"""IdentityTable from k8s.v1 records, and the reassembler naming requests with it."""

from __future__ import annotations

from typing import Any

from kubesight.schemas import validate
from kubesight.streams.identity import IdentityTable
from kubesight.streams.reassembly import KIND_DATA_IN, KIND_DATA_OUT, Reassembler

from kubesight.k8smeta import endpointslice_record, pod_record, record_key, service_record

from .test_reassembly import REQ, RESP, S, batch

CID = "c" * 64


def pod(name: str, ip: str, *, workload: str = "web", ns: str = "shop", cid: str = "",
        phase: str = "Running", host_network: bool = False) -> dict[str, Any]:
    rec = pod_record({
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}",
                     "ownerReferences": [{"kind": "StatefulSet", "name": workload,
                                          "controller": True}]},
        "spec": {"nodeName": "n1", "hostNetwork": host_network},
        "status": {"phase": phase, "podIP": ip,
                   "containerStatuses": [{"name": "app", "containerID": f"containerd://{cid}"}]
                   if cid else []}})
    validate("k8s.v1", rec)
    return rec


def service(name: str, ip: str, port: int, ns: str = "shop") -> dict[str, Any]:
    return service_record({"metadata": {"name": name, "namespace": ns},
                           "spec": {"clusterIP": ip, "ports": [{"port": port}]}})


def slice_of(service_name: str, pods: list[tuple[str, str]], ns: str = "shop",
             port: int = 8080, name: str = "") -> dict[str, Any]:
    return endpointslice_record({
        "metadata": {"name": name or f"{service_name}-x", "namespace": ns,
                     "labels": {"kubernetes.io/service-name": service_name}},
        "ports": [{"name": "http", "protocol": "TCP", "port": port}],
        "endpoints": [{"addresses": [ip], "targetRef": {"kind": "Pod", "name": p}}
                      for p, ip in pods]})


def table(*records: dict[str, Any]) -> IdentityTable:
    t = IdentityTable()
    for rec in records:
        t.apply(record_key(rec), rec)
    return t


def test_pods_by_ip_container_and_uid_follow_updates_and_tombstones() -> None:
    t = table(pod("web-0", "10.244.1.5", cid=CID))
    found = t.pod_for_ip("10.244.1.5")
    assert found is not None and (found.namespace, found.workload, found.pod) == (
        "shop", "web", "web-0")
    assert t.pod_for_container(CID) == found == t.pod_for_uid("uid-web-0")
    t.apply("pod/shop/web-0", pod("web-0", "10.244.1.6"))  # a new sandbox: new IP
    assert t.pod_for_ip("10.244.1.5") is None and t.pod_for_container(CID) is None
    assert t.pod_for_ip("10.244.1.6") is not None
    # The IP is reused by a newer pod before the old pod's tombstone arrives.
    t.apply("pod/shop/api-0", pod("api-0", "10.244.1.6", workload="api"))
    t.apply("pod/shop/web-0", None)
    reused = t.pod_for_ip("10.244.1.6")
    assert reused is not None and reused.workload == "api"
    assert len(t) == 1


def test_host_network_and_finished_pods_do_not_own_their_ips() -> None:
    t = table(pod("agent-x", "192.168.0.4", host_network=True),
              pod("job-1", "10.244.1.9", phase="Succeeded"))
    assert t.pod_for_ip("192.168.0.4") is None and t.pod_for_ip("10.244.1.9") is None


def test_services_name_the_one_workload_behind_them() -> None:
    t = table(pod("web-0", "10.244.1.5"), pod("web-1", "10.244.2.5"),
              pod("other-0", "10.244.3.5", workload="other"),
              service("web", "10.96.0.20", 80), slice_of("web", [("web-0", "10.244.1.5"),
                                                                 ("web-1", "10.244.2.5")]),
              service("mixed", "10.96.0.21", 80),
              slice_of("mixed", [("web-0", "10.244.1.5"), ("other-0", "10.244.3.5")]))
    web = t.service_for("10.96.0.20", 80)
    assert web is not None and t.service_workload(web) == ("shop", "web")
    mixed = t.service_for("10.96.0.21", 80)
    assert mixed is not None and t.service_workload(mixed) is None
    assert t.service_for("10.96.0.20", 81) is None
    t.apply("service/shop/web", None)
    assert t.service_for("10.96.0.20", 80) is None


def test_an_endpoint_names_its_service_only_when_one_service_lists_it() -> None:
    t = table(slice_of("web", [("web-0", "10.244.1.5"), ("web-1", "10.244.2.5")]),
              slice_of("admin", [("web-0", "10.244.1.5")], port=9090))
    web = t.service_of_endpoint("10.244.2.5", 8080)
    assert web is not None and (web.namespace, web.name) == ("shop", "web")
    admin = t.service_of_endpoint("10.244.1.5", 9090)
    assert admin is not None and admin.name == "admin"
    assert t.service_of_endpoint("10.244.1.5", 7070) is None  # a port no slice lists
    # A second slice of the same service is still one service; another service makes it
    # ambiguous, and its tombstone makes it unambiguous again.
    t.apply("endpointslice/shop/web-y", slice_of("web", [("web-1", "10.244.2.5")], name="web-y"))
    assert (s := t.service_of_endpoint("10.244.2.5", 8080)) is not None and s.name == "web"
    other = slice_of("canary", [("web-1", "10.244.2.5")])
    t.apply(record_key(other), other)
    assert t.service_of_endpoint("10.244.2.5", 8080) is None
    t.apply(record_key(other), None)
    assert (s := t.service_of_endpoint("10.244.2.5", 8080)) is not None and s.name == "web"
    for key in ("endpointslice/shop/web-x", "endpointslice/shop/web-y"):
        t.apply(key, None)
    assert t.service_of_endpoint("10.244.2.5", 8080) is None


def test_requests_between_pods_carry_namespace_workload_and_pod() -> None:
    ident = table(pod("front-0", "10.244.1.7", workload="front", cid=CID),
                  pod("web-0", "10.244.1.5"), service("web", "10.96.0.20", 80),
                  slice_of("web", [("web-0", "10.244.1.5")]))
    r = Reassembler(window_seconds=10, slow_threshold_ns=lambda _p: S, identity=ident)
    events = [[KIND_DATA_OUT, S, len(REQ), REQ], [KIND_DATA_IN, 2 * S, len(RESP), RESP]]
    # by pod IP, named from the client's address
    [by_ip] = r.on_batch("a", batch(1, "python3", ("10.244.1.7", 4000), ("10.244.1.5", 8080),
                                    events))
    # by cluster IP, the client named from its container id (the probe's cgroup lookup)
    b = batch(1, "python3", ("127.0.0.1", 4001), ("10.96.0.20", 80), events)
    b["conn"]["container_id"] = CID
    [by_service] = r.on_batch("b", b)
    for rec in (by_ip, by_service):
        assert (rec["src_namespace"], rec["src_workload"], rec["src_pod"]) == (
            "shop", "front", "front-0")
        assert (rec["dst_namespace"], rec["dst_workload"]) == ("shop", "web")
    assert by_ip["dst_pod"] == "web-0" and by_service["dst_pod"] == ""
    # the called service: by its cluster IP, or as the one service listing the pod IP:port
    assert by_ip["dst_service"] == by_service["dst_service"] == "web"
    # ...and with conntrack's answer from the probe, the pod behind the service
    b = batch(1, "python3", ("10.244.1.7", 4002), ("10.96.0.20", 80), events)
    b["conn"].update(backend_addr="10.244.1.5", backend_port=8080)
    [natted] = r.on_batch("d", b)
    assert (natted["dst_workload"], natted["dst_pod"]) == ("web", "web-0")
    # the server side: the caller by its pod IP
    [server] = r.on_batch("c", batch(2, "python3", ("10.244.1.5", 8080), ("10.244.1.7", 4000),
                                     [[KIND_DATA_IN, S, len(REQ), REQ],
                                      [KIND_DATA_OUT, 2 * S, len(RESP), RESP]]))
    assert (server["src_workload"], server["src_pod"], server["dst_workload"],
            server["dst_pod"], server["dst_service"]) == ("front", "front-0", "web", "web-0", "web")
    for rec in (by_ip, by_service, natted, server):
        validate("requests.v1", {"v": 1, "node": "n1", "conn": "c", "requests": [rec]})
    series = {tuple(m["series"][k] for k in ("side", "src_namespace", "src_workload",
                                             "dst_namespace", "dst_workload"))
              for _key, m in r.take_partials()}
    assert series == {("client", "shop", "front", "shop", "web"),
                      ("server", "shop", "front", "shop", "web")}


def test_without_identity_a_bare_host_keeps_process_names() -> None:
    r = Reassembler(window_seconds=10, slow_threshold_ns=lambda _p: S, identity=IdentityTable())
    [rec] = r.on_batch("a", batch(1, "curl", ("10.0.0.1", 5000), ("10.9.9.9", 8080), [
        [KIND_DATA_OUT, S, len(REQ), REQ], [KIND_DATA_IN, 2 * S, len(RESP), RESP]]))
    assert (rec["src_namespace"], rec["src_workload"], rec["dst_workload"], rec["src_pod"],
            rec["dst_service"]) == ("", "curl", "10.9.9.9", "", "")
