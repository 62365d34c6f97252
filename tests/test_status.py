"""What `kubesight status` lists under drops/errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubesight import status
from kubesight.config import Config
from kubesight.status import drops
from tests.conftest import free_ports


def test_losses_and_blind_spots_are_listed_and_zeroes_are_not() -> None:
    counters = {"kernel_ringbuf_drops": 3, "kernel_events": 1000, "delivery_errors": 0,
                "tls_libraries_probed": 2, "tls_libraries_not_probed": 1,
                "kernel_truncated": 7, "consumer_lag": 0}
    assert drops(counters) == {"kernel_ringbuf_drops": 3, "tls_libraries_not_probed": 1,
                               "kernel_truncated": 7}


def test_a_broker_that_is_down_is_one_clear_line_not_a_flood(tmp_path: Path) -> None:
    """Nothing listens on the port: status says so once, with librdkafka's reason, says the
    health topic was not read (rather than "no component has reported"), exits 1, and does not
    pass on librdkafka's refused connection every ~50 ms (it printed ~60 lines before)."""
    port, metrics = free_ports(2)
    env = {**os.environ, "KUBESIGHT_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
           "KUBESIGHT_STATE_DIR": str(tmp_path),
           "KUBESIGHT_SINKS__PROMETHEUS__LISTEN": f"127.0.0.1:{metrics}"}
    env.pop("KUBESIGHT_CONFIG", None)
    out = subprocess.run([sys.executable, "-m", "kubesight.cli", "status"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"kafka      127.0.0.1:{port}: NOT reachable (") and \
        "transport" in lines[0].lower(), lines[0]
    assert "health     not read: kubesight.health.v1 is on the broker" in lines
    assert "probe      not running here" in lines
    assert f"metrics    http://127.0.0.1:{metrics}/metrics: NOT answering" in lines
    assert "rdkafka" not in out.stderr and len(out.stderr.splitlines()) <= 2, out.stderr


def _report(comp: str, node: str, instance: str, age_s: float) -> dict[str, object]:
    return {"component": comp, "node": node, "instance": instance,
            "ts": time.time() - age_s, "counters": {}}


def test_a_restarted_component_is_its_new_instance_not_a_stale_old_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed and restarted on the same node leaves its old instance's last report
    behind: status counts the new one (it said unhealthy for 5 minutes before). An instance
    gone with no successor on its node, or on another node, stays a stale one."""
    reports = {}
    for comp, node, instance, age in (("probe", "n1", "p", 1), ("worker", "n1", "old", 100),
                                      ("worker", "n1", "new", 2)):
        reports[comp, node, instance] = [_report(comp, node, instance, age)]
    monkeypatch.setattr(status, "_health_reports", lambda _config: reports)
    monkeypatch.setattr(status, "_metrics_ok", lambda _config: True)
    info = status.collect(Config())
    assert [(c["component"], c["instance"]) for c in info["components"]] == [
        ("probe", "p"), ("worker", "new")]
    assert info["healthy"]

    reports["worker", "n2", "gone"] = [_report("worker", "n2", "gone", 100)]
    info = status.collect(Config())
    assert ("worker", "gone", False) in [(c["component"], c["instance"], c["fresh"])
                                         for c in info["components"]]
    assert not info["healthy"]
