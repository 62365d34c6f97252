"""LatencySketch: relative accuracy against exact ranks, merge, wire format, bounded size."""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubesight.streams.sketch import LatencySketch

ALPHA = 0.01
# Latencies from 1 µs to 1 h, the range the sketch is sized for.
latencies = st.lists(st.floats(min_value=1e-6, max_value=3600.0), min_size=1, max_size=400)
quantile_qs = st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=8)


def exact(values: list[float], q: float) -> float:
    """The rank definition the sketch documents: x[floor(q * (n - 1))] of the sorted values."""
    ordered = sorted(values)
    return ordered[math.floor(q * (len(ordered) - 1))]


def relative_error(estimate: float, truth: float) -> float:
    return abs(estimate - truth) / truth


def without_sum(sketch: LatencySketch) -> dict[str, object]:
    return {k: v for k, v in sketch.to_wire().items() if k != "sum"}


@settings(max_examples=300, deadline=None)
@given(latencies, quantile_qs)
def test_quantiles_are_within_relative_accuracy(values: list[float], qs: list[float]) -> None:
    sketch = LatencySketch.of(values, ALPHA)
    for q, estimate in zip(qs, sketch.quantiles(qs), strict=True):
        assert relative_error(estimate, exact(values, q)) <= ALPHA + 1e-12
        assert sketch.quantile(q) == estimate


@settings(max_examples=200, deadline=None)
@given(latencies, latencies)
def test_merge_equals_sketch_of_concatenation(a: list[float], b: list[float]) -> None:
    merged = LatencySketch.of(a)
    merged.merge(LatencySketch.of(b))
    whole = LatencySketch.of(a + b)
    assert without_sum(merged) == without_sum(whole)
    assert math.isclose(merged.sum, whole.sum, rel_tol=1e-12)
    assert (merged.count, merged.min, merged.max) == (len(a + b), min(a + b), max(a + b))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=-1.0, max_value=3600.0), max_size=200))
def test_wire_round_trip_through_msgpack(values: list[float]) -> None:
    sketch = LatencySketch.of(values)
    wire = msgpack.unpackb(msgpack.packb(sketch.to_wire()), strict_map_key=False)
    assert LatencySketch.from_wire(wire) == sketch


def test_zero_and_negative_values_share_the_zero_bucket() -> None:
    sketch = LatencySketch.of([0.0, -2.0, 0.0, 0.5])
    assert sketch.quantile(0.0) == sketch.quantile(0.5) == 0.0  # the zero bucket reads as 0
    assert (sketch.min, sketch.max) == (-2.0, 0.5)
    assert relative_error(sketch.quantile(1.0), 0.5) <= ALPHA
    assert sketch.count == 4 and sketch.sum == -1.5


def test_empty_sketch_has_nan_quantiles_and_a_json_safe_wire() -> None:
    sketch = LatencySketch()
    assert math.isnan(sketch.quantile(0.99))
    assert sketch.to_wire()["min"] == 0.0
    assert LatencySketch.from_wire(sketch.to_wire()) == sketch


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_refused(bad: float) -> None:
    with pytest.raises(ValueError):
        LatencySketch().add(bad)


def test_size_is_bounded_and_high_quantiles_stay_accurate() -> None:
    values = [10.0 ** (e / 10) for e in range(-3000, 3000)]  # 600 decades, 6000 buckets' worth
    sketch = LatencySketch.of(values)
    assert len(sketch) == 2048
    # Only the lowest ~2/3 of these values were folded together; what is above keeps its error.
    for q in (0.7, 0.9, 0.99, 1.0):
        assert relative_error(sketch.quantile(q), exact(values, q)) <= ALPHA + 1e-12


def test_one_microsecond_to_one_hour_fits_without_collapsing() -> None:
    values = [1e-6 * 3.6e9 ** (i / 199_999) for i in range(200_000)]  # 1 µs .. 1 h, dense
    sketch = LatencySketch.of(values)
    assert len(sketch) < 1_200
    assert len(msgpack.packb(sketch.to_wire())) < 6_000  # bytes, however many values
    assert relative_error(sketch.quantile(0.0), 1e-6) <= ALPHA


def test_merging_sketches_of_different_accuracy_is_refused() -> None:
    with pytest.raises(ValueError, match="relative accuracy"):
        LatencySketch(0.01).merge(LatencySketch(0.02))


@pytest.mark.parametrize("wire", [
    {"v": 1, "alpha": 0.01, "keys": [1, 2], "counts": [1], "zero": 0, "count": 1, "sum": 1.0,
     "min": 1.0, "max": 1.0},
    {"v": 1, "alpha": 0.01, "keys": [1], "counts": [5], "zero": 0, "count": 1, "sum": 1.0,
     "min": 1.0, "max": 1.0},
    {"v": 2},
    {"alpha": 0.01},
])
def test_malformed_wire_is_refused(wire: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        LatencySketch.from_wire(wire)
