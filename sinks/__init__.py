"""kubesight.sinks: where golden window records and pipeline health leave the pipeline.

Every sink has the shape in :mod:`kubesight.sinks.base`; :data:`SINKS` lists them all and
:func:`build_sinks` makes the enabled ones from ``Config.sinks``.
"""

from .base import (
    SERIES_LABELS,
    HealthRecord,
    NetworkRecord,
    NodeRecord,
    SeriesLabels,
    Sink,
    SinkConfig,
    SinkConfigError,
    SinkHealth,
    WindowRecord,
)
from .prometheus import PrometheusConfig, PrometheusSink
from .registry import SINKS, JsonLinesConfig, JsonLinesSink, build_sinks
from .topology import TopologyConfig, TopologySink, TopologyView

__all__ = [
    "SERIES_LABELS",
    "SINKS",
    "HealthRecord",
    "JsonLinesConfig",
    "JsonLinesSink",
    "NetworkRecord",
    "NodeRecord",
    "PrometheusConfig",
    "PrometheusSink",
    "SeriesLabels",
    "Sink",
    "SinkConfig",
    "SinkConfigError",
    "SinkHealth",
    "TopologyConfig",
    "TopologySink",
    "TopologyView",
    "WindowRecord",
    "build_sinks",
]
