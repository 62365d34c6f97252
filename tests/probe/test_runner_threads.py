"""The probe runner keeps draining the ring while a periodic task takes long, and says why
when the ring overflowed.

Found in CI: the ring went 582 ms without a drain while wrk ran flat out, the 64 MiB ring
filled and 133,670 events were lost; the drain loop also ran the /proc walks, uprobe attaches
and TCP snapshots. The kernel side and Kafka are recorders here, because only the runner's
threading is under test: a TLS scan that blocks until the test lets it go must not stop
drains, and a stop must still end every thread.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kubesight.probe.main import SENDER_NICE_STEP, DrainPriority, ProbeRunner

from kubesight.config import Config
from tests.e2e.harness import wait_for


class Kernel:
    def __init__(self) -> None:
        self.drains = 0
        self.scanning = threading.Event()
        self.release_scan = threading.Event()
        self.closed = False
        self.drops = 0
        self.pending = 0  # bytes the ring holds before each drain

    def start(self) -> None:
        pass

    def drain_into(self, *_: Any, **__: Any) -> int:
        self.drains += 1
        return 0

    def pending_bytes(self) -> int:
        return self.pending

    def scan_tls(self) -> list[str]:
        self.scanning.set()
        self.release_scan.wait(timeout=60)
        return []

    def counters(self) -> dict[str, int]:
        return {"ringbuf_drops": self.drops}

    tls_libraries: list[str] = []
    tls_not_probed: list[str] = []

    def close(self) -> None:
        self.closed = True


class Publisher:
    open: dict[int, Any] = {}
    sealed: list[Any] = []
    batch_max_events = batch_max_bytes = 1

    def count_in(self, n: int) -> None:
        pass

    def clock_offset_ns(self) -> int:
        return 0

    def flush(self) -> int:
        return 0

    def stats(self) -> dict[str, int]:
        return {}


class Producer:
    def produce(self, *_: Any, **__: Any) -> None:
        pass

    def poll(self, _: float) -> int:
        return 0

    def flush(self, _: float) -> int:
        return 0

    def __len__(self) -> int:
        return 0


class Tagger:
    backends = None

    def close(self) -> None:
        pass


def runner_with(kernel: Kernel, tmp_path: Path) -> ProbeRunner:
    runner = object.__new__(ProbeRunner)  # no probes loaded: only the runner's loop
    runner.config = Config(state_dir=str(tmp_path))
    runner.probe_id = "test"
    runner._stop = threading.Event()
    runner._kernel = kernel
    runner._tcp = None
    runner.publisher = Publisher()
    runner._producer = Producer()
    runner._tagger = Tagger()
    runner._excluded = set()
    runner._trees = set()
    runner._comms = frozenset()
    runner._named = set()
    runner._node_samples = runner._node_dropped = 0
    runner._last_drain = runner._drain_gap_max = runner._drain_max = 0.0
    runner._drops_seen = 0
    runner._priority = DrainPriority(runner.config.probe.drain_rt_priority,
                                     runner.config.probe.ringbuf_bytes)
    runner._drain_cpu = 0.0
    runner._between = (0.0, 0.0, 0.0)
    runner._refresh_exclusions = lambda: None
    runner._publish_listeners = lambda: None
    runner._publish_node = lambda: None
    return runner


def test_drains_go_on_while_a_tls_scan_blocks(tmp_path: Path) -> None:
    kernel = Kernel()
    kernel.pending = 1 << 30  # the ring fills at ~100 GiB/s: the drain goes real-time
    runner = runner_with(kernel, tmp_path)
    loop = threading.Thread(target=runner.run, daemon=True)
    loop.start()
    try:
        assert kernel.scanning.wait(timeout=30), "the TLS scan never ran"
        # The drain thread runs SCHED_RR (the ring fills fast, probe.drain_rt_priority 1,
        # root here); the housekeeping thread was started before and stays a normal thread.
        tid = loop.native_id
        assert tid is not None
        wait_for("the drain thread to go real-time",
                 lambda: os.sched_getscheduler(tid) == os.SCHED_RR, timeout=30)
        [house] = [t for t in threading.enumerate() if t.name == "probe-housekeeping"]
        assert house.native_id is not None
        assert os.sched_getscheduler(house.native_id) == os.SCHED_OTHER
        before = kernel.drains
        # poll_interval_ms is 10: 20 drains take ~0.2 s; a loop blocked by the scan does none.
        wait_for("20 drains while the TLS scan is blocked",
                 lambda: kernel.drains >= before + 20, timeout=30)
        assert runner._drain_gap_max < 5.0
    finally:
        kernel.release_scan.set()
        runner.stop()
        loop.join(timeout=30)
    assert not loop.is_alive(), "the probe runner did not stop"
    assert kernel.closed
    assert not [t for t in threading.enumerate() if t.name.startswith("probe-")]


def test_a_failing_housekeeping_task_is_retried_not_fatal(tmp_path: Path) -> None:
    kernel = Kernel()
    kernel.release_scan.set()
    runner = runner_with(kernel, tmp_path)
    calls: list[float] = []

    def broken() -> None:
        calls.append(time.monotonic())
        raise OSError("/proc went away")

    runner._refresh_exclusions = broken
    loop = threading.Thread(target=runner.run, daemon=True)
    loop.start()
    try:
        # EXCLUSION_REFRESH_S is 2: a second call within 30 s means the task is retried.
        wait_for("the failing task to be tried twice", lambda: len(calls) >= 2, timeout=30)
        assert loop.is_alive()
        drains = kernel.drains
        wait_for("drains to go on", lambda: kernel.drains > drains + 5, timeout=30)
    finally:
        runner.stop()
        loop.join(timeout=30)
    assert not loop.is_alive()


def test_ring_drops_are_logged_with_the_drain_timings(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    kernel = Kernel()
    runner = runner_with(kernel, tmp_path)
    runner._publish_health()
    assert not [r for r in caplog.records if "events lost" in r.message]

    kernel.drops = 1234
    runner._drain_gap_max = 0.75
    runner._publish_health()
    lost = [r.getMessage() for r in caplog.records if "events lost" in r.getMessage()]
    assert lost and lost[0].startswith("1234 events lost")
    assert "longest wait between drains 750 ms" in lost[0]
    assert runner._drain_gap_max == 0.0  # each health record covers the time since the last

    runner._publish_health()  # no new drops: nothing more said
    assert len([r for r in caplog.records if "events lost" in r.getMessage()]) == 1


def test_kafka_sender_threads_run_nicer_than_the_drain(tmp_path: Path) -> None:
    """A thread named like librdkafka's gets the drain's nice + SENDER_NICE_STEP; others keep
    theirs. The thread names itself through /proc, as librdkafka does with prctl."""
    runner = runner_with(Kernel(), tmp_path)
    named, done = threading.Event(), threading.Event()
    tids: dict[str, int] = {}

    def thread(comm: str) -> None:
        tid = threading.get_native_id()
        Path(f"/proc/self/task/{tid}/comm").write_text(comm)
        tids[comm] = tid
        if len(tids) == 2:
            named.set()
        done.wait(timeout=30)

    threads = [threading.Thread(target=thread, args=(c,), daemon=True)
               for c in ("rdk:broker7", "not-a-sender")]
    for t in threads:
        t.start()
    try:
        assert named.wait(timeout=30)
        runner._renice_senders()
        drain = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert os.getpriority(os.PRIO_PROCESS, tids["rdk:broker7"]) == min(
            19, drain + SENDER_NICE_STEP)
        assert os.getpriority(os.PRIO_PROCESS, tids["not-a-sender"]) == drain
    finally:
        done.set()
        for t in threads:
            t.join(timeout=30)


def test_a_drain_gap_is_logged_with_where_the_time_went(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runner = runner_with(Kernel(), tmp_path)
    runner._last_drain = time.monotonic() - 0.8
    runner._between = (0.01, 0.7, 0.0)
    runner._drain()
    [message] = [r.getMessage() for r in caplog.records if "without a drain" in r.getMessage()]
    assert message.startswith("the ring went 8")  # 800 ms and a little
    assert "700 ms in flush" in message
    assert runner._drain_gap_max >= 0.8


class Policy:
    def __init__(self, refuse: bool = False) -> None:
        self.calls: list[bool] = []
        self.refuse = refuse

    def __call__(self, realtime: bool, priority: int) -> None:
        if self.refuse:
            raise PermissionError(1, "Operation not permitted")
        assert priority == 1
        self.calls.append(realtime)


def test_the_drain_is_real_time_only_while_the_ring_fills_fast() -> None:
    policy = Policy()
    prio = DrainPriority(1, 128 << 20, set_policy=policy)  # hot from 32 MiB/s
    prio.observe(4 << 20, now=0.0)  # a paced load: stays a normal thread
    assert policy.calls == [] and not prio.realtime
    prio.observe(150 << 20, now=1.0)  # wrk flat out
    assert policy.calls == [True] and prio.realtime
    prio.observe(200 << 20, now=1.01)  # still hot: no second switch
    prio.observe(1 << 20, now=5.0)  # quiet, but not for CALM_S yet
    assert policy.calls == [True]
    prio.observe(20 << 20, now=12.0)  # under the hot rate but above half of it: stays
    assert policy.calls == [True]
    prio.observe(1 << 20, now=12.01)  # 11 s after the last hot drain, and quiet
    assert policy.calls == [True, False] and not prio.realtime
    assert prio.switches == 2


def test_a_refused_real_time_policy_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    prio = DrainPriority(1, 128 << 20, set_policy=Policy(refuse=True))
    for t in range(5):
        prio.observe(500 << 20, now=float(t))
    assert not prio.realtime and prio.switches == 0
    assert len([r for r in caplog.records if "SCHED_RR 1 refused" in r.getMessage()]) == 1


def test_priority_zero_never_switches() -> None:
    policy = Policy()
    prio = DrainPriority(0, 1 << 20, set_policy=policy)
    prio.observe(1 << 40, now=0.0)
    assert policy.calls == []
