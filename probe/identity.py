"""Who a process is: PID → cgroup → container id and pod UID, or the bare process on a host.

Kubelet puts every container in a cgroup whose path names the pod and the container, in one of
a few spellings that depend on the cgroup driver and the container runtime::

    systemd   /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_>.slice/
              cri-containerd-<id>.scope | crio-<id>.scope | docker-<id>.scope
    cgroupfs  /kubepods/burstable/pod<uid>/<id>          (containerd, dockershim)
              /kubepods/besteffort/pod<uid>/crio-<id>    (CRI-O)
    Docker    /docker/<id>, /system.slice/docker-<id>.scope   (no pod)

Guaranteed pods have no QoS level (``/kubepods/pod<uid>``, ``kubepods-pod<uid>.slice``);
nested nodes (kind, k3d) add a prefix (``/docker/<node id>/kubepods/...``,
``/kubelet.slice/kubelet-kubepods.slice/...``); under a cgroup namespace the path may start
with ``/..``. ``/proc/<pid>/cgroup`` has one ``0::<path>`` line on cgroup v2 and one
``<id>:<controllers>:<path>`` line per hierarchy on v1; hybrid hosts have both. The v2 line
is read first, then the v1 lines, and the first that names a container wins.

Identities are cached per pid and re-resolved when the pid is reused (its start time in
``/proc/<pid>/stat`` changes) or the process execs (its ``comm`` changes). Container runtimes
move a process into its cgroup before exec, so a cached cgroup stays right.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

__all__ = ["CgroupIdentity", "IdentityResolver", "ProcStat", "ProcessIdentity",
           "parse_cgroup_file", "parse_cgroup_path", "parse_stat", "read_stat"]

_HEX64 = r"[0-9a-f]{64}"
# A pod UID is a UUID (systemd slices spell its dashes as underscores) or, for static pods,
# the 32-hex hash of the manifest.
_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32}"

_KUBEPODS = re.compile(r"^(?:kubelet-)?kubepods(?:\.slice)?$")
_QOS = re.compile(r"^(?:(?:kubelet-)?kubepods-)?(burstable|besteffort)(?:\.slice)?$")
# systemd driver: the pod's slice names its QoS class (none: guaranteed) and the pod.
_POD_SLICE = re.compile(
    rf"^(?:kubelet-)?kubepods-(?:(burstable|besteffort)-)?pod({_UID})\.slice$")
_POD_DIR = re.compile(rf"^pod({_UID})$")  # cgroupfs driver, below kubepods/[qos/]
_CONTAINER = (
    re.compile(rf"^(cri-containerd|crio|docker|libpod)-({_HEX64})(?:\.scope)?$"),
    # containerd/CRI-O given a systemd-style path without systemd: "<slice>:<prefix>:<id>"
    re.compile(rf"^[^:]*:(cri-containerd|crio|docker):({_HEX64})$"),
    re.compile(rf"^()({_HEX64})$"),  # cgroupfs driver: the bare id
)
_CONMON = re.compile(rf"^crio-conmon-{_HEX64}(?:\.scope)?$")
_RUNTIME = {"cri-containerd": "containerd", "crio": "cri-o", "docker": "docker",
            "libpod": "podman", "": ""}


@dataclasses.dataclass(frozen=True)
class CgroupIdentity:
    """What one cgroup path says about its processes."""

    path: str = ""
    container_id: str = ""  # 64 hex; "" when not in a container
    pod_uid: str = ""  # with dashes; "" when not in a pod
    runtime: str = ""  # "containerd", "cri-o", "docker", "podman"; "" if the path does not say
    qos: str = ""  # "guaranteed", "burstable", "besteffort"; "" when not in a pod


def parse_cgroup_path(path: str) -> CgroupIdentity:
    """The pod and container a cgroup path names (only ``path`` is set when it names none)."""
    container_id = runtime = pod_uid = qos = prev = ""
    # Under a cgroup namespace, paths outside the reader's own cgroup start with "/..", and
    # the kubepods level may be above the part shown.
    in_kubepods = path.startswith("/..")
    for segment in path.split("/"):
        if not segment or segment == "..":
            continue
        parent, prev = prev, segment
        if _KUBEPODS.match(segment):
            # Anything before is the node's own container (kind, k3d), not the pod's.
            in_kubepods, container_id, runtime, qos, pod_uid = True, "", "", "", ""
            continue
        if m := _POD_SLICE.match(segment):
            qos, pod_uid = m.group(1) or "guaranteed", m.group(2)
            container_id = runtime = ""
            continue
        if in_kubepods and (m := _QOS.match(segment)):
            qos = m.group(1)
            continue
        if in_kubepods and (m := _POD_DIR.match(segment)):
            if _KUBEPODS.match(parent):  # no QoS level in between: a guaranteed pod
                qos = "guaranteed"
            pod_uid, container_id, runtime = m.group(1), "", ""
            continue
        slice_name, colon, _ = segment.partition(":")
        if colon and (m := _POD_SLICE.match(slice_name)):  # "<pod slice>:<runtime>:<id>"
            qos, pod_uid = m.group(1) or "guaranteed", m.group(2)
        if _CONMON.match(segment):  # CRI-O's monitor: part of the pod, not of a container
            container_id, runtime = "", "cri-o"
            continue
        for pattern in _CONTAINER:
            if m := pattern.match(segment):
                container_id, runtime = m.group(2), _RUNTIME[m.group(1)]
                if not runtime and parent == "docker":  # Docker's cgroupfs driver: /docker/<id>
                    runtime = "docker"
                break
    if not container_id and not pod_uid:
        return CgroupIdentity(path)
    if not pod_uid:
        qos = ""
    return CgroupIdentity(path, container_id, pod_uid.replace("_", "-"), runtime, qos)


def parse_cgroup_file(text: str) -> CgroupIdentity:
    """Identity from the text of ``/proc/<pid>/cgroup`` (v1, v2 or hybrid)."""
    v2: list[str] = []
    v1: list[str] = []
    for line in text.splitlines():
        hierarchy, sep, rest = line.partition(":")
        _controllers, sep2, path = rest.partition(":")
        if not sep or not sep2:
            continue
        (v2 if hierarchy == "0" else v1).append(path)
    best: CgroupIdentity | None = None
    for path in (*v2, *v1):
        found = parse_cgroup_path(path)
        if found.container_id:
            return found
        if found.pod_uid and best is None:
            best = found
    if best is not None:
        return best
    return CgroupIdentity(next(iter((*v2, *v1)), ""))  # a host process: keep where it runs


class ProcStat(NamedTuple):
    """The fields of ``/proc/<pid>/stat`` kubesight uses (times in clock ticks)."""

    pid: int
    comm: str
    state: str
    ppid: int
    utime: int
    stime: int
    start_ticks: int  # since boot: with the pid, identifies one process over its lifetime


def parse_stat(text: str) -> ProcStat:
    """Parse ``/proc/<pid>/stat``; comm may contain spaces and parentheses."""
    head, _, tail = text.rpartition(")")
    pid_text, _, comm = head.partition(" (")
    f = tail.split()
    # f[0] is field 3 (state); utime, stime, starttime are fields 14, 15 and 22.
    return ProcStat(int(pid_text), comm, f[0], int(f[1]), int(f[11]), int(f[12]), int(f[19]))


def read_stat(pid: int, proc: Path = Path("/proc")) -> ProcStat | None:
    """The stat of a live process, or None when it has gone."""
    try:
        # os.open/os.read: half the cost of open() here, and this runs for every process.
        fd = os.open(f"{proc}/{pid}/stat", os.O_RDONLY)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        return parse_stat(data.decode(errors="replace"))
    except (OSError, ValueError, IndexError):
        return None


@dataclasses.dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    comm: str
    exe: str  # "" for kernel threads and when unreadable
    start_ticks: int
    cgroup: CgroupIdentity

    @property
    def container_id(self) -> str:
        return self.cgroup.container_id

    @property
    def pod_uid(self) -> str:
        return self.cgroup.pod_uid


class IdentityResolver:
    """``identify(pid)`` with a cache that notices pid reuse and exec. The cache holds at
    most ``max_cached`` pids: past that, pids that have exited are dropped (``retain()``
    after a full /proc scan does the same at once)."""

    def __init__(self, proc: Path = Path("/proc"), max_cached: int = 20_000) -> None:
        self._proc = proc
        self._max_cached = max_cached
        self._cache: dict[int, ProcessIdentity] = {}
        self.resolved = 0  # cache misses: how often /proc/<pid>/cgroup was read

    def identify(self, pid: int, stat: ProcStat | None = None) -> ProcessIdentity | None:
        """The identity of a live process (None when it has gone). Pass ``stat`` if it was
        just read, to save reading it again."""
        stat = stat if stat is not None else read_stat(pid, self._proc)
        if stat is None:
            self._cache.pop(pid, None)
            return None
        cached = self._cache.get(pid)
        if cached is not None and (cached.start_ticks, cached.comm) == (stat.start_ticks,
                                                                        stat.comm):
            return cached
        base = self._proc / str(pid)
        try:
            cgroup = parse_cgroup_file((base / "cgroup").read_text(errors="replace"))
        except OSError:
            self._cache.pop(pid, None)
            return None
        try:
            exe = os.readlink(base / "exe")
        except OSError:
            exe = ""
        again = read_stat(pid, self._proc)
        if again is None or (again.start_ticks, again.comm) != (stat.start_ticks, stat.comm):
            # The pid was reused, or the process exec'd, while we read: ours is not theirs.
            self._cache.pop(pid, None)
            return None
        identity = ProcessIdentity(pid, stat.comm, exe, stat.start_ticks, cgroup)
        if len(self._cache) >= self._max_cached:
            self._prune()
        self._cache[pid] = identity
        self.resolved += 1
        return identity

    def _prune(self) -> None:
        self.retain(p for p in self._cache if os.path.exists(f"{self._proc}/{p}"))
        if len(self._cache) >= self._max_cached:  # still too many live ones: oldest go
            for pid in list(self._cache)[:len(self._cache) - self._max_cached // 2]:
                del self._cache[pid]

    def retain(self, live: Iterable[int]) -> None:
        """Forget every pid not in ``live`` (call after a full /proc scan)."""
        keep = set(live)
        for pid in [p for p in self._cache if p not in keep]:
            del self._cache[pid]

    def __len__(self) -> int:
        return len(self._cache)
