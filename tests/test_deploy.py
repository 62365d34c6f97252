"""The Kubernetes manifests: least privilege, and configuration that kubesight accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kubesight.config import load

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"


def docs() -> list[dict[str, Any]]:
    return [d for f in sorted(DEPLOY.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())
            if d]


def containers(kind: str) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for d in docs() if d["kind"] == kind
            for c in (d["spec"]["template"]["spec"]["containers"]
                      + d["spec"]["template"]["spec"].get("initContainers", []))}


def test_nothing_is_privileged_and_everything_drops_all_capabilities() -> None:
    every = {**containers("DaemonSet"), **containers("Deployment")}
    assert set(every) == {"probe", "worker", "topics", "sink", "meta"}
    for name, c in every.items():
        sc = c["securityContext"]
        assert not sc.get("privileged", False), name
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["readOnlyRootFilesystem"] is True, name
        assert sc["capabilities"]["drop"] == ["ALL"], name


def test_only_the_probe_gets_capabilities_and_only_those_bpf_needs() -> None:
    probe = containers("DaemonSet")["probe"]
    assert sorted(probe["securityContext"]["capabilities"]["add"]) == [
        "BPF", "DAC_READ_SEARCH", "NET_ADMIN", "PERFMON", "SYS_NICE", "SYS_PTRACE"]
    for name, c in containers("Deployment").items():
        assert "add" not in c["securityContext"]["capabilities"], name
    for d in docs():
        if d["kind"] == "Deployment":
            pod = d["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert not pod.get("hostPID") and not pod.get("hostNetwork")


def test_only_the_metadata_watcher_talks_to_the_api_and_it_may_only_list_and_watch() -> None:
    """Its ClusterRole names exactly the kinds k8smeta.RESOURCES follows, each in the API
    group of the path it lists, with the verbs list and watch; every other pod runs without
    a service account token. (That the role is enough: tests/test_k8smeta.py.)"""
    from kubesight.k8smeta import RESOURCES

    pods = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs()
            if d["kind"] in ("Deployment", "DaemonSet")}
    assert {n for n, p in pods.items() if p.get("automountServiceAccountToken", True)} == {
        "kubesight-meta"}
    assert pods["kubesight-meta"]["serviceAccountName"] == "kubesight-meta"
    [role] = [d for d in docs() if d["kind"] == "ClusterRole"]
    granted = {(group, res) for rule in role["rules"] for group in rule["apiGroups"]
               for res in rule["resources"]}
    assert all(rule["verbs"] == ["list", "watch"] for rule in role["rules"])
    # /api/v1/pods -> ("", "pods"); /apis/apps/v1/replicasets -> ("apps", "replicasets")
    wanted = {("" if r.path.startswith("/api/") else r.path.split("/")[2], r.name)
              for r in RESOURCES}
    assert granted == wanted
    [binding] = [d for d in docs() if d["kind"] == "ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubesight-meta",
                                    "namespace": "kubesight"}]


def test_the_shipped_config_is_valid(tmp_path: Path) -> None:
    [cm] = [d for d in docs() if d["kind"] == "ConfigMap"]
    f = tmp_path / "kubesight.yaml"
    f.write_text(cm["data"]["kubesight.yaml"])
    cfg = load(f, environ={})
    assert cfg.kafka.bootstrap_servers and not cfg.kafka.uses_local_broker
