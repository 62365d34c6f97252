"""Raw connection events → request records and per-series window partials.

Plain Python on plain data, no Faust here: the agent in ``agents.py`` feeds decoded raw batches
to a ``Reassembler`` and ships what it returns. Keeping the logic free of Kafka makes it
testable with captured bytes and lets the benchmark measure it alone.

Naming the two ends of a request, each as (namespace, workload, pod):
- in Kubernetes (``identity``, fed by ``k8s.v1``): the side that observed it is the pod of its
  process's container (when the probe says which) or of its local address; a peer is the pod
  that has its IP; a client's peer at a service's cluster IP:port is the backend pod conntrack
  sent the call to (the probe asks), else the one workload behind the service, else the
  service itself;
- otherwise (bare host) the observing side is its own process (``comm``); a client's peer is
  the process that listens on the address it connected to (listeners come from the probe's
  /proc scan on ``meta.v1`` and from accepted connections); a server's peer is the client
  process whose socket has the mirrored 4-tuple, when that client runs on a node we observe;
  otherwise both fall back to the peer's IP.

The called service (``dst_service``, Kubernetes only): for a client, the service that owns the
cluster IP:port it connected to, else the one service whose EndpointSlices list the pod
IP:port it called; for a server, the one service whose EndpointSlices list its own IP:port.
Empty when no service, or more than one, claims the address.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import ipaddress
import time
from collections.abc import Callable
from typing import Any

from .identity import IdentityTable
from .protocols import ParserOptions, Sniffer
from .record import Request
from .sketch import LatencySketch

KIND_CONNECT, KIND_ACCEPT, KIND_DATA_OUT, KIND_DATA_IN, KIND_CLOSE = 1, 2, 3, 4, 5
ROLE_NAMES = {0: "unknown", 1: "client", 2: "server"}
LOOPBACK = ("127.0.0.1", "::1")
WILDCARD = ("0.0.0.0", "::")
IDLE_CONNECTION_S = 600.0
IDLE_UDP_FLOW_S = 60.0  # a server's UDP flows are never closed by the kernel: forget sooner
MAX_PEERS = 200_000
DEFER_S = 3.0  # how long a same-node call waits for its peer's name

# (namespace, workload, pod): on a bare host ("", process or address, "")
Party = tuple[str, str, str]

# Pods are labels too (empty on a bare host): a slow replica must stand out in the metrics.
SERIES_LABELS = ("side", "protocol", "src_namespace", "src_workload", "src_pod", "dst_namespace",
                 "dst_workload", "dst_pod", "dst_service", "endpoint", "status")


class MalformedBatch(ValueError):
    """A raw batch that cannot be used; the agent dead-letters it with this reason."""


@dataclasses.dataclass(slots=True)
class _Connection:
    key: str
    node: str
    tgid: int
    comm: str
    laddr: str
    lport: int
    raddr: str
    rport: int
    parser: Sniffer
    last_seen: float
    transport: str = "tcp"
    tls: bool = False  # events are plaintext from the TLS library
    srtt_us: int = 0  # the connection's health as of its latest batch (TCP, from the kernel)
    retrans: int = 0
    container_id: str = ""  # of the process, when the probe knows it (cgroup)
    pod_uid: str = ""
    backend_addr: str = ""  # a call to a cluster IP: the pod conntrack sent it to


class WindowPartial:
    """Counts and a latency sketch for one (series, window) within one batch."""

    __slots__ = ("count", "errors", "slow", "sum_seconds", "sketch")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.slow = 0
        self.sum_seconds = 0.0
        self.sketch = LatencySketch()

    def add(self, seconds: float, error: bool, slow: bool) -> None:
        self.count += 1
        self.errors += error
        self.slow += slow
        self.sum_seconds += seconds
        self.sketch.add(seconds)

    def to_wire(self, window_start: int) -> dict[str, Any]:
        return {"window_start": window_start, "count": self.count, "errors": self.errors,
                "slow": self.slow, "sum_seconds": self.sum_seconds,
                "sketch": self.sketch.to_wire()}


@functools.lru_cache(maxsize=65536)
def peer_name(addr: str) -> str:
    """An unnamed peer: its address if private (a host or pod we may name later), else
    ``external`` — public client addresses would make label cardinality unbounded."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return "external"
    if ip.is_private or ip.is_loopback or ip.is_link_local:
        return addr
    return "external"


def series_key(labels: tuple[str, ...]) -> bytes:
    return "\x1f".join(labels).encode()


class Reassembler:
    """Holds every live connection's parser; turns raw batches into requests and partials."""

    def __init__(self, *, window_seconds: int, slow_threshold_ns: Callable[[str], int],
                 clock: Callable[[], float] = time.monotonic,
                 options: ParserOptions | None = None,
                 identity: IdentityTable | None = None) -> None:
        self.window_seconds = window_seconds
        self.identity = identity
        self.options = options or ParserOptions()
        self._slow_ns = slow_threshold_ns
        self._clock = clock
        self.connections: dict[str, _Connection] = {}
        self.listeners: dict[tuple[str, str, int], str] = {}  # (node, addr, port) → workload
        self._client_sockets: collections.OrderedDict[tuple[str, int, str, int], str] = (
            collections.OrderedDict())
        self.counters = collections.Counter[str]()
        self._deferred: list[tuple[float, _Connection, Request]] = []
        # (series labels) → window start → partial; drained by take_partials()
        self._partials: dict[tuple[str, ...], dict[int, WindowPartial]] = {}

    # -- metadata ---------------------------------------------------------------------------
    def on_listener(self, record: dict[str, Any]) -> None:
        self.listeners[(record["node"], record["addr"], int(record["port"]))] = (
            record.get("workload") or record["comm"])

    def _listener_workload(self, node: str, addr: str, port: int) -> str | None:
        found = self.listeners.get((node, addr, port))
        if found is None and addr in LOOPBACK:
            for wild in WILDCARD:
                found = self.listeners.get((node, wild, port))
                if found is not None:
                    break
        return found

    # -- events -----------------------------------------------------------------------------
    def on_batch(self, key: str, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Feed one raw batch; returns the request records it completed (wire form)."""
        try:
            conn_meta = batch["conn"]
            events = batch["events"]
            node = batch["node"]
        except (KeyError, TypeError) as exc:
            raise MalformedBatch(f"missing field {exc}") from exc
        if not isinstance(events, list) or not isinstance(conn_meta, dict):
            raise MalformedBatch("conn must be a map and events a list")
        conn = self.connections.get(key)
        if conn is None:
            conn = self._open(key, node, conn_meta)
        if conn_meta.get("tls"):
            conn.tls = True
        if "srtt_us" in conn_meta:
            try:
                conn.srtt_us = int(conn_meta["srtt_us"])
                conn.retrans = int(conn_meta.get("retrans", 0))
            except (TypeError, ValueError) as exc:
                raise MalformedBatch(f"bad connection health: {exc}") from exc
        conn.last_seen = self._clock()
        out: list[Request] = []
        feed = conn.parser.feed
        closed = False
        for ev in events:
            try:
                kind, ts, size, payload = ev
            except (TypeError, ValueError) as exc:
                raise MalformedBatch(f"event is not [kind, ts, size, payload]: {ev!r:.80}") from exc
            if kind == KIND_DATA_OUT:
                if size < 0:  # the send failed, the peer is gone: what was answered, unsent
                    self.counters["failed_sends"] += 1
                    size = len(payload)
                out += feed("out", ts, size, payload)
            elif kind == KIND_DATA_IN:
                out += feed("in", ts, size, payload)
            elif kind == KIND_CLOSE:
                out += conn.parser.flush(ts)
                closed = True
            elif kind in (KIND_CONNECT, KIND_ACCEPT):
                continue
            else:
                raise MalformedBatch(f"unknown event kind {kind!r}")
        self.counters["events"] += len(events)
        if closed:
            self._close(conn)
        return [rec for req in out if (rec := self._record(conn, req)) is not None]

    def _open(self, key: str, node: str, meta: dict[str, Any]) -> _Connection:
        try:
            role = ROLE_NAMES.get(int(meta["role"]), "unknown")
            conn = _Connection(
                key=key, node=node, tgid=int(meta["tgid"]), comm=str(meta["comm"]),
                laddr=str(meta["laddr"]), lport=int(meta["lport"]), raddr=str(meta["raddr"]),
                rport=int(meta["rport"]), parser=Sniffer(role, self.options),
                last_seen=self._clock(), transport=str(meta.get("transport", "tcp")),
                container_id=str(meta.get("container_id") or ""),
                pod_uid=str(meta.get("pod_uid") or ""),
                backend_addr=str(meta.get("backend_addr") or ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedBatch(f"bad conn metadata: {exc}") from exc
        self.connections[key] = conn
        if role == "client":
            self._client_sockets[(conn.laddr, conn.lport, conn.raddr, conn.rport)] = conn.comm
            if len(self._client_sockets) > MAX_PEERS:
                self._client_sockets.popitem(last=False)
        elif role == "server":
            # An accepted connection proves its local address:port is a listener.
            self.listeners.setdefault((node, conn.laddr, conn.lport), conn.comm)
        self.counters["connections_opened"] += 1
        return conn

    def _close(self, conn: _Connection) -> None:
        self._fold_parser_counters(conn)
        del self.connections[conn.key]
        self.counters["connections_closed"] += 1

    def _fold_parser_counters(self, conn: _Connection) -> None:
        self.counters.update(conn.parser.parser_counters())

    def expire_idle(self, max_idle_s: float = IDLE_CONNECTION_S) -> list[dict[str, Any]]:
        """Forget connections silent for too long (their close was never seen)."""
        now = self._clock()
        cutoff, udp_cutoff = now - max_idle_s, now - min(max_idle_s, IDLE_UDP_FLOW_S)
        stale = [c for c in self.connections.values()
                 if c.last_seen < (udp_cutoff if c.transport == "udp" else cutoff)]
        out: list[dict[str, Any]] = []
        for conn in stale:
            out += [rec for r in conn.parser.flush(time.time_ns())
                    if (rec := self._record(conn, r)) is not None]
            self._close(conn)
            self.counters["connections_expired"] += 1
        return out

    # -- records and series -----------------------------------------------------------------
    def _local(self, conn: _Connection) -> Party:
        """The side that observed the connection."""
        ident = self.identity
        if ident is not None:
            pod = (ident.pod_for_container(conn.container_id) or ident.pod_for_uid(conn.pod_uid)
                   or (None if conn.laddr in LOOPBACK else ident.pod_for_ip(conn.laddr)))
            if pod is not None:
                return pod.namespace, pod.workload, pod.pod
        return "", conn.comm, ""

    def _remote_pod(self, addr: str) -> Party | None:
        pod = self.identity.pod_for_ip(addr) if self.identity is not None else None
        return (pod.namespace, pod.workload, pod.pod) if pod is not None else None

    def _remote_server(self, conn: _Connection) -> Party | None:
        """The server a client called: the pod behind a service, the service's workload, a
        pod, or a local listener."""
        if self.identity is not None:
            if conn.backend_addr and (pod := self._remote_pod(conn.backend_addr)) is not None:
                return pod
            svc = self.identity.service_for(conn.raddr, conn.rport)
            if svc is not None:
                ns, workload = self.identity.service_workload(svc) or (svc.namespace, svc.name)
                return ns, workload, ""
            if (pod := self._remote_pod(conn.raddr)) is not None:
                return pod
        listener = self._listener_workload(conn.node, conn.raddr, conn.rport)
        return ("", listener, "") if listener is not None else None

    def _service(self, conn: _Connection, side: str) -> str:
        """The called service's name (see the module docstring), or ""."""
        if self.identity is None:
            return ""
        if side == "client":
            return self.identity.called_service(conn.raddr, conn.rport, cluster_ip=True)
        return self.identity.called_service(conn.laddr, conn.lport, cluster_ip=False)

    def _names(self, conn: _Connection, req: Request, final: bool
               ) -> tuple[Party, Party] | None:
        """(src, dst) parties, or None to wait for the peer of a same-node call.

        A call between two processes of one node is seen from both ends at about the same
        time, but on different partitions: the caller's record may be processed before the
        callee's accept has taught us who listens there. Such records wait (``DEFER_S``) for
        the name instead of being counted under an address; remote peers never wait.
        """
        same_node = conn.raddr in LOOPBACK or conn.raddr == conn.laddr
        if req.side == "client":
            dst = self._remote_server(conn)
            if dst is None and same_node and not final:
                return None
            return self._local(conn), dst or ("", peer_name(conn.raddr), "")
        src = self._remote_pod(conn.raddr)
        if src is None:
            comm = self._client_sockets.get((conn.raddr, conn.rport, conn.laddr, conn.lport))
            if comm is None and same_node and not final:
                return None
            src = ("", comm or peer_name(conn.raddr), "")
        return src, self._local(conn)

    def _record(self, conn: _Connection, req: Request) -> dict[str, Any] | None:
        names = self._names(conn, req, final=False)
        if names is None:
            self._deferred.append((self._clock() + DEFER_S, conn, req))
            self.counters["records_deferred"] += 1
            return None
        return self._build(conn, req, *names)

    def expire_requests(self, now_ns: int) -> list[tuple[str, dict[str, Any]]]:
        """(connection key, record) of requests past their protocol's deadline (timeouts)."""
        out = []
        for conn in list(self.connections.values()):
            for req in conn.parser.expire(now_ns):
                record = self._record(conn, req)
                if record is not None:
                    out.append((conn.key, record))
        return out

    @property
    def deferred(self) -> int:
        """Records waiting for a peer's name."""
        return len(self._deferred)

    def release_deferred(self, *, stopping: bool = False) -> list[tuple[str, dict[str, Any]]]:
        """(connection key, record) of deferred records whose peer is now known or whose wait
        is over (then named by address). ``stopping``: every one of them, now: their raw input
        is committed, and a worker that stopped with them would lose them."""
        if not self._deferred:
            return []
        now = self._clock()
        out, waiting = [], []
        for deadline, conn, req in self._deferred:
            names = self._names(conn, req, final=stopping or now >= deadline)
            if names is None:
                waiting.append((deadline, conn, req))
            else:
                out.append((conn.key, self._build(conn, req, *names)))
        self._deferred = waiting
        return out

    def _build(self, conn: _Connection, req: Request, src: Party, dst: Party) -> dict[str, Any]:
        latency_ns = max(0, req.end_ns - req.start_ns)
        slow = latency_ns > self._slow_ns(req.protocol)
        record = {
            "protocol": req.protocol, "side": req.side, "method": req.method,
            "endpoint": req.endpoint[:256], "path": req.raw_path[:256], "status": req.status,
            "error": req.error, "slow": slow, "start_ns": req.start_ns, "end_ns": req.end_ns,
            "request_bytes": req.request_bytes, "response_bytes": req.response_bytes,
            "complete": req.complete, "query": req.query, "tls": conn.tls,
            "rtt_us": conn.srtt_us, "retransmits": conn.retrans,
            "src_namespace": src[0], "src_workload": src[1], "src_pod": src[2],
            "dst_namespace": dst[0], "dst_workload": dst[1], "dst_pod": dst[2],
            "dst_service": self._service(conn, req.side), "pid": conn.tgid,
        }
        self._aggregate(record, latency_ns)
        return record

    def _aggregate(self, record: dict[str, Any], latency_ns: int) -> None:
        labels = (record["side"], record["protocol"], record["src_namespace"],
                  record["src_workload"], record["src_pod"], record["dst_namespace"],
                  record["dst_workload"], record["dst_pod"], record["dst_service"],
                  record["endpoint"], record["status"])
        window = self.window_seconds
        start = (record["end_ns"] // 1_000_000_000) // window * window
        per_window = self._partials.get(labels)
        if per_window is None:
            per_window = self._partials[labels] = {}
        partial = per_window.get(start)
        if partial is None:
            partial = per_window[start] = WindowPartial()
        partial.add(latency_ns / 1e9, record["error"], record["slow"])
        self.counters["requests"] += 1

    def take_partials(self) -> list[tuple[bytes, dict[str, Any]]]:
        """Per-series messages for ``series.v1`` aggregated since the last call."""
        partials, self._partials = self._partials, {}
        out = []
        for labels, windows in partials.items():
            out.append((series_key(labels), {
                "v": 1,
                "series": dict(zip(SERIES_LABELS, labels, strict=True)),
                "windows": [p.to_wire(start) for start, p in sorted(windows.items())],
            }))
        return out

    def parser_counters(self) -> dict[str, int]:
        totals = collections.Counter(self.counters)
        for conn in self.connections.values():
            totals.update(conn.parser.parser_counters())
        return dict(totals)
