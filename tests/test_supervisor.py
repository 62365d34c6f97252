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
