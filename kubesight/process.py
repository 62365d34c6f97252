"""What every kubesight process shares: pid files, liveness, running until a signal."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol

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


def who_listens(port: int) -> str:
    """Best effort: 'pid 123 (nginx)' for the process holding a TCP listener on ``port``."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                if len(parts) <= 9 or parts[3] != "0A":  # 0A: LISTEN
                    continue
                if int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(parts[9])
    if not inodes:
        return ""
    targets = {f"socket:[{i}]" for i in inodes}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in targets:
                        comm = (proc / "comm").read_text().strip()
                        return f"pid {proc.name} ({comm})"
    return ""


def own_command() -> list[str]:
    """How to start a kubesight component: the console script next to this interpreter, so
    that it runs under the name "kubesight", which the probe excludes from its exec on (and
    ``ps`` shows what it is); ``python -m kubesight.cli`` where there is no such script."""
    script = Path(sys.executable).with_name("kubesight")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "kubesight.cli"]


def take_lock(path: Path) -> IO[str] | None:
    """An exclusive lock on ``path`` (created if missing), held while the returned file stays
    open and released by the kernel however this process ends; None if another process holds
    it. For "only one of these per state directory": a pid file alone can name a dead
    process, or a live one that reused its number."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")  # noqa: SIM115 - held open for the life of the process
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def pid_in(path: Path) -> int | None:
    """The pid a pid file names, if it names a live process."""
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid_alive(pid) else None


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_on_signals(stop: Callable[[], object]) -> threading.Thread:
    """Call ``stop`` on SIGTERM or SIGINT, from a thread of its own. Not from a Python signal
    handler: that runs in the main thread between two bytecodes, maybe while the thread holds
    the very lock ``stop`` takes (``threading.Event.set`` inside ``Event.wait`` re-taking its
    condition's lock), and then waits for itself forever: `kubesight up` hung on Ctrl-C that
    way. The C-level handler writes the signal number to a socket (``set_wakeup_fd``); the
    thread reads it. Call from the main thread."""
    rd, wr = socket.socketpair()
    wr.setblocking(False)
    signal.set_wakeup_fd(wr.fileno(), warn_on_full_buffer=False)
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: None)  # handled: the wakeup byte does the work

    def watch() -> None:
        with rd, wr:
            while data := rd.recv(64):
                if any(b in STOP_SIGNALS for b in data):
                    stop()

    thread = threading.Thread(target=watch, name="stop-signals", daemon=True)
    thread.start()
    return thread


class AlreadyRunning(RuntimeError):
    """Another process holds this state directory's lock for the same component."""


# Components of which one per state directory (one per node) is all there should be, and why.
SINGLE = {"probe": "see every request twice"}


def run_component(name: str, config: Config, make: Callable[[Config], Runner]) -> None:
    """Run a component until SIGTERM/SIGINT, with ``<state>/run/<name>.pid`` meanwhile (the
    probe reads these files to keep kubesight's own traffic out of the capture)."""
    pidfile = config.state_path / "run" / f"{name}.pid"
    lock = take_lock(pidfile.with_suffix(".lock")) if name in SINGLE else None
    if name in SINGLE and lock is None:
        holder = pid_in(pidfile)
        raise AlreadyRunning(
            f"a {name} is already running with state directory {config.state_path}"
            + (f" (pid {holder})" if holder else "") + f": two would {SINGLE[name]}")
    runner = make(config)
    stop_on_signals(runner.stop)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(f"{os.getpid()}\n")
    try:
        runner.run()
    finally:
        pidfile.unlink(missing_ok=True)
