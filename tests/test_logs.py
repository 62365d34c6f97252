"""RepeatFilter: one record per logger and message template per interval, and a count of the
ones held back on the next record shown."""

from __future__ import annotations

import logging

import pytest

from kubesight.logs import RepeatFilter, quiet_repeats


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
