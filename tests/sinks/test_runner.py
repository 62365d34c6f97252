"""The sink runner's replay gate: records already applied are not applied again."""

from __future__ import annotations

from kubesight.sinks.runner import ReplayGate


def test_a_rewind_to_the_committed_offset_replays_nothing_twice() -> None:
    gate = ReplayGate()
    for offset in range(5):  # applied, but the commit failed: the broker was down
        assert gate.fresh("golden", 0, offset)
        gate.applied("golden", 0, offset)
    # After the broker restarts the group rebalances and consumption resumes from the last
    # committed offset (2): offsets 2..4 come again and must be skipped, 5 is new.
    assert [o for o in range(2, 6) if gate.fresh("golden", 0, o)] == [5]


def test_partitions_and_topics_are_tracked_apart() -> None:
    gate = ReplayGate()
    gate.applied("golden", 0, 10)
    assert gate.fresh("golden", 1, 0) and gate.fresh("health", 0, 3)
    assert not gate.fresh("golden", 0, 10)


def test_a_batch_not_yet_applied_everywhere_is_still_fresh() -> None:
    gate = ReplayGate()
    assert gate.fresh("golden", 0, 7)  # seen, a sink failed, not marked applied
    assert gate.fresh("golden", 0, 7)  # so its retry after a rewind is taken
