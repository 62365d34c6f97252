"""CompactedFollower on the real broker: every partition from its start, on every reader,
``caught_up`` only once what the topic held at open has been read."""

from __future__ import annotations

import time
import uuid

import msgpack
import pytest

from streams.follow import CompactedFollower

pytestmark = pytest.mark.kafka


def _topic(bootstrap: str, partitions: int = 3) -> str:
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"ksfollow{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)]
                        )[topic].result(30)
    return topic


def _produce(bootstrap: str, topic: str, records: list[tuple[str, bytes | None, int]]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap})
    for key, value, partition in records:
        producer.produce(topic, key=key.encode(), value=value, partition=partition)
    assert producer.flush(30) == 0


def _read_until_caught_up(follower: CompactedFollower, deadline_s: float = 30
                          ) -> list[tuple[str, object]]:
    got: list[tuple[str, object]] = []
    deadline = time.monotonic() + deadline_s
    while not follower.caught_up:
        assert time.monotonic() < deadline, f"not caught up after {deadline_s}s: {got}"
        got += follower.fetch(0.5)
    return got


def test_every_reader_gets_every_partition_from_the_start(kafka_bootstrap: str) -> None:
    topic = _topic(kafka_bootstrap)
    records = [(f"node/listen/127.0.0.1:{8000 + i}", msgpack.packb({"port": 8000 + i}), i % 3)
               for i in range(12)]
    records.append(("node/listen/gone", None, 1))  # a tombstone
    records.append(("node/bad", b"\xc1", 2))  # 0xc1: never valid msgpack
    _produce(kafka_bootstrap, topic, records)

    conf = {"bootstrap.servers": kafka_bootstrap}
    first = CompactedFollower(conf, topic, "ksfollow-test")  # the same group id, twice:
    second = CompactedFollower(conf, topic, "ksfollow-test")  # nothing is shared or committed
    try:
        assert not first.caught_up  # not opened yet
        got = _read_until_caught_up(first)
        assert sorted(k for k, _ in got) == sorted(k for k, _, _ in records if k != "node/bad")
        assert dict(got)["node/listen/gone"] is None
        assert dict(got)["node/listen/127.0.0.1:8005"] == {"port": 8005}
        assert first.malformed == 1
        assert first.read == len(records)

        again = _read_until_caught_up(second)  # a restarted worker: everything again
        assert sorted(again, key=str) == sorted(got, key=str)

        _produce(kafka_bootstrap, topic, [("node/listen/127.0.0.1:9999",
                                           msgpack.packb({"port": 9999}), 0)])
        deadline = time.monotonic() + 30
        later: list[tuple[str, object]] = []
        while not later:  # and what arrives afterwards
            assert time.monotonic() < deadline, "the new record never arrived"
            later += first.fetch(0.5)
        assert later == [("node/listen/127.0.0.1:9999", {"port": 9999})]
    finally:
        first.close()
        second.close()


def test_an_empty_topic_is_caught_up_at_once_and_a_missing_one_never(kafka_bootstrap: str
                                                                      ) -> None:
    conf = {"bootstrap.servers": kafka_bootstrap}
    empty = CompactedFollower(conf, _topic(kafka_bootstrap, partitions=2), "ksfollow-test")
    missing = CompactedFollower(conf, f"ksfollow-missing-{uuid.uuid4().hex[:8]}",
                                "ksfollow-test")
    try:
        assert empty.fetch(0.1) == []
        assert empty.reading and empty.caught_up
        assert missing.fetch(0.1) == []
        assert not missing.reading and not missing.caught_up
    finally:
        empty.close()
        missing.close()


def test_a_transaction_marker_at_the_end_does_not_keep_it_from_catching_up(
        kafka_bootstrap: str) -> None:
    """A transaction's commit marker takes the last offset but is no record: the end offset
    is one past anything a reader ever gets."""
    from confluent_kafka import Producer

    topic = _topic(kafka_bootstrap, partitions=1)
    producer = Producer({"bootstrap.servers": kafka_bootstrap,
                         "transactional.id": f"ksfollow-{uuid.uuid4().hex[:8]}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    for i in range(3):
        producer.produce(topic, key=f"k{i}".encode(), value=msgpack.packb(i), partition=0)
    producer.commit_transaction(30)
    # commit_transaction returns once the coordinator has the commit; the marker reaches the
    # partition after that, and until then a read_committed reader (librdkafka's default, so
    # the follower's) sees an end of 0. Wait for the transaction to be visible: the state a
    # restarted worker finds.
    from confluent_kafka import Consumer, TopicPartition

    probe = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": "ksfollow-probe"})
    try:
        deadline = time.monotonic() + 30
        while probe.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1] < 4:
            assert time.monotonic() < deadline, "the commit marker never reached the partition"
            time.sleep(0.05)
    finally:
        probe.close()

    follower = CompactedFollower({"bootstrap.servers": kafka_bootstrap}, topic, "ksfollow-test")
    try:
        got = _read_until_caught_up(follower)
        assert got == [("k0", 0), ("k1", 1), ("k2", 2)]
        assert follower._ends == {0: 4}  # three records and the marker
    finally:
        follower.close()
