"""Kubernetes pods imitated with the kernel's own pieces, for the end-to-end tests.

A node is a network namespace holding what a CNI bridge plugin and kube-proxy put in a node's
root namespace: a bridge (``cni0``) with the gateway address of the node's pod CIDR, IP
forwarding, and the NAT rules that send a service's cluster IP to a backend pod. It has no
uplink, so nothing a pod sends can leave the machine; the host's own namespace is not touched.

A pod is a network namespace with ``eth0`` (one end of a veth pair whose other end is on the
bridge), its own IP in the pod CIDR and a default route through the gateway. Its processes run
in a kubelet-style cgroup (systemd driver, containerd):
``/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/
cri-containerd-<container id>.scope`` on the cgroup v2 hierarchy, so the probe reads the same
container id and pod UID from ``/proc/<pid>/cgroup`` as on a real node.

Everything is removed in ``close()`` (namespaces, and with them veths, bridge and rules;
processes; cgroups), also after a failure: use ``with PodNode(...) as node``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

CGROUP2 = Path("/sys/fs/cgroup/unified") if Path("/sys/fs/cgroup/unified/cgroup.procs").exists() \
    else Path("/sys/fs/cgroup")
KUBEPODS = ("kubepods.slice", "kubepods-besteffort.slice")


def _run(*argv: str, netns: str | None = None) -> str:
    cmd = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
    return out.stdout


class Pod:
    """One pod sandbox: its network namespace, IP, UID, one container id, its processes."""

    def __init__(self, node: PodNode, name: str, ip: str, veth: str, uid: str) -> None:
        self.node, self.name, self.ip, self.veth = node, name, ip, veth
        self.netns = f"{node.tag}-{name}"[:40]
        self.uid = uid
        self.container_id = secrets.token_hex(32)
        pod_slice = f"kubepods-besteffort-pod{self.uid.replace('-', '_')}.slice"
        self.cgroup = CGROUP2.joinpath(*KUBEPODS, pod_slice,
                                       f"cri-containerd-{self.container_id}.scope")
        self.procs: list[subprocess.Popen[bytes]] = []

    def create(self) -> None:
        node = self.node
        _run("ip", "netns", "add", self.netns)
        _run("ip", "link", "add", self.veth, "netns", node.netns, "type", "veth", "peer",
             "name", "eth0", "netns", self.netns)
        _run("ip", "link", "set", self.veth, "master", node.bridge, "up", netns=node.netns)
        _run("ip", "link", "set", "lo", "up", netns=self.netns)
        _run("ip", "addr", "add", f"{self.ip}/{node.prefixlen}", "dev", "eth0", netns=self.netns)
        _run("ip", "link", "set", "eth0", "up", netns=self.netns)
        _run("ip", "route", "add", "default", "via", node.gateway, netns=self.netns)
        self.cgroup.mkdir(parents=True, exist_ok=True)

    def spawn(self, *argv: str, stdout: int | None = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
        """Run ``argv`` in the pod: its cgroup first (as runc does before exec), then its
        network namespace."""
        script = 'echo $$ > "$0/cgroup.procs" && exec ip netns exec "$1" "${@:2}"'
        proc = subprocess.Popen(["bash", "-c", script, str(self.cgroup), self.netns, *argv],
                                stdout=stdout, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, *argv: str, timeout: float = 30) -> str:
        proc = self.spawn(*argv, stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv} in pod {self.name} exited {proc.returncode}")
        return out.decode()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, timeout=30)
        _remove_cgroup(self.cgroup)


def _remove_cgroup(leaf: Path) -> None:
    """Remove the container's and the pod's cgroups, and the kubepods levels if now empty."""
    deadline = time.monotonic() + 10
    for path in (leaf, leaf.parent, CGROUP2.joinpath(*KUBEPODS), CGROUP2 / KUBEPODS[0]):
        while path.exists():
            try:
                path.rmdir()
            except OSError:  # still has processes (dying) or other pods' cgroups
                if path in (leaf, leaf.parent) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                return


class PodNode:
    """A node's pod network in its own namespace; ``pod(name)`` adds a pod to it."""

    def __init__(self, cidr: str | None = None) -> None:
        self.tag = f"ks{secrets.token_hex(3)}"
        net = ipaddress.ip_network(cidr or f"10.244.{100 + secrets.randbelow(150)}.0/24")
        self.prefixlen = net.prefixlen
        self._hosts = net.hosts()
        self.gateway = str(next(self._hosts))
        self.cidr = str(net)
        self.netns = f"{self.tag}-node"
        self.bridge = "cni0"
        self.pods: list[Pod] = []
        self._dnat: list[list[str]] = []

    def __enter__(self) -> PodNode:
        try:
            _run("ip", "netns", "add", self.netns)
            _run("ip", "link", "set", "lo", "up", netns=self.netns)
            _run("ip", "link", "add", self.bridge, "type", "bridge", netns=self.netns)
            _run("ip", "addr", "add", f"{self.gateway}/{self.prefixlen}", "dev", self.bridge,
                 netns=self.netns)
            _run("ip", "link", "set", self.bridge, "up", netns=self.netns)
            _run("sysctl", "-qw", "net.ipv4.ip_forward=1", netns=self.netns)
            # kube-proxy needs bridged pod-to-pod replies to pass conntrack (br_netfilter).
            _run("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1", netns=self.netns)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def pod(self, name: str, uid: str = "") -> Pod:
        """A pod sandbox; ``uid``: the Pod object's (the kubelet names cgroups by it)."""
        pod = Pod(self, name, str(next(self._hosts)), f"veth{len(self.pods)}",
                  uid or str(uuid.uuid4()))
        self.pods.append(pod)
        pod.create()
        return pod

    @contextlib.contextmanager
    def service_dnat(self, cluster_ip: str, port: int, backend: Pod, target_port: int
                     ) -> Iterator[None]:
        """The rule kube-proxy (iptables mode) writes for a service with one endpoint; removed
        when the block ends."""
        rule = ["PREROUTING", "-d", f"{cluster_ip}/32", "-p", "tcp", "--dport", str(port),
                "-m", "comment", "--comment", f"{self.tag} service",
                "-j", "DNAT", "--to-destination", f"{backend.ip}:{target_port}"]
        _run("iptables", "-t", "nat", "-A", *rule, netns=self.netns)
        self._dnat.append(rule)
        try:
            yield
        finally:
            self._dnat.remove(rule)
            _run("iptables", "-t", "nat", "-D", *rule, netns=self.netns)

    def nat_rules(self) -> str:
        return _run("iptables", "-t", "nat", "-S", "PREROUTING", netns=self.netns)

    def close(self) -> None:
        for rule in list(self._dnat):
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _run("iptables", "-t", "nat", "-D", *rule, netns=self.netns)
        for pod in self.pods:
            pod.close()
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, timeout=30)
