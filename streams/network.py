"""TCP connection intervals (``tcp.v1``) → network health per window, per edge and workload.

Plain Python on plain data; the agents in ``agents.py`` feed it and ship what it returns.
Two steps, as on the golden path:

1. ``NetworkAggregator.on_batch`` names both ends of every interval the probe reported and
   folds it into per-(series, window) partials: one series per *edge* (node, observing side,
   source workload, destination workload, destination port) and one per *workload* (node,
   side, the observing process's workload). ``take_partials`` hands them over keyed by
   series for ``netseries.v1``: the repartition step.
2. ``NetworkWindowStore`` merges the partials of a series per tumbling window (fixed-size,
   mergeable state: counters and an RTT sketch) and emits closed windows for ``network.v1``
   as deltas with a revision, like ``golden.WindowStore``: summing a counter over every
   record of a series is exact, however late a partial arrives.

Counted per window (``COUNTS``): connections opened (reached ESTABLISHED, seen from their
start) and closed, connect failures by kind, segments retransmitted, resets sent and
received, payload bytes sent and received; and the smoothed RTT distribution, one sample per
segment the kernel received (``rtt_sum_us`` keeps the exact sum for a summary's ``_sum``).

Naming follows streams/reassembly.py: in Kubernetes an address of a pod is that pod's namespace
and workload, a service's cluster IP the workload behind it (``identity``, fed by ``k8s.v1``);
otherwise, on a bare host, the observing end is its process (``comm``), the other end the
process the kernel found on this node (``peer_comm``: a loopback listener, or the client of a
same-node connection), else the listener of the address (``meta.v1``), else the address
(``peer_name``). A client's edge is (client → server it called), a server's edge is (client
that called → server): both ends of a same-node connection report the same edge, once per side.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import math
from typing import Any

from .golden import TumblingStore
from .identity import IdentityTable
from .reassembly import LOOPBACK, WILDCARD, peer_name
from .sketch import LatencySketch

__all__ = [
    "COUNTS", "EDGE_LABELS", "FAILURE_KINDS", "POD_LABELS", "WORKLOAD_LABELS",
    "MalformedNetworkBatch", "NetworkAggregator", "NetworkWindow", "NetworkWindowStore",
    "failure_kind", "rtt_sketch",
]

EDGE_LABELS = ("node", "side", "src_namespace", "src_workload", "src_pod", "dst_namespace",
               "dst_workload", "dst_pod", "dst_service", "dst_port")
WORKLOAD_LABELS = ("node", "side", "namespace", "workload")
POD_LABELS = ("node", "side", "namespace", "workload", "pod")  # the observing end (Kubernetes)
LABELS = {"edge": EDGE_LABELS, "workload": WORKLOAD_LABELS, "pod": POD_LABELS}
FAILURE_KINDS = ("refused", "timeout", "unreachable")
COUNTS = ("opened", "closed", "failed_refused", "failed_timeout", "failed_unreachable",
          "retransmits", "resets_sent", "resets_received", "bytes_sent", "bytes_received",
          "rtt_sum_us")
_UNREACHABLE = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN,
                          errno.ENETDOWN})


class MalformedNetworkBatch(ValueError):
    """A tcp.v1 batch that cannot be used; the agent dead-letters it with this reason."""


def failure_kind(record: dict[str, Any]) -> str:
    """Why a connect that never reached ESTABLISHED failed: ``refused`` (a reset answered the
    SYN), ``unreachable`` (an ICMP error), else ``timeout`` — the kernel gave up retrying
    SYNs (ETIMEDOUT), or the application abandoned the attempt before any answer."""
    err = int(record.get("sk_err") or 0)
    if record.get("refused") or err == errno.ECONNREFUSED:
        return "refused"
    if err in _UNREACHABLE:
        return "unreachable"
    return "timeout"


def rtt_sketch(rtt: dict[str, Any], sketch: LatencySketch | None = None) -> LatencySketch:
    """Add the srtt samples of one interval (a log2 histogram in µs) to a sketch, in seconds.

    A log2 slot alone is a factor-2 range, so the slot's range is first narrowed to the
    connection's observed [min, max] srtt and represented by its geometric middle; samples
    that all fall in one slot are represented by their exact mean instead.
    """
    sketch = sketch if sketch is not None else LatencySketch()
    samples = int(rtt.get("samples") or 0)
    if samples <= 0:
        return sketch
    slots = [(i, int(n)) for i, n in enumerate(rtt["hist"]) if n]
    if len(slots) == 1:
        sketch.add(float(rtt["sum_us"]) / samples / 1e6, slots[0][1])
        return sketch
    low, high = float(rtt.get("min_us") or 0), float(rtt.get("max_us") or 0)
    for i, n in slots:
        a, b = float(2 ** i), float(2 ** (i + 1))
        if low and high >= low:
            a, b = max(a, low), min(b, high)
        value = math.sqrt(a * b) if 0 < a <= b else float(2 ** i) * math.sqrt(2)
        sketch.add(value / 1e6, n)
    return sketch


class _Partial:
    """Counters and an RTT sketch of one (series, window) within one batch."""

    __slots__ = ("counts", "rtt")

    def __init__(self) -> None:
        self.counts = dict.fromkeys(COUNTS, 0)
        self.rtt = LatencySketch()

    def to_wire(self, window_start: int) -> dict[str, Any]:
        return {"window_start": window_start, "counts": self.counts, "rtt": self.rtt.to_wire()}


Series = tuple[str, tuple[str, ...]]  # ("edge" | "workload" | "pod", label values)


def series_key(series: Series) -> bytes:
    return (series[0] + "\x1f" + "\x1f".join(series[1])).encode()


class NetworkAggregator:
    """Names and aggregates tcp.v1 intervals; holds only the listener table."""

    def __init__(self, *, window_seconds: int, identity: IdentityTable | None = None) -> None:
        self.window_seconds = window_seconds
        self.identity = identity  # Kubernetes names, when k8s.v1 has them (streams/identity.py)
        self.listeners: dict[tuple[str, str, int], str] = {}  # (node, addr, port) → workload
        self.counters = collections.Counter[str]()
        self._partials: dict[Series, dict[int, _Partial]] = {}

    def on_listener(self, record: dict[str, Any]) -> None:
        self.listeners[(record["node"], record["addr"], int(record["port"]))] = (
            record.get("workload") or record["comm"])

    def _listener(self, node: str, addr: str, port: int, local: str) -> str | None:
        found = self.listeners.get((node, addr, port))
        if found is None and (addr in LOOPBACK or addr == local or addr.startswith("127.")):
            for wild in WILDCARD:
                found = self.listeners.get((node, wild, port))
                if found is not None:
                    break
        return found

    def on_batch(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        """Fold one tcp.v1 batch in; returns the node's conntrack record for network.v1, if
        the batch carried one."""
        try:
            node = str(batch["node"])
            intervals = batch["connections"]
            if not isinstance(intervals, list):
                raise TypeError("connections must be a list")
            for record in intervals:
                self._add(node, record)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise MalformedNetworkBatch(f"bad tcp.v1 batch: {type(exc).__name__}: {exc}"
                                        ) from exc
        self.counters["tcp_batches"] += 1
        self.counters["tcp_intervals"] += len(intervals)
        conntrack = batch.get("conntrack")
        if not conntrack:
            return None
        return {"v": 1, "kind": "conntrack", "node": node, "ts": int(batch["ts"]) / 1e9,
                **{k: int(conntrack[k]) for k in ("entries", "max", "drop", "early_drop",
                                                   "insert_failed")}}

    def names(self, node: str, r: dict[str, Any]
              ) -> tuple[str, tuple[str, str, str], tuple[str, str, str], str, int]:
        """(side, (src namespace, workload, pod), (dst namespace, workload, pod), dst service,
        dst port) of one interval. A pod's address is named by its pod, a service's cluster IP
        by the workload behind it (no pod: conntrack's answer is the L7 probe's); else
        bare-host naming (process, listener, address) with no pod. The service is the
        reassembler's (``Reassembler._service``): the cluster IP's owner, else the one service
        listing the called address."""
        laddr, lport, raddr, rport = r["laddr"], int(r["lport"]), r["raddr"], int(r["rport"])
        role = r["role"]
        if role not in ("client", "server"):  # adopted: a listening port means server
            role = "server" if self._listener(node, laddr, lport, laddr) else "client"
        if role == "client":
            src = self._pod(laddr) or ("", r["comm"] or peer_name(laddr), "")
            dst = self._pod(raddr, rport) or ("", r["peer_comm"] or self._listener(
                node, raddr, rport, laddr) or peer_name(raddr), "")
            return "client", src, dst, self._service(raddr, rport, cluster_ip=True), rport
        src = self._pod(raddr) or ("", r["peer_comm"] or peer_name(raddr), "")
        dst = self._pod(laddr) or ("", r["comm"] or self._listener(node, laddr, lport, laddr)
                                   or peer_name(laddr), "")
        return "server", src, dst, self._service(laddr, lport, cluster_ip=False), lport

    def _pod(self, addr: str, port: int | None = None) -> tuple[str, str, str] | None:
        ident = self.identity
        if ident is None or addr in LOOPBACK:
            return None
        pod = ident.pod_for_ip(addr)
        if pod is not None:
            return pod.namespace, pod.workload, pod.pod
        svc = ident.service_for(addr, port) if port is not None else None
        if svc is not None:
            return (*(ident.service_workload(svc) or (svc.namespace, svc.name)), "")
        return None

    def _service(self, addr: str, port: int, *, cluster_ip: bool) -> str:
        ident = self.identity
        return ident.called_service(addr, port, cluster_ip=cluster_ip) if ident else ""

    def _local_pod(self, addr: str) -> tuple[str, str, str] | None:
        ident = self.identity
        if ident is None or addr in LOOPBACK:
            return None
        pod = ident.pod_for_ip(addr)
        return (pod.namespace, pod.workload, pod.pod) if pod is not None else None

    def _add(self, node: str, r: dict[str, Any]) -> None:
        side, (src_ns, src, src_pod), (dst_ns, dst, dst_pod), service, port = self.names(node, r)
        local_ns, local = (src_ns, src) if side == "client" else (dst_ns, dst)
        edge: Series = ("edge", (node, side, src_ns, src, src_pod, dst_ns, dst, dst_pod, service,
                                 str(port)))
        workload: Series = ("workload", (node, side, local_ns, local))
        targets = [edge, workload]
        pod = self._local_pod(r["laddr"])
        if pod is not None:  # one replica's network must be visible on its own
            targets.append(("pod", (node, side, *pod)))
        window = self._window(int(r["ts"]))
        for series in targets:
            p = self._partial(series, window)
            counts = p.counts
            for name in ("retransmits", "resets_sent", "resets_received", "bytes_sent",
                         "bytes_received"):
                counts[name] += int(r[name])
            rtt = r["rtt"]
            counts["rtt_sum_us"] += int(rtt["sum_us"]) if rtt.get("samples") else 0
            rtt_sketch(rtt, p.rtt)
            if r["event"] == "close":
                if r["established"]:
                    counts["closed"] += 1
                elif side == "client":
                    counts["failed_" + failure_kind(r)] += 1
            if r["new"]:  # counted in the window it opened in
                opened_at = int(r["opened_ts"]) or int(r["ts"])
                self._partial(series, self._window(opened_at)).counts["opened"] += 1

    def _window(self, ts_ns: int) -> int:
        return (ts_ns // 1_000_000_000) // self.window_seconds * self.window_seconds

    def _partial(self, series: Series, window: int) -> _Partial:
        per_window = self._partials.get(series)
        if per_window is None:
            per_window = self._partials[series] = {}
        p = per_window.get(window)
        if p is None:
            p = per_window[window] = _Partial()
        return p

    def take_partials(self) -> list[tuple[bytes, dict[str, Any]]]:
        """Per-series messages for ``netseries.v1`` aggregated since the last call."""
        partials, self._partials = self._partials, {}
        out = []
        for (kind, values), windows in partials.items():
            names = LABELS[kind]
            out.append((series_key((kind, values)), {
                "v": 1, "kind": kind, "labels": dict(zip(names, values, strict=True)),
                "windows": [p.to_wire(start) for start, p in sorted(windows.items())],
            }))
        return out


@dataclasses.dataclass(slots=True)
class NetworkWindow:
    kind: str  # "edge" | "workload" | "pod"
    labels: dict[str, str]
    start: int
    partition: int
    counts: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    rtt: LatencySketch = dataclasses.field(default_factory=LatencySketch)
    revision: int = 0  # the revision this window will be emitted with next

    def merge(self, partial: dict[str, Any]) -> None:
        got = partial["counts"]
        for name in COUNTS:
            self.counts[name] += int(got.get(name, 0))
        self.rtt.merge(LatencySketch.from_wire(partial["rtt"]))

    def to_state(self) -> dict[str, Any]:
        return {"kind": self.kind, "labels": self.labels, "start": self.start,
                "partition": self.partition, "counts": self.counts, "rtt": self.rtt.to_wire(),
                "revision": self.revision}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> NetworkWindow:
        return cls(kind=state["kind"], labels=state["labels"], start=state["start"],
                   partition=state["partition"], counts=dict(state["counts"]),
                   rtt=LatencySketch.from_wire(state["rtt"]), revision=state["revision"])

    def to_record(self, window_seconds: int) -> dict[str, Any]:
        return {"v": 1, "kind": self.kind, "labels": self.labels, "window_start": self.start,
                "window_seconds": window_seconds, "counts": self.counts,
                "rtt": self.rtt.to_wire(), "revision": self.revision}


class NetworkWindowStore(TumblingStore[NetworkWindow]):
    """Open network windows of the partitions this worker owns (netseries.v1 partials →
    network.v1), with golden.WindowStore's rules."""

    def merge(self, key: bytes, message: dict[str, Any], partition: int) -> list[bytes]:
        if str(message["kind"]) not in LABELS:
            raise ValueError(f"unknown series kind {message['kind']!r}")
        dict(message["labels"])  # malformed labels fail here, whether or not a window opens
        return super().merge(key, message, partition)

    def _open(self, message: dict[str, Any], start: int, partition: int,
              revision: int) -> NetworkWindow:
        return NetworkWindow(kind=str(message["kind"]), labels=dict(message["labels"]),
                             start=start, partition=partition, revision=revision)

