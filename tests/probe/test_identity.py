"""PID → cgroup → pod UID and container id: real path formats, and real processes in
kubelet-style cgroups made under this host's cgroup v2 and v1 hierarchies."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from kubesight.probe.identity import (
    CgroupIdentity,
    IdentityResolver,
    parse_cgroup_file,
    parse_cgroup_path,
    parse_stat,
    read_stat,
)

from tests.cgroups import can_make_cgroups, cgroup_mount, pod_cgroup

CID = "3f2a9c1d7e6b5a4f8e9d0c1b2a3f4e5d6c7b8a9f0e1d2c3b4a5f6e7d8c9b0a1f"
CID2 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
UID = "0f9a5c3e-1d2b-4c8e-9a7f-3b5d6e7f8a9b"
UID_ = UID.replace("-", "_")  # how the systemd driver spells it in slice names
STATIC_UID = "6b5a9e0c3d2f1e4a7b8c9d0e1f2a3b4c"  # static pods: the manifest's hash

# (cgroup path, container id, pod uid, runtime, qos)
PATHS = [
    # systemd cgroup driver (cgroup v2 default): containerd, CRI-O, cri-dockerd
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
     f"cri-containerd-{CID}.scope", CID, UID, "containerd", "burstable"),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
     f"cri-containerd-{CID}.scope", CID, UID, "containerd", "besteffort"),
    (f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope",
     CID, UID, "containerd", "guaranteed"),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
     f"crio-{CID}.scope", CID, UID, "cri-o", "burstable"),
    (f"/kubepods.slice/kubepods-pod{UID_}.slice/crio-{CID}.scope", CID, UID, "cri-o",
     "guaranteed"),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
     f"docker-{CID}.scope", CID, UID, "docker", "besteffort"),
    # CRI-O's conmon runs in the pod, next to (not in) the container it watches
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
     f"crio-conmon-{CID}.scope", "", UID, "cri-o", "burstable"),
    # systemd inside the container: the container's scope is the one that counts
    (f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope/init.scope",
     CID, UID, "containerd", "guaranteed"),
    # cgroupfs driver: containerd and dockershim use the bare id, CRI-O prefixes it
    (f"/kubepods/burstable/pod{UID}/{CID}", CID, UID, "", "burstable"),
    (f"/kubepods/besteffort/pod{UID}/{CID}", CID, UID, "", "besteffort"),
    (f"/kubepods/pod{UID}/{CID}", CID, UID, "", "guaranteed"),
    (f"/kubepods/burstable/pod{UID}/crio-{CID}", CID, UID, "cri-o", "burstable"),
    (f"/kubepods/pod{STATIC_UID}/{CID}", CID, STATIC_UID, "", "guaranteed"),
    # the pod-level cgroup itself (v1 allows processes there)
    (f"/kubepods/burstable/pod{UID}", "", UID, "", "burstable"),
    # nested nodes: kind/k3d put kubepods below the node container's cgroup
    (f"/docker/{CID2}/kubepods/besteffort/pod{UID}/{CID}", CID, UID, "", "besteffort"),
    (f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/"
     f"kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
     CID, UID, "containerd", "burstable"),
    # containerd handed a systemd-style path without systemd (k3s, rootless)
    (f"/system.slice/containerd.service/kubepods-burstable-pod{UID_}.slice:cri-containerd:"
     f"{CID}", CID, UID, "containerd", "burstable"),
    # seen from inside a cgroup namespace (a probe pod with cgroupns=private)
    (f"/../../kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
     f"cri-containerd-{CID}.scope", CID, UID, "containerd", "besteffort"),
    # containers without a pod
    (f"/docker/{CID}", CID, "", "docker", ""),
    (f"/system.slice/docker-{CID}.scope", CID, "", "docker", ""),
    (f"/machine.slice/libpod-{CID}.scope", CID, "", "podman", ""),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope",
     CID, "", "podman", ""),
    # host processes
    ("/", "", "", "", ""),
    ("/system.slice/containerd.service", "", "", "", ""),
    ("/user.slice/user-1000.slice/session-3.scope", "", "", "", ""),
    ("/kubepods.slice", "", "", "", ""),
    ("/system.slice/kubelet.service", "", "", "", ""),
    ("/docker", "", "", "", ""),
    (f"/system.slice/{CID[:12]}.service", "", "", "", ""),  # a short hex name is no id
]


@pytest.mark.parametrize(("path", "container_id", "pod_uid", "runtime", "qos"), PATHS)
def test_cgroup_path_formats(path: str, container_id: str, pod_uid: str, runtime: str,
                             qos: str) -> None:
    assert parse_cgroup_path(path) == CgroupIdentity(path, container_id, pod_uid, runtime, qos)


V1_HOST = """12:cpu,cpuacct:/
11:memory:/user.slice/user-0.slice/session-1.scope
1:name=systemd:/user.slice/user-0.slice/session-1.scope
0::/user.slice/user-0.slice/session-1.scope
"""


@pytest.mark.parametrize(("text", "path", "container_id", "pod_uid"), [
    # cgroup v2 only
    (f"0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope\n",
     f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope", CID, UID),
    # cgroup v1, cgroupfs driver: every controller line says the same
    ("".join(f"{n}:{c}:/kubepods/burstable/pod{UID}/{CID}\n" for n, c in (
        (12, "cpu,cpuacct"), (11, "memory"), (10, "pids"), (9, "blkio"), (2, "cpuset"),
        (1, "name=systemd"))),
     f"/kubepods/burstable/pod{UID}/{CID}", CID, UID),
    # hybrid: v1 controllers name the container, the v2 line is systemd's view
    (f"12:cpu,cpuacct:/kubepods/besteffort/pod{UID}/{CID}\n1:name=systemd:/system.slice/"
     f"containerd.service\n0::/system.slice/containerd.service\n",
     f"/kubepods/besteffort/pod{UID}/{CID}", CID, UID),
    # a v1 line with only the pod, another with the container: the container wins
    (f"3:cpuset:/kubepods/pod{UID}\n2:cpu,cpuacct:/kubepods/pod{UID}/{CID}\n",
     f"/kubepods/pod{UID}/{CID}", CID, UID),
    # host: keep the v2 path, no pod, no container
    (V1_HOST, "/user.slice/user-0.slice/session-1.scope", "", ""),
    ("", "", "", ""),
])
def test_cgroup_file_v1_v2_and_hybrid(text: str, path: str, container_id: str,
                                      pod_uid: str) -> None:
    found = parse_cgroup_file(text)
    assert (found.path, found.container_id, found.pod_uid) == (path, container_id, pod_uid)


@pytest.mark.parametrize(("text", "pid", "comm", "utime", "stime", "start"), [
    ("4242 (nginx) S 1 4242 4242 0 -1 4194624 731 0 0 0 12 34 0 0 20 0 1 0 98765 "
     "11046912 1234 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 0 0 0 0 0 0",
     4242, "nginx", 12, 34, 98765),
    ("7 (a) b) (c) R 1 7 7 0 -1 0 0 0 0 0 5 6 0 0 20 0 1 0 42 0 0",
     7, "a) b) (c", 5, 6, 42),
    ("9 (tmux: server) S 1 9 9 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 7 0 0",
     9, "tmux: server", 0, 0, 7),
])
def test_stat_parsing_survives_any_comm(text: str, pid: int, comm: str, utime: int,
                                        stime: int, start: int) -> None:
    stat = parse_stat(text)
    assert (stat.pid, stat.comm, stat.utime, stat.stime, stat.start_ticks) == (
        pid, comm, utime, stime, start)


def _fake_proc(root: Path, pid: int, comm: str, start: int, cgroup: str) -> None:
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "stat").write_text(f"{pid} ({comm}) S 1 {pid} {pid} 0 -1 0 0 0 0 0 10 5 0 0 20 0 1 0 "
                            f"{start} 0 0\n")
    (d / "cgroup").write_text(f"0::{cgroup}\n")


def test_cache_is_invalidated_by_pid_reuse_and_exec(tmp_path: Path) -> None:
    pod = f"/kubepods/pod{UID}/{CID}"
    _fake_proc(tmp_path, 100, "app", 5000, pod)
    resolver = IdentityResolver(proc=tmp_path)
    first = resolver.identify(100)
    assert first is not None and first.pod_uid == UID and resolver.resolved == 1

    (tmp_path / "100" / "cgroup").write_text("0::/elsewhere\n")
    assert resolver.identify(100) is first and resolver.resolved == 1  # cached: not re-read

    _fake_proc(tmp_path, 100, "app", 9000, "/user.slice")  # the pid was reused
    again = resolver.identify(100)
    assert again is not None and again.pod_uid == "" and again.cgroup.path == "/user.slice"
    assert resolver.resolved == 2

    _fake_proc(tmp_path, 100, "other", 9000, pod)  # same process, exec'd another program
    assert resolver.identify(100).pod_uid == UID  # type: ignore[union-attr]

    resolver.retain({1, 2})
    assert len(resolver) == 0
    (tmp_path / "100" / "stat").unlink()  # exited
    assert resolver.identify(100) is None


def test_cache_is_bounded(tmp_path: Path) -> None:
    resolver = IdentityResolver(proc=tmp_path, max_cached=4)
    for pid in range(1, 5):
        _fake_proc(tmp_path, pid, "app", pid, "/")
        assert resolver.identify(pid) is not None
    for pid in (1, 2):  # exited
        for f in (tmp_path / str(pid)).iterdir():
            f.unlink()
        (tmp_path / str(pid)).rmdir()
    _fake_proc(tmp_path, 5, "app", 5, "/")
    assert resolver.identify(5) is not None
    assert len(resolver) == 3  # the exited ones made room
    for pid in range(6, 9):
        _fake_proc(tmp_path, pid, "app", pid, "/")
        assert resolver.identify(pid) is not None
    assert len(resolver) <= 4


def test_host_process_keeps_process_identity() -> None:
    resolver = IdentityResolver()
    me = resolver.identify(os.getpid())
    assert me is not None
    assert me.comm == Path("/proc/self/comm").read_text().strip()
    assert Path(me.exe).resolve() == Path(os.readlink("/proc/self/exe")).resolve()
    assert me.pod_uid == "" and me.container_id == ""


def _wait_exec(pid: int, comm: str) -> None:
    deadline = time.monotonic() + 10
    while (stat := read_stat(pid)) is None or stat.comm != comm:
        assert time.monotonic() < deadline, f"pid {pid} never became {comm}: {stat}"
        time.sleep(0.01)


V2 = cgroup_mount("cgroup2")
V1_CPU = cgroup_mount("cgroup", "cpu")


@pytest.mark.parametrize(("driver", "runtime", "qos", "expect_runtime"), [
    ("systemd", "containerd", "burstable", "containerd"),
    ("systemd", "cri-o", "guaranteed", "cri-o"),
    ("systemd", "docker", "besteffort", "docker"),
    ("cgroupfs", "containerd", "besteffort", ""),
    ("cgroupfs", "cri-o", "burstable", "cri-o"),
])
@pytest.mark.parametrize("hierarchy", ["v2", "v1"])
def test_real_process_in_kubelet_style_cgroup(hierarchy: str, driver: str, runtime: str,
                                              qos: str, expect_runtime: str) -> None:
    mount = V2 if hierarchy == "v2" else V1_CPU
    if not can_make_cgroups(mount):
        pytest.skip(f"no writable cgroup {hierarchy} hierarchy here (needs root)")
    assert mount is not None
    sleep = shutil.which("sleep") or "/bin/sleep"
    with pod_cgroup(mount, driver=driver, runtime=runtime, qos=qos) as pod:
        proc = pod.spawn([sleep, "30"], stdout=subprocess.DEVNULL)
        _wait_exec(proc.pid, "sleep")
        assert proc.pid in pod.members()
        resolver = IdentityResolver()
        ident = resolver.identify(proc.pid)
        assert ident is not None
        assert (ident.pod_uid, ident.container_id, ident.cgroup.runtime, ident.cgroup.qos) == (
            pod.pod_uid, pod.container_id, expect_runtime, qos)
        assert ident.comm == "sleep" and Path(ident.exe) == Path(sleep).resolve()
        assert ident.cgroup.path.endswith(str(pod.path.relative_to(mount)))

        proc.kill()
        proc.wait()
        assert resolver.identify(proc.pid) is None  # gone: not served from the cache
    assert not pod.top.exists()
