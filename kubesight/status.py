"""``kubesight status``: is every component alive, what flows through it, what did it drop.

Reads the components' own health reports from the ``health.v1`` topic (the last two reports
of each component give rates), the pid files under ``<state>/run``, and whether the broker and
the metrics endpoint answer. Exit status 0 when everything is healthy, 1 otherwise.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from typing import Any

import msgpack
from confluent_kafka import Consumer, KafkaException, TopicPartition

from .config import Config
from .logs import RdkafkaLog
from .process import pid_alive
from .topics import err_name

TAIL = 200  # messages read back per partition of health.v1
STALE_S = 30.0
RATE_KEYS = {"probe": ("events_in", "kafka_delivered"),
             "worker": ("raw_batches", "requests"),
             "sink": ("windows_in",)}
# Counters that say something was lost or not seen: shown under drops/errors when non-zero.
# "not_probed": a TLS library the probe could not put uprobes on (its HTTPS is not seen).
DROP_WORDS = ("drop", "error", "fail", "dead", "truncated", "unparsed", "lag", "not_probed")


def drops(counters: dict[str, Any]) -> dict[str, Any]:
    """The non-zero counters of a health record that name a loss or a blind spot."""
    return {k: v for k, v in counters.items() if v and any(w in k for w in DROP_WORDS)}


def _processes(config: Config) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    files = {"supervisor": "run/supervisor.pid", "probe": "run/probe.pid",
             "worker": "run/worker.pid", "sink": "run/sink.pid", "kafka": "kafka/broker.pid"}
    for name, rel in files.items():
        try:
            pid = int((config.state_path / rel).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            out[name] = None
            continue
        out[name] = pid if pid_alive(pid) else None
    return out


def _health_reports(config: Config) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """The last two reports of each (component, node, instance)."""
    topic = config.topic("health.v1")
    consumer = Consumer({**config.kafka.librdkafka(), "group.id": "kubesight-status",
                         "enable.auto.commit": False, "socket.timeout.ms": 3000,
                         # a refused connection every ~50 ms while the broker is down:
                         # status says itself, once, whether the broker answers
                         "logger": RdkafkaLog("kubesight.status.kafka", level=logging.DEBUG)})
    reports: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    try:
        meta = consumer.list_topics(topic, timeout=3)
        if topic not in meta.topics or meta.topics[topic].error is not None:
            return reports
        assign = []
        for p in meta.topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=3)
            if high > low:
                assign.append(TopicPartition(topic, p, max(low, high - TAIL)))
        if not assign:
            return reports
        consumer.assign(assign)
        remaining = {tp.partition: consumer.get_watermark_offsets(tp, timeout=3)[1]
                     for tp in assign}
        deadline = time.monotonic() + 5
        while remaining and time.monotonic() < deadline:
            for m in consumer.consume(num_messages=500, timeout=0.5):
                if m.error():
                    continue
                part, offset = m.partition() or 0, m.offset() or 0
                if offset + 1 >= remaining.get(part, 0):
                    remaining.pop(part, None)
                try:
                    r = msgpack.unpackb(m.value(), raw=False)
                    key = (r["component"], r["node"], r["instance"])
                except (ValueError, KeyError, TypeError, msgpack.UnpackException):
                    continue
                reports.setdefault(key, []).append(r)
                reports[key] = reports[key][-2:]
    finally:
        consumer.close()
    return reports


def _metrics_ok(config: Config) -> bool | None:
    prom = config.sinks.prometheus
    if not prom.enabled:
        return None
    try:
        with urllib.request.urlopen(f"http://{prom.listen}/metrics", timeout=3) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def collect(config: Config) -> dict[str, Any]:
    procs = _processes(config)
    broker_error = None
    try:
        reports = _health_reports(config)
    except KafkaException as exc:
        reports, broker_error = {}, err_name(exc)[2] or type(exc).__name__
    broker_ok = broker_error is None
    now = time.time()
    components = []
    # The newest report of each component on each node: an instance that stopped reporting
    # while a newer one reports (a restarted process) was replaced, not lost.
    newest: dict[tuple[str, str], float] = {}
    for (comp, node, _instance), recs in reports.items():
        newest[comp, node] = max(newest.get((comp, node), 0.0), float(recs[-1]["ts"]))
    for (comp, node, instance), recs in sorted(reports.items()):
        last = recs[-1]
        age = now - float(last["ts"])
        if age > 10 * STALE_S:  # an old instance: long gone
            continue
        if age >= STALE_S and now - newest[comp, node] < STALE_S:
            continue  # replaced by a fresh instance of the same component on the same node
        rates: dict[str, float] = {}
        if len(recs) == 2:
            dt = float(last["ts"]) - float(recs[0]["ts"])
            for k in RATE_KEYS.get(comp, ()):
                if dt > 0 and k in last["counters"]:
                    rates[k] = (last["counters"][k] - recs[0]["counters"].get(k, 0)) / dt
        components.append({"component": comp, "node": node, "instance": instance,
                           "age_s": round(age, 1), "fresh": age < STALE_S,
                           "rates_per_s": {k: round(v, 1) for k, v in rates.items()},
                           "drops": drops(last["counters"]), "counters": last["counters"]})
    healthy = broker_ok and all(c["fresh"] for c in components) and bool(components)
    return {"bootstrap": config.kafka.bootstrap, "broker_reachable": broker_ok,
            "broker_error": broker_error,
            "processes": procs, "metrics_endpoint_ok": _metrics_ok(config),
            "components": components, "healthy": healthy}


def status(config: Config, *, as_json: bool = False) -> int:
    info = collect(config)
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0 if info["healthy"] else 1
    print(f"kafka      {info['bootstrap']}: "
          + ("reachable" if info["broker_reachable"]
             else f"NOT reachable ({info['broker_error']})"))
    for name, pid in info["processes"].items():
        print(f"{name:<10} {'running, pid ' + str(pid) if pid else 'not running here'}")
    ok = info["metrics_endpoint_ok"]
    if ok is not None:
        url = f"http://{config.sinks.prometheus.listen}/metrics"
        print(f"metrics    {url}: {'answering' if ok else 'NOT answering'}")
    if not info["broker_reachable"]:
        print(f"health     not read: {config.topic('health.v1')} is on the broker")
    elif not info["components"]:
        print("health     no component has reported on "
              f"{config.topic('health.v1')} yet")
    for c in info["components"]:
        state = "ok" if c["fresh"] else f"STALE (last report {c['age_s']:.0f}s ago)"
        rates = ", ".join(f"{k} {v:,.1f}/s" for k, v in c["rates_per_s"].items()) or "-"
        drops = ", ".join(f"{k}={v:,}" for k, v in sorted(c["drops"].items())) or "none"
        print(f"{c['component']:<10} {c['node']} [{c['instance']}] {state}")
        print(f"           rates: {rates}")
        print(f"           drops/errors: {drops}")
    return 0 if info["healthy"] else 1
