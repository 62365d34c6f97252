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
            for c in d["spec"]["template"]["spec"]["containers"]}


def test_nothing_is_privileged_and_everything_drops_all_capabilities() -> None:
    every = {**containers("DaemonSet"), **containers("Deployment")}
    assert set(every) == {"probe", "worker", "sink"}
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


def test_the_shipped_config_is_valid(tmp_path: Path) -> None:
    [cm] = [d for d in docs() if d["kind"] == "ConfigMap"]
    f = tmp_path / "kubesight.yaml"
    f.write_text(cm["data"]["kubesight.yaml"])
    cfg = load(f, environ={})
    assert cfg.kafka.bootstrap_servers and not cfg.kafka.uses_local_broker
