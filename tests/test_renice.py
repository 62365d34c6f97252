"""A component's nice value reaches its autogroup, so it ranks it against other sessions.

Real processes on this kernel: each component starts in a session of its own, and with
sched_autogroup on a nice value alone only ranks a process within its session.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

AUTOGROUP = Path("/proc/self/autogroup")
SHOW = ("import os; from kubesight.cli import _renice; _renice(int(os.environ['NICE'])); "
        "print(repr(open('/proc/self/autogroup').read()), os.nice(0))")


def group_nice(text: str) -> int | None:
    """The nice in ``/autogroup-12 nice 3``; None for the empty text of a process still in
    the boot session's group (never setsid since init, as under some CI runners)."""
    return int(text.split()[-1]) if text.strip() else None


def run(nice: int, *, new_session: bool) -> tuple[int | None, int]:
    out = subprocess.run([sys.executable, "-c", SHOW], env={"NICE": str(nice), "PATH": ""},
                         capture_output=True, text=True, check=True, timeout=60,
                         start_new_session=new_session)
    group, own = out.stdout.rsplit(maxsplit=1)
    return group_nice(ast.literal_eval(group)), int(own)


@pytest.mark.skipif(not AUTOGROUP.exists(), reason="kernel without CONFIG_SCHED_AUTOGROUP")
def test_a_session_leader_gives_its_autogroup_its_nice() -> None:
    assert run(3, new_session=True) == (3, 3)


@pytest.mark.skipif(not AUTOGROUP.exists(), reason="kernel without CONFIG_SCHED_AUTOGROUP")
def test_a_process_in_someone_elses_session_leaves_the_autogroup_alone() -> None:
    before = group_nice(AUTOGROUP.read_text())
    group, own = run(4, new_session=False)
    assert (group, own) == (before, 4)
    assert group_nice(AUTOGROUP.read_text()) == before
