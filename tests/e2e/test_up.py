"""`kubesight up` as an operator runs it: it says what it started, `kubesight status` sees
every component healthy, a request shows up in the metrics, and Ctrl-C stops it all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from kubesight.process import pid_alive
from tests.conftest import free_ports
from tests.promtext import parse

from .conftest import _need_root_and_bpf
from .harness import REPO, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.bpf, pytest.mark.kafka]


def test_up_status_and_ctrl_c(tmp_path: Path) -> None:
    _need_root_and_bpf()
    kafka, controller, prom, web = free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBESIGHT_")}
    env.update({
        "KUBESIGHT_STATE_DIR": str(tmp_path / "state"),
        "KUBESIGHT_KAFKA__LOCAL__PORT": str(kafka),
        "KUBESIGHT_KAFKA__LOCAL__CONTROLLER_PORT": str(controller),
        "KUBESIGHT_KAFKA__LOCAL__HEAP": "512m",
        "KUBESIGHT_SINKS__PROMETHEUS__LISTEN": f"127.0.0.1:{prom}",
        "KUBESIGHT_STREAMS__WEB_PORT": str(web),
        "KUBESIGHT_STREAMS__WINDOW_SECONDS": "2",
        "PYTHONUNBUFFERED": "1",
    })
    cli = [sys.executable, "-m", "kubesight.cli"]
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen([*cli, "up"], env=env, stdout=out, stderr=subprocess.STDOUT,
                              cwd=REPO)
    try:
        wait_for("`kubesight up` to say it is ready", lambda: "ready." in log.read_text(),
                 timeout=180)
        text = log.read_text()
        for line in ("kafka      up", "topics     ready", "sink       up", "worker     up",
                     "probe      up", f"http://127.0.0.1:{prom}/metrics"):
            assert line in text, text

        def status_ok() -> bool:
            res = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True,
                                 timeout=60)
            return res.returncode == 0 and "probe " in res.stdout and "worker " in res.stdout

        wait_for("`kubesight status` to report every component healthy", status_ok,
                 timeout=120, interval=2)

        # A second `up` on the same state directory would share the broker, run a second
        # probe (every request seen twice) and, when stopped, stop the first one's broker
        # (it did). It, and a second probe, refuse and say who is running.
        supervisor = int((tmp_path / "state" / "run" / "supervisor.pid").read_text())
        second = subprocess.run([*cli, "up"], env=env, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2, second
        assert (f"`kubesight up` is already running with state directory {tmp_path / 'state'} "
                f"(pid {supervisor})") in second.stderr, second.stderr
        probe_pid = int((tmp_path / "state" / "run" / "probe.pid").read_text())
        probe = subprocess.run([*cli, "probe"], env=env, capture_output=True, text=True,
                               timeout=120)
        assert probe.returncode == 2, probe
        assert (f"kubesight probe: a probe is already running with state directory "
                f"{tmp_path / 'state'} (pid {probe_pid})") in probe.stderr, probe.stderr
        assert status_ok() and "kafka      stopped" not in log.read_text()

        def metrics() -> str:
            url = f"http://127.0.0.1:{prom}/metrics"
            with urllib.request.urlopen(url, timeout=5) as resp:
                return str(resp.read().decode())

        # This scrape is itself a request (curl → the sink): it shows up as a client request.
        subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{prom}/metrics"],
                       check=True, timeout=30)
        def curl_counted() -> bool:
            samples, _helps, _types = parse(metrics())
            return any(name == "kubesight_requests_total" and value >= 1
                       and {("src_workload", "curl"), ("dst_workload", "ks-sink")} <= set(labels)
                       for (name, labels), value in samples.items())

        wait_for("curl's request in the metrics", curl_counted, timeout=60)

        def excluded_at_start() -> float:
            samples, _helps, _types = parse(metrics())
            return sum(value for (name, labels), value in samples.items()
                       if name == "kubesight_pipeline_counter_total"
                       and ("name", "kernel_excluded_at_start") in labels)

        # A worker the supervisor restarts is kept out of the capture by the kernel as it
        # starts (forked by an excluded root, the supervisor; exec'd as `kubesight`), not once
        # its pid file is read. Nothing else starts so meanwhile: the count is the restart's.
        before = excluded_at_start()
        run = tmp_path / "state" / "run"
        first_worker = int((run / "worker.pid").read_text())
        os.kill(first_worker, signal.SIGKILL)
        wait_for("the supervisor to restart the killed worker",
                 lambda: "worker exited with status" in log.read_text()
                 and int((run / "worker.pid").read_text()) != first_worker, timeout=60)
        wait_for("the probe to report the restarted worker excluded as it started",
                 lambda: excluded_at_start() > before, timeout=60, interval=1)
        new_worker = int((run / "worker.pid").read_text())

        def status_json() -> dict[str, Any]:
            res = subprocess.run([*cli, "status", "--json"], env=env, capture_output=True,
                                 text=True, timeout=60)
            info: dict[str, Any] = json.loads(res.stdout)
            info["rc"] = res.returncode
            return info

        def new_worker_reports() -> bool:
            info = status_json()
            return info["rc"] == 0 and any(
                c["component"] == "worker" and c["instance"].endswith(f"-{new_worker}")
                and c["fresh"] for c in info["components"])

        wait_for("`kubesight status` to report every component healthy again, the worker "
                 "by its new instance", new_worker_reports, timeout=120, interval=2)

        # The local broker is supervised too: killed, it is restarted, and the components
        # (which buffered meanwhile) are healthy again.
        broker_pid = int((tmp_path / "state" / "kafka" / "broker.pid").read_text())
        os.kill(broker_pid, signal.SIGKILL)
        wait_for("the supervisor to restart the killed broker",
                 lambda: "kafka exited; restarting" in log.read_text()
                 and log.read_text().count("kafka      up") == 2, timeout=120)
        assert int((tmp_path / "state" / "kafka" / "broker.pid").read_text()) != broker_pid
        back = time.time()

        def reported_since_restart() -> bool:
            info = status_json()
            names = {c["component"] for c in info["components"]
                     if c["age_s"] < time.time() - back}  # a report the new broker took
            return (info["rc"] == 0 and {"probe", "worker", "sink"} <= names
                    and info["metrics_endpoint_ok"])

        wait_for("every component to report through the restarted broker",
                 reported_since_restart, timeout=180, interval=2)

        pids = {p.stem: int(p.read_text()) for p in run.glob("*.pid")}
        pids["kafka"] = int((tmp_path / "state" / "kafka" / "broker.pid").read_text())
        assert {"supervisor", "probe", "worker", "sink", "kafka"} <= set(pids)
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(120) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "kafka      stopped" in text, text
    for name, pid in pids.items():
        assert not pid_alive(pid), f"{name} (pid {pid}) still running after Ctrl-C"
