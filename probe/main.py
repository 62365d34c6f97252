"""The probe process: load the BPF programs, drain them on a timer, publish to Kafka.

A straight line: start the kernel side, then loop { poll ring buffer; batch; flush on a timer;
refresh exclusions, listeners and health on slower timers } until asked to stop. On stop it
flushes what it holds and waits (bounded) for Kafka to acknowledge it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import msgpack
from confluent_kafka import Producer

from kubesight.config import Config
from kubesight.process import run_component

from . import node
from .l7 import L7Probe
from .publisher import Publisher, producer_config

log = logging.getLogger("kubesight.probe")

EXCLUSION_REFRESH_S = 2.0
LISTENER_REFRESH_S = 5.0
TLS_REFRESH_S = 2.0  # new processes' TLS libraries are probed within this


class ProbeRunner:
    def __init__(self, config: Config, *, filter_all: bool = False) -> None:
        self.config = config
        self.probe_id = f"{int(time.time())}-{os.getpid()}"
        self._stop = threading.Event()
        self._excluded: set[int] = {os.getpid()} | self._own_pids()
        self._kernel = L7Probe(
            capture_bytes=config.probe.capture_bytes,
            ringbuf_bytes=config.probe.ringbuf_bytes,
            exclude_tgids=tuple(sorted(self._excluded)),
            filter_all=filter_all,
            tls=config.probe.tls,
        )
        self._producer = Producer(producer_config(config.kafka.librdkafka()))
        self.publisher = Publisher(
            producer=self._producer, topic=config.topic("raw.v1"), node=config.node_name,
            probe_id=self.probe_id, batch_max_events=config.probe.batch_max_events,
        )
        self._listeners: dict[tuple[str, int], node.Listener] = {}

    def stop(self, *_: Any) -> None:
        self._stop.set()

    def run(self) -> None:
        cfg = self.config.probe
        self._kernel.start()
        log.info("probe %s attached; publishing to %s on %s", self.probe_id,
                 self.config.topic("raw.v1"), self.config.kafka.bootstrap)
        flush_s = cfg.flush_interval_ms / 1000
        next_flush = next_excl = next_listen = next_health = next_tls = time.monotonic()
        try:
            while not self._stop.is_set():
                self._drain()
                self._stop.wait(cfg.poll_interval_ms / 1000)
                now = time.monotonic()
                if now >= next_flush:
                    self.publisher.flush()
                    next_flush = now + flush_s
                if now >= next_excl:
                    self._refresh_exclusions()
                    next_excl = now + EXCLUSION_REFRESH_S
                if now >= next_listen:
                    self._publish_listeners()
                    next_listen = now + LISTENER_REFRESH_S
                if now >= next_tls:
                    self._kernel.scan_tls()
                    next_tls = now + TLS_REFRESH_S
                if now >= next_health:
                    self._publish_health()
                    next_health = now + cfg.health_interval_s
        finally:
            self._drain()
            self.publisher.flush()
            self._publish_health()
            self._kernel.close()
            left = self._producer.flush(30)
            if left:
                log.error("%d Kafka messages not acknowledged at exit", left)

    def _drain(self) -> None:
        pub = self.publisher
        pub.count_in(self._kernel.drain_into(
            pub.open, pub.sealed, offset_ns=pub.clock_offset_ns(),
            max_events=pub.batch_max_events, max_bytes=pub.batch_max_bytes))

    def _own_pids(self) -> set[int]:
        """kubesight's other processes (supervisor, worker, sink, broker), from pid files."""
        state = self.config.state_path
        return node.read_pidfiles(state / "run") | node.read_pidfiles(state / "kafka")

    def _refresh_exclusions(self) -> None:
        for tgid in self._own_pids() - self._excluded:
            self._kernel.exclude_tgid(tgid)
            self._excluded.add(tgid)

    def _publish_listeners(self) -> None:
        topic = self.config.topic("meta.v1")
        nodename = self.config.node_name
        for lst in node.listeners():
            key = (lst.addr, lst.port)
            if self._listeners.get(key) == lst:
                continue
            self._listeners[key] = lst
            record = {"v": 1, "kind": "listener", "node": nodename, "addr": lst.addr,
                      "port": lst.port, "tgid": lst.tgid, "comm": lst.comm,
                      "namespace": "", "workload": lst.comm}
            self._producer.produce(topic, key=f"{nodename}/listen/{lst.addr}:{lst.port}",
                                   value=msgpack.packb(record))

    def health(self) -> dict[str, int]:
        counters = {f"kernel_{k}": v for k, v in self._kernel.counters().items()}
        counters.update(self.publisher.stats())
        counters["tls_libraries_probed"] = len(self._kernel.tls_libraries)
        return {k: max(0, int(v)) for k, v in counters.items()}

    def _publish_health(self) -> None:
        record = {"v": 1, "component": "probe", "node": self.config.node_name,
                  "instance": self.probe_id, "ts": time.time(), "counters": self.health()}
        self._producer.produce(self.config.topic("health.v1"),
                               key=f"{self.config.node_name}/probe",
                               value=msgpack.packb(record))
        self._producer.poll(0)


def run(config: Config) -> None:
    run_component("probe", config, ProbeRunner)
