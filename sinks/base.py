"""The one shape every sink has (the OpenTelemetry Collector / Vector exporter model).

- a config class (a frozen ``SinkConfig`` dataclass) that rejects unknown keys and names the
  dotted key in every message: ``sinks.prometheus.listn: unknown key (did you mean 'listen'?)``;
- a ``Sink`` with ``write(batch)``, ``write_health(batch)``, ``close()`` and ``healthcheck()``;
- the records sinks receive: ``WindowRecord`` (golden signals, schema ``golden.v1``) and
  ``HealthRecord`` (pipeline health counters, schema ``health.v1``), plain dicts.

Sinks are listed in one place, ``kubesight.sinks.registry.SINKS``, and one compliance test runs
over all of them.
"""

from __future__ import annotations

import abc
import dataclasses
import typing
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar, Generic, NotRequired, Self, TypedDict, TypeVar

from kubesight.config import ConfigError, check_key, coerce_scalar

__all__ = [
    "SERIES_LABELS", "HealthRecord", "SeriesLabels", "Sink", "SinkConfig", "SinkConfigError",
    "SinkHealth", "WindowRecord",
]

# The label set of every golden series, in exposition order (a contract: DESIGN.md).
SERIES_LABELS: tuple[str, ...] = (
    "side", "protocol", "src_namespace", "src_workload", "dst_namespace", "dst_workload",
    "endpoint", "status",
)


class SeriesLabels(TypedDict):
    side: str  # "server" or "client": where the request was observed
    protocol: str
    src_namespace: str
    src_workload: str
    dst_namespace: str
    dst_workload: str
    endpoint: str
    status: str


class WindowRecord(TypedDict):
    """One delta of one series' tumbling window, as the golden stream agent emits it.

    Deltas add up: a window's first emission has ``revision`` 0, records that arrive after it
    closed are emitted again for the same ``window_start`` with a higher revision.
    """

    v: NotRequired[int]
    series: SeriesLabels
    window_start: int  # unix seconds
    window_seconds: int
    count: int
    errors: int
    slow: int
    sum_seconds: float
    sketch: dict[str, Any]  # LatencySketch.to_wire() of this delta
    revision: int


class HealthRecord(TypedDict):
    """Cumulative counters of one pipeline component since it started (drops, errors, ...)."""

    v: NotRequired[int]
    component: str  # "probe", "worker", "sink"
    node: str
    instance: NotRequired[str]
    ts: float
    counters: dict[str, int]


class SinkConfigError(ConfigError):
    """A sink configuration key or value is wrong; the message names the dotted key.

    A ``ConfigError`` (and so a ``ValueError``), so the config loader's callers catch it too.
    """


@dataclasses.dataclass(frozen=True)
class SinkConfig:
    """Base of every sink's config. Subclasses are frozen dataclasses and set ``section``."""

    section: ClassVar[str] = "sinks"  # dotted key of this config, e.g. "sinks.prometheus"

    enabled: bool = True

    def __post_init__(self) -> None:
        for key, message in self.problems():
            raise SinkConfigError(f"{self.section}.{key}: {message}")

    def problems(self) -> Iterator[tuple[str, str]]:
        """Yield ``(field, message)`` for each invalid value; overridden by subclasses."""
        return iter(())

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Self:
        """Build from a YAML-style mapping, checking every key and value type."""
        section = cls.section
        if not isinstance(data, Mapping):
            raise SinkConfigError(f"{section}: expected a mapping, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs: dict[str, Any] = {}
        for raw_key, value in data.items():
            key = str(raw_key)
            check_key(key, f"{section}.{key}", names, SinkConfigError)
            kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
        return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    scalar = coerce_scalar(value, hint, key, SinkConfigError)
    if scalar is NotImplemented:
        raise SinkConfigError(f"{key}: unsupported type {hint!r}")
    return scalar


@dataclasses.dataclass(frozen=True)
class SinkHealth:
    ok: bool
    detail: str


ConfigT = TypeVar("ConfigT", bound=SinkConfig)


class Sink(abc.ABC, Generic[ConfigT]):
    """A destination for golden window records (and, optionally, pipeline health)."""

    name: ClassVar[str]
    config_class: ClassVar[type[SinkConfig]]

    def __init__(self, config: ConfigT) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        self.config: ConfigT = config

    @abc.abstractmethod
    def write(self, batch: Sequence[WindowRecord]) -> None:
        """Deliver a batch of window deltas (may be empty)."""

    def write_health(self, batch: Sequence[HealthRecord]) -> None:  # noqa: B027  # optional
        """Deliver pipeline health records; sinks that do not export health ignore them."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release resources; safe to call more than once."""

    @abc.abstractmethod
    def healthcheck(self) -> SinkHealth:
        """Whether the sink can deliver right now, and a one-line reason."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
