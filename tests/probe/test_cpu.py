"""Node CPU, memory and top-N from /proc: exact arithmetic on a /proc tree in the kernel's
formats, then a real CPU hog in a kubelet-style cgroup ranked first with its pod."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from kubesight.probe.cpu import (
    CLK_TCK,
    NodeSampler,
    cpu_utilisation,
    read_cpu_jiffies,
    read_meminfo,
)
from kubesight.schemas import validate

from tests.cgroups import can_make_cgroups, cgroup_mount, cpu_hog, pod_cgroup

UID = "8d1e6a52-93c4-4f0b-b7a1-2c5e9f3d4a60"
CID = "c0ffee" + "0" * 58

MEMINFO = """MemTotal:        8000000 kB
MemFree:         1000000 kB
MemAvailable:    3000000 kB
Buffers:          100000 kB
Cached:          1500000 kB
SwapCached:            0 kB
SwapTotal:             0 kB
SwapFree:              0 kB
"""


def _proc_stat(cpus: list[list[int]]) -> str:
    total = [sum(col) for col in zip(*cpus, strict=True)]
    lines = [f"cpu  {' '.join(map(str, total))}"]
    lines += [f"cpu{i} {' '.join(map(str, c))}" for i, c in enumerate(cpus)]
    return "\n".join([*lines, "intr 1 2 3", "ctxt 123", "btime 1700000000", "processes 9"]) + "\n"


def _pid(root: Path, pid: int, comm: str, ticks: int, start: int, cgroup: str = "/") -> None:
    d = root / str(pid)
    d.mkdir(exist_ok=True)
    (d / "stat").write_text(f"{pid} ({comm}) R 1 {pid} {pid} 0 -1 0 0 0 0 0 {ticks} 0 0 0 20 0 "
                            f"1 0 {start} 0 0\n")
    (d / "cgroup").write_text(f"0::{cgroup}\n")


def test_cpu_utilisation_per_core() -> None:
    before = {"0": (0, 1000), "1": (0, 1000)}
    after = {"0": (75, 1100), "1": (100, 1100), "2": (5, 10)}  # cpu2 came online meanwhile
    assert cpu_utilisation(before, after) == {"0": 0.75, "1": 1.0}


def test_sampler_arithmetic_on_a_proc_tree(tmp_path: Path) -> None:
    """Deltas per process; a process new since the last sample counts in full; a reused pid
    is a new process, not a negative delta; identities come with the top-N."""
    clock = [100.0]
    (tmp_path / "meminfo").write_text(MEMINFO)
    #       user nice system idle iowait irq softirq steal guest guest_nice
    idle = [0, 0, 0, 1000, 0, 0, 0, 0, 0, 0]
    (tmp_path / "stat").write_text(_proc_stat([idle, idle]))
    pod = f"/kubepods/besteffort/pod{UID}/{CID}"
    t = CLK_TCK
    _pid(tmp_path, 10, "hog", ticks=1000, start=5 * t, cgroup=pod)
    _pid(tmp_path, 12, "old", ticks=5000, start=10 * t)
    _pid(tmp_path, 14, "idle", ticks=70, start=10 * t)
    sampler = NodeSampler(top_n=3, proc=tmp_path, boottime=lambda: clock[0],
                          wall=lambda: 1_700_000_000 + clock[0])  # booted at 1_700_000_000
    assert sampler.sample() is None  # the baseline

    clock[0] = 102.0  # two seconds later
    cpu0 = [150, 0, 50, 1000 + 0, 0, 0, 0, 0, 0, 0]  # 200 of 200 ticks busy
    cpu1 = [40, 0, 10, 1000 + 150, 0, 0, 0, 0, 0, 0]  # 50 of 200
    (tmp_path / "stat").write_text(_proc_stat([cpu0, cpu1]))
    _pid(tmp_path, 10, "hog", ticks=1000 + 2 * t, start=5 * t, cgroup=pod)  # 1 core
    _pid(tmp_path, 11, "new", ticks=t // 2, start=int(101 * t))  # started 1 s ago: 0.25 core
    _pid(tmp_path, 12, "reused", ticks=t // 5, start=int(100.5 * t))  # pid reused: 0.1 core
    # pid 14 used nothing; a pid seen for the first time but older than the baseline is
    # skipped (its CPU time is not from this interval)
    _pid(tmp_path, 15, "missed", ticks=999, start=50 * t)
    sample = sampler.sample()
    assert sample is not None and sample.interval_s == 2.0 and sample.ts == 1_700_000_102
    assert [(p.identity.pid, p.identity.comm, round(p.cpu_cores, 3)) for p in sample.top] == [
        (10, "hog", 1.0), (11, "new", 0.25), (12, "reused", 0.1)]
    assert [p.rank for p in sample.top] == [1, 2, 3]
    hog = sample.top[0]
    assert (hog.identity.pod_uid, hog.identity.container_id) == (UID, CID)
    assert hog.start_time == 1700000000 + 5
    assert [(p.pod_uid, p.cpu_cores, p.processes) for p in sample.pods] == [(UID, 1.0, 1)]
    assert sample.cpu == {"all": 0.625, "0": 1.0, "1": 0.25}
    assert sample.memory_bytes == {
        "total": 8_192_000_000, "free": 1_024_000_000, "available": 3_072_000_000,
        "buffers": 102_400_000, "cached": 1_536_000_000, "swap_total": 0, "swap_free": 0,
        "used": 5_120_000_000}
    assert sample.processes == 5
    record = sample.to_record("node-a", "probe-1")
    validate("node.v1", record)
    assert record["top"][0]["pod_uid"] == UID and record["cpu"] == {"0": 1.0, "1": 0.25}

    clock[0] = 103.0  # the hog again: same process, same start_time (sinks key on it)
    _pid(tmp_path, 10, "hog", ticks=1000 + 3 * t, start=5 * t, cgroup=pod)
    again = sampler.sample()
    assert again is not None and again.top[0].cpu_cores == 1.0
    assert again.top[0].to_record()["start_time"] == record["top"][0]["start_time"]


def test_meminfo_and_jiffies_of_this_host() -> None:
    mem = read_meminfo()
    assert mem["total"] > mem["available"] > 0
    assert mem["used"] == mem["total"] - mem["available"]
    cpus = read_cpu_jiffies()
    assert set(cpus) == {"all", *(str(i) for i in range(os.cpu_count() or 0))}
    assert all(0 <= busy <= total for busy, total in cpus.values())


V2 = cgroup_mount("cgroup2")


def _ran_ns(pid: int) -> int:
    """Time on CPU from the scheduler's own nanosecond accounting (not utime/stime ticks)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def _wait_comm(pid: int, comm: str) -> None:
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/comm").read_text().strip() != comm:
        assert time.monotonic() < deadline, f"pid {pid} never named itself {comm}"
        time.sleep(0.01)


def test_cpu_hog_in_a_pod_ranks_first_with_about_one_core() -> None:
    """A hog that stops itself after a few seconds, in a kubelet-style cgroup. The machine is
    shared (another busy process may tie with the hog for a while), so we sample 1 s
    intervals until one ranks the hog first; there it must have the CPU the scheduler
    measured, most of a core."""
    if not can_make_cgroups(V2):
        pytest.skip("no writable cgroup v2 hierarchy here (needs root)")
    assert V2 is not None
    with pod_cgroup(V2, driver="systemd", runtime="containerd", qos="burstable") as pod:
        hog = pod.spawn(cpu_hog(12.0))
        _wait_comm(hog.pid, "ks-cpu-hog")
        sampler = NodeSampler(top_n=10)
        sampler.sample()
        ran = _ran_ns(hog.pid)
        deadline = time.monotonic() + 10
        seen = []
        while True:
            assert time.monotonic() < deadline, f"the hog was never ranked first: {seen}"
            time.sleep(1.0)  # one sampling interval
            sample = sampler.sample()
            ran, ran_before = _ran_ns(hog.pid), ran
            assert sample is not None
            truth = (ran - ran_before) / 1e9 / sample.interval_s
            seen.append((round(truth, 2), [(p.identity.comm, round(p.cpu_cores, 2))
                                           for p in sample.top[:3]]))
            if sample.top and sample.top[0].identity.pid == hog.pid:
                break
        first = sample.top[0]
        assert first.identity.comm == "ks-cpu-hog"
        assert (first.identity.pod_uid, first.identity.container_id) == (pod.pod_uid,
                                                                       pod.container_id)
        # utime+stime (10 ms ticks) against the scheduler's ns: a couple of ticks apart.
        assert abs(first.cpu_cores - truth) <= 0.05, seen[-1]
        assert first.cpu_cores >= 0.5, seen[-1]
        assert sample.pods[0].pod_uid == pod.pod_uid
        # Per-core shares: one per online CPU, each 0..1, and together they hold the hog.
        cores = {k: v for k, v in sample.cpu.items() if k != "all"}
        assert len(cores) == os.cpu_count()
        assert all(0.0 <= v <= 1.0 for v in cores.values())
        assert sum(cores.values()) >= first.cpu_cores - 0.05
        # The "cpu" line and the per-core lines of /proc/stat are each rounded to jiffies
        # and each core's busy share is capped at 1.0: over one interval they agree within
        # a few hundredths (seen: 0.0201), not exactly.
        assert abs(sample.cpu["all"] - sum(cores.values()) / len(cores)) < 0.05
        validate("node.v1", sample.to_record("this-node", "test"))
