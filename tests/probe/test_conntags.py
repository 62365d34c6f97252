"""ConnectionTagger: a batch's conn metadata gets its process's container id and pod UID."""

from __future__ import annotations

import shutil
from pathlib import Path

from kubesight.probe.conntags import ConnectionTagger
from kubesight.probe.identity import IdentityResolver

CID = "d" * 64
UID = "0f0e0d0c-1111-2222-3333-444455556666"


def fake_proc(root: Path, pid: int, comm: str, cgroup: str) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "stat").write_text(f"{pid} ({comm}) S 1 1 1 0 -1 0 0 0 0 0 7 3 0 0 20 0 1 0 4242 0 0\n")
    (d / "cgroup").write_text(f"0::{cgroup}\n")


def test_pod_processes_are_tagged_and_host_processes_are_not(tmp_path: Path) -> None:
    fake_proc(tmp_path, 10, "server", "/kubepods.slice/kubepods-besteffort.slice/kubepods-"
              f"besteffort-pod{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope")
    fake_proc(tmp_path, 11, "sshd", "/system.slice/ssh.service")
    now = [0.0]
    tagger = ConnectionTagger(IdentityResolver(tmp_path), refresh_s=5, clock=lambda: now[0])
    pod_meta, host_meta = {"tgid": 10, "comm": "server"}, {"tgid": 11, "comm": "sshd"}
    tagger.annotate(pod_meta)
    tagger.annotate(host_meta)
    assert pod_meta == {"tgid": 10, "comm": "server", "container_id": CID, "pod_uid": UID}
    assert host_meta == {"tgid": 11, "comm": "sshd"}
    # Cached: the process has gone, its tags stay until refresh_s has passed.
    shutil.rmtree(tmp_path / "10")
    assert tagger.tags(10)["container_id"] == CID
    now[0] = 6.0
    assert tagger.tags(10) == {}


def test_calls_to_a_cluster_ip_get_the_backend_conntrack_chose(tmp_path: Path) -> None:
    """Real conntrack: a pod calls a service's cluster IP through a kube-proxy-style DNAT."""
    import os

    import pytest
    from kubesight.probe.conntags import BackendLookup

    from tests.e2e.harness import wait_for
    from tests.e2e.k8spods import PodNode

    if os.geteuid() != 0:
        pytest.skip("network namespaces and iptables need root")
    vip = "10.96.7.7"
    with PodNode() as node:
        server, client = node.pod("server"), node.pod("client")
        server.spawn("python3", "-m", "http.server", "8080", "--bind", "0.0.0.0",
                     "--directory", str(tmp_path))
        wait_for("the server to listen", lambda: ":8080" in server.run("ss", "-ltnH"))
        with node.service_dnat(vip, 80, server, 8080):
            port = int(client.run("curl", "-s", "-o", "/dev/null", "-w", "%{local_port}",
                                  "--max-time", "10", f"http://{vip}/"))
        lookup = BackendLookup(["10.96.0.0/16"], netns=node.netns)
        meta = {"tgid": 1, "role": 1, "laddr": client.ip, "lport": port, "raddr": vip,
                "rport": 80}
        tagger = ConnectionTagger(IdentityResolver(tmp_path), backends=lookup)
        try:
            tagger.annotate(meta)
        finally:
            tagger.close()
        assert (meta["backend_addr"], meta["backend_port"]) == (server.ip, 8080)
        # Not a service address, or not NATed: nothing asked or nothing added.
        direct = {"tgid": 1, "role": 1, "laddr": client.ip, "lport": port, "raddr": server.ip,
                  "rport": 8080}
        try:
            tagger.annotate(direct)
            assert lookup.backend(client.ip, 1, vip, 80) is None
        finally:
            tagger.close()
        assert "backend_addr" not in direct
        assert (lookup.lookups, lookup.found, lookup.errors) == (2, 1, 0)
