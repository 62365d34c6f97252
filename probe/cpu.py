"""Node CPU and memory, and the top-N processes by CPU, from the kernel's /proc accounting.

Each ``NodeSampler.sample()`` reads ``/proc/stat`` (per-core jiffies), ``/proc/meminfo`` and
``/proc/<pid>/stat`` of every process (utime + stime, which cover all of a process's
threads), and reports what changed since the previous call: per-core utilisation, memory,
and the processes that used the most CPU over the interval, each with its identity
(``identity.py``: pod UID and container id when it runs in one).

Why /proc and not ``sched:sched_switch`` in BPF: /proc costs scale with the number of
processes and the sampling interval, which kubesight chooses; a sched_switch program costs
on every context switch, which the workload chooses, inside the scheduler of every CPU, and
most when the node is busiest. Measured on this 2-vCPU VM (2026-11-27):

- this sampler: ~17 µs of probe CPU per process per sample (os.open/os.read of
  ``/proc/<pid>/stat``): 1.8 ms for 112 processes, 18.6 ms for 1,109; at the default 5 s
  interval 0.04-0.37% of one core, outside any application's path;
- a minimal ``tp_btf/sched_switch`` program (per-CPU last-switch time, per-tgid ns in a hash
  map): 178 ns per switch (``kernel.bpf_stats_enabled``); a pipe ping-pong switching 145k
  times/s then pays 2.6% of a core in the scheduler and ran 3% fewer round trips; this VM
  idles at ~8k switches/s (0.15%). The map would still have to be read and pruned from
  user space each interval.

Top-N over seconds does not need per-switch precision: utime/stime are sampled per tick
(1/CLK_TCK = 10 ms), a tick or two (≤0.4% of a core) over 5 s; tests check them against the
scheduler's own ns accounting in ``/proc/<pid>/schedstat``.

What /proc cannot see: a process that starts and exits between two samples (its time is
added to its parent's ``cutime`` instead). A process that started during the interval is
counted in full, since all of its CPU time was used within it.
"""

from __future__ import annotations

import dataclasses
import heapq
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .identity import IdentityResolver, ProcessIdentity, ProcStat, read_stat

__all__ = ["NodeSample", "NodeSampler", "TopPod", "TopProcess", "cpu_utilisation",
           "read_cpu_jiffies", "read_meminfo"]

CLK_TCK = os.sysconf("SC_CLK_TCK")

# /proc/meminfo field -> the ``kind`` label kubesight reports it under.
MEMINFO_KINDS = {"MemTotal": "total", "MemFree": "free", "MemAvailable": "available",
                 "Buffers": "buffers", "Cached": "cached", "SwapTotal": "swap_total",
                 "SwapFree": "swap_free"}


def read_cpu_jiffies(proc: Path = Path("/proc")) -> dict[str, tuple[int, int]]:
    """``{"all" | "<n>": (busy, total)}`` jiffies per CPU since boot, from /proc/stat."""
    out: dict[str, tuple[int, int]] = {}
    for line in (proc / "stat").read_text().splitlines():
        if not line.startswith("cpu"):
            break  # the cpu lines come first
        name, *fields = line.split()
        # user nice system idle iowait irq softirq steal (guest time is already in user).
        ticks = [int(x) for x in fields[:8]]
        total = sum(ticks)
        idle = ticks[3] + ticks[4]
        out["all" if name == "cpu" else name[3:]] = (total - idle, total)
    return out


def cpu_utilisation(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
                    ) -> dict[str, float]:
    """Busy share 0..1 of each CPU between two ``read_cpu_jiffies()`` readings."""
    out: dict[str, float] = {}
    for cpu, (busy1, total1) in after.items():
        if cpu not in before:
            continue  # came online meanwhile
        busy0, total0 = before[cpu]
        if total1 > total0:
            out[cpu] = min(1.0, max(0.0, (busy1 - busy0) / (total1 - total0)))
    return out


def read_meminfo(proc: Path = Path("/proc")) -> dict[str, int]:
    """Memory in bytes by kind, plus ``used`` = total - available (what cannot be reclaimed)."""
    out: dict[str, int] = {}
    for line in (proc / "meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        kind = MEMINFO_KINDS.get(name)
        if kind is not None:
            out[kind] = int(rest.split()[0]) * 1024  # the kernel prints kB
    if "total" in out and "available" in out:
        out["used"] = out["total"] - out["available"]
    return out


def _boottime() -> float:
    """Seconds since boot on the clock /proc's start times use (it counts suspend too)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclasses.dataclass(frozen=True)
class TopProcess:
    rank: int  # 1 = the process that used the most CPU
    cpu_cores: float  # CPU seconds per second over the interval
    identity: ProcessIdentity
    start_time: float  # unix seconds

    def to_record(self) -> dict[str, Any]:
        ident, cg = self.identity, self.identity.cgroup
        return {"rank": self.rank, "pid": ident.pid, "comm": ident.comm, "exe": ident.exe,
                "cpu_cores": round(self.cpu_cores, 4), "start_time": round(self.start_time, 2),
                "pod_uid": cg.pod_uid, "container_id": cg.container_id, "runtime": cg.runtime,
                "qos": cg.qos}


@dataclasses.dataclass(frozen=True)
class TopPod:
    rank: int
    pod_uid: str
    cpu_cores: float  # summed over the pod's processes
    processes: int  # of the pod's processes, how many used CPU in the interval

    def to_record(self) -> dict[str, Any]:
        return {"rank": self.rank, "pod_uid": self.pod_uid,
                "cpu_cores": round(self.cpu_cores, 4), "processes": self.processes}


@dataclasses.dataclass(frozen=True)
class NodeSample:
    ts: float  # unix seconds at the end of the interval
    interval_s: float
    cpu: dict[str, float]  # per CPU ("0", "1", ...) and "all", 0..1
    memory_bytes: dict[str, int]
    top: list[TopProcess]
    pods: list[TopPod]
    processes: int  # processes scanned
    scan_seconds: float  # CPU time this sample cost the probe

    def to_record(self, node: str, instance: str) -> dict[str, Any]:
        """The ``node.v1`` record (schemas/node.v1.json)."""
        per_cpu = {k: round(v, 4) for k, v in self.cpu.items() if k != "all"}
        return {"v": 1, "node": node, "instance": instance, "ts": self.ts,
                "interval_s": round(self.interval_s, 3), "cpu": per_cpu,
                "cpu_all": round(self.cpu.get("all", 0.0), 4),
                "memory_bytes": self.memory_bytes, "processes": self.processes,
                "scan_seconds": round(self.scan_seconds, 6),
                "top": [p.to_record() for p in self.top],
                "pods": [p.to_record() for p in self.pods]}


class NodeSampler:
    """Call ``sample()`` on a timer; each call reports the interval since the previous one."""

    def __init__(self, *, top_n: int = 10, proc: Path = Path("/proc"),
                 resolver: IdentityResolver | None = None,
                 boottime: Callable[[], float] = _boottime,
                 wall: Callable[[], float] = time.time) -> None:
        self.top_n = top_n
        self._proc = proc
        self.resolver = resolver or IdentityResolver(proc)
        self._boottime = boottime
        self._wall = wall
        self._btime = wall() - boottime()  # unix time of boot, to the µs
        self._prev_at: float | None = None  # boottime of the previous sample
        self._prev_cpu: dict[str, tuple[int, int]] = {}
        self._prev_ticks: dict[int, tuple[int, int]] = {}  # pid -> (start ticks, utime+stime)

    def _scan(self) -> dict[int, ProcStat]:
        stats: dict[int, ProcStat] = {}
        for entry in os.scandir(self._proc):
            if entry.name.isdigit():
                stat = read_stat(int(entry.name), self._proc)
                if stat is not None:
                    stats[stat.pid] = stat
        return stats

    def sample(self) -> NodeSample | None:
        """What happened since the previous call; None on the first call (no interval yet)."""
        cpu0 = time.process_time()
        wall, now = self._wall(), self._boottime()
        if abs(wall - now - self._btime) > 1.0:
            # The wall clock was stepped. Otherwise keep it fixed, so each process's
            # start_time stays the same number from sample to sample (sinks key on it).
            self._btime = wall - now
        cpu = read_cpu_jiffies(self._proc)
        stats = self._scan()
        prev_at, prev_ticks, prev_cpu = self._prev_at, self._prev_ticks, self._prev_cpu
        self._prev_at, self._prev_cpu = now, cpu
        self._prev_ticks = {pid: (s.start_ticks, s.utime + s.stime) for pid, s in stats.items()}
        self.resolver.retain(stats)
        if prev_at is None or now <= prev_at:
            return None
        interval = now - prev_at
        # A pid absent last time whose process started after that sample: all its CPU time is
        # from this interval (a tick of slack: start times are in whole ticks).
        new_since = int(prev_at * CLK_TCK) - 1
        used: list[tuple[int, int]] = []  # (ticks in the interval, pid)
        for pid, s in stats.items():
            ticks = s.utime + s.stime
            before = prev_ticks.get(pid)
            if before is not None and before[0] == s.start_ticks:
                ticks -= before[1]
            elif s.start_ticks < new_since:
                continue  # seen for the first time, but older than the previous sample
            if ticks > 0:
                used.append((ticks, pid))
        top, pods = self._rank(used, stats, interval)
        return NodeSample(
            ts=wall, interval_s=interval, cpu=cpu_utilisation(prev_cpu, cpu),
            memory_bytes=read_meminfo(self._proc), top=top, pods=pods, processes=len(stats),
            scan_seconds=time.process_time() - cpu0)

    def _rank(self, used: list[tuple[int, int]], stats: dict[int, ProcStat],
              interval: float) -> tuple[list[TopProcess], list[TopPod]]:
        per_tick = 1.0 / (CLK_TCK * interval)
        identities: list[tuple[int, ProcessIdentity]] = []
        for ticks, pid in used:  # few per interval; identities are cached per pid
            ident = self.resolver.identify(pid, stats[pid])
            if ident is not None:
                identities.append((ticks, ident))
        top = [TopProcess(rank, ticks * per_tick, ident,
                          self._btime + ident.start_ticks / CLK_TCK)
               for rank, (ticks, ident) in enumerate(
                   heapq.nlargest(self.top_n, identities, key=lambda t: (t[0], -t[1].pid)),
                   start=1)]
        pod_ticks: dict[str, list[int]] = {}
        for ticks, ident in identities:
            if ident.pod_uid:
                acc = pod_ticks.setdefault(ident.pod_uid, [0, 0])
                acc[0] += ticks
                acc[1] += 1
        ranked = heapq.nlargest(self.top_n, pod_ticks.items(), key=lambda kv: (kv[1][0], kv[0]))
        pods = [TopPod(rank, uid, ticks * per_tick, n)
                for rank, (uid, (ticks, n)) in enumerate(ranked, start=1)]
        return top, pods
