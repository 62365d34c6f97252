"""The node view the Prometheus sink serves: latest CPU, memory and top-N per node, and a short
time series per top process, so "since when" has an answer (``/top`` on the sink's server).

Prometheus gets gauges for the latest sample of each node; their history is Prometheus's own.
The sink also keeps, per node, the CPU of every process that was in the top-N recently
(``TOP_HISTORY_SAMPLES`` samples each, ``TOP_TRACKED_PER_NODE`` processes, the ones longest
out of the top-N forgotten first) and when it first entered the top-N. Older history is in
the ``node.v1`` topic itself.

Plain data, no locking: the Prometheus sink calls it under its own lock.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .base import NodeRecord

__all__ = ["TOP_HISTORY_SAMPLES", "TOP_TRACKED_PER_NODE", "NodeView"]

log = logging.getLogger(__name__)

TOP_HISTORY_SAMPLES = 720  # an hour at the probe's default 5 s interval
TOP_TRACKED_PER_NODE = 50

PROCESS_LABELS = ("rank", "pid", "comm", "exe", "namespace", "pod", "pod_uid", "container_id")
POD_LABELS = ("rank", "namespace", "pod", "workload", "pod_uid")
# Named by the sink runner from k8s.v1 (the probe knows only the UID); "" until it knows.
_POD_NAMES = ("namespace", "pod", "workload")
_IDENTITY = ("pid", "comm", "exe", "start_time", *_POD_NAMES, "pod_uid", "container_id",
             "runtime", "qos")


@dataclasses.dataclass
class _Tracked:
    """One process (pid + start time: a pid reused is another process) seen in the top-N."""

    identity: dict[str, Any]
    first_seen: float
    last_seen: float
    samples: collections.deque[tuple[float, float]]  # (ts, cpu cores)

    def to_json(self) -> dict[str, Any]:
        return {**self.identity, "first_seen": self.first_seen, "last_seen": self.last_seen,
                "series": [list(s) for s in self.samples]}


@dataclasses.dataclass
class _Node:
    latest: NodeRecord
    tracked: dict[tuple[int, float], _Tracked] = dataclasses.field(default_factory=dict)


def _ts_or_zero(record: Any) -> float:
    ts = record.get("ts") if isinstance(record, Mapping) else None
    return float(ts) if isinstance(ts, int | float) else 0.0


def _need(value: Any, kind: type | tuple[type, ...], what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{what} must be {kind}, got {value!r}")


def _check(record: NodeRecord) -> None:
    """Raise on a record the view cannot use (fields it reads, with their types)."""
    number = (int, float)
    _need(record["node"], str, "node")
    _need(record["ts"], number, "ts")
    for cpu, share in record["cpu"].items():
        if not isinstance(cpu, str) or not cpu.isdigit():
            raise ValueError(f"cpu must be a CPU number, got {cpu!r}")
        _need(share, number, f"cpu.{cpu}")
    for kind, value in record["memory_bytes"].items():
        _need(kind, str, "memory_bytes")
        _need(value, int, f"memory_bytes.{kind}")
    for entry in record["top"]:
        for key in ("rank", "pid"):
            _need(entry[key], int, f"top.{key}")
        for key in ("cpu_cores", "start_time"):
            _need(entry[key], number, f"top.{key}")
        for key in ("comm", "exe", "pod_uid", "container_id"):
            _need(entry[key], str, f"top.{key}")
    for pod in record["pods"]:
        _need(pod["rank"], int, "pods.rank")
        _need(pod["pod_uid"], str, "pods.pod_uid")
        _need(pod["cpu_cores"], number, "pods.cpu_cores")


class NodeView:
    def __init__(self, history: int = TOP_HISTORY_SAMPLES,
                 tracked: int = TOP_TRACKED_PER_NODE) -> None:
        self._history = history
        self._max_tracked = tracked
        self.nodes: dict[str, _Node] = {}

    def apply(self, batch: Sequence[NodeRecord]) -> tuple[int, int]:
        """Fold in a batch; returns (written, rejected). Records older than a node's latest
        (a redelivery, a restarted probe's backlog) are rejected: gauges never go back."""
        written = rejected = 0
        for record in sorted(batch, key=_ts_or_zero):
            try:
                _check(record)
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                log.warning("prometheus sink: dropping malformed node record: %r", exc)
                rejected += 1
                continue
            node = self.nodes.get(record["node"])
            if node is not None and record["ts"] <= node.latest["ts"]:
                rejected += 1
                continue
            if node is None:
                node = self.nodes[record["node"]] = _Node(record)
            node.latest = record
            self._track(node, record)
            written += 1
        return written, rejected

    def _track(self, node: _Node, record: NodeRecord) -> None:
        ts = float(record["ts"])
        for entry in record["top"]:
            key = (int(entry["pid"]), float(entry["start_time"]))
            tracked = node.tracked.get(key)
            if tracked is None:
                tracked = node.tracked[key] = _Tracked(
                    {k: entry.get(k, "") for k in _IDENTITY}, ts, ts,
                    collections.deque(maxlen=self._history))
            tracked.identity["comm"] = entry["comm"]  # an exec renames it
            for k in _POD_NAMES:  # the pod's metadata may arrive after its first sample
                if entry.get(k):
                    tracked.identity[k] = entry[k]
            tracked.last_seen = ts
            tracked.samples.append((ts, float(entry["cpu_cores"])))
        excess = len(node.tracked) - self._max_tracked
        if excess > 0:
            for key in sorted(node.tracked, key=lambda k: node.tracked[k].last_seen)[:excess]:
                del node.tracked[key]

    # -- exposition ---------------------------------------------------------------------------

    def samples(self) -> Iterator[tuple[str, list[tuple[str, str]], float]]:
        """(metric, labels, value) of every gauge, metric by metric."""
        nodes = sorted(self.nodes.items())
        for name, node in nodes:
            yield ("kubesight_node_sample_timestamp_seconds", [("node", name)],
                   float(node.latest["ts"]))
        for name, node in nodes:
            for cpu, share in sorted(node.latest["cpu"].items(), key=lambda kv: int(kv[0])):
                yield "kubesight_node_cpu_utilisation", [("node", name), ("cpu", cpu)], share
        for name, node in nodes:
            for kind, nbytes in sorted(node.latest["memory_bytes"].items()):
                yield "kubesight_node_memory_bytes", [("node", name), ("kind", kind)], nbytes
        for metric, field in (("kubesight_top_process_cpu_cores", "cpu_cores"),
                              ("kubesight_top_process_start_time_seconds", "start_time"),
                              ("kubesight_top_process_first_seen_timestamp_seconds", "")):
            for name, node in nodes:
                for entry in node.latest["top"]:
                    labels = [("node", name),
                              *((k, str(entry.get(k, ""))) for k in PROCESS_LABELS)]
                    if field:
                        value = float(entry[field])
                    else:
                        tracked = node.tracked.get((int(entry["pid"]),
                                                    float(entry["start_time"])))
                        value = tracked.first_seen if tracked else float(node.latest["ts"])
                    yield metric, labels, value
        for name, node in nodes:
            for pod in node.latest["pods"]:
                yield ("kubesight_top_pod_cpu_cores",
                       [("node", name), *((k, str(pod.get(k, ""))) for k in POD_LABELS)],
                       float(pod["cpu_cores"]))

    def to_json(self, node: str | None = None) -> dict[str, Any]:
        """``/top``: per node, the latest sample; each top process with its time series since
        it entered the top-N, and (``earlier``) the tracked processes no longer in it."""
        out = []
        for name, state in sorted(self.nodes.items()):
            if node is not None and name != node:
                continue
            latest: Mapping[str, Any] = state.latest
            current = set()
            top = []
            for entry in latest["top"]:
                key = (int(entry["pid"]), float(entry["start_time"]))
                current.add(key)
                tracked = state.tracked.get(key)
                top.append({**entry, **(tracked.to_json() if tracked else {})})
            earlier = sorted((t.to_json() for k, t in state.tracked.items() if k not in current),
                             key=lambda t: -float(t["last_seen"]))
            out.append({**{k: latest[k] for k in ("node", "instance", "ts", "interval_s", "cpu",
                                                   "cpu_all", "memory_bytes", "pods")},
                        "top": top, "earlier": earlier})
        return {"nodes": out}


HELP: dict[str, str] = {
    "kubesight_node_sample_timestamp_seconds": "Unix time of each node's latest CPU sample.",
    "kubesight_node_cpu_utilisation": "Busy share (0..1) of each CPU over the latest interval.",
    "kubesight_node_memory_bytes": "Node memory by kind (total, available, used = total - "
                                   "available, free, buffers, cached, swap_total, swap_free).",
    "kubesight_top_process_cpu_cores": "CPU cores used over the latest interval by the node's "
                                       "top-N processes (rank 1 = most).",
    "kubesight_top_process_start_time_seconds": "Unix time each top-N process started.",
    "kubesight_top_process_first_seen_timestamp_seconds":
        "Unix time each top-N process first entered the top-N (as far as this sink remembers; "
        "/top has its time series).",
    "kubesight_top_pod_cpu_cores": "CPU cores used over the latest interval by the node's "
                                   "top-N pods (summed over their processes).",
}
