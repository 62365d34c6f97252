"""The catalogue of kubesight's Kafka topics, and creating them.

Logical names (``raw.v1``) carry the schema version; the full topic name adds the configured
prefix: ``config.topic("raw.v1") == "kubesight.raw.v1"``. Each topic's record schema is
``kubesight.schemas.load(spec.schema)``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from kubesight.config import Config
from kubesight.logs import RdkafkaLog

if TYPE_CHECKING:
    from confluent_kafka.admin import AdminClient


class TopicError(RuntimeError):
    """A topic could not be created or described; the message names the topic."""


@dataclasses.dataclass(frozen=True)
class TopicSpec:
    name: str  # logical name, e.g. "raw.v1"; full name is config.topic(name)
    key: str  # what the Kafka message key is
    description: str
    compacted: bool
    schema: str  # schema name in kubesight.schemas (a file schemas/<schema>.json)


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(
        "raw.v1", "connection (node/probe/connection id)",
        "Raw kernel event batches from the probe: one message is a batch of one connection's "
        "events, in kernel order.",
        False, "raw.v1"),
    TopicSpec(
        "requests.v1", "connection",
        "Protocol-level request records reassembled from raw events (HTTP, gRPC, SQL, Redis, "
        "DNS…), with endpoint, status, latency and SQL text / trace ids.",
        False, "requests.v1"),
    TopicSpec(
        "series.v1", "series",
        "Internal repartition of request records by metric series (group_by) before the "
        "windowed golden-signal tables.",
        False, "series.v1"),
    TopicSpec(
        "golden.v1", "series",
        "Golden-signal window aggregates per series: counts, errors, slow requests and a "
        "mergeable latency sketch.",
        False, "golden.v1"),
    TopicSpec(
        "meta.v1", "node/endpoint",
        "Process, listener and workload metadata (latest value per key wins).",
        True, "meta.v1"),
    TopicSpec(
        "health.v1", "node/component",
        "Health counters of kubesight's own components (ring-buffer drops, truncations, "
        "delivery failures…).",
        False, "health.v1"),
    TopicSpec(
        "deadletter.v1", "source topic/partition/offset",
        "Records that could not be decoded or validated, with the reason.",
        False, "deadletter.v1"),
    TopicSpec(
        "k8s.v1", "kind/namespace/name",
        "Kubernetes metadata from the API server (kubesight meta): pods with IPs, container "
        "ids and owning workload, services, endpointslices, workloads and nodes; latest "
        "record per object wins, a deleted object leaves a tombstone.",
        True, "k8s.v1"),
    TopicSpec(
        "node.v1", "node",
        "Node CPU per core, memory and the top-N processes and pods by CPU, one record per "
        "probe sampling interval; the topic's history is their time series.",
        False, "node.v1"),
    TopicSpec(
        "tcp.v1", "node/probe/batch",
        "TCP connection intervals from the probe: per connection, what changed since it was "
        "last reported (bytes, retransmits, resets, smoothed RTT histogram, connect outcome), "
        "in batches per node; batches after a snapshot carry the node's conntrack usage.",
        False, "tcp.v1"),
    TopicSpec(
        "netseries.v1", "network series",
        "Internal repartition of TCP intervals by network series (edge or workload) before "
        "the windowed network tables.",
        False, "netseries.v1"),
    TopicSpec(
        "network.v1", "network series, or node",
        "Network health per edge and workload and tumbling window (connections opened/"
        "closed, connect failures by kind, resets, retransmits, bytes, an RTT sketch), and "
        "node conntrack usage.",
        False, "network.v1"),
    TopicSpec(
        "topology.v1", "edge (src -> dst [protocol])",
        "The live service map at workload level, kept by the topology sink: per edge, "
        "requests, errors, slow, latency P50-P99 per observing side and the pair's TCP "
        "signals over the last minute; a quiet edge ages out as a tombstone.",
        True, "topology.v1"),
)

_BY_NAME = {t.name: t for t in TOPICS}


def spec(name: str) -> TopicSpec:
    """The spec of a logical topic name (``"golden.v1"``)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no topic {name!r}; known: {', '.join(_BY_NAME)}") from None


def topic_config(s: TopicSpec) -> dict[str, str]:
    """Per-topic Kafka settings kubesight sets at creation."""
    if s.compacted:
        return {"cleanup.policy": "compact"}
    return {"cleanup.policy": "delete"}


def _admin(config: Config) -> AdminClient:
    from confluent_kafka.admin import AdminClient

    conf: dict[str, Any] = dict(config.kafka.librdkafka())
    conf.update({"socket.connection.setup.timeout.ms": 2000, "reconnect.backoff.max.ms": 500,
                 "logger": RdkafkaLog("kubesight.topics.kafka")})
    return AdminClient(conf)


# Errors that mean "the cluster is not ready yet; try again".
_RETRIABLE = {
    "_TRANSPORT", "_TIMED_OUT", "_ALL_BROKERS_DOWN", "_WAIT_COORD", "_RESOLVE",
    "REQUEST_TIMED_OUT", "NOT_CONTROLLER", "LEADER_NOT_AVAILABLE", "BROKER_NOT_AVAILABLE",
    "NETWORK_EXCEPTION", "COORDINATOR_NOT_AVAILABLE", "NOT_COORDINATOR",
    "COORDINATOR_LOAD_IN_PROGRESS", "KAFKA_STORAGE_ERROR", "THROTTLING_QUOTA_EXCEEDED",
    "NOT_ENOUGH_REPLICAS",
}


def err_name(exc: BaseException) -> tuple[str, bool, str]:
    """(error name, retriable, text) of a confluent-kafka exception."""
    from confluent_kafka import KafkaException

    if isinstance(exc, KafkaException) and exc.args:
        err = exc.args[0]
        name = err.name() if hasattr(err, "name") else str(err)
        retriable = bool(getattr(err, "retriable", lambda: False)()) or name in _RETRIABLE
        return name, retriable, err.str() if hasattr(err, "str") else str(err)
    return type(exc).__name__, False, str(exc)


def ensure_topics(config: Config, timeout: float = 30,
                  specs: Iterable[TopicSpec] = TOPICS) -> list[str]:
    """Create the topics that do not exist yet; return the full names created now.

    Idempotent (a topic that already exists, or is created concurrently, is fine). Retries while
    the broker is still coming up, until ``timeout``; raises TopicError naming the topic on a
    real failure (bad replication factor, policy violation, authorization…).
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.cimpl import NewTopic

    deadline = time.monotonic() + timeout
    wanted = {config.topic(s.name): s for s in specs}
    all_names = list(wanted)
    created: list[str] = []
    admin = _admin(config)
    last = "no answer from the cluster"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = ", ".join(sorted(wanted))
            raise TopicError(
                f"could not create Kafka topic(s) {missing} on {config.kafka.bootstrap} "
                f"within {timeout:.0f}s: {last}"
            )
        try:
            existing = set(admin.list_topics(timeout=min(5.0, max(0.5, remaining))).topics)
        except KafkaException as exc:
            name, _, text = err_name(exc)
            last = f"listing topics failed: {name}: {text}"
            admin.poll(0)  # its log lines (RdkafkaLog) come out when it is polled
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
            continue
        for full in [t for t in wanted if t in existing]:
            del wanted[full]
        if not wanted:
            _wait_leaders(admin, all_names, deadline, timeout)
            return created
        new = [
            NewTopic(full, num_partitions=config.kafka.partitions,
                     replication_factor=config.kafka.replication_factor,
                     config=topic_config(s))
            for full, s in wanted.items()
        ]
        futures = admin.create_topics(
            new, request_timeout=min(15.0, max(1.0, remaining)),
            operation_timeout=min(15.0, max(1.0, remaining)),
        )
        for full, fut in futures.items():
            try:
                fut.result()
            except KafkaException as exc:
                name, retriable, text = err_name(exc)
                if name == "TOPIC_ALREADY_EXISTS":
                    wanted.pop(full, None)
                    continue
                if retriable:
                    last = f"creating {full} failed: {name}: {text}"
                    continue
                raise TopicError(
                    f"cannot create Kafka topic {full} ({config.kafka.partitions} partitions, "
                    f"replication factor {config.kafka.replication_factor}) on "
                    f"{config.kafka.bootstrap}: {name}: {text}"
                ) from exc
            else:
                created.append(full)
                wanted.pop(full, None)
        if not wanted:
            _wait_leaders(admin, all_names, deadline, timeout)
            return created
        time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))


def _wait_leaders(admin: AdminClient, names: list[str], deadline: float,
                  timeout: float) -> None:
    """Wait until every partition of ``names`` has a leader, so clients can use them at once."""
    from confluent_kafka import KafkaException

    pending = "metadata not fetched"
    while True:
        remaining = deadline - time.monotonic()
        try:
            md = admin.list_topics(timeout=min(5.0, max(0.5, remaining)))
            pending = ""
            for name in names:
                t = md.topics.get(name)
                if t is None or t.error is not None:
                    pending = f"{name}: {t.error if t is not None else 'not in metadata'}"
                    break
                bad = [p for p in t.partitions.values() if p.error is not None or p.leader < 0]
                if bad or not t.partitions:
                    pending = f"{name}: partition {bad[0].id if bad else '?'} has no leader"
                    break
            if not pending:
                return
        except KafkaException as exc:
            pending = str(exc)
        if time.monotonic() >= deadline:
            raise TopicError(f"Kafka topics were created but are not ready after {timeout:.0f}s: "
                             f"{pending}")
        time.sleep(0.1)


WAIT_LOG_S = 30.0  # how often wait_for_cluster says it is still waiting


def wait_for_cluster(config: Config, stopped: Callable[[], bool]) -> bool:
    """Block until the cluster answers a metadata request (True), or ``stopped()`` (False).
    Says what it waits for and why at once, then every WAIT_LOG_S: a component started
    before its broker (a pod scheduled before Kafka's) waits rather than crash-looping."""
    from confluent_kafka import KafkaException

    log = logging.getLogger("kubesight.topics")
    admin = _admin(config)
    start = time.monotonic()
    said = -WAIT_LOG_S
    while not stopped():
        try:
            admin.list_topics(timeout=1.0)  # short: a signal waits for it
        except KafkaException as exc:
            waited = time.monotonic() - start
            if waited - said >= WAIT_LOG_S:
                name, _, text = err_name(exc)
                log.warning("waiting for Kafka at %s (%s: %s)%s", config.kafka.bootstrap,
                            name, text, f"; {waited:.0f}s so far" if waited >= 1 else "")
                said = waited
            admin.poll(0)
            time.sleep(0.5)
            continue
        if time.monotonic() - start >= 1:
            log.info("Kafka at %s answers after %.0fs", config.kafka.bootstrap,
                     time.monotonic() - start)
        return True
    return False


def describe(config: Config, timeout: float = 10) -> dict[str, int]:
    """{full topic name: partition count} for kubesight's topics that exist on the cluster."""
    from confluent_kafka import KafkaException

    try:
        md = _admin(config).list_topics(timeout=timeout)
    except KafkaException as exc:
        name, _, text = err_name(exc)
        raise TopicError(f"cannot list topics on {config.kafka.bootstrap}: {name}: {text}") from exc
    out: dict[str, int] = {}
    for s in TOPICS:
        full = config.topic(s.name)
        t = md.topics.get(full)
        if t is not None and t.error is None:
            out[full] = len(t.partitions)
    return out
