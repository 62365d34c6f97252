"""Tests of kubesight.sinks; ``window_record`` builds the golden records sinks receive."""

from __future__ import annotations

from collections.abc import Sequence

from kubesight.sinks import SERIES_LABELS, SeriesLabels, WindowRecord
from kubesight.streams.sketch import LatencySketch


def series(**labels: str) -> SeriesLabels:
    """A full label set: defaults for a server-side HTTP series, overridden by ``labels``."""
    values = {"side": "server", "protocol": "http", "src_namespace": "shop",
              "src_workload": "gateway", "dst_namespace": "shop", "dst_workload": "product",
              "src_pod": "gateway-7d9f-x1", "dst_pod": "product-5c4b-a2", "dst_service": "product",
              "endpoint": "/api/items", "status": "200"} | labels
    assert set(values) == set(SERIES_LABELS)
    return SeriesLabels(**values)


def window_record(labels: SeriesLabels, window_start: int, latencies: Sequence[float], *,
                  errors: int = 0, slow: int = 0, revision: int = 0) -> WindowRecord:
    """The delta a golden worker emits for ``latencies`` observed in one window."""
    return {"v": 1, "series": labels, "window_start": window_start, "window_seconds": 10,
            "count": len(latencies), "errors": errors, "slow": slow,
            "sum_seconds": sum(latencies), "sketch": LatencySketch.of(latencies).to_wire(),
            "revision": revision}
