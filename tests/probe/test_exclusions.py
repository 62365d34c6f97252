"""The probe runner's exclusions follow kubesight's own processes as their pid files come and
go: a new one is excluded, one that exited is traced again (its pid may be given to another
process). The kernel side of exclude/include is tested in test_l7_capture.py; here the two
probes are recorders, because only the runner's bookkeeping is under test."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from kubesight.probe.main import ProbeRunner

from kubesight.config import Config


class Recorder:
    def __init__(self) -> None:
        self.excluded: set[int] = set()

    def exclude_tgid(self, tgid: int) -> None:
        self.excluded.add(tgid)

    def include_tgid(self, tgid: int) -> None:
        self.excluded.discard(tgid)


def test_exited_kubesight_processes_are_traced_again(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    worker = subprocess.Popen(["sleep", "60"])
    gone = subprocess.Popen(["true"])
    gone.wait(timeout=10)
    try:
        runner = object.__new__(ProbeRunner)  # no probes loaded: only the bookkeeping
        runner.config = Config(state_dir=str(tmp_path))
        kernel, tcp = Recorder(), Recorder()
        runner._kernel, runner._tcp = kernel, tcp  # type: ignore[assignment]
        runner._excluded = {os.getpid()}
        (run / "worker.pid").write_text(f"{worker.pid}\n")
        (run / "sink.pid").write_text(f"{gone.pid}\n")
        runner._refresh_exclusions()
        assert kernel.excluded == tcp.excluded == {worker.pid, gone.pid}

        # Next round: the sink's pid file is gone and its process too; the worker's pid file
        # is gone but it still runs (it is released only once it has exited).
        (run / "sink.pid").unlink()
        (run / "worker.pid").unlink()
        runner._refresh_exclusions()
        assert kernel.excluded == tcp.excluded == {worker.pid}
        assert runner._excluded == {os.getpid(), worker.pid}
    finally:
        worker.kill()
        worker.wait(timeout=10)
