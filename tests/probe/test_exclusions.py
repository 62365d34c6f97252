"""The probe runner's exclusions follow kubesight's own processes as their pid files come and
go: a new one is excluded, one that exited is traced again (its pid may be given to another
process). The kernel side of exclude/include is tested in test_l7_capture.py; here the two
probes are recorders, because only the runner's bookkeeping is under test."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from kubesight.probe.main import ProbeRunner

from kubesight.config import Config


class Recorder:
    def __init__(self) -> None:
        self.excluded: set[int] = set()
        self.trees: set[int] = set()

    def exclude_tgid(self, tgid: int) -> None:
        self.excluded.add(tgid)

    def exclude_tree(self, tgid: int) -> None:
        self.excluded.add(tgid)
        self.trees.add(tgid)

    def include_tgid(self, tgid: int) -> None:
        self.excluded.discard(tgid)
        self.trees.discard(tgid)


def bookkeeping_only(tmp_path: Path, comms: frozenset[str] = frozenset()
                     ) -> tuple[ProbeRunner, Recorder, Recorder]:
    runner = object.__new__(ProbeRunner)  # no probes loaded: only the bookkeeping
    runner.config = Config(state_dir=str(tmp_path))
    kernel, tcp = Recorder(), Recorder()
    runner._kernel, runner._tcp = kernel, tcp  # type: ignore[assignment]
    runner._excluded = {os.getpid()}
    runner._trees = set()
    runner._comms = comms
    runner._named = set()
    return runner, kernel, tcp


def test_exited_kubesight_processes_are_traced_again(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    worker = subprocess.Popen(["sleep", "60"])
    gone = subprocess.Popen(["true"])
    gone.wait(timeout=10)
    try:
        runner, kernel, tcp = bookkeeping_only(tmp_path)
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


def test_the_supervisor_and_processes_named_so_are_roots(tmp_path: Path) -> None:
    """The supervisor's pid file and a process under an excluded name make roots: the kernel
    excludes their children as they are forked. Other components are excluded alone (the
    pytest of the e2e tests writes a pid file, and the curl it starts must be traced)."""
    run = tmp_path / "run"
    run.mkdir()
    named = tmp_path / "ks-excl-sleep"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", named)
    supervisor = subprocess.Popen(["sleep", "60"])
    worker = subprocess.Popen(["sleep", "60"])
    other = subprocess.Popen([str(named), "60"])
    try:
        # Popen can return before the kernel gives the child its new name (vfork resumes the
        # parent before exec sets the comm).
        comm = Path(f"/proc/{other.pid}/comm")
        deadline = time.monotonic() + 10
        while comm.read_text().strip() != named.name and time.monotonic() < deadline:
            time.sleep(0.01)
        runner, kernel, tcp = bookkeeping_only(tmp_path, frozenset({"ks-excl-sleep"}))
        (run / "supervisor.pid").write_text(f"{supervisor.pid}\n")
        (run / "worker.pid").write_text(f"{worker.pid}\n")
        runner._scan_named()  # the /proc walk for names, then the pid files
        assert kernel.excluded == tcp.excluded == {supervisor.pid, worker.pid, other.pid}
        assert kernel.trees == {supervisor.pid, other.pid}

        other.kill()
        other.wait(timeout=10)
        runner._scan_named()
        assert kernel.trees == {supervisor.pid} and other.pid not in kernel.excluded
    finally:
        for proc in (supervisor, worker, other):
            proc.kill()
            proc.wait(timeout=10)
