"""ks_ring_group (bpf/drain.c) groups records straight from the ring as the Python fallback does.

The ring here is a stand-in for a BPF ring buffer with the kernel's memory layout (a memfd:
consumer page, producer page, data area), so records can be placed where a test needs them:
across the end of the ring, still being written, discarded.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from kubesight.probe import l7, libbpf

SO = Path(__file__).resolve().parents[2] / "bpf" / "build" / "libksdrain.so"
pytestmark = pytest.mark.skipif(not SO.exists(), reason="run `make bpf` to build libksdrain.so")

BUSY, DISCARD = 1 << 31, 1 << 30  # bits of a ring record's length word
OFFSET_NS = 5_000_000_000


class FakeRing:
    """A BPF ring buffer's memory over a memfd, for ks_ring_open: consumer page, producer page,
    then the data area twice in a row. The kernel maps the data pages twice so a record that
    wraps around the end is contiguous; here every write goes to both copies. Positions run
    on forever and are taken modulo the size, like the kernel's."""

    def __init__(self, size: int, start: int = 0) -> None:
        self.size, self.page = size, mmap.PAGESIZE
        self.fd = os.memfd_create("ks-test-ring")
        os.ftruncate(self.fd, 2 * self.page + 2 * size)
        self.mem = mmap.mmap(self.fd, 2 * self.page + 2 * size)
        self.prod = start
        struct.pack_into("<QQ", self.mem, 0, start, 0)
        struct.pack_into("<Q", self.mem, self.page, start)

    @property
    def consumer(self) -> int:
        return int(struct.unpack_from("<Q", self.mem, 0)[0])

    def free(self) -> int:
        return self.size - (self.prod - self.consumer)

    def push(self, body: bytes, flags: int = 0) -> int:
        """Commit one record (or leave it reserved: BUSY); returns its position."""
        total = (8 + len(body) + 7) & ~7
        assert total <= self.free(), "ring full"
        pos = self.prod
        self._write(pos, struct.pack("<II", len(body) | flags, 0) + body)
        self.prod += total
        struct.pack_into("<Q", self.mem, self.page, self.prod)
        return pos

    def commit(self, pos: int) -> None:
        """Clear BUSY on the record at pos, as bpf_ringbuf_submit does."""
        (word,) = struct.unpack_from("<I", self.mem, 2 * self.page + pos % self.size)
        self._write(pos, struct.pack("<I", word & ~BUSY))

    def _write(self, pos: int, blob: bytes) -> None:
        off = pos % self.size
        head, tail = blob[:self.size - off], blob[self.size - off:]
        for copy in (2 * self.page, 2 * self.page + self.size):
            self.mem[copy + off:copy + off + len(head)] = head
            self.mem[copy:copy + len(tail)] = tail

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)


@pytest.fixture
def ring_factory() -> Iterator[Any]:
    made: list[tuple[FakeRing, libbpf.RingReader]] = []

    def make(size: int, start: int = 0) -> tuple[FakeRing, libbpf.RingReader]:
        ring = FakeRing(size, start)
        made.append((ring, libbpf.RingReader(ring.fd, size, SO)))
        return made[-1]

    yield make
    for ring, reader in made:
        reader.close()
        ring.close()


def record(conn_id: int, cap: int, ts: int, rng: random.Random, *, flags: int = 0,
           srtt_us: int = 0, payload: bytes | None = None) -> bytes:
    """One struct l7_event as the kernel submits it: header, then cap bytes of payload."""
    hdr = l7.L7EventHeader(kind=rng.choice([1, 3, 4, 5]), role=conn_id % 3,
                           family=2, transport=6, lport=1000 + conn_id, rport=80, tgid=42,
                           conn_id=conn_id, ts_ns=ts, size=rng.choice([cap, cap + 100, -115]),
                           cap_len=cap, flags=flags, srtt_us=srtt_us, retrans=srtt_us // 10)
    hdr.laddr[:4] = [127, 0, 0, 1]
    hdr.raddr[:4] = [127, 0, 0, 2]
    hdr.comm = b"curl"
    return bytes(hdr) + (payload if payload is not None else rng.randbytes(cap))


def records(n: int, seed: int = 7, conns: int = 5) -> list[bytes]:
    rng = random.Random(seed)
    return [record(1 + rng.randrange(conns), rng.choice([0, 1, 17, 255, 256, 300, 4096, 8192]),
                   10_000 + i, rng, flags=rng.choice([0, 0, 0, l7.L7_FLAG_TLS]),
                   srtt_us=rng.choice([50, 120])) for i in range(n)]


def python_batches(bodies: list[bytes], max_events: int,
                   max_bytes: int) -> list[l7.ConnectionBatch]:
    """The fallback path's batches (no libksdrain.so) for the same records."""
    buf = b"".join(len(b).to_bytes(4, "little") + b for b in bodies)
    opened: dict[int, l7.ConnectionBatch] = {}
    sealed: list[l7.ConnectionBatch] = []
    assert l7.decode_grouped(buf, len(buf), OFFSET_NS, opened, sealed, {}, max_events,
                             max_bytes) == len(bodies)
    return sealed + list(opened.values())


def events_per_conn(batches: list[l7.ConnectionBatch]) -> dict[int, list[Any]]:
    per_conn: dict[int, list[Any]] = {}
    for b in batches:
        unpacker = msgpack.Unpacker(raw=False)
        for run in b.encoded:
            unpacker.feed(run)
        events = list(unpacker)
        assert len(events) == b.n
        per_conn.setdefault(b.conn_id, []).extend(events)
    return per_conn


class Collector:
    """Drains a ring with ks_ring_group into batches, as L7Probe.drain_into does."""

    def __init__(self, reader: libbpf.RingReader, max_events: int, max_bytes: int,
                 **buffers: int) -> None:
        self.drain = l7.GroupedDrain(reader, **buffers)
        self.max_events, self.max_bytes = max_events, max_bytes
        self.opened: dict[int, l7.ConnectionBatch] = {}
        self.sealed: list[l7.ConnectionBatch] = []

    def __call__(self) -> int:
        return self.drain.drain_into(self.opened, self.sealed, {}, offset_ns=OFFSET_NS,
                                     max_events=self.max_events, max_bytes=self.max_bytes)

    @property
    def batches(self) -> list[l7.ConnectionBatch]:
        return self.sealed + list(self.opened.values())


@pytest.mark.parametrize(("max_events", "max_bytes"), [(512, 768 * 1024), (7, 20_000)])
def test_grouped_from_a_wrapping_ring_like_the_python_fallback(ring_factory: Any,
                                                               max_events: int,
                                                               max_bytes: int) -> None:
    bodies = records(600)
    ring, reader = ring_factory(64 * 1024, start=64 * 1024 - 40)  # the first record wraps
    collect = Collector(reader, max_events, max_bytes)
    drained = 0
    for body in bodies:  # ~1 MB through 64 KiB: the ring wraps around ~16 times
        if ring.free() < len(body) + 8:
            drained += collect()
        ring.push(body)
    drained += collect()
    assert drained == 600 and ring.consumer == ring.prod
    expected = python_batches(bodies, max_events, max_bytes)
    assert events_per_conn(collect.batches) == events_per_conn(expected)
    for batch in collect.batches:
        assert batch.n <= max_events and batch.nbytes <= max_bytes
        assert batch.meta["laddr"] == "127.0.0.1" and batch.meta["comm"] == "curl"
    # Connection metadata: identity from a batch's first record, TLS or-ed, RTT from the latest.
    # Batches split at other events when the ring is drained in several calls: compare
    # whole metadata only where nothing splits.
    if max_events >= len(bodies):
        assert [b.meta for b in collect.batches] == [b.meta for b in expected]
    health = ("tls", "srtt_us", "retrans")
    assert ({b.conn_id: {k: v for k, v in b.meta.items() if k not in health}
             for b in collect.batches}
            == {b.conn_id: {k: v for k, v in b.meta.items() if k not in health}
                for b in expected})
    first = events_per_conn(expected)[1][0]
    assert first[1] >= OFFSET_NS and isinstance(first[3], bytes)


def test_a_record_across_the_end_of_the_ring_arrives_whole(ring_factory: Any) -> None:
    rng = random.Random(1)
    ring, reader = ring_factory(16 * 1024, start=16 * 1024 - 256)
    payload = bytes(range(256)) * 20  # 5120 bytes, most of them past the end
    ring.push(record(9, len(payload), 1, rng, payload=payload))
    collect = Collector(reader, 512, 768 * 1024)
    assert collect() == 1
    [[event]] = events_per_conn(collect.batches).values()
    assert event[3] == payload


def test_full_output_buffers_leave_the_rest_in_the_ring(ring_factory: Any) -> None:
    bodies = records(600, seed=3)
    ring, reader = ring_factory(2 << 20)
    ends = [ring.push(body) + ((8 + len(body) + 7) & ~7) for body in bodies]
    # One call with room for 3 runs and ~2 large events: it stops at a record boundary and
    # hands back exactly the space of what it encoded.
    groups = (l7.KsGroup * 3)()
    data = ctypes.create_string_buffer(20_000)
    ngroups, events = reader.group_into(groups, 3, data, len(data), offset_ns=0,
                                        max_events=512, max_bytes=768 * 1024)
    assert 0 < events < 600 and 0 < ngroups <= 3
    assert sum(g.nevents for g in groups[:ngroups]) == events
    assert ring.consumer == ends[events - 1]
    assert sum(g.data_len for g in groups[:ngroups]) <= len(data)
    # The drain loop takes the rest through the same small buffers, losing nothing.
    collect = Collector(reader, 512, 768 * 1024, groups_max=3, data_bytes=20_000)
    assert collect() == 600 - events
    assert ring.consumer == ring.prod
    rest = python_batches(bodies[events:], 512, 768 * 1024)
    assert events_per_conn(collect.batches) == events_per_conn(rest)


def test_stops_at_a_record_being_written_and_skips_discarded_ones(ring_factory: Any) -> None:
    rng = random.Random(2)
    ring, reader = ring_factory(16 * 1024)
    ring.push(record(1, 3, 1, rng, payload=b"one"))
    ring.push(record(1, 7, 2, rng, payload=b"dropped"), DISCARD)
    busy = ring.push(record(2, 3, 3, rng, payload=b"two"), BUSY)
    ring.push(record(1, 5, 4, rng, payload=b"three"))
    collect = Collector(reader, 512, 768 * 1024)
    assert collect() == 1
    assert ring.consumer == busy  # the discarded record is passed, the reserved one waits
    ring.commit(busy)
    assert collect() == 2
    assert ring.consumer == ring.prod
    payloads = {conn: [e[3] for e in evs] for conn, evs in events_per_conn(collect.batches).items()}
    assert payloads == {1: [b"one", b"three"], 2: [b"two"]}


def test_a_record_being_written_at_the_head_is_waited_for(ring_factory: Any) -> None:
    rng = random.Random(6)
    ring, reader = ring_factory(16 * 1024)
    busy = ring.push(record(1, 3, 1, rng, payload=b"one"), BUSY)
    collect = Collector(reader, 512, 768 * 1024)
    assert collect() == 0 and ring.consumer == busy  # nothing yet, and no error
    ring.commit(busy)
    assert collect() == 1 and ring.consumer == ring.prod


def test_more_connections_than_one_call_takes(ring_factory: Any) -> None:
    rng = random.Random(4)
    ring, reader = ring_factory(1 << 20)
    for conn in range(1, 5001):  # past the 4096 connections one ks_ring_group call groups
        ring.push(record(conn, 0, conn, rng, payload=b""))
    collect = Collector(reader, 512, 768 * 1024)
    assert collect() == 5000
    assert sorted(events_per_conn(collect.batches)) == list(range(1, 5001))


def test_output_too_small_for_one_record_is_an_error(ring_factory: Any) -> None:
    rng = random.Random(5)
    ring, reader = ring_factory(16 * 1024)
    ring.push(record(1, 4096, 1, rng))
    collect = Collector(reader, 512, 768 * 1024, data_bytes=1024)
    with pytest.raises(libbpf.ProbeError, match="ks_ring_group"):
        collect()
    assert ring.consumer == 0  # still in the ring


def test_empty_ring_gives_nothing(ring_factory: Any) -> None:
    _ring, reader = ring_factory(4096)
    assert Collector(reader, 512, 768 * 1024)() == 0

