"""The topic catalogue and ensure_topics against a real broker."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource  # the public re-export is untyped

from kubesight import topics
from kubesight.config import REPO_ROOT, Config
from kubesight.topics import TOPICS, TopicError, ensure_topics


def test_catalogue() -> None:
    names = [t.name for t in TOPICS]
    assert names[:7] == ["raw.v1", "requests.v1", "series.v1", "golden.v1", "meta.v1",
                         "health.v1", "deadletter.v1"]
    assert "node.v1" in names
    assert len(set(names)) == len(names)
    assert [t.name for t in TOPICS if t.compacted] == ["meta.v1", "k8s.v1", "topology.v1"]
    for t in TOPICS:
        assert t.key and t.description
        assert (REPO_ROOT / "schemas" / f"{t.schema}.json").exists(), t.schema
    assert topics.spec("golden.v1").key == "series"
    with pytest.raises(KeyError, match="golden.v1"):
        topics.spec("golden")
    with pytest.raises(dataclasses.FrozenInstanceError):
        TOPICS[0].name = "x"  # type: ignore[misc]
    assert Config().topic("raw.v1") == "kubesight.raw.v1"


def _cleanup_policies(config: Config, names: list[str]) -> dict[str, str]:
    admin = AdminClient(dict(config.kafka.librdkafka()))
    futures = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, n) for n in names])
    out = {}
    for res, fut in futures.items():
        out[res.name] = fut.result(timeout=30)["cleanup.policy"].value
    return out


@pytest.mark.kafka
def test_ensure_topics_creates_all_then_is_a_noop(kubesight_config: Config) -> None:
    config = dataclasses.replace(
        kubesight_config, kafka=dataclasses.replace(kubesight_config.kafka, partitions=3))
    full = [config.topic(t.name) for t in TOPICS]
    assert all(n.startswith(config.kafka.topic_prefix) for n in full)
    assert topics.describe(config) == {}

    created = ensure_topics(config)
    assert sorted(created) == sorted(full)
    assert topics.describe(config) == {n: 3 for n in full}
    policies = _cleanup_policies(config, full)
    compacted = ("meta.v1", "k8s.v1", "topology.v1")
    assert policies == {n: ("compact" if n.endswith(compacted) else "delete") for n in full}

    assert ensure_topics(config) == []  # second call: nothing to do
    assert topics.describe(config) == {n: 3 for n in full}


@pytest.mark.kafka
def test_ensure_topics_creates_only_the_missing(kubesight_config: Config) -> None:
    ensure_topics(kubesight_config, specs=[topics.spec("golden.v1")])
    created = ensure_topics(kubesight_config)
    assert kubesight_config.topic("golden.v1") not in created
    assert len(created) == len(TOPICS) - 1
    assert set(topics.describe(kubesight_config).values()) == {kubesight_config.kafka.partitions}


@pytest.mark.kafka
def test_ensure_topics_names_the_topic_on_real_failure(kubesight_config: Config) -> None:
    brokers = AdminClient(dict(kubesight_config.kafka.librdkafka())).list_topics(timeout=10).brokers
    config = dataclasses.replace(kubesight_config, kafka=dataclasses.replace(
        kubesight_config.kafka, replication_factor=len(brokers) + 1))
    with pytest.raises(TopicError, match=rf"{config.topic('')}\S+.*INVALID_REPLICATION_FACTOR"):
        ensure_topics(config, timeout=20)


def test_ensure_topics_times_out_naming_the_topics() -> None:
    # Nothing listens on port 1: the call retries, then gives up with the missing topic names.
    from kubesight.config import KafkaConfig

    config = Config(kafka=KafkaConfig(bootstrap_servers="127.0.0.1:1", topic_prefix="nowhere."))
    with pytest.raises(TopicError, match=r"nowhere\.raw\.v1.*within 2s"):
        ensure_topics(config, timeout=2)


def test_the_topics_command_with_no_broker_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    """`kubesight topics` against a port nothing listens on: exit 1 and the names of the topics
    it could not create, within --timeout; no traceback, and librdkafka's refused connections
    (one per ~50 ms, 564 lines in the 30 s of the default timeout before) come out once."""
    env = {**os.environ, "KUBESIGHT_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1",
           "KUBESIGHT_KAFKA__TOPIC_PREFIX": "nowhere.", "KUBESIGHT_STATE_DIR": str(tmp_path)}
    env.pop("KUBESIGHT_CONFIG", None)
    out = subprocess.run([sys.executable, "-m", "kubesight.cli", "topics", "--timeout", "3"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr, out.stderr
    assert "kubesight: could not create Kafka topic(s)" in out.stderr
    assert "nowhere.raw.v1" in out.stderr and "within 3s" in out.stderr
    assert out.stderr.count("Connection refused") <= 1, out.stderr
