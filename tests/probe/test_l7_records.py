"""How events travel from the kernel to per-connection batches, on this kernel.

The fast build writes each event straight into its ring-buffer record where the kernel has
bpf_probe_read_user_dynptr (Linux >= 6.16) and builds it in per-CPU scratch otherwise; the
probe drains records grouped by connection in C (libksdrain.so) or, without it, in Python.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import msgpack
import pytest
from kubesight.probe.l7 import (
    DIRECT_RECORDS_KFUNC,
    L7_ACCEPT,
    L7_CLOSE,
    L7_DATA_IN,
    L7_DATA_OUT,
    ConnectionBatch,
    L7Probe,
)
from kubesight.probe.libbpf import kernel_has_kfunc

from .conftest import REPO, Nginx, wrk_while_draining

pytestmark = pytest.mark.bpf


def curl(url: str) -> int:
    proc = subprocess.Popen(["curl", "-sS", "-o", "/dev/null", "--http1.1", url])
    assert proc.wait(timeout=10) == 0
    return proc.pid


def helper_calls(probe: L7Probe, section: str) -> set[str]:
    """The helpers and kfuncs one loaded program calls, from its translated code."""
    assert probe._obj is not None
    fd = probe._obj.program_fds()[section]
    fdinfo = Path(f"/proc/self/fdinfo/{fd}").read_text()
    prog_id = re.search(r"prog_id:\s+(\d+)", fdinfo).group(1)  # type: ignore[union-attr]
    out = subprocess.run(["bpftool", "prog", "dump", "xlated", "id", prog_id], check=True,
                         capture_output=True, text=True).stdout
    return set(re.findall(r"call (\w+)", out))


class Drained:
    """Every batch drain_into produced, and the events in them per connection."""

    def __init__(self) -> None:
        self.opened: dict[int, ConnectionBatch] = {}
        self.sealed: list[ConnectionBatch] = []
        self.count = 0

    def drain(self, probe: L7Probe) -> None:
        self.count += probe.drain_into(self.opened, self.sealed, offset_ns=0, max_events=64,
                                       max_bytes=768 * 1024)

    def events(self, tgids: set[int]) -> list[tuple[dict[str, Any], list[Any]]]:
        out = []
        for batch in self.sealed + list(self.opened.values()):
            if batch.meta["tgid"] in tgids:
                unpacker = msgpack.Unpacker(raw=False)
                for run in batch.encoded:
                    unpacker.feed(run)
                out.append((batch.meta, list(unpacker)))
        return out


def drain_until(probe: L7Probe, drained: Drained, tgids: set[int], kind: int,
                timeout: float = 10.0) -> None:
    stop = threading.Event()
    timer = threading.Timer(timeout, stop.set)
    timer.start()
    try:
        while not stop.wait(0.01):
            drained.drain(probe)
            if any(ev[0] == kind for _, evs in drained.events(tgids) for ev in evs):
                return
    finally:
        timer.cancel()


def test_fast_build_writes_events_in_place_where_the_kernel_can(bpf_root: Path) -> None:
    with L7Probe(bpf_dir=bpf_root) as probe:
        calls = helper_calls(probe, "tp_btf/sock_recv_length")
    in_place = kernel_has_kfunc(DIRECT_RECORDS_KFUNC)
    assert probe.events_in_place == in_place
    assert ("bpf_ringbuf_reserve_dynptr" in calls) == in_place
    assert ("bpf_ringbuf_output" in calls) == (not in_place)


def test_fast_build_without_the_kfunc_builds_events_in_scratch(bpf_root: Path, nginx: Nginx,
                                                               tmp_path: Path) -> None:
    """A kernel before 6.16 (no bpf_probe_read_user_dynptr) still runs the fast build: here
    the kfunc's name is changed at compile time to one no kernel has."""
    subprocess.run(["clang", "-O2", "-g", "-Wall", "-Werror", "-target", "bpf",
                    "-D__TARGET_ARCH_x86", f"-I{bpf_root}", "-I/usr/include",
                    "-I/usr/include/x86_64-linux-gnu",
                    f"-D{DIRECT_RECORDS_KFUNC}=ks_no_such_kfunc", "-c",
                    str(REPO / "bpf" / "l7.bpf.c"), "-o", str(tmp_path / "l7.bpf.o")],
                   check=True)
    shutil.copy(bpf_root / "libksdrain.so", tmp_path)
    drained = Drained()
    with L7Probe(bpf_dir=tmp_path, build="l7.bpf.o") as probe:
        calls = helper_calls(probe, "tp_btf/sock_recv_length")
        pid = curl(nginx.url())
        drain_until(probe, drained, {pid}, L7_CLOSE)
    assert "bpf_ringbuf_output" in calls and "bpf_ringbuf_reserve_dynptr" not in calls
    [(meta, events)] = drained.events({pid})
    assert meta["comm"] == "curl"
    assert [ev[3][:4] for ev in events if ev[0] == L7_DATA_OUT] == [b"GET "]
    assert [ev[3][:12] for ev in events if ev[0] == L7_DATA_IN] == [b"HTTP/1.1 200"]


@pytest.mark.parametrize("drain_so", [True, False], ids=["c-grouped", "python-grouped"])
def test_drain_into_batches_real_traffic(bpf_root: Path, nginx: Nginx, tmp_path: Path,
                                         drain_so: bool) -> None:
    bpf_dir = bpf_root
    if not drain_so:
        shutil.copy(bpf_root / "l7.bpf.o", tmp_path)  # no libksdrain.so next to it
        bpf_dir = tmp_path
    drained = Drained()
    with L7Probe(bpf_dir=bpf_dir) as probe:
        assert probe.drain_mode == ("c-batch" if drain_so else "ctypes-callback")
        pid = curl(nginx.url("/big"))
        drain_until(probe, drained, {pid}, L7_CLOSE)
        drain_until(probe, drained, nginx.workers, L7_CLOSE)
    [(meta, events)] = drained.events({pid})
    assert (meta["comm"], meta["role"], meta["raddr"], meta["rport"]) == (
        "curl", 1, "127.0.0.1", nginx.port)
    sent = [ev[3] for ev in events if ev[0] == L7_DATA_OUT]
    assert len(sent) == 1 and sent[0].startswith(b"GET /big HTTP/1.1\r\n")
    received = b"".join(ev[3] for ev in events if ev[0] == L7_DATA_IN)
    assert received.startswith(b"HTTP/1.1 200") and received.endswith(b"x" * 2000)
    assert meta["srtt_us"] > 0
    server = [evs for m, evs in drained.events(nginx.workers) if m["rport"] == meta["lport"]]
    assert [ev[0] for ev in server[0]][:2] == [L7_ACCEPT, L7_DATA_IN]


def test_wrk_through_a_small_ring_loses_no_request(bpf_root: Path, nginx: Nginx) -> None:
    """The ring wraps around several times; drain_into (grouped in C) takes every record once.
    One wrk thread on four connections leaves the drain thread some CPU on two cores: the
    ring holds ~300 ms of this traffic."""
    drained = Drained()
    tick = threading.Event()  # never set: its wait() is the drain loop's 10 ms timer

    def drain(_wrk: subprocess.Popen[str]) -> None:
        tick.wait(0.01)
        drained.drain(probe)

    with L7Probe(ringbuf_bytes=8 << 20, bpf_dir=bpf_root) as probe:
        out, wrk_pid = wrk_while_draining(nginx.url(), ["-t1", "-c4", "-d3s"], drain)

        def requests(tgids: set[int], kind: int) -> int:
            return sum(1 for _, evs in drained.events(tgids) for ev in evs
                       if ev[0] == kind and ev[3].startswith(b"GET "))

        completed = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        for _ in range(100):  # until both ends have seen every request wrk completed
            drained.drain(probe)
            if min(requests({wrk_pid}, L7_DATA_OUT),
                   requests(nginx.workers, L7_DATA_IN)) >= completed:
                break
            tick.wait(0.05)
        counters = probe.counters()
        drained.drain(probe)
    sent, read = requests({wrk_pid}, L7_DATA_OUT), requests(nginx.workers, L7_DATA_IN)
    assert counters["ringbuf_drops"] == 0
    assert completed * 4 * (8 + 104) > 8 << 20  # more went through than the ring holds
    # At most one request in flight per connection when wrk stops; nginx may not read one
    # whose connection wrk resets (test_l7_capture.test_wrk_load_loses_no_request).
    assert completed <= read <= sent <= completed + 4, (completed, read, sent)
    assert drained.count >= counters["events"]  # every record sent was drained
