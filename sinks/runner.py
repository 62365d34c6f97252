"""``kubesight sink``: read golden windows, health, node samples and network health from
Kafka, fan them out to every sink.

At least once, never silently lossy: offsets are committed only after every sink accepted
the batch. A sink that fails keeps the batch; it is retried with backoff (the consumer is
paused meanwhile, so Kafka is the buffer), and each failure is counted and logged.

It also measures the stream workers' consumer lag on ``raw.v1`` and reports it as the
sink's own health, next to the metrics that lag would delay.

Node samples name processes and pods by pod UID (the probe reads it from the cgroup); the
runner follows ``k8s.v1`` (a thread, ``K8sFollower``) and adds the pod's namespace, name and
workload before any sink sees the sample, so the top-N says which pod, not which UID.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import msgpack
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from kubesight.streams.identity import IdentityTable, K8sFollower

from kubesight.config import Config
from kubesight.logs import RdkafkaLog
from kubesight.process import run_component

from .base import HealthRecord, NetworkRecord, NodeRecord, WindowRecord
from .registry import build_sinks

log = logging.getLogger("kubesight.sink")

LAG_INTERVAL_S = 5.0
MAX_BACKOFF_S = 30.0


def name_pods(record: Mapping[str, Any], identity: IdentityTable) -> None:
    """Add namespace, pod and workload to each top-N process and pod whose pod UID the k8s.v1
    table knows (in place); others are left as they are (the sink shows "")."""
    for entry in (*record.get("top", ()), *record.get("pods", ())):
        uid = entry.get("pod_uid") if isinstance(entry, dict) else None
        pod = identity.pod_for_uid(uid) if isinstance(uid, str) else None
        if pod is not None:
            entry.update(namespace=pod.namespace, pod=pod.pod, workload=pod.workload)


class ReplayGate:
    """Skips records a sink was already given: after a rebalance (the broker restarting is
    one) the consumer starts again from the last *committed* offset, and commits made while
    the broker was down failed, so records already applied come back. Sinks keep counters:
    applying them twice would double-count. Per (topic, partition), the highest offset
    applied is remembered; the sink's own state lives no longer than this process."""

    def __init__(self) -> None:
        self._applied: dict[tuple[str, int], int] = {}

    def fresh(self, topic: str, partition: int, offset: int) -> bool:
        return offset > self._applied.get((topic, partition), -1)

    def applied(self, topic: str, partition: int, offset: int) -> None:
        key = (topic, partition)
        if offset > self._applied.get(key, -1):
            self._applied[key] = offset


class SinkRunner:
    def __init__(self, config: Config, group: str = "kubesight-sink") -> None:
        self.config = config
        self.sinks = build_sinks(config.sinks)
        self.counters = collections.Counter[str]()
        self.instance = f"{int(time.time())}-{os.getpid()}"
        self._stop = threading.Event()
        base = {**config.kafka.librdkafka(), "logger": RdkafkaLog("kubesight.sink.kafka")}
        self._consumer = Consumer({
            **base, "group.id": group, "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "fetch.wait.max.ms": 200,
        })
        self._gate = ReplayGate()
        self._golden = config.topic("golden.v1")
        self._health = config.topic("health.v1")
        self._node = config.topic("node.v1")  # straight from the probes: no worker step
        self._network = config.topic("network.v1")  # TCP health windows, conntrack usage
        self._consumer.subscribe([self._golden, self._health, self._node, self._network])
        # Topics sinks keep themselves (topology.v1, compacted): produced from published().
        self._producer = Producer({**base, "enable.idempotence": True,
                                   "compression.type": "lz4", "linger.ms": 50})
        # Reads the workers' committed offsets; never joins their group.
        self._lag_probe = Consumer({**base, "group.id": config.streams.app_id,
                                    "enable.auto.commit": False})
        self.identity = IdentityTable()
        self._k8s = K8sFollower(base, config.topic("k8s.v1"), f"{group}-k8s", self.identity)
        self._k8s_thread = threading.Thread(target=self._follow_k8s, name="k8s.v1",
                                            daemon=True)

    def _follow_k8s(self) -> None:
        while not self._stop.is_set():
            self._k8s.poll(1.0)
            if not self._k8s.reading:
                self._stop.wait(5.0)  # no topic yet (no metadata watcher, or not yet)
        self._k8s.close()

    def stop(self, *_: Any) -> None:
        self._stop.set()

    def run(self) -> None:
        next_lag = 0.0
        self._k8s_thread.start()
        try:
            while not self._stop.is_set():
                msgs = self._consumer.consume(num_messages=1000, timeout=0.5)
                if msgs:
                    self._deliver(msgs)
                self._publish()
                now = time.monotonic()
                if now >= next_lag:
                    self._report_own_health()
                    next_lag = now + LAG_INTERVAL_S
        finally:
            self._stop.set()
            self._k8s_thread.join(timeout=5)
            self._consumer.close()
            self._lag_probe.close()
            self._producer.flush(10)
            for sink in self.sinks:
                sink.close()

    def _deliver(self, msgs: list[Any]) -> None:
        windows: list[WindowRecord] = []
        health: list[HealthRecord] = []
        nodes: list[NodeRecord] = []
        network: list[NetworkRecord] = []
        taken: list[Any] = []
        for m in msgs:
            if m.error():
                self.counters["kafka_errors"] += 1
                log.warning("consume error: %s", m.error())
                continue
            if not self._gate.fresh(m.topic(), m.partition(), m.offset()):
                self.counters["replayed_records_skipped"] += 1
                continue
            taken.append(m)
            try:
                record = msgpack.unpackb(m.value(), raw=False)
            except (ValueError, msgpack.UnpackException):
                self.counters["undecodable_records"] += 1
                continue
            if m.topic() == self._node:
                if isinstance(record, dict):
                    name_pods(record, self.identity)
                nodes.append(record)
                continue
            if m.topic() == self._network:
                network.append(record)
                continue
            (windows if m.topic() == self._golden else health).append(record)
        self.counters["windows_in"] += len(windows)
        self.counters["node_samples_in"] += len(nodes)
        self.counters["network_records_in"] += len(network)
        backoff = 0.5
        pending = list(self.sinks)  # a sink that accepted the batch is not given it again
        while pending and not self._stop.is_set():
            for sink in list(pending):
                try:
                    if windows:
                        sink.write(windows)
                    if health:
                        sink.write_health(health)
                    if nodes:
                        sink.write_node(nodes)
                    if network:
                        sink.write_network(network)
                    pending.remove(sink)
                except Exception as exc:  # any sink failure: keep the batch, retry later
                    self.counters["sink_write_failures"] += 1
                    log.error("sink %s write failed (retrying in %.1fs): %s",
                              getattr(sink, "name", sink), backoff, exc)
            if pending:
                self._stop.wait(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
        if pending:
            return  # stopping: do not commit what was not written everywhere
        for m in taken:
            self._gate.applied(m.topic(), m.partition(), m.offset())
        try:
            self._consumer.commit(asynchronous=True)
        except KafkaException as exc:
            log.warning("offset commit failed: %s", exc)

    def _publish(self) -> None:
        """Produce what the sinks keep in topics of their own (e.g. the topology edges)."""
        for sink in self.sinks:
            try:
                messages = sink.published()
            except Exception as exc:
                self.counters["sink_publish_failures"] += 1
                log.error("sink %s publish failed: %s", getattr(sink, "name", sink), exc)
                continue
            for logical, key, value in messages:
                try:
                    self._producer.produce(self.config.topic(logical), key=key, value=value,
                                           on_delivery=self._delivered)
                except (BufferError, KafkaException) as exc:
                    self.counters["published_errors"] += 1
                    log.warning("producing to %s failed: %s", logical, exc)
        self._producer.poll(0)

    def _delivered(self, err: Any, _msg: Any) -> None:
        self.counters["published_errors" if err is not None else "published"] += 1

    def _raw_lag(self) -> int | None:
        topic = self.config.topic("raw.v1")
        try:
            meta = self._lag_probe.list_topics(topic, timeout=2)
            parts = [TopicPartition(topic, p) for p in meta.topics[topic].partitions]
            committed = self._lag_probe.committed(parts, timeout=2)
            lag = 0
            for tp in committed:
                _low, high = self._lag_probe.get_watermark_offsets(tp, timeout=2)
                lag += high - tp.offset if tp.offset >= 0 else high
            return lag
        except (KafkaException, KeyError) as exc:
            log.debug("lag unavailable: %s", exc)
            return None
        finally:
            self._lag_probe.poll(0)  # never consumes: its log lines come out when polled

    def _report_own_health(self) -> None:
        counters = dict(self.counters)
        counters["k8s_records"] = self.identity.applied
        counters["k8s_malformed"] = self._k8s.malformed
        lag = self._raw_lag()
        if lag is not None:
            counters["worker_consumer_lag_raw"] = lag
        record: HealthRecord = {"v": 1, "component": "sink", "node": self.config.node_name,
                  "instance": self.instance, "ts": time.time(), "counters": counters}
        for sink in self.sinks:
            try:
                sink.write_health([record])
            except Exception as exc:
                log.warning("sink health write failed: %s", exc)
        # And on health.v1 with every other component's, where `kubesight status` reads them
        # (it came back here too: writing it again sets the same values).
        try:
            self._producer.produce(self._health, key=f"{self.config.node_name}/sink",
                                   value=msgpack.packb(record), on_delivery=self._health_sent)
        except (BufferError, KafkaException) as exc:
            self.counters["health_publish_errors"] += 1
            log.warning("producing the sink's health failed: %s", exc)
        self._producer.poll(0)

    def _health_sent(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.counters["health_publish_errors"] += 1


def run(config: Config) -> None:
    run_component("sink", config, SinkRunner)
