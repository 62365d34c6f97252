"""Publisher against a real broker: per-connection batches, bounded size, order kept."""

from __future__ import annotations

import msgpack
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from kubesight.probe.l7 import RawEvent
from kubesight.probe.publisher import Publisher, producer_config
from kubesight.schemas import validate

from kubesight.config import Config
from kubesight.topics import ensure_topics

pytestmark = pytest.mark.kafka


def event(conn_id: int, seq: int, payload: bytes, kind: int = 3) -> RawEvent:
    return RawEvent(kind, conn_id, 1, 4242, "client", 2, 6, "127.0.0.1", 40000 + conn_id,
                    "127.0.0.1", 80, 1_000_000 + seq, len(payload) + 10, payload)


def read_all(config: Config, topic: str, expected: int) -> list[tuple[bytes, dict]]:
    consumer = Consumer({**config.kafka.librdkafka(), "group.id": "t",
                         "enable.auto.commit": False})
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in parts])
    out: list[tuple[bytes, dict]] = []
    for _ in range(100):
        for m in consumer.consume(100, timeout=0.5):
            assert not m.error()
            out.append((m.key(), msgpack.unpackb(m.value(), raw=False)))
            assert len(m.value()) < 1024 * 1024
        if len(out) >= expected:
            break
    consumer.close()
    return out


def test_batches_per_connection_in_order_and_bounded(kubesight_config: Config) -> None:
    ensure_topics(kubesight_config)
    producer = Producer(producer_config(kubesight_config.kafka.librdkafka()))
    topic = kubesight_config.topic("raw.v1")
    clock = lambda: (5_000_000_000, 1_000_000)  # noqa: E731 - wall = mono + 4.999 s
    pub = Publisher(producer=producer, topic=topic, node="n1", probe_id="p1", clock=clock)
    big = bytes(range(256)) * 16  # 4 KiB payloads: 300 of them exceed one 1 MiB message
    pub.add([event(1, i, big) for i in range(300)] + [event(2, i, b"GET / HTTP/1.1\r\n\r\n")
                                                      for i in range(5)])
    messages = pub.flush()
    assert producer.flush(30) == 0
    assert messages >= 3 and pub.stats()["kafka_delivered"] == messages

    records = read_all(kubesight_config, topic, messages)
    assert len(records) == messages
    by_conn: dict[bytes, list[list]] = {}
    for key, record in records:
        validate("raw.v1", record)
        by_conn.setdefault(key, []).extend(record["events"])
    assert set(by_conn) == {b"n1/p1/1", b"n1/p1/2"}
    first = by_conn[b"n1/p1/1"]
    assert [e[1] for e in first] == [4_999_000_000 + 1_000_000 + i for i in range(300)]
    assert all(e[3] == big and e[2] == len(big) + 10 for e in first)
    assert len(by_conn[b"n1/p1/2"]) == 5
