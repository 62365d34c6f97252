"""A worker whose connections to the broker hang (packets dropped, nothing reset) while the
broker answers everyone else: the stall watch (streams/watchdog.py) must notice, say why, kick,
and exit with status 70; a fresh worker, as the supervisor starts one, then counts every request
made during the hang.

The hang is made with nftables: every TCP connection the worker holds to the broker at that
moment is black-holed in both directions (matched by its local port and the broker's), so
aiokafka waits on them until its request timeout (Faust's default: 90 s) while new
connections, the watch's own end-offset queries among them, go through. Thresholds are
lowered to the minimum (5 s + 5 s).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kubesight.config import Config, KafkaConfig

from .conftest import _need_root_and_bpf, broker_pid
from .harness import Nginx, Pipeline, curl, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.bpf, pytest.mark.kafka]

REQ = "kubesight_requests_total"
TABLE = f"ks_stall_{uuid.uuid4().hex[:6]}"


def connections_to(pid: int, port: int) -> set[int]:
    """Local ports of ``pid``'s established TCP connections to ``port``."""
    out = subprocess.run(["ss", "-tnpH", "state", "established"], capture_output=True,
                         text=True, check=True).stdout
    ports = set()
    for line in out.splitlines():
        if f"pid={pid}," not in line:
            continue
        local, peer = line.split()[2:4]
        if peer.rsplit(":", 1)[1] == str(port):
            ports.add(int(local.rsplit(":", 1)[1]))
    return ports


@pytest.fixture
def blackhole() -> Iterator[Callable[[set[int], int], None]]:
    if shutil.which("nft") is None:
        pytest.skip("nft (nftables) is not installed")
    made = []

    def drop(ports: set[int], broker: int) -> None:
        """Drop both directions of the connections from local ``ports`` to port ``broker``,
        and nothing else (a listener that happens to share a port number stays reachable)."""
        spec = ", ".join(str(p) for p in sorted(ports))
        subprocess.run(["nft", "-f", "-"], check=True, text=True, input=f"""
table inet {TABLE} {{
  chain out {{
    type filter hook output priority 0;
    tcp sport {{ {spec} }} tcp dport {broker} drop;
    tcp sport {broker} tcp dport {{ {spec} }} drop;
  }}
}}
""")
        made.append(TABLE)

    yield drop
    for table in made:
        subprocess.run(["nft", "delete", "table", "inet", table], check=False)


def test_a_hung_worker_is_noticed_kicked_and_restarted_without_loss(
        kafka_bootstrap: str, nginx: Nginx, blackhole: Callable[[set[int], int], None],
        tmp_path: Path) -> None:
    _need_root_and_bpf()
    base = Config(kafka=KafkaConfig(bootstrap_servers=kafka_bootstrap,
                                    topic_prefix=f"kss{uuid.uuid4().hex[:8]}."))
    pipe = Pipeline(base, tmp_path, extra={"streams": {"stall_after_s": 5,
                                                       "stall_restart_after_s": 5}})
    if (pid := broker_pid(kafka_bootstrap)) is not None:
        pipe.exclude("kafka", pid)
    port = int(kafka_bootstrap.rsplit(":", 1)[1])
    try:
        pipe.start()
        worker = pipe.components["worker"]
        assert worker.proc is not None
        for _ in range(20):  # the healthy pipeline first
            assert curl(nginx.url + "/small") == 200
        before = pipe.wait_total(20, REQ, side="client", dst_workload="nginx")

        ports = connections_to(worker.proc.pid, port)
        assert ports, "the worker holds no connection to the broker"
        blackhole(ports, port)
        for _ in range(50):  # made while the worker hangs: they wait in raw.v1
            assert curl(nginx.url + "/small") == 200

        wait_for("the worker to give up and exit", lambda: not worker.alive(), timeout=150)
        log = worker.log_text()
        assert worker.proc.returncode == 70, log[-4000:]
        assert "consumer stalled with a broker answering: " in log, log[-4000:]
        assert re.search(r"raw\.v1/\d lag \d+ for \d+s", log), log[-4000:]
        assert "kicked the consumer: " in log, log[-4000:]
        assert "exiting (status 70) for the supervisor" in log, log[-4000:]

        worker.stop()
        worker.start()  # what kubesight up's supervisor does with a worker that exited
        pipe.exclude("worker", worker.proc.pid)
        # It joins once the group drops the old member (session timeout), then reads on.
        pipe.wait_total(before + 50, REQ, timeout=300, side="client", dst_workload="nginx")
        # It restored the windows tables from their changelogs (the tables' serializers came
        # from a schema Faust overrides: json, and every restarted worker hung in recovery).
        restarted = worker.log_text()[len(log):]
        assert "Worker ready" in restarted and "Error in recovery" not in restarted, \
            restarted[-4000:]
    finally:
        pipe.stop()
