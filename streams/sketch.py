"""A mergeable latency sketch with bounded relative error (the DDSketch log-bucket idea).

A positive value ``x`` goes to bucket ``i = ceil(log(x) / log(gamma))`` with
``gamma = (1 + a) / (1 - a)``, so bucket ``i`` holds ``(gamma**(i-1), gamma**i]`` and its
representative ``2 * gamma**i / (gamma + 1)`` is within relative error ``a`` of every value in it.
Sketches with the same accuracy merge by adding bucket counts, which is what lets windows be
combined (longer windows, fleet views) without ever averaging percentiles.

Rank definition (the one the accuracy guarantee is stated against): for ``n`` values sorted
ascending ``x[0] <= ... <= x[n-1]``, ``quantile(q)`` estimates ``x[floor(q * (n - 1))]``.

Values are latencies in seconds. Zero and negative values are counted in a zero bucket and
reported as 0 (clamped to the observed min/max). The number of buckets is capped
(``max_buckets``, 2048 by default); beyond it the lowest buckets collapse into one, so only the
very lowest quantiles of data spanning more than ~17 orders of magnitude lose accuracy.
1 µs .. 1 h needs about 1100 buckets at 1%.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["LatencySketch", "WIRE_VERSION"]

WIRE_VERSION = 1
DEFAULT_MAX_BUCKETS = 2048
_INF = math.inf
_NO_FLOOR = -(1 << 62)  # lowest bucket index before any collapse


class LatencySketch:
    """Quantiles with relative error <= ``relative_accuracy``; fixed-size, mergeable state."""

    __slots__ = (
        "relative_accuracy", "max_buckets", "_gamma", "_multiplier", "_bins", "_floor",
        "_zero", "_count", "_sum", "_min", "_max",
    )

    def __init__(self, relative_accuracy: float = 0.01,
                 max_buckets: int = DEFAULT_MAX_BUCKETS) -> None:
        if not 0.0 < relative_accuracy < 1.0:
            raise ValueError(f"relative_accuracy must be in (0, 1), got {relative_accuracy!r}")
        if max_buckets < 2:
            raise ValueError(f"max_buckets must be >= 2, got {max_buckets!r}")
        self.relative_accuracy = float(relative_accuracy)
        self.max_buckets = max_buckets
        self._gamma = (1.0 + relative_accuracy) / (1.0 - relative_accuracy)
        self._multiplier = 1.0 / math.log(self._gamma)
        self._bins: dict[int, int] = {}
        self._floor = _NO_FLOOR  # indices below this were collapsed into it
        self._zero = 0
        self._count = 0
        self._sum = 0.0
        self._min = _INF
        self._max = -_INF

    # -- hot path ---------------------------------------------------------------------------

    def add(self, value: float, count: int = 1) -> None:
        """Record ``value`` (seconds) ``count`` times (``count`` must be a positive int)."""
        if 0.0 < value < _INF:
            i = math.ceil(math.log(value) * self._multiplier)
            if i < self._floor:
                i = self._floor
            bins = self._bins
            bins[i] = bins.get(i, 0) + count
            if len(bins) > self.max_buckets:
                self._collapse()
        elif -_INF < value <= 0.0:
            self._zero += count
        else:
            raise ValueError(f"cannot add {value!r} to a latency sketch")
        self._count += count
        self._sum += value * count
        if value < self._min:
            self._min = value
        if value > self._max:
            self._max = value

    # -- combining --------------------------------------------------------------------------

    def merge(self, other: LatencySketch) -> None:
        """Add ``other``'s values into this sketch (same relative accuracy required)."""
        if other._gamma != self._gamma:
            raise ValueError(
                f"cannot merge sketches with relative accuracy {self.relative_accuracy} "
                f"and {other.relative_accuracy}"
            )
        if other._floor > self._floor:
            self._floor = other._floor
        bins = self._bins
        floor = self._floor
        for i, n in other._bins.items():
            if i < floor:
                i = floor
            bins[i] = bins.get(i, 0) + n
        if floor != _NO_FLOOR:
            self._fold_below_floor()
        if len(bins) > self.max_buckets:
            self._collapse()
        self._zero += other._zero
        self._count += other._count
        self._sum += other._sum
        self._min = min(self._min, other._min)
        self._max = max(self._max, other._max)

    def copy(self) -> LatencySketch:
        new = LatencySketch(self.relative_accuracy, self.max_buckets)
        new.merge(self)
        return new

    def _collapse(self) -> None:
        """Fold the lowest buckets into one so at most ``max_buckets`` remain."""
        keys = sorted(self._bins)
        self._floor = keys[len(keys) - self.max_buckets]
        self._fold_below_floor()

    def _fold_below_floor(self) -> None:
        bins, floor = self._bins, self._floor
        low = [i for i in bins if i < floor]
        if low:
            bins[floor] = bins.get(floor, 0) + sum(bins.pop(i) for i in low)

    # -- reading ----------------------------------------------------------------------------

    @property
    def count(self) -> int:
        return self._count

    @property
    def sum(self) -> float:
        return self._sum

    @property
    def min(self) -> float:
        """Smallest value added (``inf`` when empty)."""
        return self._min

    @property
    def max(self) -> float:
        """Largest value added (``-inf`` when empty)."""
        return self._max

    def __len__(self) -> int:
        """Number of occupied buckets (the state's size), not the number of values."""
        return len(self._bins) + (1 if self._zero else 0)

    def quantile(self, q: float) -> float:
        """The value at rank ``floor(q * (count - 1))``, within relative accuracy; NaN if empty."""
        return self.quantiles((q,))[0]

    def quantiles(self, qs: Sequence[float]) -> list[float]:
        """Several quantiles in one pass over the buckets (for the exposition of a summary)."""
        for q in qs:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"quantile must be in [0, 1], got {q!r}")
        if self._count == 0:
            return [math.nan] * len(qs)
        wanted = sorted((math.floor(q * (self._count - 1)), k) for k, q in enumerate(qs))
        out = [0.0] * len(qs)
        j = 0
        # Walk buckets in value order, zero bucket first; a rank r is in the bucket where the
        # cumulative count first exceeds r.
        seen = self._zero
        while j < len(wanted) and wanted[j][0] < seen:
            out[wanted[j][1]] = self._clamp(0.0)
            j += 1
        for i in sorted(self._bins):
            if j == len(wanted):
                break
            seen += self._bins[i]
            while j < len(wanted) and wanted[j][0] < seen:
                out[wanted[j][1]] = self._clamp(2.0 * self._gamma ** i / (self._gamma + 1.0))
                j += 1
        return out

    def _clamp(self, estimate: float) -> float:
        # The true value lies in [min, max], so clamping never increases the error.
        return min(max(estimate, self._min), self._max)

    # -- wire -------------------------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        """A msgpack/JSON-friendly dict: bucket indices and counts as two parallel int lists."""
        keys = sorted(self._bins)
        empty = self._count == 0
        return {
            "v": WIRE_VERSION,
            "alpha": self.relative_accuracy,
            "keys": keys,
            "counts": [self._bins[i] for i in keys],
            "zero": self._zero,
            "count": self._count,
            "sum": self._sum,
            # JSON has no infinities: an empty sketch sends 0 and from_wire restores them.
            "min": 0.0 if empty else self._min,
            "max": 0.0 if empty else self._max,
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any],
                  max_buckets: int = DEFAULT_MAX_BUCKETS) -> LatencySketch:
        """Rebuild a sketch from :meth:`to_wire` output; ``ValueError`` if it is malformed."""
        try:
            if wire["v"] != WIRE_VERSION:
                raise ValueError(f"unsupported sketch wire version {wire['v']!r}")
            sketch = cls(float(wire["alpha"]), max_buckets)
            keys, counts = wire["keys"], wire["counts"]
            if len(keys) != len(counts):
                raise ValueError("sketch keys and counts differ in length")
            sketch._bins = _int_map(keys, counts)
            sketch._zero = int(wire["zero"])
            sketch._count = int(wire["count"])
            sketch._sum = float(wire["sum"])
            if sketch._count:
                sketch._min = float(wire["min"])
                sketch._max = float(wire["max"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed sketch: {exc!r}") from exc
        if sketch._zero < 0 or sketch._count != sketch._zero + sum(sketch._bins.values()):
            raise ValueError("malformed sketch: count does not match its buckets")
        if len(sketch._bins) > max_buckets:
            sketch._collapse()
        return sketch

    @classmethod
    def of(cls, values: Iterable[float], relative_accuracy: float = 0.01) -> LatencySketch:
        sketch = cls(relative_accuracy)
        for v in values:
            sketch.add(v)
        return sketch

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LatencySketch):
            return NotImplemented
        return self.to_wire() == other.to_wire()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (f"LatencySketch(relative_accuracy={self.relative_accuracy}, count={self._count}, "
                f"buckets={len(self)})")


def _int_map(keys: Sequence[Any], counts: Sequence[Any]) -> dict[int, int]:
    bins: dict[int, int] = {}
    for k, n in zip(keys, counts, strict=True):
        if isinstance(k, bool) or not isinstance(k, int) or isinstance(n, bool) \
                or not isinstance(n, int) or n <= 0:
            raise ValueError(f"malformed sketch bucket {k!r}: {n!r}")
        bins[k] = bins.get(k, 0) + n
    return bins
