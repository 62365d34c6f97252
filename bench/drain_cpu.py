"""CPU per event of the probe's user side, drain to Kafka message values, old path vs new.

    .venv/bin/python -m bench.drain_cpu [--flushes 40] [--events-per-drain 1000] ...

No kernel and no broker: a ring buffer's memory image (a memfd laid out as the kernel lays out
a BPF ring buffer: consumer page, producer page, data) is filled with struct l7_event records
(bpf/l7.h) the way nginx under wrk fills it: ~40-byte requests and ~850-byte responses
alternating over 16 connections. Each flush period is ``--drains-per-flush`` drain calls, then
a flush into message values (a stand-in producer takes them), as the probe's loop runs it.
Both paths drain the same records, period by period, taking turns going first, and only
their own thread's CPU time is counted (time.thread_time), not the filling of the ring or the
cache eviction (``--warm`` skips it) that stands in for the kernel writing from another CPU.

old: ks_ring_group encodes each call's runs into one reused buffer, Python copies each run
     into a bytes, the flush joins them into the message (the path as of commit 7eab5ea,
     copied below); new: l7.GroupedDrain (ks_ring_group_batches) + Publisher.flush.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import random
import resource
import struct
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
from kubesight.probe import l7
from kubesight.probe.libbpf import RingReader
from kubesight.probe.publisher import (
    _CONN,
    _EVENTS,
    _NODE,
    _ONE,
    _PROBE,
    _SEQ,
    _V,
    Publisher,
    _array_header,
)

SO = Path(__file__).resolve().parent.parent / "bpf" / "build" / "libksdrain.so"
RING_BYTES = 16 << 20  # the probe's default ring
EVICT_BYTES = 48 << 20  # more than this machine's L2 + L3: the records are not in cache
OFFSET_NS = 1_700_000_000 * 10**9


class SyntheticRing:
    """A BPF ring buffer's memory image in a memfd, opened by ks_ring_open like the real one.
    Each load starts where the previous one ended, or at the next lap when it would wrap (a
    wrapped record needs the kernel's double mapping, not needed here)."""

    def __init__(self, size: int) -> None:
        self.size, self.page = size, mmap.PAGESIZE
        self.fd = os.memfd_create("bench-ring")
        os.ftruncate(self.fd, 2 * self.page + 2 * size)
        self.mem = mmap.mmap(self.fd, 2 * self.page + 2 * size)
        self.pos = 0
        self.reader = RingReader(self.fd, size, SO)

    def load(self, blob: bytes) -> None:
        assert self.consumer() == self.pos, "the previous records were not all drained"
        if self.pos % self.size + len(blob) > self.size:
            self.pos += self.size - self.pos % self.size
        off = 2 * self.page + self.pos % self.size
        self.mem[off:off + len(blob)] = blob
        self.pos += len(blob)
        struct.pack_into("<Q", self.mem, 0, self.pos - len(blob))  # consumer
        struct.pack_into("<Q", self.mem, self.page, self.pos)  # producer

    def consumer(self) -> int:
        return int(struct.unpack_from("<Q", self.mem, 0)[0])

    def close(self) -> None:
        self.reader.close()
        self.mem.close()
        os.close(self.fd)


def traffic(n: int, conns: int, rng: random.Random) -> bytes:
    """n records as they sit in the ring (8-byte header, body, padded to 8): a request read
    and its response written on a random one of the connections, in turn."""
    out = bytearray()
    conn = 0
    for i in range(n):
        request = i % 2 == 0
        if request:
            conn = 1 + rng.randrange(conns)
        cap = rng.randint(30, 50) if request else rng.randint(800, 900)
        hdr = l7.L7EventHeader(kind=l7.L7_DATA_IN if request else l7.L7_DATA_OUT,
                               role=l7.L7_ROLE_SERVER, family=2, transport=6, lport=80,
                               rport=40000 + conn, tgid=4242, conn_id=conn, ts_ns=1000 + i,
                               size=cap, cap_len=cap, srtt_us=50 + conn, retrans=0)
        hdr.laddr[:4] = [10, 0, 0, 1]
        hdr.raddr[:4] = [10, 0, 0, 2]
        hdr.comm = b"nginx"
        body = bytes(hdr) + rng.randbytes(cap)
        out += struct.pack("<II", len(body), 0) + body + bytes(-len(body) % 8)
    return bytes(out)


class Producer:
    """Takes message values as confluent_kafka's Producer would (it copies them)."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.values: list[tuple[bytes, bytes]] = []
        self.bytes = 0

    def produce(self, _topic: str, value: bytes, key: bytes, on_delivery: Any = None) -> None:
        self.bytes += len(value)
        if self.keep:
            self.values.append((key, value))

    def poll(self, _timeout: float) -> int:
        return 0

    def __len__(self) -> int:
        return 0


# ---- the old path, as of commit 7eab5ea (probe/l7.py group_runs, GroupedDrain,
# ConnectionBatch; probe/publisher.py Publisher.flush/_encode) ----------------------------

class OldBatch:
    __slots__ = ("conn_id", "meta", "encoded", "n", "nbytes")

    def __init__(self, conn_id: int, meta: dict[str, Any]) -> None:
        self.conn_id = conn_id
        self.meta = meta
        self.encoded: list[bytes] = []
        self.n = 0
        self.nbytes = 0

    def add_encoded(self, run: bytes, events: int) -> None:
        self.encoded.append(run)
        self.n += events
        self.nbytes += len(run)


def old_group_runs(groups: memoryview, ngroups: int, data: memoryview,
                   open_batches: dict[int, OldBatch], sealed: list[OldBatch],
                   names: dict[bytes, tuple[str, str, str]], max_events: int,
                   max_bytes: int) -> int:
    unpack, size = l7._GROUP.unpack_from, l7._GROUP.size
    count = 0
    for off in range(0, ngroups * size, size):
        (conn_id, nevents, start, length, flags, role, family, transport, lport, rport, tgid,
         raw, srtt_us, retrans) = unpack(groups, off)
        count += nevents
        batch = open_batches.get(conn_id)
        if (batch is None or batch.n + nevents > max_events
                or batch.nbytes + length > max_bytes):
            if batch is not None:
                sealed.append(batch)
            batch = open_batches[conn_id] = OldBatch(
                conn_id, l7.connection_meta(conn_id, role, family, transport, lport, rport,
                                            tgid, l7._names(names, family, raw)))
        if flags & l7.L7_FLAG_TLS:
            batch.meta["tls"] = True
        if srtt_us:
            batch.meta["srtt_us"], batch.meta["retrans"] = srtt_us, retrans
        batch.add_encoded(bytes(data[start:start + length]), nevents)
    return count


class OldPublisher(Publisher):
    """Publisher.flush and Publisher._encode as they were."""

    def flush(self) -> int:
        batches = self.sealed
        batches.extend(self.open.values())
        self.open, self.sealed = {}, []
        self._drain_overflow()
        for batch in batches:
            self._produce(*self._encode(batch))
            self.counters["events_published"] += batch.n
        self._producer.poll(0)
        return len(batches)

    def _encode(self, batch: Any, _n: int = 0) -> tuple[bytes, bytes]:
        if self._annotate is not None:
            self._annotate(batch.meta)
        value = b"".join((
            b"\x86", _V, _ONE, _NODE, msgpack.packb(self._node), _PROBE,
            msgpack.packb(self._probe_id), _SEQ, msgpack.packb(self._seq), _CONN,
            msgpack.packb(batch.meta), _EVENTS, _array_header(batch.n), *batch.encoded))
        self._seq += 1
        key = f"{self._node}/{self._probe_id}/{batch.conn_id}".encode()
        return key, value


class OldPath:
    def __init__(self, reader: RingReader, producer: Producer) -> None:
        self._reader = reader
        self._groups = (l7.KsGroup * l7.GROUPS_MAX)()
        self._groups_view = memoryview(self._groups).cast("B")
        self._data = ctypes.create_string_buffer(l7.GROUP_DATA_BYTES)
        self._data_view = memoryview(self._data).cast("B")
        self.publisher = OldPublisher(producer=producer, topic="t",  # type: ignore[arg-type]
                                      node="bench", probe_id="bench",
                                      clock=lambda: (OFFSET_NS, 0))
        self.names: dict[bytes, tuple[str, str, str]] = {}

    def drain(self) -> int:  # GroupedDrain.drain_into as it was
        pub = self.publisher
        total = 0
        while True:
            ngroups, events = self._reader.group_into(
                self._groups, len(self._groups), self._data, len(self._data),
                offset_ns=pub.clock_offset_ns(), max_events=pub.batch_max_events,
                max_bytes=pub.batch_max_bytes)
            if not events:
                return total
            total += old_group_runs(self._groups_view, ngroups, self._data_view,
                                    pub.open, pub.sealed,  # type: ignore[arg-type]
                                    self.names, pub.batch_max_events, pub.batch_max_bytes)

    def flush(self) -> int:
        return self.publisher.flush()


# ---- the new path: what kubesight.probe.main runs ------------------------------------------

class NewPath:
    def __init__(self, reader: RingReader, producer: Producer) -> None:
        self._drain = l7.GroupedDrain(reader)
        self.publisher = Publisher(producer=producer, topic="t", node="bench",  # type: ignore[arg-type]
                                   probe_id="bench", clock=lambda: (OFFSET_NS, 0))
        self.names: dict[bytes, tuple[str, str, str]] = {}

    def drain(self) -> int:
        pub = self.publisher
        return self._drain.drain_into(pub.open, pub.sealed, self.names,
                                      offset_ns=pub.clock_offset_ns(),
                                      max_events=pub.batch_max_events,
                                      max_bytes=pub.batch_max_bytes)

    def flush(self) -> int:
        return self.publisher.flush()


# ---- measuring ---------------------------------------------------------------------------

def events_by_connection(values: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """Each connection's events as encoded, the messages' heads left out, in order."""
    out: dict[bytes, bytearray] = {}
    for key, value in values:
        start = value.index(b"\xa6events") + 7
        start += 1 if value[start] < 0xa0 else 3  # fixarray or array 16
        out.setdefault(key, bytearray()).extend(value[start:])
    return {k: bytes(v) for k, v in out.items()}


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flushes", type=int, default=40, help="flush periods (each path)")
    ap.add_argument("--drains-per-flush", type=int, default=10)
    ap.add_argument("--events-per-drain", type=int, default=1000)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--warm", action="store_true",
                    help="leave the records in cache (no eviction before each drain)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if not SO.exists():
        print(f"{SO} missing: run `make -C bpf`", file=sys.stderr)
        return 1

    rng = random.Random(args.seed)
    # A pool of drains' worth of records, reused round robin (building them is slow).
    pool = [traffic(args.events_per_drain, args.conns, rng) for _ in range(16)]
    evict = ctypes.create_string_buffer(EVICT_BYTES)
    check_flushes = 3  # whose messages are kept and compared
    rings = {name: SyntheticRing(RING_BYTES) for name in ("old", "new")}
    producers = {name: Producer(keep=True) for name in rings}
    paths: dict[str, OldPath | NewPath] = {"old": OldPath(rings["old"].reader, producers["old"]),
                                           "new": NewPath(rings["new"].reader, producers["new"])}
    cpu_ns = {name: [0, 0] for name in paths}  # drain, flush
    faults = {name: 0 for name in paths}  # minor page faults: allocations the kernel fills
    events = {name: 0 for name in paths}
    messages = {name: 0 for name in paths}

    def period(name: str, first: int) -> None:
        ring, path = rings[name], paths[name]
        for d in range(args.drains_per_flush):
            ring.load(pool[(first + d) % len(pool)])
            if not args.warm:
                ctypes.memset(evict, d & 0xff, EVICT_BYTES)
            f0, t0 = _minor_faults(), time.thread_time_ns()
            n = path.drain()
            cpu_ns[name][0] += time.thread_time_ns() - t0
            faults[name] += _minor_faults() - f0
            assert n == args.events_per_drain and ring.consumer() == ring.pos
            events[name] += n
        f0, t0 = _minor_faults(), time.thread_time_ns()
        messages[name] += path.flush()
        cpu_ns[name][1] += time.thread_time_ns() - t0
        faults[name] += _minor_faults() - f0

    for f in range(args.flushes + 1):  # period 0 warms up both paths and is not counted
        order = ("old", "new") if f % 2 else ("new", "old")
        for name in order:
            period(name, f * args.drains_per_flush)
        if f == 0:
            for name in paths:
                cpu_ns[name] = [0, 0]
                events[name] = messages[name] = faults[name] = 0
        if f == check_flushes:
            old_values, new_values = producers["old"].values, producers["new"].values
            # The same events, to the byte, per connection; the messages split at other events
            # (old: at drain calls' runs, new: event by event, as the Python fallback).
            assert events_by_connection(old_values) == events_by_connection(new_values)
            assert ({msgpack.unpackb(v)["conn"]["id"]: msgpack.unpackb(v)["conn"]
                     for _, v in old_values}
                    == {msgpack.unpackb(v)["conn"]["id"]: msgpack.unpackb(v)["conn"]
                        for _, v in new_values})
            for p in producers.values():
                p.keep, p.values = False, []

    print(f"{args.flushes} flush periods x {args.drains_per_flush} drains x "
          f"{args.events_per_drain} events, {args.conns} connections, "
          f"{'warm' if args.warm else 'cold'} ring; thread CPU per event:")
    per_event = {}
    for name in paths:
        drain_ns, flush_ns = cpu_ns[name]
        per_event[name] = (drain_ns + flush_ns) / events[name]
        print(f"  {name}: {per_event[name]:6.1f} ns  (drain {drain_ns / events[name]:6.1f}, "
              f"flush {flush_ns / events[name]:5.1f}; {messages[name]} messages, "
              f"{faults[name] * 1000 / events[name]:.0f} page faults per 1000 events)")
    print(f"  new/old: {per_event['new'] / per_event['old']:.2f} "
          f"({1 - per_event['new'] / per_event['old']:.0%} less)")
    for ring in rings.values():
        ring.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
