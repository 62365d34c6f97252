"""Tumbling windows of golden signals per series: merge partials, emit closed windows.

A window [start, start + window_seconds) is emitted once the wall clock is ``grace_seconds``
past its end. Its state is fixed-size and mergeable (counters and a latency sketch), so late
partials merge cheaply. A partial that arrives after its window was emitted opens the window
again and is emitted as a further delta with ``revision + 1``: summing ``count`` over all
records of a series is exact, whatever the lateness (a broker outage, a slow node).

State is keyed ``<series key>\\x1e<window start>``. The agent mirrors it into a Faust table
(changelog-backed) so a restarted worker resumes, and records per input partition the highest
offset folded in, so a message delivered twice after a rebalance is merged once.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from .sketch import LatencySketch

SEP = b"\x1e"


@dataclasses.dataclass(slots=True)
class Window:
    series: dict[str, str]
    start: int
    partition: int
    count: int = 0
    errors: int = 0
    slow: int = 0
    sum_seconds: float = 0.0
    sketch: LatencySketch = dataclasses.field(default_factory=LatencySketch)
    revision: int = 0  # the revision this window will be emitted with next

    def merge(self, partial: dict[str, Any]) -> None:
        self.count += int(partial["count"])
        self.errors += int(partial["errors"])
        self.slow += int(partial["slow"])
        self.sum_seconds += float(partial["sum_seconds"])
        self.sketch.merge(LatencySketch.from_wire(partial["sketch"]))

    def to_state(self) -> dict[str, Any]:
        return {"series": self.series, "start": self.start, "partition": self.partition,
                "count": self.count, "errors": self.errors, "slow": self.slow,
                "sum_seconds": self.sum_seconds, "sketch": self.sketch.to_wire(),
                "revision": self.revision}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Window:
        return cls(series=state["series"], start=state["start"], partition=state["partition"],
                   count=state["count"], errors=state["errors"], slow=state["slow"],
                   sum_seconds=state["sum_seconds"],
                   sketch=LatencySketch.from_wire(state["sketch"]), revision=state["revision"])

    def to_record(self, window_seconds: int) -> dict[str, Any]:
        return {"v": 1, "series": self.series, "window_start": self.start,
                "window_seconds": window_seconds, "count": self.count, "errors": self.errors,
                "slow": self.slow, "sum_seconds": self.sum_seconds,
                "sketch": self.sketch.to_wire(), "revision": self.revision}


def window_key(series_key: bytes, start: int) -> bytes:
    return series_key + SEP + str(start).encode()


class _TumblingWindow(Protocol):
    start: int
    partition: int
    revision: int

    def merge(self, partial: dict[str, Any]) -> None: ...

    def to_state(self) -> dict[str, Any]: ...

    def to_record(self, window_seconds: int) -> dict[str, Any]: ...


W = TypeVar("W", bound=_TumblingWindow)


class TumblingStore(Generic[W]):
    """Open windows of the partitions this worker owns, for any window kind: the rules above
    (emitted ``grace_seconds`` after their end; a late partial re-opens a window as the next
    revision). Subclasses say how a message's first partial opens a window (``_open``)."""

    def __init__(self, *, window_seconds: int, grace_seconds: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.window_seconds = window_seconds
        self.grace_seconds = grace_seconds
        self._clock = clock
        self.open: dict[bytes, W] = {}
        # Emitted windows remember their next revision until they are well past; bounded by
        # (series × a few windows).
        self._emitted: dict[bytes, tuple[int, float]] = {}
        self.late_partials = 0

    def _open(self, message: dict[str, Any], start: int, partition: int, revision: int) -> W:
        raise NotImplementedError

    def merge(self, series_key: bytes, message: dict[str, Any],
              partition: int) -> list[bytes]:
        """Fold one message of partials in; returns the window keys it changed."""
        changed = []
        for partial in message["windows"]:
            start = int(partial["window_start"])
            key = window_key(series_key, start)
            win = self.open.get(key)
            if win is None:
                revision = 0
                emitted = self._emitted.get(key)
                if emitted is not None:
                    revision = emitted[0]
                    self.late_partials += 1
                win = self.open[key] = self._open(message, start, partition, revision)
            win.merge(partial)
            changed.append(key)
        return changed

    def due(self, partition: int | None = None) -> list[tuple[bytes, W]]:
        """Remove and return the windows whose end + grace has passed (optionally for one
        partition), oldest first."""
        now = self._clock()
        horizon = now - self.grace_seconds - self.window_seconds
        ready = [(k, w) for k, w in self.open.items()
                 if w.start <= horizon and (partition is None or w.partition == partition)]
        ready.sort(key=lambda kw: kw[1].start)
        keep_until = now + 10 * self.window_seconds + self.grace_seconds
        for key, win in ready:
            del self.open[key]
            self._emitted[key] = (win.revision + 1, keep_until)
        if len(self._emitted) > 4 * max(1, len(self.open)) + 1024:
            self._emitted = {k: v for k, v in self._emitted.items() if v[1] > now}
        return ready


class WindowStore(TumblingStore[Window]):
    """Open golden windows (series.v1 partials → golden.v1)."""

    def _open(self, message: dict[str, Any], start: int, partition: int,
              revision: int) -> Window:
        return Window(series=message["series"], start=start, partition=partition,
                      revision=revision)
