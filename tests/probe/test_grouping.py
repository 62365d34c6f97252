"""The C grouping (bpf/drain.c ks_group) and the Python fallback build the same batches."""

from __future__ import annotations

import ctypes
import random
from pathlib import Path
from typing import Any

import msgpack
import pytest
from kubesight.probe import l7, libbpf

SO = Path(__file__).resolve().parents[2] / "bpf" / "build" / "libksdrain.so"


def records(n: int, seed: int = 7) -> bytes:
    rng = random.Random(seed)
    out = bytearray()
    for i in range(n):
        cap = rng.choice([0, 1, 17, 255, 256, 300, 4096, 8192])
        hdr = l7.L7EventHeader(kind=rng.choice([1, 3, 4, 5]), role=rng.choice([0, 1, 2]),
                               family=2, lport=1000 + i % 3, rport=80, tgid=42,
                               conn_id=1 + rng.randrange(5), ts_ns=10_000 + i,
                               size=rng.choice([cap, cap + 100, -115]), cap_len=cap)
        hdr.laddr[:4] = [127, 0, 0, 1]
        hdr.raddr[:4] = [127, 0, 0, 2]
        hdr.comm = b"curl"
        body = bytes(hdr) + bytes(rng.randrange(256) for _ in range(cap))
        out += len(body).to_bytes(4, "little") + body
    return bytes(out)


def unpack(batches: list[l7.ConnectionBatch]) -> dict[int, list[Any]]:
    per_conn: dict[int, list[Any]] = {}
    for b in batches:
        unpacker = msgpack.Unpacker(raw=False)
        for run in b.encoded:
            unpacker.feed(run)
        events = list(unpacker)
        assert len(events) == b.n
        per_conn.setdefault(b.conn_id, []).extend(events)
    return per_conn


@pytest.mark.skipif(not SO.exists(), reason="run `make bpf` to build libksdrain.so")
@pytest.mark.parametrize(("max_events", "max_bytes"), [(512, 768 * 1024), (7, 20_000)])
def test_c_and_python_grouping_agree(max_events: int, max_bytes: int) -> None:
    buf = records(600)
    offset = 5_000_000_000
    lib = libbpf._DrainLib(SO)
    groups = (libbpf.KsGroup * 4096)()
    data = ctypes.create_string_buffer(len(buf))
    n = lib.group(buf, len(buf), offset, max_events, max_bytes, groups, 4096, data, len(data))
    assert n > 0
    c_open: dict[int, l7.ConnectionBatch] = {}
    c_sealed: list[l7.ConnectionBatch] = []
    count = l7.group_runs(memoryview(buf), groups, n, memoryview(data).cast("B"), c_open,
                          c_sealed, {}, max_events, max_bytes)
    p_open: dict[int, l7.ConnectionBatch] = {}
    p_sealed: list[l7.ConnectionBatch] = []
    assert l7.decode_grouped(memoryview(buf), len(buf), offset, p_open, p_sealed, {},
                             max_events, max_bytes) == count == 600
    c_batches, p_batches = c_sealed + list(c_open.values()), p_sealed + list(p_open.values())
    assert unpack(c_batches) == unpack(p_batches)
    for batch in c_batches + p_batches:
        assert batch.n <= max_events and batch.nbytes <= max_bytes
        assert batch.meta["laddr"] == "127.0.0.1" and batch.meta["comm"] == "curl"
    first = unpack(p_batches)[1][0]
    assert first[1] >= offset and isinstance(first[3], bytes)
