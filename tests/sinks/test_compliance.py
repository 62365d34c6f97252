"""The contract every registered sink keeps; a new sink only needs a test config below."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubesight.sinks import SINKS, HealthRecord, NetworkRecord, NodeRecord, SinkConfigError
from kubesight.streams.sketch import LatencySketch

from . import series, window_record

# How to configure each sink for a test (no real ports, files under tmp_path).
TEST_CONFIGS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "prometheus": lambda tmp: {"listen": "127.0.0.1:0"},
    "jsonl": lambda tmp: {"enabled": True, "path": str(tmp / "golden.jsonl")},
    "topology": lambda tmp: {},
}


def test_every_registered_sink_has_a_test_config() -> None:
    assert sorted(TEST_CONFIGS) == sorted(SINKS)


@pytest.mark.parametrize("name", sorted(SINKS))
def test_sink_compliance(name: str, tmp_path: Path) -> None:
    sink_class = SINKS[name]
    assert sink_class.name == name

    with pytest.raises(SinkConfigError, match=rf"^sinks\.{name}\.enabeld: unknown key"):
        sink_class.config_class.from_mapping({"enabeld": True})

    rng = random.Random(7)
    batch = [
        window_record(series(status=status), 1_700_000_000, [rng.expovariate(50) for _ in range(n)],
                      errors=n // 10)
        for status, n in (("200", 300), ("500", 20))
    ]
    health: list[HealthRecord] = [
        {"component": "probe", "node": "n1", "ts": 1.0, "counters": {"ringbuf_drops": 0}},
    ]
    nodes: list[NodeRecord] = [
        {"node": "n1", "instance": "p1", "ts": 1.0, "interval_s": 5.0, "cpu": {"0": 0.5},
         "cpu_all": 0.5, "memory_bytes": {"total": 2, "available": 1, "used": 1, "free": 1},
         "processes": 1, "scan_seconds": 0.001, "top": [], "pods": []},
    ]
    network: list[NetworkRecord] = [
        {"v": 1, "kind": "conntrack", "node": "n1", "ts": 1.0, "entries": 3, "max": 10,
         "drop": 0, "early_drop": 0, "insert_failed": 0},
        {"v": 1, "kind": "workload", "labels": {"node": "n1", "side": "client",
                                                "namespace": "", "workload": "curl"},
         "window_start": 1_700_000_000, "window_seconds": 10, "revision": 0,
         "counts": dict.fromkeys(("opened", "closed", "failed_refused", "failed_timeout",
                                  "failed_unreachable", "retransmits", "resets_sent",
                                  "resets_received", "bytes_sent", "bytes_received",
                                  "rtt_sum_us"), 1),
         "rtt": LatencySketch.of([1e-6]).to_wire()},
    ]
    sink = sink_class(sink_class.config_class.from_mapping(TEST_CONFIGS[name](tmp_path)))
    try:
        sink.write(batch)
        sink.write([])
        sink.write_health(health)
        sink.write_health([])
        sink.write_node(nodes)
        sink.write_node([])
        sink.write_network(network)
        sink.write_network([])
        health_now = sink.healthcheck()
        assert health_now.ok, health_now.detail
    finally:
        sink.close()
    sink.close()
    assert not sink.healthcheck().ok


def test_jsonl_sink_appends_one_json_line_per_record(tmp_path: Path) -> None:
    # Moves to tests/sinks/test_jsonl.py with the sink's own module.
    path = tmp_path / "lake" / "golden.jsonl"
    records = [window_record(series(), 100, [0.1, 0.3]), window_record(series(), 110, [0.2])]
    for batch in (records[:1], records[1:]):  # two sinks, as across a restart: appends
        with SINKS["jsonl"](SINKS["jsonl"].config_class.from_mapping(
                {"enabled": True, "path": str(path)})) as sink:
            sink.write(batch)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records
