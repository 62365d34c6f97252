"""PrometheusSink over real HTTP: exact counters, latest-window quantiles, the text format."""

from __future__ import annotations

import math
import random
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from kubesight.sinks import PrometheusConfig, PrometheusSink, SeriesLabels

from tests.promtext import parse

from . import series, window_record

GOLDEN = ("kubesight_requests_total", "kubesight_request_errors_total",
          "kubesight_slow_requests_total", "kubesight_request_duration_seconds")
def exact(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[math.floor(q * (len(ordered) - 1))]


@pytest.fixture
def sink() -> Iterator[PrometheusSink]:
    s = PrometheusSink(PrometheusConfig(listen="127.0.0.1:0"))
    yield s
    s.close()


def scrape(sink: PrometheusSink, path: str = "/metrics") -> tuple[int, str, str]:
    host, port = sink.address
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as response:
        return response.status, response.headers["Content-Type"], response.read().decode()


def test_counters_sum_all_deltas_and_quantiles_follow_the_latest_window(
        sink: PrometheusSink) -> None:
    rng = random.Random(1)
    a = series(src_workload='we"ird\\name\nx')  # every character that needs escaping
    b = series(dst_workload="mysql", protocol="mysql", endpoint="SELECT")

    def draw(n: int, scale: float) -> list[float]:
        return [rng.lognormvariate(math.log(scale), 0.8) for _ in range(n)]

    a100, a110, a110_late = draw(500, 0.010), draw(400, 0.200), draw(100, 0.900)
    b100, b110, b100_late = draw(300, 0.005), draw(200, 0.050), draw(50, 5.0)
    sink.write([window_record(a, 100, a100, errors=5, slow=1),
                window_record(b, 100, b100, errors=1)])
    sink.write([window_record(a, 110, a110, errors=7, slow=40),
                window_record(b, 110, b110, slow=2)])
    sink.write([window_record(a, 110, a110_late, errors=2, slow=100, revision=1),  # same window
                window_record(b, 100, b100_late, slow=50, revision=1)])  # older window: counts only

    status, content_type, text = scrape(sink)
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    samples, helps, types = parse(text)
    assert {m: types[m] for m in GOLDEN} == {
        "kubesight_requests_total": "counter", "kubesight_request_errors_total": "counter",
        "kubesight_slow_requests_total": "counter",
        "kubesight_request_duration_seconds": "summary",
    }
    assert all(helps[m] for m in GOLDEN)

    for labels, windows, errors, slow, latest in (
        (a, [a100, a110, a110_late], 14, 141, a110 + a110_late),
        (b, [b100, b110, b100_late], 1, 52, b110),
    ):
        key = frozenset(labels.items())
        everything = [v for w in windows for v in w]
        assert samples[("kubesight_requests_total", key)] == len(everything)
        assert samples[("kubesight_request_errors_total", key)] == errors
        assert samples[("kubesight_slow_requests_total", key)] == slow
        assert samples[("kubesight_request_duration_seconds_count", key)] == len(everything)
        assert math.isclose(samples[("kubesight_request_duration_seconds_sum", key)],
                            sum(everything), rel_tol=1e-9)
        for q in ("0.5", "0.9", "0.95", "0.99"):
            got = samples[("kubesight_request_duration_seconds", key | {("quantile", q)})]
            truth = exact(latest, float(q))
            assert abs(got - truth) <= 0.01 * truth, q

    assert samples[("kubesight_sink_records_total", frozenset(
        {("sink", "prometheus"), ("kind", "window"), ("outcome", "written")}))] == 6


def test_pipeline_health_keeps_the_latest_report(sink: PrometheusSink) -> None:
    sink.write_health([
        {"component": "probe", "node": "n1", "instance": "p1", "ts": 10.0,
         "counters": {"ringbuf_drops": 3, "truncated": 1}},
        {"component": "probe", "node": "n1", "instance": "p1", "ts": 20.0,
         "counters": {"ringbuf_drops": 9, "truncated": 1}},
    ])
    sink.write_health([{"component": "probe", "node": "n1", "instance": "p1", "ts": 15.0,
                        "counters": {"ringbuf_drops": 5}}])  # late and stale: ignored
    samples, _, types = parse(scrape(sink)[2])
    probe = {("component", "probe"), ("node", "n1"), ("instance", "p1")}
    assert samples[("kubesight_pipeline_counter_total",
                    frozenset(probe | {("name", "ringbuf_drops")}))] == 9
    assert samples[("kubesight_pipeline_last_report_timestamp_seconds", frozenset(probe))] == 20
    assert types["kubesight_pipeline_counter_total"] == "counter"


def test_malformed_records_are_counted_not_fatal(sink: PrometheusSink) -> None:
    good = window_record(series(), 100, [0.1, 0.2])
    sink.write([good, {**good, "sketch": {"v": 99}}, {**good, "series": {"side": "server"}}])
    samples, _, _ = parse(scrape(sink)[2])
    outcome = {("sink", "prometheus"), ("kind", "window")}
    assert samples[("kubesight_sink_records_total",
                    frozenset(outcome | {("outcome", "rejected")}))] == 2
    assert samples[("kubesight_requests_total", frozenset(series().items()))] == 2


def test_records_from_before_dst_service_read_it_as_empty(sink: PrometheusSink) -> None:
    """series.v1 gained dst_service after its first release: a golden.v1 record written by
    an older worker still counts, under dst_service="" (no other label may be missing)."""
    old = {k: v for k, v in series().items() if k != "dst_service"}
    sink.write([window_record(SeriesLabels(**old), 100, [0.1, 0.2, 0.3])])  # type: ignore[typeddict-item]
    samples, _, _ = parse(scrape(sink)[2])
    assert samples[("kubesight_requests_total",
                    frozenset(series(dst_service="").items()))] == 3
    no_side = {k: v for k, v in old.items() if k != "side"}
    sink.write([window_record(SeriesLabels(**no_side), 100, [0.1])])  # type: ignore[typeddict-item]
    samples, _, _ = parse(scrape(sink)[2])
    assert samples[("kubesight_sink_records_total", frozenset(
        {("sink", "prometheus"), ("kind", "window"), ("outcome", "rejected")}))] == 1


def test_healthz_and_close_frees_the_port() -> None:
    sink = PrometheusSink(PrometheusConfig(listen="127.0.0.1:0"))
    status, _, body = scrape(sink, "/healthz")
    assert status == 200 and body.startswith("ok")
    with pytest.raises(urllib.error.HTTPError) as not_found:
        scrape(sink, "/nope")
    assert not_found.value.code == 404
    not_found.value.close()
    host, port = sink.address
    sink.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5)
    # A restarted sink can listen on the same port again.
    PrometheusSink(PrometheusConfig(listen=f"{host}:{port}")).close()


def test_a_taken_listen_address_names_the_key_and_its_holder() -> None:
    import os
    import socket

    from kubesight.sinks.base import SinkConfigError

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(SinkConfigError, match=(
                rf"sinks\.prometheus\.listen: cannot serve on 127\.0\.0\.1:{port}: Address "
                rf"already in use \(by pid {os.getpid()} \(")):
            PrometheusSink(PrometheusConfig(listen=f"127.0.0.1:{port}"))
