from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubesight.probe import node

from kubesight.config import Config, KafkaConfig

from .harness import Nginx, Pipeline

BPF_OBJECT = Path(__file__).resolve().parents[2] / "bpf" / "build" / "l7.bpf.o"


def _need_root_and_bpf() -> None:
    if os.geteuid() != 0:
        pytest.skip("the probe loads BPF programs: run as root")
    if not BPF_OBJECT.exists():
        pytest.skip(f"{BPF_OBJECT} is missing: run `make bpf`")


def broker_pid(bootstrap: str) -> int | None:
    """The local process listening on the broker's port, to keep it out of the capture."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    for lst in node.listeners():
        if lst.port == int(port):
            return lst.tgid
    return None


@pytest.fixture(scope="module")
def pipeline(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Pipeline]:
    _need_root_and_bpf()
    import uuid

    base = Config(kafka=KafkaConfig(bootstrap_servers=kafka_bootstrap,
                                    topic_prefix=f"kse{uuid.uuid4().hex[:8]}."))
    pipe = Pipeline(base, tmp_path_factory.mktemp("pipeline"))
    pid = broker_pid(kafka_bootstrap)
    if pid is not None:
        pipe.exclude("kafka", pid)
    try:
        pipe.start()
        yield pipe
    finally:
        pipe.stop()


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    server = Nginx(tmp_path_factory.mktemp("nginx"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
