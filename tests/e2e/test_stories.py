"""DESIGN.md's troubleshooting stories 1, 2 and 4, end to end, asserting kubesight points at
the cause.

Pods are network namespaces on a bridge with kubelet-style cgroups (``k8spods.py``) described
to a real kube-apiserver (Deployment → ReplicaSet → Pods), so kubesight names them by namespace,
workload and pod. Everything (namespaces, veths, the tbf qdisc, iptables rules, processes,
cgroups) goes with the pod node when the module ends.

1. Network: a gateway calls two downstreams; the path to one of them loses 20% of the packets
   to its port (iptables statistic; this kernel has no netem) and queues behind bulk traffic
   through a tbf shaper. The topology shows that edge's RTT and retransmits high and the other
   edge's normal, and the slow downstream's own server-side latency normal.
2. CPU hog: one pod burns a core. The node's CPU is high and the top-N names that pod first,
   by namespace, pod and workload (the probe sees its UID in the cgroup path; the sink names
   it from k8s.v1), both among pods and among processes.
4. Slow canary: three replicas of one Deployment, one of them slow. The workload view blends
   them; the pod view singles the slow pod out.
"""

from __future__ import annotations

import json
import statistics
import sys
import urllib.request
import uuid
from typing import Any

import pytest

from tests.cgroups import cpu_hog
from tests.k8s_fixture import Kube, KubeAPIServer, read_latest

from .harness import Pipeline, wait_for
from .k8spods import Pod, PodNode, _run
from .test_k8s_pipeline import _k8s_messages, _worker_counter, k8s_pipeline, pod_node

__all__ = ["k8s_pipeline", "pod_node"]  # the fixtures, shared with test_k8s_pipeline

pytestmark = [pytest.mark.e2e, pytest.mark.bpf, pytest.mark.kafka]

ROUNDS = 16  # calls per downstream (story 1) and per replica (story 4)
SLOW_S = 0.3
HOG_SECONDS = 120.0  # story 2's hog stops itself by then, whatever happens to the test


def topology(pipe: Pipeline, level: str, window: int = 600) -> dict[str, Any]:
    url = pipe.metrics_url.replace("/metrics", f"/topology?level={level}&window={window}")
    with urllib.request.urlopen(url, timeout=5) as resp:
        graph: dict[str, Any] = json.load(resp)
    return graph


def edges(pipe: Pipeline, level: str = "workload") -> dict[str, dict[str, Any]]:
    return {e["id"]: e for e in topology(pipe, level)["edges"]}


class Cluster:
    """One namespace of Deployments whose pods are sandboxes on ``node``."""

    def __init__(self, pipe: Pipeline, api: KubeAPIServer, node: PodNode) -> None:
        self.pipe, self.node = pipe, node
        self.kube = Kube(api.api_client())
        self.ns = f"story-{uuid.uuid4().hex[:6]}"
        self.node_name = pipe.config.node_name
        self.kube.namespace(self.ns)
        if not any(n["metadata"]["name"] == self.node_name
                   for n in self.kube.request("GET", "/api/v1/nodes")["items"]):
            self.kube.node(self.node_name, node.gateway, pod_cidr=node.cidr)
        self.keys: list[str] = []

    def deploy(self, name: str, replicas: int = 1) -> list[tuple[str, Pod]]:
        labels = {"app": name}
        rs = self.kube.replicaset(self.ns, self.kube.deployment(self.ns, name, labels), "5c6d7")
        out = []
        for i in range(replicas):
            pod_name = f"{name}-5c6d7-{uuid.uuid4().hex[:5]}"
            obj = self.kube.pod(self.ns, pod_name, labels={**labels, "pod-template-hash": "5c6d7"},
                                owner=rs, node=self.node_name)
            sandbox = self.node.pod(f"{name}{i}", uid=obj["metadata"]["uid"])
            self.kube.pod_status(self.ns, pod_name, ip=sandbox.ip,
                                 container_id=sandbox.container_id)
            self.keys.append(f"pod/{self.ns}/{pod_name}")
            out.append((pod_name, sandbox))
        return out

    def known(self) -> None:
        """Wait until the watcher published every pod and the worker read all of it."""
        pipe = self.pipe
        wait_for("the pods on k8s.v1", lambda: all(
            isinstance(read_latest(pipe.config).get(k), dict) for k in self.keys), timeout=60)
        published = _k8s_messages(pipe)
        wait_for("the worker to read k8s.v1",
                 lambda: _worker_counter(pipe, "k8s_records") >= published, timeout=60)


def serve(pod: Pod, *argv: str) -> int:
    """A server in ``pod`` that prints ``listening PORT``; returns the port."""
    proc = pod.spawn(sys.executable, "-m", *argv, stdout=-1)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    proc.stdout.close()  # it prints nothing more
    assert line.startswith("listening "), line
    return int(line.split()[1])


def call(pod: Pod, comm: str, urls: list[str], rounds: int = ROUNDS) -> dict[str, Any]:
    out = pod.run(sys.executable, "-m", "tests.e2e.story_client", comm, str(rounds), "10",
                  *urls, timeout=300)
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    return result


def test_story_1_lossy_delayed_path_shows_on_its_edge_not_on_the_server(
        k8s_pipeline: Pipeline, kube_apiserver: KubeAPIServer, pod_node: PodNode) -> None:
    pipe, node = k8s_pipeline, pod_node
    cluster = Cluster(pipe, kube_apiserver, node)
    ns = cluster.ns
    [(_, gateway)] = cluster.deploy("gateway")
    [(_, down_a)] = cluster.deploy("down-a")
    [(_, down_b)] = cluster.deploy("down-b")
    cluster.known()
    port_a = serve(down_a, "tests.e2e.servers", "slow", "kse-down-a", "0", "0.0.0.0")
    port_b = serve(down_b, "tests.e2e.servers", "slow", "kse-down-b", "0", "0.0.0.0")
    bulk_port = serve(down_a, "tests.tcp_traffic", "serve", "kse-bulksink", down_a.ip, "0")

    # The path to down-a: 20% of the packets to its port dropped, and a tbf shaper on its veth
    # that queues (up to 150 ms) behind a bulk transfer from the gateway pod. Bounded: the
    # transfer is 12 MB at 2 Mbit/s at most, and is killed when the calls are done.
    _run("iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(port_a), "-m", "statistic",
         "--mode", "random", "--probability", "0.2", "-j", "DROP", netns=down_a.netns)
    _run("tc", "qdisc", "add", "dev", down_a.veth, "root", "tbf", "rate", "2mbit", "burst",
         "16kb", "latency", "200ms", netns=node.netns)
    bulk = gateway.spawn(sys.executable, "-m", "tests.tcp_traffic", "send", "kse-bulk",
                         down_a.ip, str(bulk_port), "12000000", "60", "1")
    wait_for("the bulk transfer to fill the shaper's queue", lambda: int(_run(
        "tc", "-s", "qdisc", "show", "dev", down_a.veth, netns=node.netns
    ).split("backlog ")[1].split("b")[0]) > 20_000, timeout=30, interval=0.1)
    url_a, url_b = f"http://{down_a.ip}:{port_a}/", f"http://{down_b.ip}:{port_b}/"
    try:
        result = call(gateway, "kse-gw", [url_a, url_b])
    finally:
        bulk.kill()
    ok_a = result[url_a]["statuses"].count(200)
    ok_b = result[url_b]["statuses"].count(200)
    assert ok_b == ROUNDS and ok_a >= ROUNDS - 2, result

    edge_a = f"{ns}/gateway -> {ns}/down-a [http]"
    edge_b = f"{ns}/gateway -> {ns}/down-b [http]"

    # streams/network.py does not name TCP ends by Kubernetes identity yet (the golden path
    # does): a pair's TCP signals are found under the names network.v1 gives them, the
    # workload when it has one, else the gateway's process and the downstream's address.
    gateways = {f"{ns}/gateway", "kse-gw"}

    def tcp_of(names: set[str]) -> dict[str, Any] | None:
        for e in edges(pipe).values():
            if e["src"] in gateways and e["dst"] in names and "client" in e["tcp"]:
                tcp: dict[str, Any] = e["tcp"]["client"]
                return tcp
        return None

    def settled() -> tuple[dict[str, Any], ...] | None:
        got = edges(pipe)
        a, b = got.get(edge_a), got.get(edge_b)
        if a is None or b is None:
            return None
        counts = [e["by_side"].get(s, {}).get("requests") for e in (a, b)
                  for s in ("client", "server")]
        tcp_a = tcp_of({f"{ns}/down-a", down_a.ip})
        tcp_b = tcp_of({f"{ns}/down-b", down_b.ip})
        if counts != [ok_a, ok_a, ok_b, ok_b] or tcp_a is None or tcp_b is None:
            return None
        return a, b, tcp_a, tcp_b

    try:
        a, b, tcp_a, tcp_b = wait_for("both edges with every call on both sides", settled,
                                      timeout=120, interval=1.0)
    except AssertionError as exc:
        mine = {k: v for k, v in edges(pipe).items() if ns in k or "kse-" in k}
        raise AssertionError(f"{exc}\n{json.dumps(mine, indent=1)[:8000]}") from None
    rtt_a, rtt_b = tcp_a["rtt_seconds"]["p50"], tcp_b["rtt_seconds"]["p50"]
    asked_a = statistics.median(result[url_a]["request_latencies"])
    client_a = a["by_side"]["client"]["latency_seconds"]["p50"]
    server_a = a["by_side"]["server"]["latency_seconds"]["p50"]
    client_b = b["by_side"]["client"]["latency_seconds"]["p50"]
    print(f"story 1: rtt p50 a={rtt_a:.6f}s b={rtt_b:.6f}s; retransmits a={tcp_a['retransmits']} "
          f"b={tcp_b['retransmits']}; latency p50 a client={client_a:.4f}s server={server_a:.4f}s,"
          f" b client={client_b:.4f}s; client-measured median a="
          f"{statistics.median(result[url_a]['latencies']):.4f}s, of which the request "
          f"{asked_a:.4f}s")
    # The edge to down-a: its RTT far above the clean edge's, and retransmits; the clean edge none.
    assert tcp_a["retransmits"] > 0 and tcp_b["retransmits"] == 0
    assert rtt_a > 0.01 and rtt_a > 10 * rtt_b
    # kubesight's client side is what the client measured from sending the request to the
    # end of the response (the connect before it is not part of a request). Its P50 lies
    # among the client's middle values (a rank either way: a call that failed may count on
    # one side and not the other; the delays can be bimodal, queued or not).
    asked = sorted(result[url_a]["request_latencies"])
    middle = len(asked) // 2
    low, high = asked[max(0, middle - 2)], asked[min(len(asked) - 1, middle + 1)]
    assert 0.75 * low - 0.002 <= client_a <= 1.25 * high + 0.002, (client_a, asked)
    # The gateway waited on down-a; down-a itself answered fast: the cause is the path. How
    # long it waited is the shaper's queue delay, which the bulk transfer sets: 49-57 ms in
    # most runs (the client's whole median, ~105 ms, also counts connecting through the same
    # queue), so it is compared with the clean edge (under 1 ms), not with a fixed delay.
    # Once in CI kubesight's P50 there was 0.5 ms while the client's whole median was 104 ms:
    # most requests found the queue drained (the bulk sender backing off after the shaper's
    # drops) and only their connects had waited. The client did not time the request alone
    # then; now it does, and the story is held to it.
    if asked_a > 0.02:
        assert client_a > 0.02 and client_a > 20 * client_b
    assert server_a < max(client_a / 5, 0.002)


def test_story_2_cpu_hog_is_named_by_its_pod(
        k8s_pipeline: Pipeline, kube_apiserver: KubeAPIServer, pod_node: PodNode) -> None:
    pipe = k8s_pipeline
    cluster = Cluster(pipe, kube_apiserver, pod_node)
    ns, node = cluster.ns, pipe.config.node_name
    [(pod_name, sandbox)] = cluster.deploy("cruncher")
    cluster.known()
    hog = sandbox.spawn(*cpu_hog(HOG_SECONDS))
    seen: list[list[dict[str, str]]] = []

    def hog_pod_first() -> dict[str, str] | None:
        # The probe samples every 5 s and the sink learns the pod from k8s.v1: wait for a
        # sample in which the hog's pod, named, tops the pods.
        pods = [dict(lab) for lab, _ in sorted(
            pipe.series("kubesight_top_pod_cpu_cores", node=node).items(),
            key=lambda kv: int(dict(kv[0])["rank"]))]
        if not seen or seen[-1] != pods[:2]:
            seen.append(pods[:2])
        return pods[0] if pods and pods[0]["pod"] == pod_name else None

    try:
        try:
            first = wait_for("the hog's pod ranked first, by name", hog_pod_first, timeout=90,
                             interval=1.0)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\npods per sample: {seen}\n"
                                 f"{pipe.diagnostics()}") from None
        assert (first["namespace"], first["workload"], first["pod_uid"]) == (
            ns, "cruncher", sandbox.uid)

        def top_process() -> tuple[dict[str, str], float, float] | None:
            # The first sample that names the pod may have seen the hog for part of its 5 s
            # only: wait for one that covers it whole (the hog spins all along).
            procs = {dict(lab)["rank"]: (dict(lab), v) for lab, v in pipe.series(
                "kubesight_top_process_cpu_cores", node=node).items()}
            busy = sum(pipe.series("kubesight_node_cpu_utilisation", node=node).values())
            if "1" not in procs or procs["1"][1] <= 0.5:
                return None
            return procs["1"][0], procs["1"][1], busy

        top_proc, cores, busy = wait_for("the hog at more than half a core", top_process,
                                         timeout=30, interval=1.0)
        assert (top_proc["pid"], top_proc["comm"], top_proc["namespace"], top_proc["pod"]) == (
            str(hog.pid), "ks-cpu-hog", ns, pod_name)
        assert busy >= cores - 0.05, (busy, cores)  # the node is busy with it
    finally:
        hog.kill()
        hog.wait(timeout=10)


def test_story_4_pod_level_latency_singles_out_the_slow_replica(
        k8s_pipeline: Pipeline, kube_apiserver: KubeAPIServer, pod_node: PodNode) -> None:
    pipe = k8s_pipeline
    cluster = Cluster(pipe, kube_apiserver, pod_node)
    ns = cluster.ns
    [(_, caller)] = cluster.deploy("caller")
    replicas = cluster.deploy("catalog", replicas=3)
    cluster.known()
    delays = {replicas[0][0]: 0.0, replicas[1][0]: SLOW_S, replicas[2][0]: 0.0}
    slow_pod = replicas[1][0]
    urls = {}
    for name, sandbox in replicas:
        port = serve(sandbox, "tests.e2e.servers", "slow", "kse-catalog", str(delays[name]),
                     "0.0.0.0")
        urls[name] = f"http://{sandbox.ip}:{port}/"
    result = call(caller, "kse-caller", list(urls.values()))
    assert all(r["statuses"] == [200] * ROUNDS for r in result.values()), result

    # The workload view blends the replicas: one edge, every call.
    wl_edge = f"{ns}/caller -> {ns}/catalog [http]"
    pipe.wait_total(3 * ROUNDS, "kubesight_requests_total", side="server", src_namespace=ns,
                    dst_workload="catalog")
    blended = wait_for("the workload edge", lambda: (e := edges(pipe).get(wl_edge)) and
                       e["by_side"].get("server", {}).get("requests") == 3 * ROUNDS and e,
                       timeout=60)
    assert blended["by_side"]["server"]["latency_seconds"]["p50"] < SLOW_S / 3  # looks fine

    def pod_edges() -> dict[str, dict[str, Any]] | None:  # the topology's pod view
        got = {e["dst"]: e for e in topology(pipe, "pod")["edges"]
               if e["dst"].startswith(f"{ns}/catalog-")}
        done = len(got) == 3 and all(
            e["by_side"].get("server", {}).get("requests") == ROUNDS for e in got.values())
        return got if done else None

    per_pod = wait_for("three pod edges", pod_edges, timeout=60)
    p50 = {dst.split("/", 1)[1]: e["by_side"]["server"]["latency_seconds"]["p50"]
           for dst, e in per_pod.items()}
    print(f"story 4: server-side p50 by pod {p50} (slow: {slow_pod})")
    assert max(p50, key=lambda p: p50[p]) == slow_pod
    assert p50[slow_pod] >= SLOW_S * 0.95
    assert all(v < SLOW_S / 5 for pod, v in p50.items() if pod != slow_pod), p50
