"""HTTPS end to end: plaintext from uprobes on OpenSSL, the same exact counts as plaintext HTTP.

nginx serves TLS with a throwaway certificate; curl and wrk (both linked against the system
libssl.so.3) drive it. The probe attaches to that library because the running nginx maps it.
Counts must equal what wrk and curl report (client side) and nginx's access log (server side);
the probe reports the library it probed and the ciphertext it kept out of the stream.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .harness import Nginx, Pipeline, curl, read_topic, wait_for, wrk

pytestmark = [pytest.mark.e2e, pytest.mark.bpf, pytest.mark.kafka]

REQ = "kubesight_requests_total"
ERR = "kubesight_request_errors_total"


@pytest.fixture(scope="module")
def nginx_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    server = Nginx(tmp_path_factory.mktemp("nginx-tls"), tls=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tls_pipeline(nginx_tls: Nginx, pipeline: Pipeline) -> Pipeline:
    """The pipeline, started after nginx so its libssl is probed from the first scan."""
    return pipeline


def test_https_counts_are_exact_like_plaintext(tls_pipeline: Pipeline, nginx_tls: Nginx) -> None:
    pipeline = tls_pipeline
    client0 = pipeline.total(REQ, side="client", dst_workload="nginx")
    server0 = pipeline.total(REQ, side="server", dst_workload="nginx")
    served0 = nginx_tls.served()

    statuses = [curl("-k", nginx_tls.url + "/") for _ in range(5)]
    errors = curl("-k", nginx_tls.url + "/error")
    result = wrk(nginx_tls.url + "/items/42", connections=8, seconds=3)

    assert statuses == [200] * 5 and errors == 503
    assert result.non_2xx == 0 and result.requests > 200
    served = nginx_tls.served() - served0
    assert 0 <= served - (result.requests + 6) <= 8  # at most one in flight per connection
    pipeline.wait_total(client0 + result.requests + 6, REQ, side="client", dst_workload="nginx")
    pipeline.wait_total(server0 + served, REQ, side="server", dst_workload="nginx")
    assert pipeline.total(ERR, side="client", src_workload="curl", dst_workload="nginx") == 1
    assert pipeline.total(REQ, side="client", src_workload="wrk", endpoint="/items/{id}",
                          protocol="http") == result.requests


def test_https_records_are_marked_tls(tls_pipeline: Pipeline, nginx_tls: Nginx) -> None:
    assert curl("-k", nginx_tls.url + "/small") == 200
    pipeline = tls_pipeline

    def tls_records() -> list[dict]:
        out = []
        for message in read_topic(pipeline.config, "requests.v1"):
            out += [r for r in message["requests"] if r["path"] == "/small"]
        return out

    records = wait_for("the /small records of both sides", lambda: (
        recs if len(recs := tls_records()) >= 2 else None), timeout=60)
    assert {r["side"] for r in records} == {"client", "server"}
    seen = [(r["side"], r["tls"], r["status"], r["complete"], r["rtt_us"], r["retransmits"])
            for r in records]
    assert all(r["tls"] and r["status"] == "200" and r["complete"] for r in records), seen
    # Each request knows its connection's health (kernel srtt; tens of µs on loopback).
    assert all(0 < r["rtt_us"] < 1_000_000 and r["retransmits"] >= 0 for r in records), seen


def test_probe_reports_the_library_and_the_ciphertext_it_dropped(tls_pipeline: Pipeline) -> None:
    def probe_counters() -> dict | None:
        health = [m for m in read_topic(tls_pipeline.config, "health.v1")
                  if m.get("component") == "probe"]
        return health[-1]["counters"] if health else None

    counters = wait_for("a probe health record after the HTTPS traffic", lambda: (
        c if (c := probe_counters()) and c.get("kernel_tls_ciphertext") else None), timeout=30)
    assert counters["tls_libraries_probed"] >= 1
