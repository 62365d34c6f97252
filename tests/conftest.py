"""Shared fixtures: a real Kafka broker for the session, per-test configs and private brokers.

The session broker is, in this order of preference:

1. an external broker named by ``KUBESIGHT_TEST_BOOTSTRAP`` (used as-is);
2. a testcontainers ``KafkaContainer`` when a Docker engine answers (set
   ``KUBESIGHT_TEST_DOCKER=0`` to skip the check); image from ``KUBESIGHT_TEST_KAFKA_IMAGE``;
3. the real local broker (``kubesight.broker.LocalBroker``, jars from `make kafka`) in a
   temporary state dir on free ports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kubesight.broker import LocalBroker
from kubesight.config import Config, KafkaConfig, LocalBrokerConfig

log = logging.getLogger("kubesight.tests")

DEFAULT_KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.1"


def _ephemeral_low() -> int:
    """The first port the kernel hands out to connect() without a bind (32768 by default)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that are free right now (held open together while choosing).

    They come from below the ephemeral range: a port the kernel picked with bind(0) can be
    handed to some client's connect() before the listener that was meant to get it binds it.
    CI saw it: the metrics port was a worker's local port to the broker, and the worker-stall
    test's black hole for that connection swallowed the scrapes too."""
    rng = random.Random()
    high = max(_ephemeral_low(), 2048)
    socks: list[socket.socket] = []
    try:
        for _ in range(200 * n):
            if len(socks) == n:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((host, rng.randrange(max(1024, high // 2), high)))
            except OSError:
                s.close()
                continue
            socks.append(s)
        while len(socks) < n:  # the low range is crowded: fall back on the kernel's choice
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _docker_answers(timeout: float = 3.0) -> bool:
    """True if a Docker engine answers a ping within ``timeout`` seconds."""
    if os.environ.get("KUBESIGHT_TEST_DOCKER", "").lower() in ("0", "no", "false"):
        return False
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False
    try:
        import docker  # comes with testcontainers
    except ImportError:
        try:
            res = subprocess.run(["docker", "info"], capture_output=True, timeout=timeout,
                                 check=False)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return res.returncode == 0
    try:
        client = docker.from_env(timeout=int(max(1, timeout)))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure means "no usable Docker"
        return False


@contextlib.contextmanager
def _testcontainers_kafka() -> Iterator[str]:
    from testcontainers.kafka import KafkaContainer  # lazy: optional dependency

    image = os.environ.get("KUBESIGHT_TEST_KAFKA_IMAGE", DEFAULT_KAFKA_IMAGE)
    with KafkaContainer(image=image).with_kraft() as container:
        yield container.get_bootstrap_server()


def make_local_broker(state_dir: Path, **local: Any) -> LocalBroker:
    """A LocalBroker (not started) with its state in ``state_dir``, on free ports."""
    port, controller_port = free_ports(2)
    local.setdefault("port", port)
    local.setdefault("controller_port", controller_port)
    local.setdefault("heap", "512m")
    config = Config(state_dir=str(state_dir), kafka=KafkaConfig(local=LocalBrokerConfig(**local)))
    return LocalBroker(config)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of a real Kafka broker for the whole session."""
    external = os.environ.get("KUBESIGHT_TEST_BOOTSTRAP", "").strip()
    if external:
        yield external
        return
    if _docker_answers():
        try:
            import testcontainers.kafka  # noqa: F401
        except ImportError:
            log.info("Docker answers but testcontainers[kafka] is not installed")
        else:
            with _testcontainers_kafka() as bootstrap:
                yield bootstrap
            return
    broker = make_local_broker(tmp_path_factory.mktemp("kafka-session"))
    broker.start(timeout=120)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def kubesight_config(kafka_bootstrap: str, tmp_path: Path) -> Config:
    """A Config on the session broker with a topic prefix of its own (``kst<uuid8>.``)."""
    prefix = f"kst{uuid.uuid4().hex[:8]}."
    return Config(
        state_dir=str(tmp_path),
        kafka=KafkaConfig(bootstrap_servers=kafka_bootstrap, topic_prefix=prefix),
    )


@pytest.fixture
def local_broker_factory(tmp_path_factory: pytest.TempPathFactory
                         ) -> Iterator[Callable[..., LocalBroker]]:
    """``factory(state_dir=None, **LocalBrokerConfig fields)`` -> a LocalBroker, NOT started,
    on free ports, in a fresh temporary state dir unless one is given. All are stopped at
    teardown (whether the test stopped, killed or restarted them)."""
    brokers: list[LocalBroker] = []

    def factory(state_dir: Path | None = None, **local: Any) -> LocalBroker:
        broker = make_local_broker(state_dir or tmp_path_factory.mktemp("kafka-broker"), **local)
        brokers.append(broker)
        return broker

    yield factory
    errors: list[BaseException] = []
    for broker in reversed(brokers):
        try:
            broker.stop()
        except Exception as exc:  # noqa: BLE001 - stop the others, then report
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture(scope="session")
def kube_apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real etcd + kube-apiserver on loopback for the session (tests/k8s_fixture.py);
    skips, saying why, when `make apiserver` has not built the binary or etcd is missing."""
    from tests.k8s_fixture import KubeAPIServer, missing_reason

    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)
    server = KubeAPIServer(tmp_path_factory.mktemp("kube-apiserver"))
    try:
        server.start()
        yield server
    finally:
        server.stop()
