"""Prometheus sink: golden signals as a scrape endpoint (text exposition format 0.0.4).

Window deltas turn into Prometheus semantics like this, per series:

- counters (requests, errors, slow, duration ``_sum``/``_count``) are the sum of every delta
  ever written, so late revisions of old windows still count;
- summary quantiles come from the sketch of the *latest* window only (the greatest
  ``window_start`` seen for the series); later deltas of that same window merge into it, deltas
  of older windows do not touch it.

Node CPU, memory and top-N processes (``node.v1``) are gauges of each node's latest sample;
``/top`` serves them as JSON with a short time series per top process (``topn.py``).
Network health (``network.v1``: ``kubesight_tcp_*``, ``kubesight_conntrack_*``) follows the
same counter and latest-window rules (``network.py``).

Writes come from a stream worker's event-loop thread and scrapes from HTTP server threads; one
lock guards the state. Quantiles are computed at scrape time, only for series whose latest
sketch changed since the previous scrape.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import socket
import threading
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

from kubesight.streams.sketch import LatencySketch

from kubesight.process import who_listens

from .base import (
    SERIES_LABELS,
    HealthRecord,
    NetworkRecord,
    NodeRecord,
    Route,
    Sink,
    SinkConfig,
    SinkConfigError,
    SinkHealth,
    WindowRecord,
)
from .network import NetworkView
from .topn import HELP as NODE_HELP
from .topn import NodeView

__all__ = ["PrometheusConfig", "PrometheusSink", "SUMMARY_QUANTILES", "parse_listen"]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SUMMARY_QUANTILES: tuple[str, ...] = ("0.5", "0.9", "0.95", "0.99")
_QUANTILES = tuple(float(q) for q in SUMMARY_QUANTILES)


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` or ``[v6-host]:port`` -> (host, port); ValueError says what is wrong."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be 0..65535, got {port!r} in {listen!r}")
    return host, int(port)


@dataclasses.dataclass(frozen=True)
class PrometheusConfig(SinkConfig):
    section: ClassVar[str] = "sinks.prometheus"

    listen: str = "127.0.0.1:9464"  # port 0: pick a free one (see PrometheusSink.address)

    def problems(self) -> Iterator[tuple[str, str]]:
        try:
            parse_listen(self.listen)
        except ValueError as exc:
            yield "listen", str(exc)


@dataclasses.dataclass
class _Series:
    requests: int = 0
    errors: int = 0
    slow: int = 0
    duration_sum: float = 0.0
    window_start: int = -(1 << 62)
    sketch: LatencySketch | None = None
    quantiles: list[float] | None = None  # cache, dropped when the sketch changes


class PrometheusSink(Sink[PrometheusConfig]):
    name = "prometheus"
    config_class = PrometheusConfig

    def __init__(self, config: PrometheusConfig) -> None:
        super().__init__(config)
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], _Series] = {}
        # (component, node, instance, counter name) -> latest cumulative value
        self._health: dict[tuple[str, str, str, str], int] = {}
        self._health_ts: dict[tuple[str, str, str], float] = {}
        self._records = {  # (kind, outcome) -> count
            (kind, outcome): 0
            for kind in ("window", "health", "node", "network")
            for outcome in ("written", "rejected")
        }
        self._nodes = NodeView()  # node CPU, memory, top-N and their recent history
        self._network = NetworkView()  # TCP health per edge and workload, conntrack usage
        self._closed = False
        self._routes: dict[str, Route] = {}  # other sinks' pages (``mount``), e.g. /topology
        host, port = parse_listen(config.listen)
        try:
            self._server = _server_class(host)((host, port), _handler_for(self))
        except OSError as exc:  # most often: the port is taken (another sink, an exporter)
            holder = who_listens(port) if exc.errno == errno.EADDRINUSE else ""
            raise SinkConfigError(
                f"sinks.prometheus.listen: cannot serve on {config.listen}: "
                f"{os.strerror(exc.errno or errno.EINVAL)}{f' (by {holder})' if holder else ''};"
                " stop that process or choose another address") from exc
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"prometheus-sink:{port}", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); with ``listen: host:0`` this is where the kernel put it."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    # -- Sink -------------------------------------------------------------------------------

    def write(self, batch: Sequence[WindowRecord]) -> None:
        parsed: list[tuple[tuple[str, ...], WindowRecord, LatencySketch]] = []
        rejected = 0
        for record in batch:  # parse outside the lock: scrapes need not wait for it
            try:
                parsed.append((_series_key(record), record, _sketch_of(record)))
            except (KeyError, TypeError, ValueError) as exc:
                rejected += 1
                log.warning("prometheus sink: dropping malformed window record: %r", exc)
        with self._lock:
            written = sum(self._apply(key, record, sketch) for key, record, sketch in parsed)
            self._count("window", "written", written)
            self._count("window", "rejected", rejected + len(parsed) - written)

    def _apply(self, key: tuple[str, ...], record: WindowRecord, sketch: LatencySketch) -> bool:
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series()
        start = record["window_start"]
        if start > series.window_start or series.sketch is None:
            series.window_start, series.sketch = start, sketch
            series.quantiles = None
        elif start == series.window_start:
            try:
                series.sketch.merge(sketch)
            except ValueError as exc:  # a sketch of another accuracy: a misconfigured worker
                log.warning("prometheus sink: dropping window record: %s", exc)
                return False
            series.quantiles = None
        series.requests += record["count"]
        series.errors += record["errors"]
        series.slow += record["slow"]
        series.duration_sum += record["sum_seconds"]
        return True

    def write_health(self, batch: Sequence[HealthRecord]) -> None:
        rows: list[tuple[tuple[str, str, str], float, Mapping[str, int]]] = []
        rejected = 0
        for record in batch:
            try:
                who = (str(record["component"]), str(record["node"]),
                       str(record.get("instance", "")))
                counters = {str(k): int(v) for k, v in record["counters"].items()}
                rows.append((who, float(record["ts"]), counters))
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                rejected += 1
                log.warning("prometheus sink: dropping malformed health record: %r", exc)
        with self._lock:
            for who, ts, latest in rows:
                if ts < self._health_ts.get(who, -math.inf):
                    continue  # an older report arriving late must not move counters back
                self._health_ts[who] = ts
                for counter, value in latest.items():
                    self._health[(*who, counter)] = value
            self._count("health", "written", len(rows))
            self._count("health", "rejected", rejected)

    def write_network(self, batch: Sequence[NetworkRecord]) -> None:
        with self._lock:
            written, rejected = self._network.apply(batch)
            self._count("network", "written", written)
            self._count("network", "rejected", rejected)

    def write_node(self, batch: Sequence[NodeRecord]) -> None:
        with self._lock:
            written, rejected = self._nodes.apply(batch)
            self._count("node", "written", written)
            self._count("node", "rejected", rejected)

    def top_json(self, node: str | None = None) -> dict[str, Any]:
        """What ``/top`` serves: per node, the latest top-N with each process's time series."""
        with self._lock:
            return self._nodes.to_json(node)

    def mount(self, path: str, route: Route) -> None:
        """Serve another sink's page (``GET path``) on this sink's HTTP server."""
        self._routes[path] = route

    def _count(self, kind: str, outcome: str, n: int) -> None:
        self._records[(kind, outcome)] += n

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def healthcheck(self) -> SinkHealth:
        if self._closed:
            return SinkHealth(False, "closed")
        if not self._thread.is_alive():
            return SinkHealth(False, "HTTP server thread has stopped")
        host, port = self.address
        with self._lock:
            n, rejected = len(self._series), self._records.get(("window", "rejected"), 0)
        return SinkHealth(
            True, f"serving http://{_host_for_url(host)}:{port}/metrics, {n} series, "
                  f"{rejected} malformed window records dropped"
        )

    # -- exposition -------------------------------------------------------------------------

    def render(self) -> str:
        """The whole exposition, as served at ``/metrics``."""
        with self._lock:
            return "".join(self._render_locked())

    def _render_locked(self) -> Iterator[str]:
        series = sorted(self._series.items())
        labels = {key: _labels(zip(SERIES_LABELS, key, strict=True)) for key, _ in series}

        for metric, help_text, attr in (
            ("kubesight_requests_total", "Requests observed.", "requests"),
            ("kubesight_request_errors_total",
             "Requests that failed (HTTP 5xx, gRPC non-OK, SQL/Redis errors, DNS failures).",
             "errors"),
            ("kubesight_slow_requests_total",
             "Requests slower than the protocol's slow threshold.", "slow"),
        ):
            yield from _header(metric, "counter", help_text)
            for key, s in series:
                yield f"{metric}{{{labels[key]}}} {getattr(s, attr)}\n"

        metric = "kubesight_request_duration_seconds"
        yield from _header(metric, "summary", "Request latency in seconds: quantiles over the "
                                              "latest window, _sum and _count over all time.")
        for key, s in series:
            if s.quantiles is None and s.sketch is not None:
                s.quantiles = s.sketch.quantiles(_QUANTILES)
            for q, value in zip(SUMMARY_QUANTILES, s.quantiles or (), strict=False):
                yield f'{metric}{{{labels[key]},quantile="{q}"}} {_number(value)}\n'
            yield f"{metric}_sum{{{labels[key]}}} {_number(s.duration_sum)}\n"
            yield f"{metric}_count{{{labels[key]}}} {s.requests}\n"

        metric = "kubesight_pipeline_counter_total"
        yield from _header(metric, "counter", "Pipeline health counters as last reported by each "
                                              "component (drops, truncations, delivery errors).")
        for (component, node, instance, counter), value in sorted(self._health.items()):
            lbl = _labels((("component", component), ("node", node), ("instance", instance),
                           ("name", counter)))
            yield f"{metric}{{{lbl}}} {value}\n"

        metric = "kubesight_pipeline_last_report_timestamp_seconds"
        yield from _header(metric, "gauge", "Unix time of each component's latest health report.")
        for (component, node, instance), ts in sorted(self._health_ts.items()):
            lbl = _labels((("component", component), ("node", node), ("instance", instance)))
            yield f"{metric}{{{lbl}}} {_number(ts)}\n"

        metric = ""
        for name, pairs, value in self._nodes.samples():
            if name != metric:
                metric = name
                yield from _header(metric, "gauge", NODE_HELP[metric])
            yield f"{metric}{{{_labels(pairs)}}} {_number(value)}\n"

        for family, kind, help_text, samples in self._network.families():
            yield from _header(family, kind, help_text)
            for suffix, net_pairs, value in samples:
                yield f"{family}{suffix}{{{_labels(net_pairs)}}} {_number(value)}\n"

        metric = "kubesight_sink_records_total"
        yield from _header(metric, "counter", "Records this sink received, by kind and outcome.")
        for (kind, outcome), value in sorted(self._records.items()):
            lbl = _labels((("sink", self.name), ("kind", kind), ("outcome", outcome)))
            yield f"{metric}{{{lbl}}} {value}\n"


# -- record parsing -------------------------------------------------------------------------

def _series_key(record: WindowRecord) -> tuple[str, ...]:
    series: Mapping[str, Any] = record["series"]
    if set(series) | _OPTIONAL_LABELS != set(SERIES_LABELS):
        raise ValueError(f"series labels must be exactly {SERIES_LABELS}, got {sorted(series)}")
    for field in ("count", "errors", "slow", "window_start"):
        value = record[field]
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{field} must be an integer, got {value!r}")
    if not isinstance(record["sum_seconds"], int | float):
        raise TypeError(f"sum_seconds must be a number, got {record['sum_seconds']!r}")
    return tuple(str(series.get(name, "")) for name in SERIES_LABELS)


# Labels added to series.v1 after its first release: records written before lack them.
_OPTIONAL_LABELS = frozenset({"dst_service"})


def _sketch_of(record: WindowRecord) -> LatencySketch:
    return LatencySketch.from_wire(record["sketch"])


# -- text format helpers --------------------------------------------------------------------

def _header(metric: str, kind: str, help_text: str) -> Iterator[str]:
    escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
    yield f"# HELP {metric} {escaped}\n"
    yield f"# TYPE {metric} {kind}\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Any) -> str:
    return ",".join(f'{name}="{_escape(value)}"' for name, value in pairs)


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


# -- HTTP -----------------------------------------------------------------------------------

def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _server_class(host: str) -> type[ThreadingHTTPServer]:
    if ":" not in host:
        return _Server
    return _Server6


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def _handler_for(sink: PrometheusSink) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, CONTENT_TYPE, sink.render())
            elif path == "/top":
                query = urllib.parse.parse_qs(self.path.partition("?")[2])
                node = query.get("node", [None])[0]
                self._reply(200, "application/json", json.dumps(sink.top_json(node)) + "\n")
            elif path in sink._routes:
                try:
                    status, content_type, body = sink._routes[path](self.path.partition("?")[2])
                except Exception as exc:  # a page's bug must not kill the server thread
                    log.exception("prometheus sink: %s failed", path)
                    status, content_type, body = 500, "text/plain; charset=utf-8", f"{exc}\n"
                self._reply(status, content_type, body)
            elif path == "/healthz":
                health = sink.healthcheck()
                self._reply(200 if health.ok else 503, "text/plain; charset=utf-8",
                            f"{'ok' if health.ok else 'unhealthy'}: {health.detail}\n")
            else:
                self._reply(404, "text/plain; charset=utf-8",
                            "try " + ", ".join(["/metrics", "/top", "/healthz",
                                                 *sorted(sink._routes)]) + "\n")

        def _reply(self, status: int, content_type: str, body: str) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("prometheus sink %s: " + format, self.address_string(), *args)

    return Handler
