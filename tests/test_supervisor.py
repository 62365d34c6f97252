"""The supervisor's restart budget, shared by its components and the local broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubesight import supervisor


def test_a_crash_loop_is_left_down_and_named_and_an_old_crash_is_forgiven(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    now = [1000.0]
    monkeypatch.setattr(supervisor.time, "monotonic", lambda: now[0])
    restarts: list[float] = []
    allowed = []
    for _ in range(supervisor.RESTART_LIMIT + 1):
        allowed.append(supervisor._restart_allowed(restarts, "worker", Path("/l/worker.log")))
        now[0] += 1
    assert allowed == [True] * supervisor.RESTART_LIMIT + [False]
    assert (f"worker exited {supervisor.RESTART_LIMIT} times within "
            f"{supervisor.RESTART_WINDOW_S:.0f}s; leaving it down. See /l/worker.log"
            in capsys.readouterr().out)
    now[0] += supervisor.RESTART_WINDOW_S  # the window has passed: a new crash is new
    assert supervisor._restart_allowed(restarts, "worker", Path("/l/worker.log"))
    assert restarts == [now[0]]


def test_an_unusable_state_directory_is_named(tmp_path: Path) -> None:
    """A state directory that cannot be made (here: under a file) is one message naming it
    and the setting, exit 2, before anything starts."""
    import os
    import subprocess
    import sys

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBESIGHT_")}
    env["KUBESIGHT_STATE_DIR"] = str(blocker / "state")
    out = subprocess.run([sys.executable, "-m", "kubesight.cli", "up", "--no-probe"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr, out.stderr
    assert (f"kubesight: cannot use {blocker / 'state'} as the state directory: Not a "
            f"directory: {blocker}") in out.stderr, out.stderr
    assert "KUBESIGHT_STATE_DIR" in out.stderr and out.stdout == ""
