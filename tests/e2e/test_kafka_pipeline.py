"""Kafka end to end: a librdkafka client process (kafka_client.py) against the real broker,
→ kernel → Kafka → Faust → Prometheus. Client-side counts must equal what librdkafka itself
reports: Produce and Fetch requests from its statistics (``stats_cb``, brokers[].req), every
request type from its ``debug=protocol`` log of the responses it received, and the errors from
its delivery reports.

The client process is named ``ks-e2e-kclient`` (the probe names workloads by process, so
librdkafka's "rdk:broker1" I/O threads count under it): other pipelines' Kafka traffic is on
this machine too, and only this workload's series are counted. The broker itself is kept out
of the capture (see conftest.py), so there are no server-side records of these calls here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from .harness import REPO, Pipeline, read_topic

pytestmark = [pytest.mark.e2e, pytest.mark.bpf, pytest.mark.kafka]

REQ = "kubesight_requests_total"
ERR = "kubesight_request_errors_total"
KCLIENT = "ks-e2e-kclient"
MESSAGES, OVERSIZE = 20, 2  # one Produce request each (a flush after every message)
LIBRDKAFKA_NAMES = {"ApiVersion": "ApiVersions"}  # its request names that differ from Kafka's


@pytest.fixture(scope="module")
def report(pipeline: Pipeline, kafka_bootstrap: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(topic, what the client reported) after one run of the client, probe attached."""
    from confluent_kafka.admin import AdminClient, NewTopic

    topic, tiny = f"kse2e-{uuid.uuid4().hex[:8]}", f"kse2e-{uuid.uuid4().hex[:8]}-tiny"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    created = admin.create_topics([NewTopic(topic, 1, 1), NewTopic(
        tiny, 1, 1, config={"max.message.bytes": "1024"})], operation_timeout=30)
    for future in created.values():
        future.result(60)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "tests.e2e.kafka_client", KCLIENT, kafka_bootstrap, topic,
             tiny, str(MESSAGES), str(OVERSIZE)],
            capture_output=True, text=True, timeout=180, cwd=REPO, check=True)
        yield topic, json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        for future in admin.delete_topics([topic, tiny], operation_timeout=30).values():
            future.result(60)


def received(doc: dict[str, Any]) -> Counter[str]:
    """Responses the client received, per Kafka API name, over its producer and consumer."""
    total: Counter[str] = Counter()
    for per_type in doc["received"].values():
        total.update({LIBRDKAFKA_NAMES.get(k, k): v for k, v in per_type.items()})
    return total


def test_the_client_did_what_was_asked(report: tuple[str, dict[str, Any]]) -> None:
    _, doc = report
    assert doc["consumed"] == MESSAGES
    assert doc["delivery_errors"] == ["MSG_SIZE_TOO_LARGE"] * OVERSIZE
    assert doc["sent"]["producer"]["Produce"] == MESSAGES + OVERSIZE


@pytest.mark.parametrize("endpoint, client", [("Produce", "producer"), ("Fetch", "consumer")])
def test_produce_and_fetch_counts_equal_librdkafka_statistics(
        pipeline: Pipeline, report: tuple[str, dict[str, Any]], endpoint: str, client: str
) -> None:
    _, doc = report
    sent = doc["sent"][client][endpoint]
    assert sent == received(doc)[endpoint] > 0  # all answered: nothing was in flight at the end
    pipeline.wait_total(sent, REQ, side="client", protocol="kafka", src_workload=KCLIENT,
                        endpoint=endpoint)


def test_every_request_type_counted_as_the_client_logged_it(
        pipeline: Pipeline, report: tuple[str, dict[str, Any]]) -> None:
    _, doc = report
    expected = received(doc)
    assert {"ApiVersions", "Metadata", "Produce", "Fetch"} <= set(expected)
    for endpoint, count in expected.items():
        pipeline.wait_total(count, REQ, side="client", protocol="kafka", src_workload=KCLIENT,
                            endpoint=endpoint)
    assert pipeline.total(REQ, protocol="kafka", src_workload=KCLIENT) == sum(expected.values())


def test_oversize_produce_is_an_error_named_by_the_broker(
        pipeline: Pipeline, report: tuple[str, dict[str, Any]]) -> None:
    pipeline.wait_total(OVERSIZE, ERR, side="client", protocol="kafka", src_workload=KCLIENT,
                        endpoint="Produce", status="MESSAGE_TOO_LARGE")
    pipeline.wait_total(MESSAGES, REQ, side="client", protocol="kafka", src_workload=KCLIENT,
                        endpoint="Produce", status="NONE")


def test_request_records_name_the_topic_and_are_complete(
        pipeline: Pipeline, report: tuple[str, dict[str, Any]]) -> None:
    from kubesight.schemas import validate

    topic, _ = report
    pipeline.wait_total(MESSAGES, REQ, side="client", protocol="kafka", src_workload=KCLIENT,
                        endpoint="Produce", status="NONE")
    ours = []
    for msg in read_topic(pipeline.config, "requests.v1", timeout=60):
        mine = [r for r in (msg or {}).get("requests", [])
                if r["protocol"] == "kafka" and r["src_workload"] == KCLIENT]
        if mine:
            validate("requests.v1", msg)
            ours += mine
    produce = [r for r in ours if r["method"] == "Produce" and r["status"] == "NONE"]
    assert len(produce) == MESSAGES
    assert {(r["path"], r["complete"], r["side"]) for r in produce} == {(topic, True, "client")}
    assert all(r["complete"] for r in ours)
    assert all(r["query"].startswith(f'{r["method"]} v') for r in ours)
