"""Network health (``network.v1``) as the Prometheus sink exposes it.

Edge and workload windows follow the golden rules (prometheus.py): counters are the sum of
every delta ever written; RTT quantiles come from the sketch of the latest window of the
series, ``_sum``/``_count`` from every delta. Conntrack records are gauges of each node's
latest report (its drop counters are cumulative since boot: counters).

``NetworkView`` holds the state; the sink calls ``apply`` under its lock and renders the
metric families ``families`` yields.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from kubesight.streams.sketch import LatencySketch

from .base import NetworkRecord

__all__ = ["EDGE_LABELS", "WORKLOAD_LABELS", "NetworkView"]

log = logging.getLogger(__name__)

EDGE_LABELS = ("node", "side", "src_namespace", "src_workload", "src_pod", "dst_namespace",
               "dst_workload", "dst_pod", "dst_service", "dst_port")
# Edge labels added after network.v1's first release: records written before lack them.
_OPTIONAL_EDGE_LABELS = frozenset({"src_pod", "dst_pod", "dst_service"})
WORKLOAD_LABELS = ("node", "side", "namespace", "workload")
POD_LABELS = ("node", "side", "namespace", "workload", "pod")
COUNTS = ("opened", "closed", "failed_refused", "failed_timeout", "failed_unreachable",
          "retransmits", "resets_sent", "resets_received", "bytes_sent", "bytes_received",
          "rtt_sum_us")
FAILURE_KINDS = ("refused", "timeout", "unreachable")
CONNTRACK_DROPS = ("drop", "early_drop", "insert_failed")
QUANTILES = ("0.5", "0.9", "0.95", "0.99")
_QS = tuple(float(q) for q in QUANTILES)

Pairs = tuple[tuple[str, str], ...]
Sample = tuple[str, Pairs, float]  # (suffix of the metric name, labels, value)
Family = tuple[str, str, str, list[Sample]]  # (metric, type, help, samples)


@dataclasses.dataclass
class _Series:
    counts: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    rtt_count: int = 0
    window_start: int = -(1 << 62)
    rtt: LatencySketch | None = None
    quantiles: list[float] | None = None  # cache, dropped when the sketch changes

    def apply(self, record: NetworkRecord, sketch: LatencySketch) -> None:
        start = int(record["window_start"])
        if start > self.window_start or self.rtt is None:
            self.window_start, self.rtt, self.quantiles = start, sketch, None
        elif start == self.window_start:
            self.rtt.merge(sketch)
            self.quantiles = None
        got = record["counts"]
        for name in COUNTS:
            self.counts[name] += int(got[name])
        self.rtt_count += sketch.count


class NetworkView:
    def __init__(self) -> None:
        self._edges: dict[tuple[str, ...], _Series] = {}
        self._workloads: dict[tuple[str, ...], _Series] = {}
        self._pods: dict[tuple[str, ...], _Series] = {}
        self._conntrack: dict[str, NetworkRecord] = {}

    def apply(self, batch: Sequence[NetworkRecord]) -> tuple[int, int]:
        """Fold records in; returns (written, rejected)."""
        written = rejected = 0
        for record in batch:
            try:
                self._apply(record)
                written += 1
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                rejected += 1
                log.warning("prometheus sink: dropping malformed network record: %r", exc)
        return written, rejected

    def _apply(self, record: NetworkRecord) -> None:
        kind = record["kind"]
        if kind == "conntrack":
            node = str(record["node"])
            for field in ("entries", "max", *CONNTRACK_DROPS):
                int(record[field])  # type: ignore[literal-required]
            old = self._conntrack.get(node)
            if old is None or float(record["ts"]) >= float(old["ts"]):
                self._conntrack[node] = record
            return
        names = {"edge": EDGE_LABELS, "workload": WORKLOAD_LABELS, "pod": POD_LABELS}.get(kind)
        if names is None:
            raise ValueError(f"unknown network record kind {kind!r}")
        labels: dict[str, Any] = record["labels"]
        optional = _OPTIONAL_EDGE_LABELS if kind == "edge" else frozenset()
        if set(labels) | optional != set(names):
            raise ValueError(f"{kind} labels must be exactly {names}, got {sorted(labels)}")
        for name in COUNTS:
            value = record["counts"][name]
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"counts.{name} must be an integer, got {value!r}")
        sketch = LatencySketch.from_wire(record["rtt"])
        table = {"edge": self._edges, "workload": self._workloads, "pod": self._pods}[kind]
        key = tuple(str(labels.get(n, "")) for n in names)
        series = table.get(key)
        if series is None:
            series = table[key] = _Series()
        series.apply(record, sketch)

    # -- exposition ---------------------------------------------------------------------

    def families(self) -> Iterator[Family]:
        edges = sorted(self._edges.items())
        pairs = {key: tuple(zip(EDGE_LABELS, key, strict=True)) for key, _ in edges}

        def counter(metric: str, help_text: str, count: str) -> Family:
            return (metric, "counter", help_text,
                    [("", pairs[k], float(s.counts[count])) for k, s in edges])

        def by(extra: str, options: Sequence[tuple[str, str]], only: str | None = None
               ) -> list[Sample]:
            return [("", (*pairs[k], (extra, value)), float(s.counts[count]))
                    for k, s in edges if only is None or k[1] == only
                    for value, count in options]

        yield counter("kubesight_tcp_connections_opened_total",
                      "TCP connections seen reaching ESTABLISHED, per edge and observing side.",
                      "opened")
        yield counter("kubesight_tcp_connections_closed_total",
                      "Established TCP connections that closed.", "closed")
        yield ("kubesight_tcp_connect_failures_total", "counter",
               "Connects that never reached ESTABLISHED: refused (a reset answered the SYN), "
               "unreachable (ICMP error), timeout (no answer before the kernel or the "
               "application gave up).",
               by("kind", [(k, f"failed_{k}") for k in FAILURE_KINDS], only="client"))
        yield counter("kubesight_tcp_retransmits_total",
                      "TCP segments retransmitted (SYNs included).", "retransmits")
        yield ("kubesight_tcp_resets_total", "counter", "TCP resets sent and received.",
               by("direction", [("sent", "resets_sent"), ("received", "resets_received")]))
        yield ("kubesight_tcp_bytes_total", "counter",
               "TCP payload bytes sent (acknowledged by the peer) and received.",
               by("direction", [("sent", "bytes_sent"), ("received", "bytes_received")]))
        yield ("kubesight_tcp_rtt_seconds", "summary",
               "Smoothed RTT, one sample per segment received: quantiles over the latest "
               "window, _sum and _count over all time.",
               _summary(edges, pairs))
        workloads = sorted(self._workloads.items())
        wpairs = {key: tuple(zip(WORKLOAD_LABELS, key, strict=True)) for key, _ in workloads}
        yield ("kubesight_tcp_workload_rtt_seconds", "summary",
               "Smoothed RTT of all of a workload's connections, by the side it was on.",
               _summary(workloads, wpairs))
        pods = sorted(self._pods.items())
        ppairs = {key: tuple(zip(POD_LABELS, key, strict=True)) for key, _ in pods}
        yield ("kubesight_tcp_pod_rtt_seconds", "summary",
               "Smoothed RTT of all of a pod's connections, by the side it was on.",
               _summary(pods, ppairs))
        yield ("kubesight_tcp_pod_retransmits_total", "counter",
               "TCP segments a pod's connections retransmitted.",
               [("", ppairs[k], float(s.counts["retransmits"])) for k, s in pods])
        yield ("kubesight_tcp_pod_bytes_total", "counter",
               "TCP payload bytes a pod's connections sent and received.",
               [("", (*ppairs[k], ("direction", d)), float(s.counts[c])) for k, s in pods
                for d, c in (("sent", "bytes_sent"), ("received", "bytes_received"))])
        nodes = sorted(self._conntrack.items())
        yield ("kubesight_conntrack_entries", "gauge",
               "Connection-tracking entries in use on the node (its latest report).",
               [("", (("node", n),), float(r["entries"])) for n, r in nodes])
        yield ("kubesight_conntrack_max", "gauge",
               "Connection-tracking table size (nf_conntrack_max).",
               [("", (("node", n),), float(r["max"])) for n, r in nodes])
        yield ("kubesight_conntrack_drops_total", "counter",
               "Connection-tracking drops since boot: drop (no entry could be made), "
               "early_drop (entries evicted to make room), insert_failed.",
               [("", (("node", n), ("reason", reason)),
                 float(r[reason]))  # type: ignore[literal-required]
                for n, r in nodes for reason in CONNTRACK_DROPS])


def _summary(series: list[tuple[tuple[str, ...], _Series]],
             pairs: dict[tuple[str, ...], Pairs]) -> list[Sample]:
    out: list[Sample] = []
    for key, s in series:
        if s.rtt is not None and s.rtt.count:
            if s.quantiles is None:
                s.quantiles = s.rtt.quantiles(_QS)
            out += [("", (*pairs[key], ("quantile", q)), v)
                    for q, v in zip(QUANTILES, s.quantiles, strict=True)]
        out.append(("_sum", pairs[key], s.counts["rtt_sum_us"] / 1e6))
        out.append(("_count", pairs[key], float(s.rtt_count)))
    return out
