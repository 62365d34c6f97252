from __future__ import annotations

from typing import Any

from kubesight.streams.golden import WindowStore
from kubesight.streams.sketch import LatencySketch

SERIES = {"side": "server", "protocol": "http", "src_namespace": "", "src_workload": "wrk",
          "dst_namespace": "", "dst_workload": "nginx", "src_pod": "", "dst_pod": "",
          "endpoint": "/", "status": "200"}


def partial(start: int, latencies: list[float], errors: int = 0) -> dict[str, Any]:
    sk = LatencySketch()
    for v in latencies:
        sk.add(v)
    return {"window_start": start, "count": len(latencies), "errors": errors, "slow": 0,
            "sum_seconds": sum(latencies), "sketch": sk.to_wire()}


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_windows_close_after_grace_and_merge_partials() -> None:
    clock = Clock(1000.0)
    store = WindowStore(window_seconds=10, grace_seconds=2, clock=clock)
    store.merge(b"s", {"series": SERIES, "windows": [partial(1000, [0.1, 0.2])]}, 0)
    store.merge(b"s", {"series": SERIES, "windows": [partial(1000, [0.3], errors=1)]}, 0)
    clock.now = 1011.9
    assert store.due() == []
    clock.now = 1012.0
    [(_key, win)] = store.due()
    rec = win.to_record(10)
    assert (rec["count"], rec["errors"], rec["revision"]) == (3, 1, 0)
    assert abs(LatencySketch.from_wire(rec["sketch"]).quantile(0.5) - 0.2) <= 0.2 * 0.01
    assert store.open == {}


def test_late_partial_reopens_window_as_next_revision() -> None:
    clock = Clock(1000.0)
    store = WindowStore(window_seconds=10, grace_seconds=2, clock=clock)
    store.merge(b"s", {"series": SERIES, "windows": [partial(1000, [0.1])]}, 0)
    clock.now = 1013
    [(_k, first)] = store.due()
    store.merge(b"s", {"series": SERIES, "windows": [partial(1000, [0.1, 0.1])]}, 0)
    [(_k, second)] = store.due()
    assert (first.count, first.revision) == (1, 0)
    assert (second.count, second.revision) == (2, 1)
    assert store.late_partials == 1


def test_due_is_per_partition() -> None:
    clock = Clock(2000.0)
    store = WindowStore(window_seconds=10, grace_seconds=0, clock=clock)
    store.merge(b"a", {"series": SERIES, "windows": [partial(1980, [0.1])]}, 0)
    store.merge(b"b", {"series": SERIES, "windows": [partial(1980, [0.1])]}, 1)
    assert [w.partition for _k, w in store.due(1)] == [1]
    assert [w.partition for _k, w in store.due(0)] == [0]
