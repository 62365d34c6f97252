"""The broker dies mid-run (SIGKILL) and comes back: no request may be missing afterwards.

The probe's producer buffers while the broker is away (librdkafka, no message expiry), the
worker's consumers and producer reconnect, and duplicates re-delivered after the rebalance
are skipped by offset. Counts must still equal what wrk and nginx report.

Should the worker's consumer stall after the restart (seen once in four CI runs before the
stall watch existed: the worker stayed up with 5,809 messages of lag for 240 s), the watch
kicks it and, failing that, exits with status 70 for its supervisor to start a fresh one, which
resumes from the committed offsets and the changelogs (tests/e2e/test_worker_stall.py). The
test plays that supervisor (``Supervises``: a worker that exits 70 is started again, nothing
else is) and prints how often it had to, so a heal is visible rather than silent.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kubesight.broker import LocalBroker
from kubesight.config import Config, KafkaConfig

from .conftest import _need_root_and_bpf
from .harness import Nginx, Pipeline, WrkResult, wait_for, wrk

pytestmark = [pytest.mark.e2e, pytest.mark.bpf, pytest.mark.kafka]

REQ = "kubesight_requests_total"


class Supervises:
    """What ``kubesight up`` does for the worker, for exit status 70 (the stall watch) only."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe, self.restarts = pipe, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        worker = self.pipe.components["worker"]
        while not self._stop.wait(0.5):
            if worker.proc is not None and worker.proc.poll() == 70:
                worker.stop()
                worker.start()
                self.pipe.exclude("worker", worker.proc.pid)
                self.restarts += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def worker_counter(pipe: Pipeline, name: str) -> float:
    return pipe.total("kubesight_pipeline_counter_total", component="worker", name=name)


def test_no_request_lost_across_a_broker_restart(
        local_broker_factory: Callable[..., LocalBroker], nginx: Nginx, tmp_path: Path) -> None:
    _need_root_and_bpf()
    broker = local_broker_factory()
    broker.start(timeout=120)
    base = Config(kafka=KafkaConfig(bootstrap_servers=broker.bootstrap, topic_prefix="ksr."))
    pipe = Pipeline(base, tmp_path)
    assert broker.pid is not None
    pipe.exclude("kafka", broker.pid)
    supervisor: Supervises | None = None
    try:
        pipe.start()
        supervisor = Supervises(pipe)
        client0 = pipe.total(REQ, side="client", dst_workload="nginx")
        server0 = pipe.total(REQ, side="server", dst_workload="nginx")
        served0 = nginx.served()
        results: list[WrkResult] = []
        load = threading.Thread(target=lambda: results.append(
            wrk(nginx.url + "/", connections=4, threads=1, seconds=12)))
        load.start()
        time.sleep(3)  # let traffic flow through the healthy pipeline first
        broker.kill()
        wait_for("the broker to be gone", lambda: not broker.is_running(), timeout=20)
        time.sleep(4)  # traffic keeps flowing while the broker is down
        broker.start(timeout=120)
        pipe.exclude("kafka", broker.pid or 0)
        load.join(timeout=60)
        [result] = results
        assert result.requests > 1000
        for name in ("sink", "probe"):
            assert pipe.components[name].alive(), f"{name} died:\n" + \
                pipe.components[name].log_text()[-3000:]
        # up to 30 s to call a stall, 60 s for the kick, 30 s to exit, a minute to rejoin
        pipe.wait_total(client0 + result.requests, REQ, timeout=360, side="client",
                        dst_workload="nginx")
        supervisor.stop()
        pipe.wait_total(server0 + nginx.served() - served0, REQ, timeout=60, side="server",
                        dst_workload="nginx")
        # The stall watch (streams/watchdog.py) reads the real consumer: every input partition
        # (raw, series, tcp, netseries; 2 each) is watched, or it would be blind. meta.v1 and
        # k8s.v1 are read whole outside the group (streams/follow.py): no position to watch.
        wait_for("the worker's stall watch to report its partitions",
                 lambda: 8 in pipe.series("kubesight_pipeline_counter_total",
                                           component="worker",
                                           name="watched_partitions").values(), timeout=30)
        assert pipe.components["worker"].alive()

        # The watch's remedy, run on the real consumer (SIGUSR2 asks for it by hand): it logs
        # every layer's state, re-seeks each partition to its own position, and loses nothing.
        worker = pipe.components["worker"]
        assert worker.proc is not None
        os.kill(worker.proc.pid, signal.SIGUSR2)
        wait_for("the worker to log its kick", lambda: re.search(
            r"kicked the consumer: refreshed metadata, re-seeked 8 partition", worker.log_text()),
            timeout=30)
        log = worker.log_text()
        assert re.search(r"faust: fetcher running, rebalancing False, flow active",
                         log), log[-3000:]
        assert re.search(r"aiokafka: fetch task running, coordination task running, "
                         r"coordinator 1", log), log[-3000:]
        client1 = pipe.total(REQ, side="client", dst_workload="nginx")
        more = wrk(nginx.url + "/", connections=4, threads=1, seconds=2)
        pipe.wait_total(client1 + more.requests, REQ, timeout=120, side="client",
                        dst_workload="nginx")
        assert worker.alive()
        probe = pipe.series("kubesight_pipeline_counter_total", component="probe")
        seen = {dict(lab)["name"]: v for lab, v in probe.items()}
        print(f"\nbroker restart: {result.requests} requests; probe ring drops "
              f"{seen.get('kernel_ringbuf_drops')}, longest drain gap "
              f"{seen.get('drain_gap_max_ms')} ms (latest record); worker stalls "
              f"{worker_counter(pipe, 'consumer_stalls')}, kicks "
              f"{worker_counter(pipe, 'consumer_kicks')}, restarts {supervisor.restarts}")
    finally:
        if supervisor is not None:
            supervisor.stop()
        pipe.stop()
