"""A librdkafka client for the Kafka end-to-end test, run as its own process.

    python -m tests.e2e.kafka_client COMM BOOTSTRAP TOPIC TINY_TOPIC MESSAGES OVERSIZE

Names itself COMM (librdkafka names its I/O threads "rdk:broker1"; the probe names a workload by
its process, the thread group leader). A producer (acks=all, linger.ms=0, a flush after each
message: one Produce request each) sends MESSAGES messages to TOPIC and OVERSIZE messages of
4000 bytes to TINY_TOPIC, whose max.message.bytes is smaller (the broker answers
MESSAGE_TOO_LARGE); a consumer fetches the messages back from partition 0 and pauses. Once
nothing is in flight, it prints one JSON line with what librdkafka itself says, per client and
request type: the requests sent according to its statistics (``stats_cb``: brokers[].req; a
bootstrap broker's counts leave the statistics when librdkafka retires it, so only the brokers
still known are there), and the responses received according to its ``debug=protocol`` log
("Received ProduceResponse (v10, ...)"), which covers every connection; plus the delivery errors
and the messages consumed. """

from __future__ import annotations

import ctypes
import json
import logging
import re
import sys
import time
from collections import Counter
from typing import Any


def set_comm(name: str) -> None:
    PR_SET_NAME = 15
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


class Statistics:
    """The latest librdkafka statistics of each client (served on poll/flush/consume)."""

    def __init__(self) -> None:
        self.latest: dict[str, dict[str, Any]] = {}
        self.seen = 0

    def on_stats(self, raw: str) -> None:
        doc = json.loads(raw)
        self.latest[doc["client_id"]] = doc
        self.seen += 1

    def requests(self, name: str) -> Counter[str]:
        """Requests sent, per type, over all of the client's brokers."""
        total: Counter[str] = Counter()
        for broker in self.latest[name]["brokers"].values():
            total.update({k: v for k, v in broker.get("req", {}).items() if v})
        return total

    def idle(self, name: str) -> bool:
        brokers = self.latest[name]["brokers"].values()
        return all(b["waitresp_cnt"] == 0 and b["outbuf_cnt"] == 0 for b in brokers)


class ProtocolLog(logging.Handler):
    """Counts librdkafka's "Received <Type>Response" debug lines, per client and type."""

    RECEIVED = re.compile(r"Received (\w+?)Response \(v\d+")

    def __init__(self) -> None:
        super().__init__()
        self.received: dict[str, Counter[str]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        match = self.RECEIVED.search(record.getMessage())
        if match:
            client = record.name
            self.received.setdefault(client, Counter())[match.group(1)] += 1

    def logger(self, client: str) -> logging.Logger:
        log = logging.getLogger(client)
        log.setLevel(logging.DEBUG)
        log.propagate = False
        log.addHandler(self)
        return log


def settle(stats: Statistics, name: str, poll: Any, timeout: float = 30) -> Counter[str]:
    """Poll until the client has nothing in flight and its counts stop moving for 3 reports."""
    history: list[Counter[str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = stats.seen
        while stats.seen == seen and time.monotonic() < deadline:
            poll(0.05)
        if name in stats.latest and stats.idle(name):
            history.append(stats.requests(name))
            if len(history) >= 3 and history[-1] == history[-2] == history[-3]:
                return history[-1]
        else:
            history.clear()
    raise SystemExit(f"{name} did not settle: {stats.latest.get(name, {}).get('brokers')}")


def main() -> None:
    comm, bootstrap, topic, tiny = sys.argv[1:5]
    messages, oversize = int(sys.argv[5]), int(sys.argv[6])
    set_comm(comm)
    from confluent_kafka import Consumer, Producer, TopicPartition

    stats = Statistics()
    log = ProtocolLog()
    common = {"bootstrap.servers": bootstrap, "statistics.interval.ms": 100,
              "stats_cb": stats.on_stats, "debug": "protocol"}
    producer = Producer({**common, "client.id": "ks-e2e-producer", "acks": "all",
                         "logger": log.logger("ks-e2e-producer"),
                         "linger.ms": 0, "enable.idempotence": False,
                         "compression.type": "none"})
    errors: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(err.name())

    for i in range(messages):
        producer.produce(topic, b"message-%d" % i, on_delivery=delivered)
        producer.flush(30)
    for _ in range(oversize):
        producer.produce(tiny, b"x" * 4000, on_delivery=delivered)
        producer.flush(30)
    produced = settle(stats, "ks-e2e-producer", producer.poll)

    consumer = Consumer({**common, "client.id": "ks-e2e-consumer", "group.id": f"{comm}-group",
                         "logger": log.logger("ks-e2e-consumer"),
                         "enable.auto.commit": False, "fetch.wait.max.ms": 100})
    partition = TopicPartition(topic, 0, 0)
    consumer.assign([partition])
    consumed = 0
    deadline = time.monotonic() + 60
    while consumed < messages and time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        if msg is not None and not msg.error():
            consumed += 1
    consumer.pause([partition])  # no more Fetch requests once the one in flight is answered

    def poll_consumer(timeout: float) -> None:
        consumer.poll(timeout)

    fetched = settle(stats, "ks-e2e-consumer", poll_consumer)
    print(json.dumps({"sent": {"producer": produced, "consumer": fetched},
                      "received": log.received, "delivery_errors": errors,
                      "consumed": consumed}), flush=True)
    consumer.close()


if __name__ == "__main__":
    main()
