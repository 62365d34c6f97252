"""Publish drained kernel events to Kafka: one msgpack batch per connection per flush.

The probe is thin: it does not parse protocols. It groups the events of each connection (so
one connection's events stay in order on one partition, keyed by connection), converts the
kernel's monotonic timestamps to wall-clock time, and hands the batches to an idempotent,
compressing confluent-kafka producer.

Nothing is dropped silently. A broker that is down means the producer buffers and retries
(``message.timeout.ms=0``: no expiry); if librdkafka's own queue is full, batches wait in a
bounded overflow queue; only beyond that is a batch dropped, and then it is counted.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import msgpack
from confluent_kafka import KafkaError, Message, Producer

log = logging.getLogger(__name__)

EVENT_OVERHEAD = 32  # msgpack framing of one event besides its payload, rounded up
MAX_MESSAGE_BYTES = 768 * 1024  # well under the broker's default 1 MiB message.max.bytes


class EventLike(Protocol):
    kind: int
    conn_id: int
    role: int
    tgid: int
    comm: str
    family: int
    laddr: str
    lport: int
    raddr: str
    rport: int
    ts_ns: int
    size: int
    payload: bytes


def producer_config(base: Mapping[str, str]) -> dict[str, Any]:
    """Settings for every kubesight producer: idempotent, compressed, never expiring."""
    conf: dict[str, Any] = dict(base)
    conf.update({
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": "lz4",
        "linger.ms": 20,
        "batch.size": 1_000_000,
        "message.timeout.ms": 0,  # 0 = infinite: a broker outage means buffering, not loss
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,  # 1 GiB of outage buffer
        "reconnect.backoff.max.ms": 2000,
    })
    return conf


class Publisher:
    """Batches events per connection and produces them to the raw topic."""

    def __init__(self, *, producer: Producer, topic: str, node: str, probe_id: str,
                 batch_max_events: int = 512, batch_max_bytes: int = MAX_MESSAGE_BYTES,
                 overflow_max_batches: int = 100_000,
                 clock: Callable[[], tuple[int, int]] | None = None) -> None:
        self._producer = producer
        self._topic = topic
        self._node = node
        self._probe_id = probe_id
        self._batch_max = batch_max_events
        self._batch_bytes = batch_max_bytes
        self._pending: dict[int, list[EventLike]] = {}
        self._overflow: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._overflow_max = overflow_max_batches
        self._seq = 0
        self._clock = clock or (lambda: (time.time_ns(), time.monotonic_ns()))
        self.counters = collections.Counter[str]()

    def add(self, events: Iterable[EventLike]) -> None:
        pending = self._pending
        n = 0
        for ev in events:
            n += 1
            batch = pending.get(ev.conn_id)
            if batch is None:
                pending[ev.conn_id] = [ev]
            else:
                batch.append(ev)
        self.counters["events_in"] += n

    def flush(self) -> int:
        """Produce every pending connection batch; returns the number of Kafka messages."""
        wall, mono = self._clock()
        offset = wall - mono  # bpf_ktime_get_ns() is CLOCK_MONOTONIC
        produced = 0
        pending, self._pending = self._pending, {}
        self._drain_overflow()
        for conn_id, events in pending.items():
            for chunk in self._chunks(events):
                key, value = self._encode(conn_id, chunk, offset)
                self._produce(key, value)
                produced += 1
                self.counters["events_published"] += len(chunk)
        self._producer.poll(0)
        return produced

    def _chunks(self, events: list[EventLike]) -> Iterable[list[EventLike]]:
        """Split one connection's events into messages of bounded count and bytes (a broker
        refuses messages over its message.max.bytes, 1 MiB by default)."""
        start, size = 0, 0
        for i, ev in enumerate(events):
            weight = len(ev.payload) + EVENT_OVERHEAD
            if i > start and (i - start >= self._batch_max or size + weight > self._batch_bytes):
                yield events[start:i]
                start, size = i, 0
            size += weight
        yield events[start:]

    def _encode(self, conn_id: int, events: list[EventLike], offset: int) -> tuple[bytes, bytes]:
        first = events[0]
        # A connection's addresses and role are fixed once known; take the richest event
        # (connect/accept come first when the probe saw the connection open).
        conn = {
            "id": conn_id, "tgid": first.tgid, "comm": first.comm, "role": first.role,
            "family": first.family, "laddr": first.laddr, "lport": first.lport,
            "raddr": first.raddr, "rport": first.rport,
        }
        value = msgpack.packb({
            "v": 1, "node": self._node, "probe": self._probe_id, "seq": self._seq,
            "conn": conn,
            "events": [[e.kind, e.ts_ns + offset, e.size, e.payload] for e in events],
        })
        self._seq += 1
        key = f"{self._node}/{self._probe_id}/{conn_id}".encode()
        return key, value

    def _produce(self, key: bytes, value: bytes) -> None:
        if self._overflow:
            self._queue_overflow(key, value)
            return
        try:
            self._producer.produce(self._topic, value=value, key=key, on_delivery=self._delivered)
        except BufferError:
            self._queue_overflow(key, value)

    def _queue_overflow(self, key: bytes, value: bytes) -> None:
        if len(self._overflow) >= self._overflow_max:
            self.counters["overflow_dropped_batches"] += 1
            return
        self._overflow.append((key, value))
        self.counters["overflow_queued_batches"] += 1

    def _drain_overflow(self) -> None:
        while self._overflow:
            key, value = self._overflow[0]
            try:
                self._producer.produce(self._topic, value=value, key=key,
                                       on_delivery=self._delivered)
            except BufferError:
                return
            self._overflow.popleft()

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
        return out
