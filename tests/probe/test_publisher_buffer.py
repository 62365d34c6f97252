"""A broker that cannot be reached: the probe buffers up to its byte budget, then drops and
counts, and never loses an event without saying so.

A real librdkafka producer pointed at a closed loopback port: its queue really fills and
really refuses (BufferError), with a queue made small so that the test is quick.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from confluent_kafka import Producer
from kubesight.probe.l7 import RawEvent
from kubesight.probe.publisher import Publisher, producer_config, split_buffer

PAYLOAD = bytes(range(256)) * 16  # 4 KiB: a request with a body, as the probe captures it


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once it is closed


@pytest.fixture
def unreachable_producer() -> Iterator[Producer]:
    producer = Producer(producer_config({"bootstrap.servers": f"127.0.0.1:{closed_port()}"},
                                        buffer_kbytes=64))
    yield producer
    producer.purge()
    producer.flush(0)


def event(conn_id: int, seq: int) -> RawEvent:
    return RawEvent(3, conn_id, 1, 4242, "client", 2, 6, "127.0.0.1", 40000 + conn_id,
                    "127.0.0.1", 80, 1_000_000 + seq, len(PAYLOAD), PAYLOAD)


def test_an_outage_fills_the_queue_then_the_overflow_then_drops_and_counts(
        unreachable_producer: Producer) -> None:
    overflow_max = 100_000
    pub = Publisher(producer=unreachable_producer, topic="t", node="n", probe_id="p",
                    overflow_max_bytes=overflow_max)
    sent = 0
    for round_ in range(20):  # 20 flushes of 8 connections x 4 events: ~640 KiB in all
        pub.add(event(conn, round_ * 4 + i) for conn in range(8) for i in range(4))
        sent += 32
        pub.flush()
        stats = pub.stats()
        assert stats["overflow_bytes"] <= overflow_max
        accounted = (stats.get("events_published", 0) + stats.get("overflow_dropped_events", 0)
                     + 4 * stats["overflow_len"])  # every waiting batch is one conn's 4 events
        assert accounted == sent, stats
    stats = pub.stats()
    assert stats["events_in"] == sent
    assert stats["events_published"] > 0  # librdkafka took what fits its 64 KiB
    assert stats["kafka_queue_len"] * 4 == stats["events_published"]
    assert stats["overflow_len"] > 0 and stats["overflow_dropped_events"] > 0
    assert stats["overflow_dropped_batches"] * 4 == stats["overflow_dropped_events"]
    assert stats.get("kafka_delivered", 0) == 0


def test_waiting_batches_go_first_once_the_queue_has_room(
        unreachable_producer: Producer) -> None:
    pub = Publisher(producer=unreachable_producer, topic="t", node="n", probe_id="p",
                    overflow_max_bytes=10_000_000)
    for round_ in range(10):
        pub.add(event(1, round_ * 4 + i) for i in range(4))
        pub.flush()
    before = pub.stats()
    assert before["overflow_len"] > 0
    # Room in librdkafka's queue, as when a broker comes back and takes what was queued:
    # purged messages come back as failed deliveries (counted) once the producer is polled.
    unreachable_producer.purge()
    unreachable_producer.poll(0)
    pub.flush()  # nothing new: only what waited moves on
    after = pub.stats()
    moved = before["overflow_len"] - after["overflow_len"]
    assert moved > 0
    assert after["events_published"] == before["events_published"] + 4 * moved
    assert after["events_published"] + 4 * after["overflow_len"] == 40
    assert after["kafka_delivery_errors"] == before["kafka_queue_len"]
    assert "overflow_dropped_events" not in after


def test_the_budget_splits_three_to_one() -> None:
    queue_kbytes, overflow_bytes = split_buffer(256)
    assert queue_kbytes == 192 * 1024 and overflow_bytes == 64 * 1024 * 1024
