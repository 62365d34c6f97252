"""What every kubesight process shares: pid files, liveness, running until a signal."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .config import Config


class Runner(Protocol):
    def run(self) -> None: ...

    def stop(self, *_: Any) -> None: ...


def pid_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def run_component(name: str, config: Config, make: Callable[[Config], Runner]) -> None:
    """Run a component until SIGTERM/SIGINT, with ``<state>/run/<name>.pid`` meanwhile (the
    probe reads these files to keep kubesight's own traffic out of the capture)."""
    runner = make(config)
    signal.signal(signal.SIGTERM, runner.stop)
    signal.signal(signal.SIGINT, runner.stop)
    pidfile = config.state_path / "run" / f"{name}.pid"
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(f"{os.getpid()}\n")
    try:
        runner.run()
    finally:
        pidfile.unlink(missing_ok=True)
