"""Pipeline capacity: HTTP requests per second per stream-worker core, end to end, zero loss.

One real `kubesight worker` (the Faust app) on a real broker. Once it is ready and its idle
CPU rate is measured, a backlog of raw batches is produced to `raw.v1` — real HTTP/1.1 bytes
(an nginx request/response pair), both sides of each connection, batched per connection like
the probe does. The worker reassembles, aggregates and emits windows; we read `golden.v1`
until the summed count equals what was sent (zero loss, checked exactly), and divide the
requests by the worker's CPU seconds spent on them (from /proc, idle rate subtracted).

Usage: python -m bench.pipeline_capacity [--requests 300000] [--batch 256]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

REQUEST = (b"GET /items/42 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n"
           b"Accept: */*\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 27 Nov 2026 13:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 600\r\nConnection: keep-alive\r\n\r\n"
            + b"x" * 600)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def produce_backlog(bootstrap: str, topic: str, requests: int, batch: int,
                    connections: int) -> int:
    from confluent_kafka import Producer
    from kubesight.probe.publisher import producer_config

    producer = Producer(producer_config({"bootstrap.servers": bootstrap}))
    now = time.time_ns()
    sent = 0
    seq = 0
    per_conn = requests // connections
    for conn in range(connections):
        for role, first, second in ((1, 3, 4), (2, 4, 3)):  # client: out,in; server: in,out
            conn_id = conn * 2 + role
            meta = {"id": conn_id, "tgid": 100 + role, "comm": "wrk" if role == 1 else "nginx",
                    "role": role, "family": 2, "laddr": "127.0.0.1",
                    "lport": 40000 + conn if role == 1 else 8080, "raddr": "127.0.0.1",
                    "rport": 8080 if role == 1 else 40000 + conn}
            done = 0
            while done < per_conn:
                n = min(batch, per_conn - done)
                events = []
                for i in range(n):
                    t = now + (done + i) * 50_000
                    req, resp = (REQUEST, RESPONSE)
                    events.append([first, t, len(req), req])
                    events.append([second, t + 40_000, len(resp), resp])
                value = msgpack.packb({"v": 1, "node": "bench", "probe": "bench", "seq": seq,
                                       "conn": meta, "events": events})
                while True:
                    try:
                        producer.produce(topic, value=value, key=f"bench/{conn_id}".encode())
                        break
                    except BufferError:
                        producer.poll(0.1)
                seq += 1
                done += n
            if role == 1:
                sent += done
    left = producer.flush(120)
    if left:
        raise RuntimeError(f"{left} messages not delivered")
    return sent * 2  # each request is observed on both sides


def golden_total(config: Any) -> int:
    from tests.e2e.harness import read_topic

    return sum(r["count"] for r in read_topic(config, "golden.v1"))


class CapacityRun:
    """A real `kubesight worker` on a broker, ready, with its idle CPU rate measured."""

    def __init__(self, bootstrap: str, config: Any, worker: subprocess.Popen[bytes],
                 idle_rate: float) -> None:
        self.bootstrap, self.config, self.worker, self.idle_rate = (bootstrap, config, worker,
                                                                    idle_rate)

    def measure(self, produce: Any, timeout_s: float = 900) -> tuple[int, int, float, float,
                                                                    float]:
        """produce(raw topic) -> requests expected; waits until golden.v1 counts them all.
        Returns (expected, counted, wall seconds, worker CPU seconds, produce seconds)."""
        t_start = time.monotonic()
        c_start = cpu_seconds(self.worker.pid)
        expected = produce(self.config.topic("raw.v1"))
        produced_s = time.monotonic() - t_start
        total = 0
        while time.monotonic() - t_start < timeout_s:
            total = golden_total(self.config)
            if total >= expected:
                break
            time.sleep(2)
        elapsed = time.monotonic() - t_start
        cpu = cpu_seconds(self.worker.pid) - c_start - self.idle_rate * elapsed
        return expected, total, elapsed, cpu, produced_s


@contextlib.contextmanager
def capacity_worker(bootstrap: str = "") -> Iterator[CapacityRun]:
    """Start a broker (unless ``bootstrap`` names one) and one worker with its own topics."""
    from kubesight.broker import LocalBroker
    from kubesight.config import Config, KafkaConfig, LocalBrokerConfig, load
    from kubesight.topics import ensure_topics
    from tests.conftest import free_ports

    workdir = Path(tempfile.mkdtemp(prefix="ks-capacity-"))
    broker = None
    if not bootstrap:
        port, cport = free_ports(2)
        broker = LocalBroker(Config(state_dir=str(workdir / "kafka"), kafka=KafkaConfig(
            local=LocalBrokerConfig(port=port, controller_port=cport, heap="768m"))))
        broker.start(timeout=120)
        bootstrap = broker.bootstrap
    (web_port,) = free_ports(1)
    prefix = f"cap{time.time_ns()}."
    tree = {"node_name": "bench", "state_dir": str(workdir / "state"), "log_level": "info",
            "kafka": {"bootstrap_servers": bootstrap, "topic_prefix": prefix, "partitions": 4},
            "streams": {"window_seconds": 2, "grace_seconds": 1.0, "web_port": web_port,
                        "app_id": f"ks-{prefix.rstrip('.')}"},
            "sinks": {"prometheus": {"enabled": False}}}
    cfg_path = workdir / "kubesight.yaml"
    cfg_path.write_text(yaml.safe_dump(tree))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBESIGHT_")}
    env["KUBESIGHT_CONFIG"] = str(cfg_path)
    config = load(cfg_path, environ=env)
    ensure_topics(config)
    log = open(workdir / "worker.log", "wb")  # noqa: SIM115
    worker = subprocess.Popen([sys.executable, "-m", "kubesight.cli", "worker"], env=env,
                              stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while b"Ready" not in (workdir / "worker.log").read_bytes():
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((workdir / "worker.log").read_text()[-3000:])
            time.sleep(0.2)
        c0, t0 = cpu_seconds(worker.pid), time.monotonic()
        time.sleep(5)
        idle_rate = (cpu_seconds(worker.pid) - c0) / (time.monotonic() - t0)
        yield CapacityRun(bootstrap, config, worker, idle_rate)
    finally:
        worker.terminate()
        worker.wait(60)
        log.close()
        if broker is not None:
            broker.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300_000, help="requests per side")
    ap.add_argument("--batch", type=int, default=256, help="requests per raw batch")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--bootstrap", default=os.environ.get("KUBESIGHT_BENCH_BOOTSTRAP", ""))
    args = ap.parse_args()

    with capacity_worker(args.bootstrap) as run:
        expected, total, elapsed, cpu, produced_s = run.measure(
            lambda topic: produce_backlog(run.bootstrap, topic, args.requests, args.batch,
                                          args.connections))
    print(f"requests sent (both sides): {expected:,}; counted in golden.v1: {total:,} "
          f"({'zero loss' if total == expected else 'MISMATCH'})")
    print(f"backlog produced in {produced_s:.1f}s; worker done after {elapsed:.1f}s wall")
    print(f"worker CPU: {cpu:.1f}s (idle rate subtracted) -> "
          f"{expected / cpu:,.0f} requests/s per worker core "
          f"({2 * expected / cpu:,.0f} events/s)")
    return 0 if total == expected else 1


if __name__ == "__main__":
    sys.exit(main())
