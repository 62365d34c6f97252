"""The benchmark build that batches events per CPU in the kernel (l7_batch.bpf.o, bench mode
capture-batch): the reader's flush, run on every CPU with BPF_PROG_TEST_RUN, hands over what a
CPU staged, and nothing is lost or reordered on the way.

Real programs on this kernel, a real loopback TCP conversation in a child process pinned to
one CPU (the probe never reports its own process).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kubesight.probe.l7 import L7_DATA_IN, L7_DATA_OUT, L7EventHeader, L7Probe

from bench.probe_overhead import flush_stages

pytestmark = pytest.mark.bpf

ROUNDS = 20
HEAD = ctypes.sizeof(L7EventHeader)  # offsetof(struct l7_event, payload)
CHILD = f"""
import socket
srv = socket.create_server(("127.0.0.1", 0))
cli = socket.create_connection(srv.getsockname())
peer, _ = srv.accept()
for i in range({ROUNDS}):
    cli.sendall(b"ping-%03d" % i)
    assert peer.recv(64) == b"ping-%03d" % i
    peer.sendall(b"pong-%03d" % i)
    assert cli.recv(64) == b"pong-%03d" % i
"""


def events_of(records: list[bytes], tgid: int) -> tuple[list[tuple[int, int, bytes]], int]:
    """(kind, conn_id, payload) of tgid's data events, in ring order, and how many of them
    came in records that hold more than one event (a flushed stage)."""
    out: list[tuple[int, int, bytes]] = []
    batched = 0
    for body in records:
        off, found = 0, []
        while off + HEAD <= len(body):
            head = L7EventHeader.from_buffer_copy(body, off)
            found.append((head, body[off + HEAD:off + HEAD + head.cap_len]))
            off += (HEAD + head.cap_len + 7) & ~7
        for head, payload in found:
            if head.tgid == tgid and head.kind in (L7_DATA_IN, L7_DATA_OUT):
                out.append((head.kind, head.conn_id, payload))
                batched += len(found) > 1
    return out, batched


def drained(probe: L7Probe) -> list[bytes]:
    """Every record in the ring now, as bytes (ks_ring_drain's [u32 len][body] runs)."""
    records: list[bytes] = []

    def take(view: memoryview, used: int) -> None:
        pos = 0
        while pos < used:
            n = int.from_bytes(view[pos:pos + 4], "little")
            records.append(bytes(view[pos + 4:pos + 4 + n]))
            pos += 4 + n

    reader = probe._reader  # noqa: SLF001 (the records themselves, not decoded events)
    assert reader is not None
    reader.drain(take)
    return records


def test_a_flush_on_every_cpu_hands_over_every_staged_event_in_order(bpf_root: Path) -> None:
    if not (bpf_root / "l7_batch.bpf.o").exists():
        pytest.skip("l7_batch.bpf.o not built (make -C bpf)")
    cpus = sorted(os.sched_getaffinity(0))
    with L7Probe(bpf_dir=bpf_root, build="l7_batch.bpf.o", tls=False) as probe:
        obj = probe._obj  # noqa: SLF001 (the flush program is not part of L7Probe)
        assert obj is not None
        drained(probe)
        subprocess.run(["taskset", "-c", str(cpus[0]), sys.executable, "-c", CHILD],
                       timeout=60, check=True)
        before = drained(probe)
        flush_stages(obj, cpus)  # RuntimeError if a CPU stays mid-append
        after = drained(probe)

    pid = _child_pid_from(before + after)
    events, batched = events_of(before + after, pid)
    sent = [b"ping-%03d" % i for i in range(ROUNDS)]
    answered = [b"pong-%03d" % i for i in range(ROUNDS)]
    by_conn: dict[int, list[tuple[int, bytes]]] = {}
    for kind, conn, payload in events:
        by_conn.setdefault(conn, []).append((kind, payload))
    # Two sockets, each with every send and receive once, in the order they happened.
    assert sorted(by_conn.values()) == sorted([
        [x for i in range(ROUNDS) for x in ((L7_DATA_OUT, sent[i]), (L7_DATA_IN, answered[i]))],
        [x for i in range(ROUNDS) for x in ((L7_DATA_IN, sent[i]), (L7_DATA_OUT, answered[i]))],
    ])
    # Past each connection's first event (sent to the ring directly) they were staged.
    assert batched >= 4 * ROUNDS - 2


def _child_pid_from(records: list[bytes]) -> int:
    """The tgid whose data events carry the child's pings (its pid: it ran to completion)."""
    for body in records:
        off = 0
        while off + HEAD <= len(body):
            head = L7EventHeader.from_buffer_copy(body, off)
            if body[off + HEAD:off + HEAD + head.cap_len] == b"ping-000":
                return int(head.tgid)
            off += (HEAD + head.cap_len + 7) & ~7
    pytest.fail("no event carries the child's first ping")
