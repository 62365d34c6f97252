"""A stream worker started before its broker (a pod scheduled before Kafka's, a host that boots
them in any order) waits for it, says so, and runs once it answers; Faust alone exits at once
with a traceback."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from kubesight.broker import LocalBroker
from kubesight.config import Config, KafkaConfig
from kubesight.topics import ensure_topics

from .harness import Pipeline, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]


def _pipeline(bootstrap: str, workdir: Path) -> Pipeline:
    return Pipeline(Config(kafka=KafkaConfig(bootstrap_servers=bootstrap,
                                             topic_prefix=f"ksw{uuid.uuid4().hex[:8]}.")),
                    workdir)


def test_a_worker_started_before_its_broker_waits_then_runs(
        local_broker_factory: Callable[..., LocalBroker], tmp_path: Path) -> None:
    broker = local_broker_factory()
    pipe = _pipeline(broker.bootstrap, tmp_path)
    worker = pipe.components["worker"]
    worker.start()
    try:
        wait_for("the worker to say what it waits for", lambda: pipe._ready(  # noqa: SLF001
            "worker", f"waiting for Kafka at {broker.bootstrap}"), timeout=60)
        broker.start(timeout=120)
        ensure_topics(pipe.config)
        wait_for("the worker to start once the broker answers", lambda: pipe._ready(  # noqa: SLF001
            "worker", "Ready"), timeout=120)
        log = worker.log_text()
        assert "Kafka at" in log and "answers after" in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
    finally:
        worker.stop()


def test_a_waiting_worker_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    from tests.conftest import free_ports

    pipe = _pipeline(f"127.0.0.1:{free_ports(1)[0]}", tmp_path)  # nothing listens there
    worker = pipe.components["worker"]
    worker.start()
    try:
        wait_for("the worker to wait", lambda: pipe._ready(  # noqa: SLF001
            "worker", "waiting for Kafka at"), timeout=60)
    finally:
        worker.stop(timeout=30)
    assert worker.proc is not None and worker.proc.returncode == 0, worker.log_text()[-3000:]
    assert "Traceback" not in worker.log_text()
