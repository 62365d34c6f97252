"""Pipeline capacity per protocol: request records per second per stream-worker core.

Same method as ``pipeline_capacity`` (one real `kubesight worker` on a real broker, a backlog
on `raw.v1`, counted exactly on `golden.v1`, worker CPU from /proc with the idle rate
subtracted), but the traffic is replayed from the real captures under
``tests/streams/fixtures/<protocol>/``: each replay is one captured connection seen from both
sides (the capture's own role, and the peer's with directions swapped), with its own
connection id. How many records one replay makes is computed first by the same Reassembler
in this process, so the expected total is exact and the check is zero loss.

Usage: python -m bench.protocol_capacity [--protocols redis,postgres,...] [--records 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import msgpack

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.pipeline_capacity import capacity_worker  # noqa: E402

FIXTURES = REPO / "tests" / "streams" / "fixtures"
# The capture replayed per protocol: steady-state traffic, not handshakes or error corners.
REPLAYS = {
    "http1": "keepalive3.json",
    "http2": "grpc_unary.json",
    "postgres": "pgbench_extended.json",
    "mysql": "connector_prepared.json",
    "redis": "pipelined.json",
    "kafka": "produce_acks_all.json",
    "dns": "udp_a.json",
}
KIND = {"out": 3, "in": 4}
CAPTURE = 4096  # what the probe captures by default


def connections(protocol: str) -> tuple[list[list[tuple[str, int, bytes]]], str, str]:
    """The fixture's connections as [(direction, size, payload)], its role and transport."""
    doc = json.loads((FIXTURES / protocol / REPLAYS[protocol]).read_text())
    conns = [c["events"] if isinstance(c, dict) else c
             for c in doc.get("connections") or [doc["events"]]]
    out = [[(ev[0], int(ev[1]), ev[2].encode("latin-1")[:CAPTURE]) for ev in conn]
           for conn in conns]
    return out, doc.get("role", "client"), doc.get("transport", "tcp")


def batches(protocol: str, replays: int, start_ns: int) -> list[tuple[bytes, dict[str, Any]]]:
    """(key, raw.v1 batch) for ``replays`` replays of the capture, both sides each."""
    conns, role, transport = connections(protocol)
    out = []
    conn_id = 0
    for r in range(replays):
        for events in conns:
            for side in ("client", "server"):
                conn_id += 1
                swap = (side == "client") != (role == "client")
                port = 20000 + conn_id % 40000
                meta = {"id": conn_id, "tgid": 100 if side == "client" else 200,
                        "comm": f"{protocol}-cli" if side == "client" else f"{protocol}-srv",
                        "role": 1 if side == "client" else 2, "family": 2,
                        "transport": transport, "laddr": "10.0.0.1" if side == "client"
                        else "10.0.0.2", "lport": port if side == "client" else 5000,
                        "raddr": "10.0.0.2" if side == "client" else "10.0.0.1",
                        "rport": 5000 if side == "client" else port}
                t = start_ns + r * 1_000_000
                evs = []
                for i, (direction, size, payload) in enumerate(events):
                    if swap:
                        direction = "in" if direction == "out" else "out"
                    evs.append([KIND[direction], t + i * 20_000, size, payload])
                evs.append([5, t + len(events) * 20_000, 0, b""])  # close
                out.append((f"bench/{protocol}/{conn_id}".encode(),
                            {"v": 1, "node": "bench", "probe": "bench", "seq": conn_id,
                             "conn": meta, "events": evs}))
    return out


def records_per_replay(protocol: str) -> int:
    from kubesight.streams.reassembly import Reassembler

    reassembler = Reassembler(window_seconds=2, slow_threshold_ns=lambda _p: 10**12)
    for key, batch in batches(protocol, 1, time.time_ns()):
        reassembler.on_batch(key.decode(), batch)
    reassembler.release_deferred()
    return sum(p["count"] for _k, m in reassembler.take_partials() for p in m["windows"])


def produce(bootstrap: str, topic: str, protocol: str, replays: int) -> None:
    from confluent_kafka import Producer
    from kubesight.probe.publisher import producer_config

    producer = Producer(producer_config({"bootstrap.servers": bootstrap}))
    for key, batch in batches(protocol, replays, time.time_ns()):
        value = msgpack.packb(batch)
        while True:
            try:
                producer.produce(topic, value=value, key=key)
                break
            except BufferError:
                producer.poll(0.1)
    left = producer.flush(120)
    if left:
        raise RuntimeError(f"{left} messages not delivered")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocols", default=",".join(REPLAYS))
    ap.add_argument("--records", type=int, default=100_000,
                    help="records to make per protocol (rounded up to whole replays)")
    ap.add_argument("--bootstrap", default=os.environ.get("KUBESIGHT_BENCH_BOOTSTRAP", ""))
    args = ap.parse_args()
    rows = []
    for protocol in args.protocols.split(","):
        per = records_per_replay(protocol)
        if per == 0:
            print(f"{protocol}: the capture makes no records; skipped", flush=True)
            continue
        replays = -(-args.records // per)
        with capacity_worker(args.bootstrap) as run:
            def backlog(topic: str, p: str = protocol, n: int = replays,
                        each: int = per) -> int:
                produce(run.bootstrap, topic, p, n)
                return n * each

            expected, total, elapsed, cpu, _ = run.measure(backlog)
        ok = "zero loss" if total == expected else "MISMATCH"
        rows.append((protocol, REPLAYS[protocol], expected, total, cpu, ok))
        print(f"{protocol:<9} {expected:>9,} records ({ok}), worker CPU {cpu:6.1f}s -> "
              f"{expected / cpu:>9,.0f} records/s per worker core", flush=True)
    print("\n| protocol | capture replayed | records | counted | worker CPU s | "
          "records/s per worker core |")
    print("|---|---|---:|---:|---:|---:|")
    for protocol, fixture, expected, total, cpu, ok in rows:
        print(f"| {protocol} | {fixture} | {expected:,} | {total:,} ({ok}) | {cpu:.1f} | "
              f"{expected / cpu:,.0f} |")
    return 0 if all(r[5] == "zero loss" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
