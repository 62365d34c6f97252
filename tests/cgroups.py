"""Kubelet-style cgroups for tests: real processes in the cgroup paths kubelet and the container
runtimes make, under the real cgroup v2 (or v1) hierarchy of this host.

Each ``PodCgroup`` lives below a top-level directory of its own (``ks-test-<hex>``, the way
kind and k3d nodes nest kubepods below their own cgroup), so concurrent tests never share a
directory, and ``remove()`` stops what it started and removes every directory it made.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def cgroup_mount(fstype: str = "cgroup2", option: str = "") -> Path | None:
    """Where a cgroup hierarchy is mounted (v1: the one whose options include ``option``)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        fields, post_fields = pre.split(), post.split()
        if post_fields and post_fields[0] == fstype and (
                not option or option in post_fields[-1].split(",")):
            return Path(fields[4])
    return None


def pod_path(pod_uid: str, container_id: str, *, driver: str, qos: str, runtime: str) -> str:
    """The cgroup path kubelet (``driver`` systemd or cgroupfs) and the runtime give a
    container, without the leading slash."""
    if driver == "systemd":
        uid = pod_uid.replace("-", "_")
        parts = ["kubepods.slice"]
        if qos == "guaranteed":
            parts.append(f"kubepods-pod{uid}.slice")
        else:
            parts += [f"kubepods-{qos}.slice", f"kubepods-{qos}-pod{uid}.slice"]
        prefix = {"containerd": "cri-containerd", "cri-o": "crio", "docker": "docker"}[runtime]
        parts.append(f"{prefix}-{container_id}.scope")
    else:
        parts = ["kubepods"] + ([] if qos == "guaranteed" else [qos]) + [f"pod{pod_uid}"]
        parts.append(f"crio-{container_id}" if runtime == "cri-o" else container_id)
    return "/".join(parts)


class PodCgroup:
    """One container's cgroup of one pod, made for real under ``mount``."""

    def __init__(self, mount: Path, *, pod_uid: str | None = None,
                 container_id: str | None = None, driver: str = "systemd",
                 qos: str = "burstable", runtime: str = "containerd") -> None:
        self.pod_uid = pod_uid or str(uuid.uuid4())
        self.container_id = container_id or (uuid.uuid4().hex + uuid.uuid4().hex)
        self.top = mount / f"ks-test-{uuid.uuid4().hex[:8]}"
        self.path = self.top / pod_path(self.pod_uid, self.container_id, driver=driver,
                                        qos=qos, runtime=runtime)
        self.procs: list[subprocess.Popen[bytes]] = []

    def create(self) -> None:
        self.path.mkdir(parents=True)

    def spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside the cgroup: the shell joins it, then execs (as runc does)."""
        script = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            ["sh", "-c", script, str(self.path), *argv], **kwargs)
        self.procs.append(proc)
        return proc

    def members(self) -> set[int]:
        try:
            return {int(p) for p in (self.path / "cgroup.procs").read_text().split()}
        except OSError:
            return set()

    def remove(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        # Leaf first; an exited process may keep its cgroup busy for a moment.
        for directory in [self.path, *self.path.parents]:
            if not directory.is_relative_to(self.top):
                break
            deadline = time.monotonic() + 5
            while True:
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)


@contextlib.contextmanager
def pod_cgroup(mount: Path, **kwargs: str) -> Iterator[PodCgroup]:
    pod = PodCgroup(mount, **kwargs)
    pod.create()
    try:
        yield pod
    finally:
        pod.remove()


def cpu_hog(seconds: float, comm: str = "ks-cpu-hog", nice: int = -5) -> list[str]:
    """argv of a process that burns one core for ``seconds`` (at most), named ``comm``.

    It runs at ``nice`` (like the probe, -5): on a 2-core machine shared with other tests it
    still gets most of a core, so "ranked first" does not depend on who else is busy."""
    code = (
        "import ctypes, os, time\n"
        f"ctypes.CDLL(None).prctl(15, {comm.encode()!r}, 0, 0, 0)\n"  # PR_SET_NAME
        f"os.setpriority(os.PRIO_PROCESS, 0, {nice})\n"
        f"end = time.monotonic() + {seconds}\n"
        "while time.monotonic() < end:\n"
        "    pass\n"
    )
    return [sys.executable, "-c", code]


def can_make_cgroups(mount: Path | None) -> bool:
    return mount is not None and os.geteuid() == 0 and os.access(mount, os.W_OK)
