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
from kubesight.probe.publisher import Publisher

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



# ---- batches held in libksdrain across drain calls (ks_ring_group_batches) ------------------


class Produced:
    """Stands in for the Kafka producer: keeps every (key, value) it is handed, in order."""

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bytes]] = []

    def produce(self, _topic: str, value: bytes, key: bytes, on_delivery: Any) -> None:
        self.messages.append((key, value))

    def poll(self, _timeout: float) -> int:
        return 0


def publisher() -> tuple[Publisher, Produced]:
    out = Produced()
    clock = lambda: (OFFSET_NS + 1_000, 1_000)  # noqa: E731 - offset = OFFSET_NS
    return Publisher(producer=out, topic="t", node="n1", probe_id="p1", clock=clock), out  # type: ignore[arg-type]


def mixed_records(n: int, seed: int, conns: int = 4) -> list[bytes]:
    """Records whose metadata order varies by connection: TLS before or after the first RTT,
    events without RTT (connect, close) last in a drain."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        conn = 1 + rng.randrange(conns)
        out.append(record(conn, rng.choice([0, 40, 850, 300, 4096]), 10_000 + i, rng,
                          flags=l7.L7_FLAG_TLS if rng.random() < 0.1 else 0,
                          srtt_us=rng.choice([0, 0, 50, 120, 77])))
    return out


def held_messages(bodies: list[bytes], periods: list[int], max_events: int, max_bytes: int,
                  ring: FakeRing, reader: libbpf.RingReader,
                  drain_odds: float) -> list[tuple[bytes, bytes]]:
    """Messages of the held-batch path: records pushed into the ring and drained at random
    points (and when it is full), flushed after each period."""
    drain = l7.GroupedDrain(reader)
    pub, out = publisher()
    rng = random.Random(12)
    for start, end in zip([0, *periods], [*periods, len(bodies)], strict=True):
        for body in bodies[start:end]:
            if ring.free() < len(body) + 8 or rng.random() < drain_odds:
                drain.drain_into(pub.open, pub.sealed, {}, offset_ns=OFFSET_NS,
                                 max_events=max_events, max_bytes=max_bytes)
            ring.push(body)
        drain.drain_into(pub.open, pub.sealed, {}, offset_ns=OFFSET_NS, max_events=max_events,
                         max_bytes=max_bytes)
        pub.flush()
    assert ring.consumer == ring.prod
    return out.messages


@pytest.mark.parametrize("max_events", [512, 7])
def test_messages_spanning_drains_are_the_fallbacks(ring_factory: Any, max_events: int) -> None:
    """Each connection's message grows over many drain calls and two flushes and is sealed
    event by event where the Python fallback seals it, with the same metadata."""
    bodies = mixed_records(900, seed=11)
    ring, reader = ring_factory(64 * 1024, start=64 * 1024 - 40)
    held = held_messages(bodies, [500], max_events, 768 * 1024, ring, reader, 0.05)
    pub, out = publisher()
    for period in (bodies[:500], bodies[500:]):
        buf = b"".join(len(b).to_bytes(4, "little") + b for b in period)
        l7.decode_grouped(buf, len(buf), OFFSET_NS, pub.open, pub.sealed, {}, max_events,
                          768 * 1024)
        pub.flush()
    assert len(held) >= 8  # 4 connections, 2 flushes, and the splits
    # Keys, and heads to the byte (meta keys in the same order); the events' bytes differ
    # where C writes ts and size as 64-bit ints and packb in fewer bytes.
    assert [(k, v[:v.index(b"\xa6events")], msgpack.unpackb(v)) for k, v in held] \
        == [(k, v[:v.index(b"\xa6events")], msgpack.unpackb(v)) for k, v in out.messages]


@pytest.mark.parametrize(("max_events", "max_bytes"), [(1000, 9_000), (7, 20_000)])
def test_where_drain_calls_fall_does_not_change_the_messages(ring_factory: Any,
                                                             max_events: int,
                                                             max_bytes: int) -> None:
    """Split at max_bytes (or max_events) across drain calls: byte for byte the messages of
    one drain call per flush."""
    bodies = mixed_records(900, seed=11)
    ring, reader = ring_factory(64 * 1024, start=64 * 1024 - 40)
    many = held_messages(bodies, [300, 500], max_events, max_bytes, ring, reader, 0.05)
    ring, reader = ring_factory(4 << 20)
    once = held_messages(bodies, [300, 500], max_events, max_bytes, ring, reader, 0.0)
    assert len(many) > 3 * 4
    assert many == once
    for _key, value in many:
        events = msgpack.unpackb(value)["events"]
        assert len(events) <= max_events
        encoded = len(value) - value.index(b"\xa6events") - 7 - (1 if len(events) < 16 else 3)
        assert encoded <= max_bytes or len(events) == 1  # a first event may be bigger alone


def test_split_at_max_bytes_between_drain_calls(ring_factory: Any) -> None:
    rng = random.Random(13)
    ring, reader = ring_factory(64 * 1024)
    collect = Collector(reader, 512, 2_000)
    for i in range(5):  # one event per call: 3 fit in 2,000 bytes, the 4th opens a batch
        ring.push(record(1, 600, i, rng, payload=bytes([i]) * 600))
        assert collect() == 1
    assert [b.n for b in collect.batches] == [3, 2]
    assert [b.nbytes for b in collect.batches] == [3 * 623, 2 * 623]  # 600 + 23 of msgpack
    assert [[e[3][0] for e in evs] for evs in (events_per_conn([b])[1] for b in
                                               collect.batches)] == [[0, 1, 2], [3, 4]]


def test_released_batches_give_their_connection_a_new_one(ring_factory: Any) -> None:
    """A flush releases every batch (and with them the connection table's entries, thousands,
    in any order); the next events open new batches, none is lost or misfiled."""
    rng = random.Random(14)
    ring, reader = ring_factory(1 << 20)
    drain = l7.GroupedDrain(reader)
    pub, out = publisher()
    conns = list(range(1, 3001))
    for round_ in range(3):
        rng.shuffle(conns)
        for conn in conns:
            ring.push(record(conn, 2, round_, rng, payload=round_.to_bytes(2, "big")))
        assert drain.drain_into(pub.open, pub.sealed, {}, offset_ns=OFFSET_NS, max_events=512,
                                max_bytes=768 * 1024) == 3000
        assert not pub.sealed and len(pub.open) == 3000
        if round_ == 1:  # dropped, not flushed: the batches give their buffers back too
            pub.open.clear()
            continue
        for batch in rng.sample(list(pub.open.values()), 3000):  # release in random order
            batch.release()
        pub.open.clear()
    assert drain.drain_into(pub.open, pub.sealed, {}, offset_ns=OFFSET_NS, max_events=512,
                            max_bytes=768 * 1024) == 0
    for conn in conns[:100]:
        ring.push(record(conn, 2, 9, rng, payload=b"xy"))
    drain.drain_into(pub.open, pub.sealed, {}, offset_ns=OFFSET_NS, max_events=512,
                     max_bytes=768 * 1024)
    assert pub.flush() == 100
    assert sorted(int(key.rsplit(b"/", 1)[1]) for key, _ in out.messages) == sorted(conns[:100])
    assert all(msgpack.unpackb(v)["events"][0][3] == b"xy" for _, v in out.messages)


def test_a_head_longer_than_the_room_before_the_events(ring_factory: Any) -> None:
    rng = random.Random(15)
    ring, reader = ring_factory(64 * 1024)
    for i in range(3):
        ring.push(record(1, 100, i, rng))
    collect = Collector(reader, 512, 768 * 1024)
    assert collect() == 3
    [batch] = collect.batches
    [events] = batch.encoded
    for head in (b"h" * 10, b"H" * 5000, b"h" * 10):  # the events move up once, and stay
        assert batch.value(head) == head + events
    batch.release()
    with pytest.raises(ValueError, match="released"):
        batch.value(b"")
    assert batch.n == 3  # the counts as of the release


def test_events_are_encoded_as_ks_ring_group_encodes_them(ring_factory: Any) -> None:
    """The message's events are byte for byte the runs ks_ring_group wrote (the drain before
    batches were held), here where one call takes every record."""
    bodies = records(300, seed=16)
    old_ring, old_reader = ring_factory(1 << 20)
    new_ring, new_reader = ring_factory(1 << 20)
    for body in bodies:
        old_ring.push(body)
        new_ring.push(body)
    groups = (l7.KsGroup * 64)()
    data = ctypes.create_string_buffer(4 << 20)
    ngroups, events = old_reader.group_into(groups, 64, data, len(data), offset_ns=OFFSET_NS,
                                            max_events=512, max_bytes=768 * 1024)
    assert events == 300
    runs = {g.conn_id: data.raw[g.data_off:g.data_off + g.data_len] for g in groups[:ngroups]}
    collect = Collector(new_reader, 512, 768 * 1024)
    assert collect() == 300
    assert {b.conn_id: b"".join(b.encoded) for b in collect.batches} == runs
    for batch in collect.batches:
        head = b"head"
        assert batch.value(head) == head + runs[batch.conn_id]
