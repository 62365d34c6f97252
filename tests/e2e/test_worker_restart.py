"""A restarted worker names a same-node server as the worker before it did.

Who listens on a node comes to the workers from meta.v1: the probe's /proc scan, written once
per listener. A worker that read meta.v1 as a consumer group member resumed after its committed
offset when restarted, knew no listener, and named calls to a server it did not also see from
the server side by address (after ``DEFER_S`` of waiting for a name that never came). That is
how the stall test's restarted worker lost 12 of 50 requests to ``dst_workload="nginx"`` in CI.

Here the server is kept out of the capture (the probe excludes its pid, as it excludes
kubesight's own), so its listener record is the only thing that can name it.

And a record still waiting for its peer's name when the worker is stopped goes out before the
worker does: its raw input is already committed.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import msgpack
import pytest
from confluent_kafka import Producer

from kubesight.config import Config, KafkaConfig
from kubesight.topics import ensure_topics

from .conftest import _need_root_and_bpf, broker_pid
from .harness import Pipeline, curl, read_topic, running_server, wait_for

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
            ensure_topics(pipe.config)
            producer = Producer(pipe.config.kafka.librdkafka())
            for value in (b"\xc1", msgpack.packb({"kind": "listener", "node": "e2e-node"})):
                producer.produce(pipe.config.topic("meta.v1"), key=b"e2e-node/listen/bad",
                                 value=value)  # not msgpack; a listener without an address
            assert producer.flush(30) == 0
            pipe.start()
            for _ in range(5):
                assert curl(url) == 200
            pipe.wait_total(5, REQ, side="client", dst_workload="restartsrv")
            wait_for("the two bad meta.v1 records to be counted", lambda: 2 in pipe.series(
                "kubesight_pipeline_counter_total", component="worker",
                name="meta_malformed").values(), timeout=30)

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


def test_a_record_waiting_for_its_peer_leaves_with_the_stopping_worker(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    from confluent_kafka import Consumer, TopicPartition

    base = Config(kafka=KafkaConfig(bootstrap_servers=kafka_bootstrap,
                                    topic_prefix=f"ksd{uuid.uuid4().hex[:8]}."))
    pipe = Pipeline(base, tmp_path)
    ensure_topics(pipe.config)
    worker = pipe.components["worker"]
    worker.start()
    try:
        wait_for("the worker to read meta.v1 through",
                 lambda: "listeners known: " in worker.log_text(), timeout=90)
        # Made here, not by the probe: a same-node call to a port whose listener nobody has
        # told the worker about. Its record waits DEFER_S (3 s) for the callee's name.
        now = time.time_ns()
        request = b"GET /deferred-at-stop HTTP/1.1\r\nHost: a\r\n\r\n"
        response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        batch = {"v": 1, "node": "e2e-node", "probe": "test", "seq": 0,
                 "conn": {"id": 1, "tgid": 7, "comm": "curl", "role": 1, "family": 2,
                          "laddr": "127.0.0.1", "lport": 40000, "raddr": "127.0.0.1",
                          "rport": 9},
                 "events": [[3, now, len(request), request],
                            [4, now + 1_000_000, len(response), response]]}
        delivered: list[tuple[int, int]] = []
        producer = Producer(pipe.config.kafka.librdkafka())
        producer.produce(pipe.config.topic("raw.v1"), key=b"e2e-node/test/1",
                         value=msgpack.packb(batch),
                         on_delivery=lambda err, msg: delivered.append(
                             (msg.partition(), msg.offset())))
        assert producer.flush(30) == 0 and delivered
        [(partition, offset)] = delivered

        group = Consumer({**pipe.config.kafka.librdkafka(),
                          "group.id": pipe.config.streams.app_id})  # only asks, never joins
        try:
            tp = TopicPartition(pipe.config.topic("raw.v1"), partition)
            wait_for("the worker to commit the batch",
                     lambda: group.committed([tp], timeout=5)[0].offset > offset, timeout=60,
                     interval=0.1)
        finally:
            group.close()
        worker.stop()  # within the 3 s the record waits

        def sent() -> list[dict]:
            return [req for rec in read_topic(pipe.config, "requests.v1") if rec
                    for req in rec["requests"] if req["path"] == "/deferred-at-stop"]

        [record] = sent()
        assert (record["src_workload"], record["dst_workload"]) == ("curl", "127.0.0.1")
    finally:
        worker.stop()
