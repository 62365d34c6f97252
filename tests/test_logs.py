"""RepeatFilter: one record per logger and message template per interval, and a count of the
ones held back on the next record shown."""

from __future__ import annotations

import logging

import pytest

from kubesight.logs import RdkafkaLog, RepeatFilter, quiet_repeats
from tests.conftest import free_ports


def record(name: str, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)


def test_repeats_are_held_back_and_counted() -> None:
    now = [0.0]
    flt = RepeatFilter(every_s=10, clock=lambda: now[0])
    shown = []
    for i in range(100):  # a retry loop: the same template every 100 ms, a new node id each time
        now[0] = i * 0.1
        rec = record("aiokafka.client", "Unable connect to node with id %s: %s", i, "refused")
        if flt.filter(rec):
            shown.append(rec.getMessage())
    assert shown == ["Unable connect to node with id 0: refused"]
    now[0] = 10.0
    rec = record("aiokafka.client", "Unable connect to node with id %s: %s", 1, "refused")
    assert flt.filter(rec)
    assert rec.getMessage() == ("Unable connect to node with id 1: refused "
                                "[99 more like this in 10s]")


def test_other_templates_and_loggers_pass() -> None:
    flt = RepeatFilter(every_s=10, clock=lambda: 0.0)
    assert flt.filter(record("aiokafka.client", "one %s", 1))
    assert flt.filter(record("aiokafka.client", "two %s", 1))
    assert flt.filter(record("aiokafka.conn", "one %s", 1))
    assert not flt.filter(record("aiokafka.client", "one %s", 2))


def test_quiet_repeats_filters_every_existing_logger_under_a_prefix(
        caplog: pytest.LogCaptureFixture) -> None:
    for name in ("ks_test_lib", "ks_test_lib.a", "ks_test_lib.a.b", "ks_test_other"):
        logging.getLogger(name)
    flt = quiet_repeats("ks_test_lib", every_s=60)
    try:
        with caplog.at_level(logging.INFO):
            for _ in range(5):
                logging.getLogger("ks_test_lib.a.b").info("retrying %s", "x")
                logging.getLogger("ks_test_other").info("retrying %s", "x")
        assert [r.name for r in caplog.records].count("ks_test_lib.a.b") == 1
        assert [r.name for r in caplog.records].count("ks_test_other") == 5
    finally:
        for name in ("ks_test_lib", "ks_test_lib.a", "ks_test_lib.a.b"):
            logging.getLogger(name).removeFilter(flt)


class _Counting:
    """A client's logger that only counts: what librdkafka hands over unfiltered."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, _level: int, fmt: str, *args: object) -> None:
        self.lines.append(fmt % args)


def test_a_real_client_with_no_broker_logs_once_per_message_not_per_retry(
        caplog: pytest.LogCaptureFixture) -> None:
    """Two real producers polled alike against a port nothing listens on: librdkafka hands
    the unfiltered one a refused connection per retry; through RdkafkaLog the same retries are
    one line (every_s is longer than the test)."""
    from confluent_kafka import Producer

    port = free_ports(1)[0]
    conf = {"bootstrap.servers": f"127.0.0.1:{port}", "reconnect.backoff.ms": 10,
            "reconnect.backoff.max.ms": 50}
    raw = _Counting()
    quiet = RdkafkaLog("ks_test_rdkafka", every_s=3600)
    plain, filtered = Producer({**conf, "logger": raw}), Producer({**conf, "logger": quiet})
    with caplog.at_level(logging.INFO, logger="ks_test_rdkafka"):
        for _ in range(200):  # bounded: at most 200 x 2 x 20 ms
            plain.poll(0.02)
            filtered.poll(0.02)
            if sum("Connection refused" in line for line in raw.lines) >= 5:
                break
    refused = [r for r in caplog.records if "Connection refused" in r.getMessage()]
    assert sum("Connection refused" in line for line in raw.lines) >= 5, raw.lines
    assert len(refused) == 1, [r.getMessage() for r in refused]
    assert refused[0].levelno == logging.ERROR and "[rdkafka#producer-" in refused[0].getMessage()


def test_rdkafka_lines_that_differ_beyond_numbers_pass_and_a_level_can_be_imposed(
        caplog: pytest.LogCaptureFixture) -> None:
    out = RdkafkaLog("ks_test_rdkafka_b", every_s=3600, level=logging.DEBUG)
    with caplog.at_level(logging.DEBUG, logger="ks_test_rdkafka_b"):
        out.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", "refused (after 0ms)")
        out.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", "refused (after 3ms)")
        out.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", "100% of 5 timed out")
    assert [r.getMessage() for r in caplog.records] == [
        "FAIL [rdkafka#consumer-1] refused (after 0ms)",
        "FAIL [rdkafka#consumer-1] 100% of 5 timed out"]
    assert {r.levelno for r in caplog.records} == {logging.DEBUG}
