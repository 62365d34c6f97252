"""The probe process: load the BPF programs, drain them on a timer, publish to Kafka.

A straight line: start the kernel side, then loop { poll ring buffer; batch; flush on a timer;
health on a slower one } until asked to stop. Exclusions, listeners, TLS libraries and node
samples are refreshed on a housekeeping thread, the TCP health probe runs on its own. On stop it
flushes what it holds and waits (bounded) for Kafka to acknowledge it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
from confluent_kafka import Producer

from kubesight.config import Config
from kubesight.logs import RdkafkaLog, RepeatFilter
from kubesight.process import run_component

from . import node
from .conntags import BackendLookup, ConnectionTagger
from .cpu import NodeSampler
from .l7 import OWN_COMM, L7Probe
from .libbpf import ProbeError
from .publisher import Publisher, producer_config, split_buffer
from .tcp import TcpProbe
from .tcp_publisher import TcpPublisher

log = logging.getLogger("kubesight.probe")
log.addFilter(RepeatFilter(every_s=10.0))  # a starved drain loop says so once per 10 s
DRAIN_GAP_WARN_S = 0.5  # the default 128 MiB ring holds 0.45-0.9 s of wrk flat out on two cores

EXCLUSION_REFRESH_S = 2.0
# Processes under an excluded name are excluded by the kernel as they exec or fork; the /proc
# walk (~20 µs a process) only catches a process renamed since (prctl), so it is rarer.
NAMED_REFRESH_S = 30.0
LISTENER_REFRESH_S = 5.0
TLS_REFRESH_S = 2.0  # new processes' TLS libraries are probed within this
SLOW_TASK_WARN_S = 0.5
SENDER_NICE_STEP = 5  # librdkafka's threads run this much nicer than the drain thread
JOIN_TIMEOUT_S = 10.0
EXIT_FLUSH_S = 20.0  # at exit, for the broker to acknowledge what is queued (under the
# supervisor's 30 s stop timeout: an unacknowledged rest is then counted and said, not cut off)


class ProbeRunner:
    def __init__(self, config: Config, *, filter_all: bool = False) -> None:
        self.config = config
        self.probe_id = f"{int(time.time())}-{os.getpid()}"
        self._stop = threading.Event()
        self._comms = frozenset({OWN_COMM, *config.probe.exclude_comms})
        self._named = node.tgids_named(self._comms)  # as of the last _scan_named
        own, _roots = self._own_pids()
        self._excluded: set[int] = {os.getpid()} | own
        self._trees: set[int] = set()  # of those, the ones whose children are excluded at birth
        self._kernel = L7Probe(
            capture_bytes=config.probe.capture_bytes,
            ringbuf_bytes=config.probe.ringbuf_bytes,
            exclude_tgids=tuple(sorted(self._excluded)),
            exclude_comms=tuple(sorted(self._comms)),
            filter_all=filter_all,
            tls=config.probe.tls,
        )
        queue_kbytes, overflow_bytes = split_buffer(config.probe.buffer_mb)
        self._producer = Producer({**producer_config(config.kafka.librdkafka(),
                                                     buffer_kbytes=queue_kbytes),
                                   "logger": RdkafkaLog("kubesight.probe.kafka")})
        # raw.v1 batches name their process's container/pod and a service call's backend pod.
        k8s = config.kubernetes
        self._tagger = ConnectionTagger(backends=BackendLookup(
            k8s.service_cidrs, k8s.conntrack_netns) if k8s.service_cidrs else None)
        self.publisher = Publisher(
            producer=self._producer, topic=config.topic("raw.v1"), node=config.node_name,
            probe_id=self.probe_id, batch_max_events=config.probe.batch_max_events,
            overflow_max_bytes=overflow_bytes,
            annotate=self._tagger.annotate,
        )
        self._listeners: dict[tuple[str, int], node.Listener] = {}
        self._node_sampler = NodeSampler(top_n=config.probe.top_n)
        self._node_samples = self._node_dropped = 0
        self._last_drain = self._drain_gap_max = self._drain_max = 0.0
        self._drops_seen = 0  # kernel ring drops at the previous health record
        self._drain_cpu = 0.0  # this thread's CPU time at the end of the last drain
        self._between = (0.0, 0.0, 0.0)  # poll wait, flush, health since the last drain
        # Switches only from _drain(), once run() has started the other threads (a real-time
        # policy is inherited by threads started after it).
        self._priority = DrainPriority(config.probe.drain_rt_priority,
                                       config.probe.ringbuf_bytes)
        # TCP health per connection (bpf/tcp.bpf.c), next to the L7 probe on its own timers.
        self._tcp: TcpPublisher | None = None
        if config.probe.tcp:
            self._tcp = TcpPublisher(
                TcpProbe(exclude_tgids=self._excluded), producer=self._producer,
                topic=config.topic("tcp.v1"), node_name=config.node_name,
                probe_id=self.probe_id, excluded=self._excluded,
                snapshot_interval_s=config.probe.tcp_snapshot_s)

    def stop(self, *_: Any) -> None:
        self._stop.set()

    def run(self) -> None:
        cfg = self.config.probe
        self._kernel.start()
        self._start_tcp()
        log.info("probe %s attached; publishing to %s on %s", self.probe_id,
                 self.config.topic("raw.v1"), self.config.kafka.bootstrap)
        # The ring is drained on this thread and nothing else runs here that can take long:
        # /proc walks and uprobe attaches are on a housekeeping thread, the TCP probe (map
        # walks, /proc) on its own. In CI the ring once went 582 ms undrained under wrk.
        threads = [threading.Thread(target=self._housekeeping, name="probe-housekeeping",
                                    daemon=True)]
        if self._tcp is not None:
            threads.append(threading.Thread(target=self._tcp_loop, args=(self._tcp,),
                                            name="probe-tcp", daemon=True))
        for thread in threads:
            thread.start()
        flush_s = cfg.flush_interval_ms / 1000
        next_flush = next_health = time.monotonic()
        try:
            while not self._stop.is_set():
                self._drain()
                start = time.monotonic()
                self._stop.wait(cfg.poll_interval_ms / 1000)
                now = time.monotonic()
                if now >= next_flush:
                    self.publisher.flush()
                    next_flush = now + flush_s
                flushed = time.monotonic()
                if now >= next_health:
                    self._publish_health()
                    next_health = now + cfg.health_interval_s
                # Where the time between two drains went, for the gap warning.
                self._between = (now - start, flushed - now, time.monotonic() - flushed)
        finally:
            self._stop.set()
            for thread in threads:
                thread.join(timeout=JOIN_TIMEOUT_S)
                if thread.is_alive():
                    log.error("%s thread did not stop within %.0f s", thread.name,
                              JOIN_TIMEOUT_S)
            self._drain()
            self.publisher.flush()
            self._publish_health()
            self._kernel.close()
            self._tagger.close()
            if self._tcp is not None:
                self._tcp.close()  # its last intervals, then detach
            pending = len(self._producer)
            if pending:
                log.info("stopping: waiting up to %.0f s for %d Kafka messages to be "
                         "acknowledged", EXIT_FLUSH_S, pending)
            left = self._producer.flush(EXIT_FLUSH_S)
            if left:
                log.error("%d Kafka messages not acknowledged at exit (lost)", left)

    def _housekeeping(self) -> None:
        """Exclusions, listeners, TLS libraries and node samples, each on its own timer; a
        task that fails is logged and tried again at its next turn."""
        tasks = [
            ("sender priority", self._renice_senders, EXCLUSION_REFRESH_S),
            ("exclusions refresh", self._refresh_exclusions, EXCLUSION_REFRESH_S),
            ("named processes scan", self._scan_named, NAMED_REFRESH_S),
            ("listener scan", self._publish_listeners, LISTENER_REFRESH_S),
            ("TLS library scan", self._kernel.scan_tls, TLS_REFRESH_S),
            ("node sample", self._publish_node, self.config.probe.node_interval_s),
        ]
        due = [0.0] * len(tasks)
        while not self._stop.is_set():
            for i, (name, task, every_s) in enumerate(tasks):
                start = time.monotonic()
                if start < due[i]:
                    continue
                try:
                    task()
                except Exception:  # noqa: BLE001 - housekeeping must outlive one bad turn
                    log.exception("%s failed; trying again in %.0f s", name, every_s)
                took = time.monotonic() - start
                if took >= SLOW_TASK_WARN_S:
                    log.warning("%s took %.0f ms (the ring is drained on another thread)",
                                name, took * 1000)
                due[i] = start + every_s
                if self._stop.is_set():
                    return
            self._stop.wait(max(0.01, min(due) - time.monotonic()))

    def _renice_senders(self) -> None:
        """librdkafka's threads (lz4, sends) run SENDER_NICE_STEP nicer than the drain: the
        ring (probe.ringbuf_bytes) is the small buffer and the producer's queue (1 GiB) the
        big one, so under CPU pressure the drain must win (at the probe's own nice the
        sender took 40-60% of a CPU in the wrk e2e test). Run on a timer: librdkafka starts
        a thread per broker as it learns of them."""
        own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        target = min(19, own + SENDER_NICE_STEP)
        for tid, comm in _threads():
            if not comm.startswith("rdk:"):
                continue
            try:
                if os.getpriority(os.PRIO_PROCESS, tid) != target:
                    os.setpriority(os.PRIO_PROCESS, tid, target)
                    log.debug("thread %s (%d) now at nice %d", comm, tid, target)
            except OSError:  # gone meanwhile, or no permission to lower it back
                continue

    def _tcp_loop(self, tcp: TcpPublisher) -> None:
        interval = self.config.probe.poll_interval_ms / 1000
        while not self._stop.is_set():
            try:
                tcp.poll()
            except Exception:  # noqa: BLE001 - a TCP health failure must not stop L7 capture
                log.exception("tcp probe poll failed")
                self._stop.wait(1.0)
            self._stop.wait(interval)

    def _drain(self) -> None:
        now = time.monotonic()
        pending = self._kernel.pending_bytes()
        if pending is not None and self._last_drain and now > self._last_drain:
            self._priority.observe(pending / (now - self._last_drain), now)
        if self._last_drain:  # the longest the ring waited between drains: what it must absorb
            gap = now - self._last_drain
            self._drain_gap_max = max(self._drain_gap_max, gap)
            if gap >= DRAIN_GAP_WARN_S:
                waited, flushed, health = self._between
                log.warning("the ring went %.0f ms without a drain: %.0f ms of it waiting for "
                            "the %d ms poll timer, %.0f ms in flush, %.0f ms in health, %.0f ms "
                            "of CPU on this thread (the rest: runnable without a CPU, or "
                            "waiting for the GIL); events are lost if it fills", gap * 1000,
                            waited * 1000, self.config.probe.poll_interval_ms, flushed * 1000,
                            health * 1000, (time.thread_time() - self._drain_cpu) * 1000)
        pub = self.publisher
        pub.count_in(self._kernel.drain_into(
            pub.open, pub.sealed, offset_ns=pub.clock_offset_ns(),
            max_events=pub.batch_max_events, max_bytes=pub.batch_max_bytes))
        self._last_drain = time.monotonic()  # a long drain is consuming: the gap starts after
        self._drain_cpu = time.thread_time()
        self._drain_max = max(self._drain_max, self._last_drain - now)

    def _start_tcp(self) -> None:
        """The TCP health probe is optional: a kernel that refuses it leaves the L7 probe
        running (logged, and reported as tcp_probe_up = 0)."""
        if self._tcp is None:
            return
        try:
            # One set of exclusion bits, kept by the l7 probe's fork, exec and exit hooks.
            self._tcp.probe.share_exclusions(self._kernel.exclusions_fd)
            self._tcp.start()
        except ProbeError as exc:
            log.error("tcp probe not started, running without TCP health: %s", exc)
            self._tcp = None

    def _own_pids(self) -> tuple[set[int], set[int]]:
        """kubesight's other processes, and the roots among them: those whose children the
        kernel excludes as they are forked. From pid files (supervisor, worker, sink, broker)
        and by name (probe.exclude_comms and kubesight's own); the supervisor and the named
        processes are roots (the kernel also makes roots of processes named so as they start,
        but not of those older than the probe)."""
        state = self.config.state_path
        roots = node.read_pidfiles(state / "run", names=("supervisor",)) | self._named
        own = node.read_pidfiles(state / "run") | node.read_pidfiles(state / "kafka") | roots
        return own, roots

    def _scan_named(self) -> None:
        self._named = node.tgids_named(self._comms)
        self._refresh_exclusions()

    def _refresh_exclusions(self) -> None:
        own, roots = self._own_pids()
        for tgid in own - self._excluded:
            self._kernel.exclude_tgid(tgid)
            if self._tcp is not None:
                self._tcp.exclude_tgid(tgid)
            self._excluded.add(tgid)
        for tgid in roots - self._trees:
            self._kernel.exclude_tree(tgid)
            self._trees.add(tgid)
        # A kubesight process that exited gives its pid back: whoever gets it next is traced.
        for tgid in self._excluded - own - {os.getpid()}:
            if Path(f"/proc/{tgid}").exists():
                continue  # still running (its pid file was removed first, say)
            self._kernel.include_tgid(tgid)
            if self._tcp is not None:
                self._tcp.include_tgid(tgid)
            self._excluded.discard(tgid)
            self._trees.discard(tgid)

    def _publish_listeners(self) -> None:
        topic = self.config.topic("meta.v1")
        nodename = self.config.node_name
        found = node.listeners()
        if self._tcp is not None:
            self._tcp.learn_listeners(found)
        for lst in found:
            key = (lst.addr, lst.port)
            if self._listeners.get(key) == lst:
                continue
            self._listeners[key] = lst
            record = {"v": 1, "kind": "listener", "node": nodename, "addr": lst.addr,
                      "port": lst.port, "tgid": lst.tgid, "comm": lst.comm,
                      "namespace": "", "workload": lst.comm}
            self._producer.produce(topic, key=f"{nodename}/listen/{lst.addr}:{lst.port}",
                                   value=msgpack.packb(record))

    def _publish_node(self) -> None:
        """Node CPU, memory and top-N processes since the previous call (probe/cpu.py)."""
        sample = self._node_sampler.sample()
        if sample is None:
            return  # the first call only sets the baseline
        record = sample.to_record(self.config.node_name, self.probe_id)
        try:
            self._producer.produce(self.config.topic("node.v1"), key=self.config.node_name,
                                   value=msgpack.packb(record))
        except BufferError:  # librdkafka's queue is full (broker down for long): the next will do
            self._node_dropped += 1
            return
        self._node_samples += 1

    def health(self) -> dict[str, int]:
        counters = {f"kernel_{k}": v for k, v in self._kernel.counters().items()}
        counters.update(self.publisher.stats())
        counters["tls_libraries_probed"] = len(self._kernel.tls_libraries)
        counters["tls_libraries_not_probed"] = len(self._kernel.tls_not_probed)  # log says why
        if (backends := self._tagger.backends) is not None:
            counters["conntrack_lookups"] = backends.lookups
            counters["conntrack_backends_found"] = backends.found
            counters["conntrack_errors"] = backends.errors
        counters["node_samples"] = self._node_samples
        counters["node_samples_dropped"] = self._node_dropped
        if self._tcp is not None:
            counters.update(self._tcp.stats())
        counters["tcp_probe_up"] = int(self._tcp is not None)
        # Since the previous health record: the longest the ring went undrained (ms).
        counters["drain_gap_max_ms"] = round(self._drain_gap_max * 1000)
        counters["drain_max_ms"] = round(self._drain_max * 1000)  # the longest single drain
        counters["drain_realtime"] = int(self._priority.realtime)
        counters["drain_realtime_switches"] = self._priority.switches
        return {k: max(0, int(v)) for k, v in counters.items()}

    def _publish_health(self) -> None:
        counters = self.health()
        drops = counters.get("kernel_ringbuf_drops", 0)
        if drops > self._drops_seen:  # say why, while the numbers that explain it are fresh
            log.warning("%d events lost: the ring was full (longest wait between drains %d ms, "
                        "longest drain %d ms since the last health record; probe.ringbuf_bytes "
                        "is %d)", drops - self._drops_seen, counters["drain_gap_max_ms"],
                        counters["drain_max_ms"], self.config.probe.ringbuf_bytes)
        self._drops_seen = drops
        record = {"v": 1, "component": "probe", "node": self.config.node_name,
                  "instance": self.probe_id, "ts": time.time(), "counters": counters}
        self._drain_gap_max = self._drain_max = 0.0
        self._producer.produce(self.config.topic("health.v1"),
                               key=f"{self.config.node_name}/probe",
                               value=msgpack.packb(record))
        self._producer.poll(0)


class DrainPriority:
    """The drain thread runs SCHED_RR while the ring fills fast, and a normal thread otherwise.

    At nice -5 the drain thread was at times runnable without a CPU for 0.58-0.87 s under
    nginx + wrk flat out (the wrk e2e test, ~1 run in 7), and the ring overflowed; as
    SCHED_RR its longest runqueue wait in 3 sampled runs was 7 ms. Always real-time, though,
    it preempts the node's applications on every poll: wrk's own P99 (paced, 2,000 req/s)
    came out 35% above what the syscalls saw, once in 3 runs. So: real-time from the first
    drain that finds the ring would fill within ``HORIZON_S`` at the rate it is filling, back
    to normal after ``CALM_S`` below half that rate. Refused (no CAP_SYS_NICE): said once,
    then it stays a normal thread."""

    HORIZON_S = 4.0
    CALM_S = 10.0

    def __init__(self, priority: int, ring_bytes: int, *,
                 set_policy: Callable[[bool, int], None] | None = None) -> None:
        self.priority = priority
        self._hot_rate = ring_bytes / self.HORIZON_S  # bytes/s at which the ring fills in time
        self._set_policy = set_policy or _set_policy
        self.realtime = False
        self.switches = 0
        self._refused = priority <= 0
        self._last_hot = 0.0

    def observe(self, rate: float, now: float) -> None:
        """``rate``: bytes per second the ring took since the previous drain."""
        if self._refused:
            return
        if rate >= self._hot_rate:
            self._last_hot = now
            if not self.realtime:
                self._switch(True, rate)
        elif (self.realtime and rate < self._hot_rate / 2
              and now - self._last_hot >= self.CALM_S):
            self._switch(False, rate)

    def _switch(self, realtime: bool, rate: float) -> None:
        try:
            self._set_policy(realtime, self.priority)
        except OSError as exc:
            self._refused = True
            log.warning("drain thread stays a normal thread (SCHED_RR %d refused: %s); on a "
                        "busy node it may be starved of CPU and the ring overflow",
                        self.priority, exc)
            return
        self.realtime = realtime
        self.switches += 1
        log.info("drain thread %s (the ring is taking %.0f MiB/s)",
                 f"runs SCHED_RR priority {self.priority}" if realtime else "is a normal thread "
                 "again", rate / (1 << 20))


def _set_policy(realtime: bool, priority: int) -> None:
    """This thread SCHED_RR at priority, or back to SCHED_OTHER (its nice value is kept)."""
    if realtime:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(priority))
    else:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def _threads() -> list[tuple[int, str]]:
    """(tid, comm) of this process's threads."""
    out = []
    for task in Path("/proc/self/task").iterdir():
        try:
            out.append((int(task.name), (task / "comm").read_text().strip()))
        except (OSError, ValueError):
            continue  # exited meanwhile
    return out


def run(config: Config) -> None:
    run_component("probe", config, ProbeRunner)
