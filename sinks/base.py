"""The one shape every sink has (the OpenTelemetry Collector / Vector exporter model).

- a config class (a frozen ``SinkConfig`` dataclass) that rejects unknown keys and names the
  dotted key in every message: ``sinks.prometheus.listn: unknown key (did you mean 'listen'?)``;
- a ``Sink`` with ``write(batch)``, ``write_health(batch)``, ``close()`` and ``healthcheck()``;
- the records sinks receive: ``WindowRecord`` (golden signals, schema ``golden.v1``),
  ``HealthRecord`` (pipeline health counters, schema ``health.v1``), ``NodeRecord`` (node
  CPU, memory and top-N processes, schema ``node.v1``) and ``NetworkRecord`` (TCP health
  windows and conntrack usage, schema ``network.v1``), plain dicts.

Sinks are listed in one place, ``kubesight.sinks.registry.SINKS``, and one compliance test runs
over all of them.
"""

from __future__ import annotations

import abc
import dataclasses
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar, Generic, NotRequired, Self, TypedDict, TypeVar

from kubesight.config import ConfigError, check_key, coerce_scalar

__all__ = [
    "SERIES_LABELS", "HealthRecord", "NetworkRecord", "NodeRecord", "Route", "SeriesLabels",
    "Sink", "SinkConfig", "SinkConfigError", "SinkHealth", "WindowRecord",
]

# The label set of every golden series, in exposition order (a contract: DESIGN.md).
SERIES_LABELS: tuple[str, ...] = (
    "side", "protocol", "src_namespace", "src_workload", "src_pod", "dst_namespace",
    "dst_workload", "dst_pod", "dst_service", "endpoint", "status",
)


class SeriesLabels(TypedDict):
    side: str  # "server" or "client": where the request was observed
    protocol: str
    src_namespace: str
    src_workload: str
    src_pod: str  # "" outside Kubernetes
    dst_namespace: str
    dst_workload: str
    dst_pod: str
    dst_service: str  # the called Kubernetes service; "" when none (or not one) claims it
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


class NodeRecord(TypedDict):
    """One probe sampling interval of a node: CPU per core, memory, top-N by CPU (node.v1)."""

    v: NotRequired[int]
    node: str
    instance: str
    ts: float  # unix seconds at the end of the interval
    interval_s: float
    cpu: dict[str, float]  # CPU number -> busy share 0..1
    cpu_all: float
    memory_bytes: dict[str, int]  # kind -> bytes
    processes: int
    scan_seconds: float
    top: list[dict[str, Any]]  # rank, pid, comm, exe, cpu_cores, start_time, pod_uid, ...
    pods: list[dict[str, Any]]  # rank, pod_uid, cpu_cores, processes


class NetworkRecord(TypedDict):
    """One ``network.v1`` record. ``kind`` edge or workload: one tumbling window of a network
    series, a delta like ``WindowRecord`` (labels, window_start, window_seconds, counts, rtt
    sketch, revision); ``kind`` conntrack: a node's latest conntrack usage (node, ts,
    entries, max and cumulative drops)."""

    v: NotRequired[int]
    kind: str  # "edge", "workload", "pod" or "conntrack"
    labels: NotRequired[dict[str, str]]
    window_start: NotRequired[int]
    window_seconds: NotRequired[int]
    counts: NotRequired[dict[str, int]]  # opened, closed, failed_<kind>, retransmits, ...
    rtt: NotRequired[dict[str, Any]]  # LatencySketch.to_wire() of the srtt samples, seconds
    revision: NotRequired[int]
    node: NotRequired[str]
    ts: NotRequired[float]
    entries: NotRequired[int]
    max: NotRequired[int]
    drop: NotRequired[int]
    early_drop: NotRequired[int]
    insert_failed: NotRequired[int]


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

# An HTTP GET a sink serves on the HTTP server of a sink that has one (``mount``): the query
# string in, (status, content type, body) out.
Route = Callable[[str], tuple[int, str, str]]


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

    def write_node(self, batch: Sequence[NodeRecord]) -> None:  # noqa: B027  # optional
        """Deliver node CPU/memory/top-N samples; sinks that do not export them ignore them."""

    def write_network(self, batch: Sequence[NetworkRecord]) -> None:  # noqa: B027  # optional
        """Deliver network health windows and conntrack usage; others ignore them."""

    def routes(self) -> Mapping[str, Route]:
        """HTTP paths this sink answers (``/topology``), served by a sink with a server."""
        return {}

    def published(self) -> Sequence[tuple[str, bytes, bytes | None]]:
        """Messages due for a topic this sink keeps, as (logical topic, key, value or None
        for a tombstone); the sink runner produces them. Most sinks keep none."""
        return ()

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
