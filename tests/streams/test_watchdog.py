"""The stall watch's decisions (streams/watchdog.py), on a clock the test moves.

Whether it reads a real worker's consumer is checked end to end: the broker-restart test
requires the worker's health record to report every input partition watched.
"""

from __future__ import annotations

import socket
import uuid

import pytest

from kubesight.config import ConfigError, StreamsConfig
from streams.watchdog import EndOffsets, Offsets, StallWatch

RAW0, RAW1 = ("raw.v1", 0), ("raw.v1", 1)


def look(watch: StallWatch, now: float, up: bool = True, **parts: tuple[int, int]) -> str:
    offs = {(name, 0): Offsets(*v) for name, v in parts.items()}
    return watch.decide(now, watch.stalled(now, offs), up).action


def test_moving_or_caught_up_partitions_are_never_stalled() -> None:
    watch = StallWatch(stall_after_s=30, restart_after_s=60)
    for t in range(0, 300, 5):
        assert look(watch, t, raw=(t * 10, t * 10 + 500)) == "ok"  # lagging but moving
    for t in range(300, 600, 5):
        assert look(watch, t, raw=(3000, 3000)) == "ok"  # still, but nothing waits


def test_a_still_lagging_partition_is_kicked_then_restarted() -> None:
    watch = StallWatch(stall_after_s=30, restart_after_s=60)
    assert look(watch, 0, raw=(100, 900)) == "ok"
    assert look(watch, 29, raw=(100, 900)) == "ok"
    assert look(watch, 30, raw=(100, 900)) == "kick"
    assert look(watch, 35, raw=(100, 950)) == "wait"  # new messages arrive, position still
    assert look(watch, 89, raw=(100, 950)) == "wait"
    assert look(watch, 90, raw=(100, 950)) == "restart"


def test_progress_after_the_kick_clears_it() -> None:
    watch = StallWatch(stall_after_s=30, restart_after_s=60)
    look(watch, 0, raw=(100, 900))
    assert look(watch, 30, raw=(100, 900)) == "kick"
    assert look(watch, 35, raw=(400, 900)) == "ok"  # the kick worked
    assert look(watch, 64, raw=(400, 900)) == "ok"
    assert look(watch, 65, raw=(400, 900)) == "kick"  # a new stall is kicked again first


def test_no_kick_while_no_broker_answers() -> None:
    watch = StallWatch(stall_after_s=30, restart_after_s=60)
    look(watch, 0, raw=(100, 900))
    for t in range(30, 600, 5):  # a ten-minute outage: positions cannot move, nothing to heal
        assert look(watch, t, up=False, raw=(100, 900)) == "wait"
    assert look(watch, 600, raw=(100, 900)) == "kick"  # back, and still not reading
    assert look(watch, 659, raw=(100, 900)) == "wait"
    assert look(watch, 660, raw=(100, 900)) == "restart"


def test_a_rebalance_or_restore_is_given_time_but_not_forever() -> None:
    watch = StallWatch(stall_after_s=30, restart_after_s=60, busy_grace_s=600)
    offs = {RAW0: Offsets(100, 900)}
    watch.stalled(0, offs)
    for t in range(30, 600, 5):  # Faust holds its streams while it restores tables
        assert watch.decide(t, watch.stalled(t, offs), True, busy=True).action == "wait"
    assert watch.decide(600, watch.stalled(600, offs), True, busy=True).action == "kick"
    assert watch.decide(660, watch.stalled(660, offs), True, busy=True).action == "restart"


def test_stalled_reports_each_partition_and_forgets_revoked_ones() -> None:
    watch = StallWatch(stall_after_s=10, restart_after_s=10)
    both = {RAW0: Offsets(5, 50), RAW1: Offsets(7, 7)}
    watch.stalled(0, both)
    assert watch.stalled(12, both) == {RAW0: (45, 12)}  # RAW1 has nothing waiting
    watch.stalled(13, {RAW1: Offsets(7, 7)})  # RAW0 revoked ...
    assert watch.stalled(14, both) == {}  # ... and assigned again: its clock starts anew
    assert watch.stalled(24, both) == {RAW0: (45, 10)}


def test_unknown_positions_count_as_nothing_waiting() -> None:
    assert Offsets(None, 10).lag == 0 and Offsets(3, None).lag == 0 and Offsets(3, 10).lag == 7
    watch = StallWatch(stall_after_s=5, restart_after_s=5)
    watch.stalled(0, {RAW0: Offsets(None, 10)})
    assert watch.stalled(100, {RAW0: Offsets(None, 10)}) == {}


@pytest.mark.parametrize("key", ["stall_after_s", "stall_restart_after_s"])
@pytest.mark.parametrize("value", [0, 4.9, 3601])
def test_config_rejects_thresholds_out_of_range(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"streams.{key}"):
        StreamsConfig(**{key: value})


@pytest.mark.kafka
def test_end_offsets_come_from_the_broker_or_none(kafka_bootstrap: str) -> None:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"kswatch{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(7):
        producer.produce(topic, value=b"x", partition=i % 2)
    assert producer.flush(30) == 0
    ends = EndOffsets({"bootstrap.servers": kafka_bootstrap}, "kswatch-test")
    try:
        assert ends.fetch([(topic, 0), (topic, 1)], timeout=20) == {(topic, 0): 4, (topic, 1): 3}
    finally:
        ends.close()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    nobody = EndOffsets({"bootstrap.servers": f"127.0.0.1:{closed}"}, "kswatch-test")
    try:
        assert nobody.fetch([(topic, 0)], timeout=2) is None
    finally:
        nobody.close()
