"""Publish drained kernel events to Kafka: one msgpack batch per connection per flush.

The probe is thin: it does not parse protocols. It groups the events of each connection (so
one connection's events stay in order on one partition, keyed by connection), converts the
kernel's monotonic timestamps to wall-clock time, and hands the batches to an idempotent,
compressing confluent-kafka producer.

Nothing is dropped silently. A broker that is down means the producer buffers and retries
(``message.timeout.ms=0``: no expiry); if librdkafka's own queue is full, batches wait in an
overflow queue. Both are bounded in bytes (``probe.buffer_mb`` between them), so an outage
cannot take the probe past its memory limit; only beyond that is a batch dropped, and then
it and its events are counted.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import msgpack
from confluent_kafka import KafkaError, Message, Producer

from kubesight.logs import RepeatFilter

from .l7 import L7_FLAG_TLS, ConnectionBatch, EncodedBatch, connection_meta

log = logging.getLogger(__name__)
log.addFilter(RepeatFilter(every_s=10.0))  # a long outage drops on every flush: once per 10 s

_V, _ONE, _NODE, _PROBE, _SEQ, _CONN, _EVENTS = (
    msgpack.packb(x) for x in ("v", 1, "node", "probe", "seq", "conn", "events"))


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")

# A batch is sealed once it passes this; with one more event of at most 8 KiB it stays well
# under the broker's default 1 MiB message.max.bytes.
MAX_MESSAGE_BYTES = 768 * 1024


class EventLike(Protocol):
    kind: int
    conn_id: int
    role: int
    tgid: int
    comm: str
    family: int
    transport: int
    laddr: str
    lport: int
    raddr: str
    rport: int
    ts_ns: int
    size: int
    payload: bytes
    flags: int
    srtt_us: int
    retrans: int


def producer_config(base: Mapping[str, str], *, buffer_kbytes: int = 1_048_576
                    ) -> dict[str, Any]:
    """Settings for every kubesight producer: idempotent, compressed, never expiring, with
    ``buffer_kbytes`` of queue for a broker outage (1 GiB unless the caller has a budget)."""
    conf: dict[str, Any] = dict(base)
    conf.update({
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": "lz4",
        "linger.ms": 20,
        "batch.size": 1_000_000,
        "message.timeout.ms": 0,  # 0 = infinite: a broker outage means buffering, not loss
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": buffer_kbytes,
        "reconnect.backoff.max.ms": 2000,
    })
    return conf


def split_buffer(buffer_mb: int) -> tuple[int, int]:
    """probe.buffer_mb as (librdkafka's queue in KiB, the overflow queue in bytes): 3/4 and
    1/4. The overflow holds what librdkafka refuses once its queue is full (by bytes, or by
    its 1,000,000-message count), so the two together stay within the budget."""
    total = buffer_mb * 1024 * 1024
    return total * 3 // 4 // 1024, total // 4


class Publisher:
    """Batches events per connection and produces them to the raw topic."""

    def __init__(self, *, producer: Producer, topic: str, node: str, probe_id: str,
                 batch_max_events: int = 512, batch_max_bytes: int = MAX_MESSAGE_BYTES,
                 overflow_max_bytes: int = 256 * 1024 * 1024,
                 clock: Callable[[], tuple[int, int]] | None = None,
                 annotate: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._producer = producer
        # Adds the process's container id / pod UID to a batch's conn metadata (conntags.py).
        self._annotate = annotate
        self._topic = topic
        self._node = node
        self._probe_id = probe_id
        self.batch_max_events = batch_max_events
        self.batch_max_bytes = batch_max_bytes
        # Filled by L7Probe.drain_into (the hot path) or by add(); emptied by flush().
        self.open: dict[int, ConnectionBatch] = {}
        self.sealed: list[ConnectionBatch] = []
        # (key, value, events) that librdkafka refused (queue full), oldest first.
        self._overflow: collections.deque[tuple[bytes, bytes, int]] = collections.deque()
        self._overflow_max = overflow_max_bytes
        self._overflow_bytes = 0
        self._seq = 0
        # Every message's head up to its seq: the node and the probe do not change.
        self._head = b"".join((b"\x86", _V, _ONE, _NODE, msgpack.packb(node), _PROBE,
                               msgpack.packb(probe_id), _SEQ))
        self._clock = clock or (lambda: (time.time_ns(), time.monotonic_ns()))
        self.counters = collections.Counter[str]()

    def clock_offset_ns(self) -> int:
        """Add to a bpf_ktime_get_ns() (CLOCK_MONOTONIC) timestamp to get unix time."""
        wall, mono = self._clock()
        return wall - mono

    def count_in(self, n: int) -> None:
        self.counters["events_in"] += n

    def add(self, events: Iterable[EventLike]) -> None:
        """Batch decoded events (the slow path, for callers holding RawEvents)."""
        offset = self.clock_offset_ns()
        n = 0
        for ev in events:
            n += 1
            run = msgpack.packb([ev.kind, ev.ts_ns + offset, ev.size, ev.payload])
            batch = self.open.get(ev.conn_id)
            if (batch is None or not isinstance(batch, EncodedBatch)
                    or batch.n >= self.batch_max_events
                    or batch.nbytes + len(run) > self.batch_max_bytes):
                if batch is not None:
                    self.sealed.append(batch)
                batch = self.open[ev.conn_id] = EncodedBatch(ev.conn_id, connection_meta(
                    ev.conn_id, ev.role, ev.family, ev.transport, ev.lport, ev.rport, ev.tgid,
                    (ev.laddr, ev.raddr, ev.comm)))
            if ev.flags & L7_FLAG_TLS:
                batch.meta["tls"] = True
            if ev.srtt_us:
                batch.meta["srtt_us"], batch.meta["retrans"] = ev.srtt_us, ev.retrans
            batch.add_encoded(run, 1)
        self.count_in(n)

    def flush(self) -> int:
        """Produce every pending connection batch; returns the number of Kafka messages."""
        batches = self.sealed
        batches.extend(self.open.values())
        self.open, self.sealed = {}, []
        self._drain_overflow()
        for batch in batches:
            n = batch.n
            key, value = self._encode(batch, n)
            batch.release()  # a held batch's buffer goes back to the drain, for the next
            self._produce(key, value, n)
        self._producer.poll(0)
        return len(batches)

    def _encode(self, batch: ConnectionBatch, n: int) -> tuple[bytes, bytes]:
        # The events are already msgpack (encoded in C on the hot path): the batch puts them
        # after the head rather than decoding and re-encoding; a held batch has room for the
        # head in front of them, so its message is copied once, out of the drain's buffer.
        meta = batch.meta
        if self._annotate is not None:
            self._annotate(meta)
        value = batch.value(b"".join((
            self._head, msgpack.packb(self._seq), _CONN, msgpack.packb(meta), _EVENTS,
            _array_header(n))))
        self._seq += 1
        key = f"{self._node}/{self._probe_id}/{batch.conn_id}".encode()
        return key, value

    def _produce(self, key: bytes, value: bytes, n: int) -> None:
        if self._overflow:  # keep the order: behind what is already waiting
            self._queue_overflow(key, value, n)
            return
        try:
            self._producer.produce(self._topic, value=value, key=key, on_delivery=self._delivered)
        except BufferError:
            self._queue_overflow(key, value, n)
            return
        self.counters["events_published"] += n

    def _queue_overflow(self, key: bytes, value: bytes, n: int) -> None:
        size = len(key) + len(value)
        if self._overflow_bytes + size > self._overflow_max:
            self.counters["overflow_dropped_batches"] += 1
            self.counters["overflow_dropped_events"] += n
            log.error("Kafka buffer full (librdkafka's queue and %d MiB of overflow): "
                      "dropped a batch of %d events (overflow_dropped_events counts them)",
                      self._overflow_max >> 20, n)
            return
        self._overflow.append((key, value, n))
        self._overflow_bytes += size
        self.counters["overflow_queued_batches"] += 1

    def _drain_overflow(self) -> None:
        while self._overflow:
            key, value, n = self._overflow[0]
            try:
                self._producer.produce(self._topic, value=value, key=key,
                                       on_delivery=self._delivered)
            except BufferError:
                return
            self._overflow.popleft()
            self._overflow_bytes -= len(key) + len(value)
            self.counters["events_published"] += n

    def _delivered(self, err: KafkaError | None, _msg: Message) -> None:
        if err is None:
            self.counters["kafka_delivered"] += 1
        else:
            self.counters["kafka_delivery_errors"] += 1
            log.warning("kafka delivery failed: %s", err)

    def stats(self) -> dict[str, int]:
        out = dict(self.counters)
        out["kafka_queue_len"] = len(self._producer)
        out["overflow_len"] = len(self._overflow)
        out["overflow_bytes"] = self._overflow_bytes
        return out
