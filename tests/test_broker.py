"""The local KRaft broker: real JVM, real produce/consume, crash and restart."""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from kubesight.broker import BrokerError, LocalBroker, jars_present
from kubesight.config import Config, KafkaConfig, LocalBrokerConfig

needs_jars = pytest.mark.skipif(
    not jars_present(), reason="Kafka jars missing: run `make kafka`"
)


def _create_topic(bootstrap: str, topic: str, partitions: int = 1) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(topic, partitions, 1)],
                                   operation_timeout=20).values():
        fut.result(timeout=30)


def _produce(bootstrap: str, topic: str, key: bytes, value: bytes) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all",
                         "enable.idempotence": True})
    errors: list[KafkaError] = []
    producer.produce(topic, key=key, value=value,
                     on_delivery=lambda err, _msg: errors.append(err) if err else None)
    assert producer.flush(30) == 0, "message not delivered within 30s"
    assert not errors, errors


def _consume_all(bootstrap: str, topic: str, want: int, timeout: float = 30
                 ) -> list[tuple[bytes | None, bytes | None]]:
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest", "enable.auto.commit": False,
    })
    got: list[tuple[bytes | None, bytes | None]] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                raise AssertionError(f"consume error: {err}")
            got.append((msg.key(), msg.value()))
    finally:
        consumer.close()
    return got


@pytest.mark.kafka
def test_session_broker_answers(kafka_bootstrap: str) -> None:
    md = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10)
    assert md.brokers


@pytest.mark.kafka
@needs_jars
def test_produce_consume_survives_kill_9(
        local_broker_factory: Callable[..., LocalBroker]) -> None:
    broker = local_broker_factory()
    t0 = time.monotonic()
    broker.start()
    first_start = time.monotonic() - t0
    assert broker.is_running() and broker.pid is not None
    assert broker.pid_path.read_text().strip() == str(broker.pid)
    assert (broker.data_dir / "meta.properties").exists()
    cluster_id = broker.cluster_id()

    topic = "kst.broker.restart"
    _create_topic(broker.bootstrap, topic)
    _produce(broker.bootstrap, topic, b"conn-1", b"before the crash")
    assert _consume_all(broker.bootstrap, topic, 1) == [(b"conn-1", b"before the crash")]

    old_pid = broker.pid
    broker.kill()
    assert not broker.is_running()
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)

    t0 = time.monotonic()
    broker.start()  # same state dir; the stale pid file must not confuse it
    restart = time.monotonic() - t0
    assert broker.pid != old_pid
    assert broker.cluster_id() == cluster_id  # not re-formatted
    assert _consume_all(broker.bootstrap, topic, 1) == [(b"conn-1", b"before the crash")]
    _produce(broker.bootstrap, topic, b"conn-1", b"after the crash")
    assert [v for _, v in _consume_all(broker.bootstrap, topic, 2)] == [
        b"before the crash", b"after the crash"]
    print(f"first start {first_start:.1f}s, restart after kill -9 {restart:.1f}s")


@pytest.mark.kafka
@needs_jars
def test_stop_is_clean_and_a_second_start_reuses_a_running_broker(
        local_broker_factory: Callable[..., LocalBroker]) -> None:
    broker = local_broker_factory()
    broker.start()
    # Another LocalBroker on the same state dir adopts the running broker instead of failing.
    same = LocalBroker(broker.config)
    same.start(timeout=20)
    assert same.pid == broker.pid
    pid = broker.pid
    assert pid is not None

    broker.stop()
    assert not broker.is_running()
    assert not broker.pid_path.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not same.is_running()
    broker.stop()  # no-op
    assert "Kafka Server started" in broker.log_path.read_text()
    # The broker logged through slf4j -> reload4j, not slf4j's no-op fallback.
    assert "SLF4J: Defaulting to no-operation" not in broker.log_path.read_text()


@pytest.mark.kafka
@needs_jars
def test_port_in_use_is_named(local_broker_factory: Callable[..., LocalBroker]) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = local_broker_factory(port=port)
        with pytest.raises(BrokerError, match=rf"port {port}\b.*already in use"):
            broker.start(timeout=10)
        assert not broker.is_running()


@needs_jars
def test_up_on_a_taken_port_says_who_has_it_and_starts_nothing(tmp_path: Path) -> None:
    """`kubesight up` as an operator meets it: one message naming the port and its holder,
    exit 1, no traceback, and no "stopped" for components that never started."""
    import subprocess
    import sys

    from tests.conftest import free_ports

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBESIGHT_")}
        env.update({"KUBESIGHT_STATE_DIR": str(tmp_path / "state"),
                    "KUBESIGHT_KAFKA__LOCAL__PORT": str(port),
                    "KUBESIGHT_KAFKA__LOCAL__CONTROLLER_PORT": str(free_ports(1)[0])})
        out = subprocess.run([sys.executable, "-m", "kubesight.cli", "up", "--no-probe"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr, out.stderr
    assert f"port {port} on 127.0.0.1 (kafka.local.port) is already in use by pid " \
        f"{os.getpid()}" in out.stderr, out.stderr
    assert "stopped" not in out.stdout, out.stdout


@pytest.mark.kafka
@needs_jars
def test_startup_failure_reports_the_log(local_broker_factory: Callable[..., LocalBroker]) -> None:
    broker = local_broker_factory(heap="not-a-size")
    with pytest.raises(BrokerError, match=r"exited during start-up.*\n.*") as info:
        broker.start(timeout=30)
    assert "Invalid maximum heap size" in str(info.value)
    assert not broker.pid_path.exists()


def test_missing_jars_say_make_kafka(tmp_path: Path) -> None:
    config = Config(state_dir=str(tmp_path),
                    kafka=KafkaConfig(local=LocalBrokerConfig(version="0.0.0-missing")))
    with pytest.raises(BrokerError, match=r"kafka-0\.0\.0-missing/libs.*make kafka"):
        LocalBroker(config).start(timeout=5)

    config = Config(state_dir=str(tmp_path), kafka=KafkaConfig(
        local=LocalBrokerConfig(jars_dir=str(tmp_path / "nowhere"))))
    with pytest.raises(BrokerError, match=r"nowhere.*make kafka"):
        LocalBroker(config).start(timeout=5)


def test_missing_java_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    libs = tmp_path / "libs"
    libs.mkdir()
    (libs / "kafka_2.13-3.9.1.jar").write_bytes(b"")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    config = Config(state_dir=str(tmp_path),
                    kafka=KafkaConfig(local=LocalBrokerConfig(jars_dir=str(libs))))
    with pytest.raises(BrokerError, match="java not found"):
        LocalBroker(config).start(timeout=5)


@pytest.mark.kafka
@needs_jars
def test_stop_escalates_to_sigkill(local_broker_factory: Callable[..., LocalBroker]) -> None:
    broker = local_broker_factory()
    broker.start()
    pid = broker.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # a stopped JVM cannot act on SIGTERM
    t0 = time.monotonic()
    broker.stop(timeout=1)
    assert time.monotonic() - t0 < 10
    assert not broker.is_running()
