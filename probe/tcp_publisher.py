"""Publish the kernel's per-connection TCP health as ``tcp.v1`` interval records.

The kernel keeps cumulative counters per connection (bpf/tcp.bpf.c). This turns them into
*intervals*: what changed since the connection was last reported. A connection is reported
when its socket is destroyed (its final record, from the ring buffer) and, while it lives,
at every snapshot of the kernel table (every ``snapshot_interval_s``) in which something
changed. Stream workers then add intervals up with no per-connection state of their own, and
a restarted worker neither loses nor double-counts anything; a restarted probe starts with
fresh kernel maps and counts connections it adopts from then on.

One Kafka message is a batch of intervals of one node (``{node}/{probe}/tcp/{seq}`` keys
spread the batches over partitions: nothing downstream needs one connection's intervals in
order). Snapshot batches also carry the node's conntrack usage.

kubesight's own connections: the kernel drops those it can attribute (see bpf/tcp.bpf.c).
Connections it adopted without a process (open before the probe started) are matched here
against the sockets kubesight's processes hold in /proc; a match is flagged in the kernel
and never published.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import msgpack
from confluent_kafka import KafkaError, Message, Producer

from . import node
from .tcp import TcpConnection, TcpFlag, TcpProbe, TcpRole

log = logging.getLogger("kubesight.probe.tcp")

__all__ = ["TcpPublisher", "interval_record"]

MAX_RECORDS_PER_MESSAGE = 1000  # ~400 bytes each: well under the broker's message limit
ROLE_NAMES = {int(TcpRole.ACTIVE): "client", int(TcpRole.PASSIVE): "server",
              int(TcpRole.UNKNOWN): "unknown"}
_COUNTED = ("bytes_sent", "bytes_received", "retransmits", "resets_sent", "resets_received",
            "srtt_sum_us")


class _Reported(NamedTuple):
    counts: tuple[int, ...]  # _COUNTED, cumulative, as last reported
    hist: tuple[int, ...]
    opened: bool  # reported as opened (it was seen reaching ESTABLISHED)


def interval_record(conn: TcpConnection, prev: _Reported | None, *, event: str, ts_ns: int,
                    offset_ns: int) -> tuple[dict[str, Any], _Reported] | None:
    """The tcp.v1 record of what changed on ``conn`` since ``prev`` (None: never reported),
    and the new baseline; None for a snapshot in which nothing changed."""
    counts = tuple(getattr(conn, name) for name in _COUNTED)
    before = prev or _Reported((0,) * len(_COUNTED), (0,) * len(conn.rtt_hist), False)
    # Cumulative counters only grow; max() guards a torn read of a live entry.
    delta = [max(0, now - was) for now, was in zip(counts, before.counts, strict=True)]
    hist = [max(0, now - was) for now, was in zip(conn.rtt_hist, before.hist, strict=True)]
    established = bool(conn.flags & TcpFlag.ESTABLISHED)
    # Seen opening (not adopted) and established: counts as opened, once.
    new = established and conn.opened_ns != 0 and not before.opened
    if event == "snapshot" and not new and not any(delta) and not any(hist):
        return None
    record: dict[str, Any] = {
        "id": conn.conn_id, "event": event, "ts": ts_ns,
        "role": ROLE_NAMES.get(conn.role, "unknown"), "family": conn.family,
        "netns": conn.netns, "laddr": conn.laddr, "lport": conn.lport, "raddr": conn.raddr,
        "rport": conn.rport, "tgid": conn.tgid, "comm": conn.comm,
        "peer_tgid": conn.peer_tgid, "peer_comm": conn.peer_comm,
        "new": new, "opened_ts": conn.opened_ns + offset_ns if conn.opened_ns else 0,
        "established": established,
        "refused": bool(conn.flags & TcpFlag.RST_SYN_SENT),
        "sk_err": conn.sk_err,
        "bytes_sent": delta[0], "bytes_received": delta[1], "retransmits": delta[2],
        "resets_sent": delta[3], "resets_received": delta[4],
        "rtt": {"samples": sum(hist), "sum_us": delta[5], "min_us": conn.srtt_min_us,
                "max_us": conn.srtt_max_us, "last_us": conn.srtt_last_us, "hist": hist},
    }
    return record, _Reported(counts, conn.rtt_hist, before.opened or new)


class TcpPublisher:
    """Drains and snapshots a TcpProbe, produces tcp.v1 batches. ``poll()`` on every turn of the
    probe's TCP thread does all of it on its own timers."""

    def __init__(self, probe: TcpProbe, *, producer: Producer, topic: str, node_name: str,
                 probe_id: str, excluded: set[int], snapshot_interval_s: float = 5.0,
                 flush_interval_s: float = 1.0,
                 clock: Callable[[], tuple[int, int]] | None = None) -> None:
        self.probe = probe
        self._producer = producer
        self._topic = topic
        self._node = node_name
        self._probe_id = probe_id
        self._excluded = excluded  # kubesight's tgids (the probe runner's live set)
        self.snapshot_interval_s = snapshot_interval_s
        self.flush_interval_s = flush_interval_s
        self._clock = clock or (lambda: (time.time_ns(), time.monotonic_ns()))
        self._reported: dict[int, _Reported] = {}  # conn_id → baseline of live connections
        self._own: set[int] = set()  # conn_ids found to be kubesight's own
        self._checked: set[int] = set()  # conn_ids without a process, found not to be
        self._own_sockets: set[tuple[str, int, str, int]] = set()
        self._own_sockets_stale = True  # re-read once per snapshot, when needed
        self._flush_due = False  # a snapshot was taken: publish even without records
        self._pending: list[dict[str, Any]] = []
        self._conntrack: node.Conntrack | None = None
        self._seq = 0
        self._next_snapshot = self._next_flush = 0.0
        self.counters = collections.Counter[str]()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.probe.start()
        now = time.monotonic()
        self._next_snapshot = now + self.snapshot_interval_s
        self._next_flush = now + self.flush_interval_s

    def close(self) -> None:
        """Report what is left (closed connections; live ones as a last snapshot), then
        detach the kernel side."""
        try:
            self.drain()
            self.snapshot()
            self.flush()
        finally:
            self.probe.close()

    def poll(self) -> None:
        self.drain()
        now = time.monotonic()
        if now >= self._next_snapshot:
            self.snapshot()
            self._next_snapshot = now + self.snapshot_interval_s
        if now >= self._next_flush or len(self._pending) >= MAX_RECORDS_PER_MESSAGE:
            self.flush()
            self._next_flush = now + self.flush_interval_s

    def exclude_tgid(self, tgid: int) -> None:
        self.probe.exclude_tgid(tgid)

    def include_tgid(self, tgid: int) -> None:
        self.probe.include_tgid(tgid)

    def learn_listeners(self, listeners: Iterable[node.Listener]) -> None:
        """Listeners found in /proc (this network namespace): names for passive connections
        whose listener the kernel never saw call listen()."""
        for lst in listeners:
            self.probe.learn_listener(lst.port, lst.tgid, lst.comm)

    # --- kernel → intervals ----------------------------------------------------------------

    def _offset(self) -> tuple[int, int]:
        wall, mono = self._clock()
        return wall, wall - mono

    def drain(self) -> None:
        """Turn the final records of connections destroyed since the last call into intervals."""
        closed = self.probe.drain()
        if not closed:
            return
        _, offset = self._offset()
        for conn in closed:
            prev = self._reported.pop(conn.conn_id, None)
            own = conn.conn_id in self._own or self._is_own(conn, refresh=False)
            self._own.discard(conn.conn_id)
            self._checked.discard(conn.conn_id)
            if own:
                self.counters["own_connections_dropped"] += 1
                continue
            out = interval_record(conn, prev, event="close", ts_ns=conn.closed_ns + offset,
                                  offset_ns=offset)
            if out is not None:
                self._pending.append(out[0])
        self.counters["closed"] += len(closed)

    def snapshot(self) -> None:
        """Read the live table: an interval for every connection that changed, and the node's
        conntrack usage for the next batch."""
        wall, offset = self._offset()
        live = self.probe.connections()
        self._own_sockets_stale = True
        seen: set[int] = set()
        for key, raw, conn in live:
            seen.add(conn.conn_id)
            if conn.conn_id in self._own:
                continue
            if self._is_own(conn, refresh=True):
                self._own.add(conn.conn_id)
                self.probe.mark_excluded(key, raw)
                self.counters["own_connections_dropped"] += 1
                continue
            prev = self._reported.get(conn.conn_id)
            out = interval_record(conn, prev, event="snapshot", ts_ns=wall, offset_ns=offset)
            if out is not None:
                self._pending.append(out[0])
                self._reported[conn.conn_id] = out[1]
        # Entries gone without a final record (LRU eviction, a lost ring-buffer record).
        for gone in set(self._reported) - seen:
            del self._reported[gone]
        self._checked &= seen
        self._conntrack = node.conntrack()
        self.counters["snapshots"] += 1
        self.counters["live_connections"] = len(live)
        self._flush_due = True

    def _is_own(self, conn: TcpConnection, *, refresh: bool) -> bool:
        """A connection without a known process: is it one of kubesight's sockets?"""
        if conn.tgid or conn.peer_tgid or conn.conn_id in self._checked:
            return False
        if refresh and self._own_sockets_stale:
            # A copy: the probe's housekeeping thread adds to the live set.
            self._own_sockets = node.sockets_of(set(self._excluded))
            self._own_sockets_stale = False
        self._checked.add(conn.conn_id)
        return (conn.laddr, conn.lport, conn.raddr, conn.rport) in self._own_sockets

    # --- Kafka -----------------------------------------------------------------------------

    def flush(self) -> int:
        """Produce what is pending (and the conntrack usage after a snapshot); returns the
        number of Kafka messages."""
        if not self._pending and not self._flush_due:
            return 0
        pending, self._pending = self._pending, []
        conntrack, self._conntrack = self._conntrack, None
        self._flush_due = False
        messages = 0
        for start in range(0, max(1, len(pending)), MAX_RECORDS_PER_MESSAGE):
            chunk = pending[start:start + MAX_RECORDS_PER_MESSAGE]
            batch: dict[str, Any] = {"v": 1, "node": self._node, "probe": self._probe_id,
                                     "seq": self._seq, "ts": time.time_ns(),
                                     "connections": chunk}
            if conntrack is not None and start == 0:
                batch["conntrack"] = conntrack._asdict()
            key = f"{self._node}/{self._probe_id}/tcp/{self._seq}"
            self._seq += 1
            try:
                self._producer.produce(self._topic, key=key, value=msgpack.packb(batch),
                                       on_delivery=self._delivered)
            except BufferError:  # librdkafka's queue is full (a long broker outage)
                self.counters["records_dropped"] += len(chunk)
                continue
            messages += 1
            self.counters["records_published"] += len(chunk)
        self._producer.poll(0)
        return messages

    def _delivered(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self.counters["kafka_delivery_errors"] += 1
            log.warning("tcp.v1 delivery failed: %s", err)

    def stats(self) -> dict[str, int]:
        """Health counters, ``tcp_`` prefixed: the kernel's and this publisher's."""
        out = {f"tcp_kernel_{k}": v for k, v in self.probe.counters().items()}
        counters = dict(self.counters)  # copied at once: they change on the probe-tcp thread
        out.update({f"tcp_{k}": v for k, v in counters.items()})
        return out
