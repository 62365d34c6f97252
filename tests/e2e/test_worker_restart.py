"""A restarted worker names a same-node server as the worker before it did.

Who listens on a node comes to the workers from meta.v1: the probe's /proc scan, written once
per listener. A worker that read meta.v1 as a consumer group member resumed after its committed
offset when restarted, knew no listener, and named calls to a server it did not also see from
the server side by address (after ``DEFER_S`` of waiting for a name that never came). That is
how the stall test's restarted worker lost 12 of 50 requests to ``dst_workload="nginx"`` in CI.

Here the server is kept out of the capture (the probe excludes its pid, as it excludes
kubesight's own), so its listener record is the only thing that can name it.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from kubesight.config import Config, KafkaConfig

from .conftest import _need_root_and_bpf, broker_pid
from .harness import Pipeline, curl, running_server, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.bpf, pytest.mark.kafka]

REQ = "kubesight_requests_total"


def listener_pid(port: int) -> int:
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout
    pid = out.split("pid=", 1)[1].split(",", 1)[0] if "pid=" in out else ""
    assert pid.isdigit(), f"no process listens on {port}: {out!r}"
    return int(pid)


def test_a_restarted_worker_still_knows_who_listens(kafka_bootstrap: str, tmp_path: Path
                                                    ) -> None:
    _need_root_and_bpf()
    base = Config(kafka=KafkaConfig(bootstrap_servers=kafka_bootstrap,
                                    topic_prefix=f"ksr{uuid.uuid4().hex[:8]}."))
    pipe = Pipeline(base, tmp_path)
    if (pid := broker_pid(kafka_bootstrap)) is not None:
        pipe.exclude("kafka", pid)
    with running_server("slow", "restartsrv", "0") as port:
        pipe.exclude("server", listener_pid(port))
        url = f"http://127.0.0.1:{port}/r"
        try:
            pipe.start()
            for _ in range(5):
                assert curl(url) == 200
            pipe.wait_total(5, REQ, side="client", dst_workload="restartsrv")

            worker = pipe.components["worker"]
            worker.stop()  # SIGTERM: it leaves the group and commits what it read
            for _ in range(10):  # made while no worker runs: they wait in raw.v1
                assert curl(url) == 200
            worker.start()
            assert worker.proc is not None
            pipe.exclude("worker", worker.proc.pid)

            pipe.wait_total(15, REQ, timeout=120, side="client", dst_workload="restartsrv")
            calls = {dict(labels)["dst_workload"]: value for labels, value
                     in pipe.series(REQ, side="client", src_workload="curl").items()}
            assert calls == {"restartsrv": 15}, f"{calls}\n{pipe.diagnostics()}"
            wait_for("the restarted worker to say it read meta.v1 through",
                     lambda: "listeners known: " in worker.log_text(), timeout=10)
        finally:
            pipe.stop()
