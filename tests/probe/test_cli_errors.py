"""`kubesight probe` that cannot start says why in one message, with what to do, and exits 1:
no traceback for an operator to read through."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_ports


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBESIGHT_")}
    env.update({"KUBESIGHT_STATE_DIR": str(tmp_path / "state"),
                "KUBESIGHT_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_ports(1)[0]}", **extra})
    return env


def test_missing_bpf_objects_name_make_bpf(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "kubesight.cli", "probe"],
                         env=_env(tmp_path, KUBESIGHT_BPF_DIR=str(tmp_path / "nothing")),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr, out.stderr
    assert (f"kubesight probe: open {tmp_path / 'nothing'}/l7.bpf.o: No such file or directory "
            "(the BPF objects are built by `make bpf`") in out.stderr, out.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="setpriv to another user needs root")
def test_an_unprivileged_probe_says_it_needs_root_or_the_daemonsets_capabilities(
        tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    out = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                          sys.executable, "-m", "kubesight.cli", "probe"],
                         env=_env(tmp_path, HOME=str(tmp_path)), capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr, out.stderr
    assert "Permission denied" in out.stderr and ("The probe runs as root, or with the "
                                                  "capabilities of deploy/kubernetes/"
                                                  "probe-daemonset.yaml") in out.stderr
