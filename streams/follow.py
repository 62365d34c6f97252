"""Reading a compacted topic whole, on every worker: the latest record per key is the state.

``k8s.v1`` (Kubernetes objects) and ``meta.v1`` (the probes' listeners) describe the world, not
events in it. Every worker needs all of it, from the start, after every restart: a consumer
group member would get only its share of the partitions, and one restarted would resume after
its committed offset with an empty table (a restarted worker then named every same-node call by
address). So these topics are read outside any group, every partition from its beginning, and
nothing is committed.
"""

from __future__ import annotations

import logging
from typing import Any

import msgpack

from kubesight.logs import RdkafkaLog

__all__ = ["CompactedFollower"]

log = logging.getLogger(__name__)
_rdkafka_log = RdkafkaLog("kubesight.streams.follower")  # a lost broker: every ~50 ms

_EARLIEST = -2  # librdkafka's OFFSET_BEGINNING


class CompactedFollower:
    """Every partition of ``topic`` from its start, outside any consumer group.

    ``fetch()`` blocks up to ``timeout`` seconds; run it in a thread or an executor. Until the
    topic exists it returns nothing and tries again on the next call. ``caught_up`` turns true
    once everything the topic held when it was opened has been read: a worker waits for that
    before it names anything with what the topic says.
    """

    def __init__(self, librdkafka: dict[str, Any], topic: str, group: str) -> None:
        # group.id only because librdkafka wants one; nothing joins or commits.
        self._conf = {**librdkafka, "group.id": group, "enable.auto.commit": False,
                      "auto.offset.reset": "earliest", "logger": _rdkafka_log}
        self.topic = topic
        self.malformed = 0
        self.read = 0
        self._consumer: Any = None
        self._ends: dict[int, int] = {}  # partition → its end offset when opened
        self._next: dict[int, int] = {}  # partition → the offset after the last one read

    def _open(self) -> Any:
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer(self._conf)
        try:
            partitions = sorted(consumer.list_topics(self.topic, timeout=10)
                                .topics[self.topic].partitions)
            if not partitions:
                raise LookupError(f"topic {self.topic} has no partitions (yet)")
            for p in partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, p),
                                                           timeout=10)
                if high > low:
                    self._ends[p] = high
        except Exception:
            consumer.close()
            raise
        consumer.assign([TopicPartition(self.topic, p, _EARLIEST) for p in partitions])
        return consumer

    @property
    def reading(self) -> bool:
        """The topic was found and is being read."""
        return self._consumer is not None

    @property
    def caught_up(self) -> bool:
        """Everything the topic held when it was opened has been read."""
        return self.reading and all(self._next.get(p, 0) >= end for p, end in self._ends.items())

    def _advance(self) -> None:
        """Count positions past offsets that hold no record for us (a transaction's commit
        marker, a compacted tail): the last record read would leave the end out of reach."""
        from confluent_kafka import TopicPartition

        behind = [TopicPartition(self.topic, p) for p, end in self._ends.items()
                  if self._next.get(p, 0) < end]
        for tp in self._consumer.position(behind) if behind else ():
            if tp.offset >= 0:
                self._next[tp.partition] = max(self._next.get(tp.partition, 0), tp.offset)

    def fetch(self, timeout: float = 1.0) -> list[tuple[str, Any]]:
        """(key, decoded value) of what arrived, a tombstone's value None; a value that is not
        msgpack is counted in ``malformed`` and left out."""
        if self._consumer is None:
            try:
                self._consumer = self._open()
            except Exception as exc:  # noqa: BLE001 - no broker or topic yet: next call
                log.warning("%s not readable yet (%s); retrying", self.topic, exc)
                return []
        out = []
        for msg in self._consumer.consume(2000, timeout):
            if msg.error():
                continue
            self._next[msg.partition()] = msg.offset() + 1
            self.read += 1
            key, value = msg.key(), msg.value()
            try:
                out.append((key.decode() if key else "",
                            None if value is None else msgpack.unpackb(value, raw=False)))
            except (ValueError, msgpack.UnpackException):
                self.malformed += 1
        if not self.caught_up:
            self._advance()
        return out

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
