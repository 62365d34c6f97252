"""The live service map: golden windows and network windows folded into nodes and edges.

Nodes are who talks (a workload ``namespace/workload``; on a bare host a process; an
external endpoint by its address), edges are (source → destination, protocol). An edge
carries, per side it was observed on, requests, errors, slow requests and latency P50–P99
merged from the windows' sketches (never averaged), and the TCP signals of the pair from
``network.v1``: RTT quantiles, retransmits, resets, connect failures, bytes. The kernel does
not know protocols, so a pair's TCP signals go on every protocol edge of that pair, and a
pair with TCP traffic but no parsed requests gets an edge of protocol ``tcp``.

Views (``level``), each a projection of the same leaves, computed when asked:

    namespace   a namespace (a bare-host process or an address stays itself)
    workload    namespace/workload (the default)
    service     the called service (``dst_service``) where series carry it, else workload
    pod         namespace/pod where series carry ``src_pod``/``dst_pod``, else workload

Golden series and TCP edges carry the same names (pods, the called service), so each view's
request edges and TCP signals land on the same edges; a call through a cluster IP whose
backend the TCP side cannot name (no pod in network.v1 for it) stays a workload there.
    node        the host a workload was seen on (network.v1 workload windows), else address

State: per leaf series (golden labels without endpoint and status; network edge labels), one
fixed-size aggregate per tumbling window, kept ``retention_seconds``. A leaf with no window
newer than ``idle_seconds`` is forgotten: quiet edges age out of the map and, as a tombstone,
out of ``topology.v1``.

The sink publishes the workload view over the last ``publish_window_s`` to the compacted
topic ``topology.v1`` (key: the edge) every ``publish_interval_s`` — only edges that saw new
windows, plus tombstones for edges that aged out — through ``published()``, which the sink
runner produces. It serves ``GET /topology?level=workload&window=60`` on the Prometheus sink's
HTTP server (``routes()``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import msgpack
from kubesight.streams.sketch import LatencySketch

from .base import NetworkRecord, Route, Sink, SinkConfig, SinkHealth, WindowRecord

__all__ = ["LEVELS", "TopologyConfig", "TopologySink", "TopologyView"]

log = logging.getLogger(__name__)

LEVELS = ("namespace", "workload", "service", "pod", "node")
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99))
TCP_COUNTS = ("opened", "closed", "failed_refused", "failed_timeout", "failed_unreachable",
              "retransmits", "resets_sent", "resets_received", "bytes_sent", "bytes_received")
SIDES = ("client", "server")

# (side, protocol, src ns, src workload, src pod, dst ns, dst workload, dst pod, dst service)
GoldenLeaf = tuple[str, str, str, str, str, str, str, str, str]
# (node, side, src ns, src workload, src pod, dst ns, dst workload, dst pod, dst service,
#  dst port)
TcpLeaf = tuple[str, str, str, str, str, str, str, str, str, str]


@dataclasses.dataclass(frozen=True)
class TopologyConfig(SinkConfig):
    section: ClassVar[str] = "sinks.topology"

    enabled: bool = True
    idle_seconds: float = 300.0  # an edge with no window newer than this leaves the map
    retention_seconds: float = 900.0  # the longest ?window= that can be answered
    publish_interval_s: float = 10.0  # how often topology.v1 gets the changed edges
    publish_window_s: float = 60.0  # the span each published edge aggregates

    def problems(self) -> Iterator[tuple[str, str]]:
        for name in ("idle_seconds", "retention_seconds", "publish_interval_s",
                     "publish_window_s"):
            if getattr(self, name) <= 0:
                yield name, f"must be > 0, got {getattr(self, name)}"
        if self.publish_window_s > self.retention_seconds:
            yield "publish_window_s", (f"must be <= retention_seconds "
                                       f"({self.retention_seconds}), got {self.publish_window_s}")


# -- per-window aggregates -------------------------------------------------------------------

@dataclasses.dataclass(slots=True)
class _Requests:
    count: int = 0
    errors: int = 0
    slow: int = 0
    sum_seconds: float = 0.0
    sketch: LatencySketch = dataclasses.field(default_factory=LatencySketch)

    def add(self, other: _Requests) -> None:
        self.count += other.count
        self.errors += other.errors
        self.slow += other.slow
        self.sum_seconds += other.sum_seconds
        self.sketch.merge(other.sketch)

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.count, "errors": self.errors, "slow": self.slow,
                "sum_seconds": self.sum_seconds, "latency_seconds": _quantiles(self.sketch)}


@dataclasses.dataclass(slots=True)
class _Tcp:
    counts: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(TCP_COUNTS, 0))
    rtt: LatencySketch = dataclasses.field(default_factory=LatencySketch)

    def add(self, other: _Tcp) -> None:
        for name in TCP_COUNTS:
            self.counts[name] += other.counts[name]
        self.rtt.merge(other.rtt)

    def to_json(self) -> dict[str, Any]:
        c = self.counts
        return {**{k: c[k] for k in TCP_COUNTS if not k.startswith("failed_")},
                "connect_failures": {k[len("failed_"):]: c[k] for k in TCP_COUNTS
                                     if k.startswith("failed_")},
                "rtt_samples": self.rtt.count, "rtt_seconds": _quantiles(self.rtt)}


def _quantiles(sketch: LatencySketch) -> dict[str, float] | None:
    if not sketch.count:
        return None
    values = sketch.quantiles([q for _, q in QUANTILES])
    return {name: v for (name, _), v in zip(QUANTILES, values, strict=True)}


# -- naming ----------------------------------------------------------------------------------

def _is_address(name: str) -> bool:
    if name == "external":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclasses.dataclass(frozen=True, slots=True)
class _Party:
    namespace: str
    workload: str
    pod: str = ""
    service: str = ""


def _workload_node(p: _Party) -> dict[str, str]:
    if _is_address(p.workload):
        return {"id": p.workload, "kind": "external", "namespace": "", "name": p.workload}
    return {"id": f"{p.namespace}/{p.workload}" if p.namespace else p.workload,
            "kind": "workload", "namespace": p.namespace, "name": p.workload}


def _project(level: str, p: _Party, hosts: Mapping[tuple[str, str], str]) -> dict[str, str]:
    """The map node ``p`` belongs to at ``level``."""
    if level == "workload" or _is_address(p.workload):
        return _workload_node(p)
    if level == "namespace":
        if not p.namespace:
            return _workload_node(p)
        return {"id": p.namespace, "kind": "namespace", "namespace": p.namespace,
                "name": p.namespace}
    if level == "service" and p.service:
        return {"id": f"{p.namespace}/{p.service}", "kind": "service",
                "namespace": p.namespace, "name": p.service}
    if level == "pod" and p.pod:
        return {"id": f"{p.namespace}/{p.pod}", "kind": "pod", "namespace": p.namespace,
                "name": p.pod, "workload": p.workload}
    if level == "node":
        host = hosts.get((p.namespace, p.workload))
        if host:
            return {"id": host, "kind": "host", "namespace": "", "name": host}
    return _workload_node(p)


# -- the view --------------------------------------------------------------------------------

EdgeKey = tuple[str, str, str]  # (src id, dst id, protocol)


class TopologyView:
    """Leaves per window; projections on demand. Plain data, no locking (the sink locks)."""

    def __init__(self, *, idle_seconds: float = 300.0, retention_seconds: float = 900.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.idle_seconds = idle_seconds
        self.retention_seconds = retention_seconds
        self._clock = clock
        # leaf → window start → (window seconds, aggregate)
        self._golden: dict[GoldenLeaf, dict[int, tuple[int, _Requests]]] = {}
        self._tcp: dict[TcpLeaf, dict[int, tuple[int, _Tcp]]] = {}
        self._hosts: dict[tuple[str, str], tuple[float, str]] = {}  # workload → (seen, node)

    # -- feeding -------------------------------------------------------------------------

    def apply_golden(self, batch: Sequence[WindowRecord]) -> tuple[int, int]:
        """Fold golden windows in; returns (written, rejected)."""
        written = rejected = 0
        for record in batch:
            try:
                s: Mapping[str, Any] = record["series"]
                leaf: GoldenLeaf = (
                    str(s["side"]), str(s["protocol"]), str(s["src_namespace"]),
                    str(s["src_workload"]), str(s.get("src_pod", "")),
                    str(s["dst_namespace"]), str(s["dst_workload"]), str(s.get("dst_pod", "")),
                    str(s.get("dst_service", "")))
                agg = _Requests(int(record["count"]), int(record["errors"]),
                                int(record["slow"]), float(record["sum_seconds"]),
                                LatencySketch.from_wire(record["sketch"]))
                start, seconds = int(record["window_start"]), int(record["window_seconds"])
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                rejected += 1
                log.warning("topology: dropping malformed window record: %r", exc)
                continue
            windows = self._golden.setdefault(leaf, {})
            old = windows.get(start)
            if old is None:
                windows[start] = (seconds, agg)
            else:
                old[1].add(agg)  # a later revision of the same window: a delta
            written += 1
        return written, rejected

    def apply_network(self, batch: Sequence[NetworkRecord]) -> tuple[int, int]:
        written = rejected = 0
        for record in batch:
            try:
                kind = record["kind"]
                if kind == "conntrack":
                    continue
                labels: Mapping[str, Any] = record["labels"]
                start, seconds = int(record["window_start"]), int(record["window_seconds"])
                if kind == "workload":
                    key = (str(labels["namespace"]), str(labels["workload"]))
                    seen = float(start + seconds)
                    if seen >= self._hosts.get(key, (-1.0, ""))[0]:
                        self._hosts[key] = (seen, str(labels["node"]))
                    written += 1
                    continue
                if kind == "pod":  # per observing pod: the pod view uses the edges' pods
                    written += 1
                    continue
                if kind != "edge":
                    raise ValueError(f"unknown network record kind {kind!r}")
                leaf: TcpLeaf = (
                    str(labels["node"]), str(labels["side"]), str(labels["src_namespace"]),
                    str(labels["src_workload"]), str(labels.get("src_pod", "")),
                    str(labels["dst_namespace"]), str(labels["dst_workload"]),
                    str(labels.get("dst_pod", "")), str(labels.get("dst_service", "")),
                    str(labels["dst_port"]))
                counts = record["counts"]
                agg = _Tcp({k: int(counts[k]) for k in TCP_COUNTS},
                           LatencySketch.from_wire(record["rtt"]))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                rejected += 1
                log.warning("topology: dropping malformed network record: %r", exc)
                continue
            windows = self._tcp.setdefault(leaf, {})
            old = windows.get(start)
            if old is None:
                windows[start] = (seconds, agg)
            else:
                old[1].add(agg)
            written += 1
        return written, rejected

    def expire(self) -> int:
        """Drop windows past retention and leaves quiet for ``idle_seconds``; returns how
        many leaves were forgotten."""
        now = self._clock()
        keep_after = now - self.retention_seconds
        idle_after = now - self.idle_seconds
        dropped = 0
        tables: tuple[dict[Any, dict[int, tuple[int, Any]]], ...] = (self._golden, self._tcp)
        for table in tables:
            for leaf in list(table):
                windows = table[leaf]
                for start in [s for s, (sec, _) in windows.items() if s + sec <= keep_after]:
                    del windows[start]
                if not windows or max(s + sec for s, (sec, _) in windows.items()) <= idle_after:
                    del table[leaf]
                    dropped += 1
        self._hosts = {k: v for k, v in self._hosts.items() if v[0] > idle_after}
        return dropped

    # -- reading -------------------------------------------------------------------------

    def graph(self, level: str = "workload", window: float = 60.0) -> dict[str, Any]:
        """The map at ``level`` over windows that overlap the last ``window`` seconds."""
        if level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
        if not 0 < window <= self.retention_seconds:
            raise ValueError(f"window must be within (0, {self.retention_seconds:g}] seconds, "
                             f"got {window:g}")
        self.expire()
        now = self._clock()
        since = now - window
        hosts = {k: node for k, (_, node) in self._hosts.items()}
        nodes: dict[str, dict[str, str]] = {}
        requests: dict[EdgeKey, dict[str, _Requests]] = {}
        tcp: dict[tuple[str, str], dict[str, _Tcp]] = {}
        last_seen: dict[tuple[str, str], float] = {}

        def ends(src: _Party, dst: _Party) -> tuple[str, str]:
            a, b = _project(level, src, hosts), _project(level, dst, hosts)
            nodes.setdefault(a["id"], a)
            nodes.setdefault(b["id"], b)
            return a["id"], b["id"]

        for gleaf, gwindows in self._golden.items():
            side, proto, sns, swl, spod, dns, dwl, dpod, dsvc = gleaf
            src, dst = ends(_Party(sns, swl, spod), _Party(dns, dwl, dpod, dsvc))
            for start, (seconds, agg) in gwindows.items():
                if start + seconds <= since:
                    continue
                per_side = requests.setdefault((src, dst, proto), {})
                per_side.setdefault(side, _Requests()).add(agg)
                end = float(start + seconds)
                last_seen[(src, dst)] = max(last_seen.get((src, dst), 0.0), end)
        for tleaf, twindows in self._tcp.items():
            node, side, sns, swl, spod, dns, dwl, dpod, dsvc, _port = tleaf
            if level == "node":  # the observing end is on the node that reported it
                a = _project(level, _Party(sns, swl), hosts)
                b = _project(level, _Party(dns, dwl), hosts)
                obs = {"id": node, "kind": "host", "namespace": "", "name": node}
                a, b = (obs, b) if side == "client" else (a, obs)
                nodes.setdefault(a["id"], a)
                nodes.setdefault(b["id"], b)
                src, dst = a["id"], b["id"]
            else:
                src, dst = ends(_Party(sns, swl, spod), _Party(dns, dwl, dpod, dsvc))
            for start, (seconds, tagg) in twindows.items():
                if start + seconds <= since:
                    continue
                tcp.setdefault((src, dst), {}).setdefault(side, _Tcp()).add(tagg)
                end = float(start + seconds)
                last_seen[(src, dst)] = max(last_seen.get((src, dst), 0.0), end)

        edges = []
        protocols: dict[tuple[str, str], list[str]] = {}
        for src, dst, proto in requests:
            protocols.setdefault((src, dst), []).append(proto)
        for pair in tcp:
            if pair not in protocols:
                protocols[pair] = ["tcp"]
        used: set[str] = set()
        for (src, dst), protos in sorted(protocols.items()):
            for proto in sorted(protos):
                per_side = requests.get((src, dst, proto), {})
                edges.append(_edge(src, dst, proto, per_side, tcp.get((src, dst), {}),
                                   last_seen.get((src, dst), 0.0)))
                used.update((src, dst))
        return {"level": level, "window_seconds": window, "ts": now,
                "nodes": [nodes[n] for n in sorted(used)], "edges": edges}


def _edge(src: str, dst: str, protocol: str, requests: Mapping[str, _Requests],
          tcp: Mapping[str, _Tcp], last_seen: float) -> dict[str, Any]:
    """One edge; the headline numbers come from the client side when it was observed (what
    the caller experienced), else from the server side."""
    side = next((s for s in SIDES if s in requests), "")
    head = requests[side].to_json() if side else {"requests": 0, "errors": 0, "slow": 0,
                                                   "sum_seconds": 0.0, "latency_seconds": None}
    return {"id": edge_id(src, dst, protocol), "src": src, "dst": dst, "protocol": protocol,
            **head, "side": side,
            "by_side": {s: requests[s].to_json() for s in SIDES if s in requests},
            "tcp": {s: tcp[s].to_json() for s in SIDES if s in tcp},
            "last_seen": last_seen}


def edge_id(src: str, dst: str, protocol: str) -> str:
    return f"{src} -> {dst} [{protocol}]"


# -- the sink --------------------------------------------------------------------------------

class TopologySink(Sink[TopologyConfig]):
    name = "topology"
    config_class = TopologyConfig
    TOPIC = "topology.v1"
    LEVEL = "workload"  # the view kept in topology.v1

    def __init__(self, config: TopologyConfig, clock: Callable[[], float] = time.time) -> None:
        super().__init__(config)
        self._clock = clock
        self._lock = threading.Lock()
        self._view = TopologyView(idle_seconds=config.idle_seconds,
                                  retention_seconds=config.retention_seconds, clock=clock)
        self._published: dict[str, float] = {}  # edge id → last_seen published
        self._next_publish = 0.0
        self._closed = False
        self.rejected = 0

    def write(self, batch: Sequence[WindowRecord]) -> None:
        with self._lock:
            self.rejected += self._view.apply_golden(batch)[1]

    def write_network(self, batch: Sequence[NetworkRecord]) -> None:
        with self._lock:
            self.rejected += self._view.apply_network(batch)[1]

    def graph(self, level: str = "workload", window: float = 60.0) -> dict[str, Any]:
        with self._lock:
            return self._view.graph(level, window)

    def published(self, force: bool = False) -> list[tuple[str, bytes, bytes | None]]:
        """The topology.v1 messages due now: edges with new windows, tombstones for edges
        that aged out; nothing before ``publish_interval_s`` has passed (unless ``force``)."""
        now = self._clock()
        if not force and now < self._next_publish:
            return []
        self._next_publish = now + self.config.publish_interval_s
        graph = self.graph(self.LEVEL, self.config.publish_window_s)
        nodes = {n["id"]: n for n in graph["nodes"]}
        out: list[tuple[str, bytes, bytes | None]] = []
        current: dict[str, float] = {}
        for edge in graph["edges"]:
            current[edge["id"]] = edge["last_seen"]
            if self._published.get(edge["id"]) == edge["last_seen"]:
                continue
            record = {"v": 1, "level": self.LEVEL, "window_seconds": graph["window_seconds"],
                      "ts": now, **edge, "src_node": nodes[edge["src"]],
                      "dst_node": nodes[edge["dst"]]}
            out.append((self.TOPIC, edge["id"].encode(), msgpack.packb(record)))
        for gone in set(self._published) - set(current):
            out.append((self.TOPIC, gone.encode(), None))
        self._published = current
        return out

    def routes(self) -> dict[str, Route]:
        return {"/topology": self._get}

    def _get(self, query: str) -> tuple[int, str, str]:
        args = urllib.parse.parse_qs(query)
        level = args.get("level", ["workload"])[0]
        try:
            window = float(args.get("window", ["60"])[0])
            body = self.graph(level, window)
        except ValueError as exc:
            return 400, "text/plain; charset=utf-8", f"{exc}\n"
        return 200, "application/json", json.dumps(body) + "\n"

    def close(self) -> None:
        self._closed = True

    def healthcheck(self) -> SinkHealth:
        if self._closed:
            return SinkHealth(False, "closed")
        with self._lock:
            edges = len(self._view._golden) + len(self._view._tcp)
        return SinkHealth(True, f"{edges} leaf series in the map, {self.rejected} malformed "
                                f"records dropped")
