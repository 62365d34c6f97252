"""Stopping on a signal never deadlocks the process that gets it."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The main thread waits on the Event it is stopped by, in the tightest loop: the shape of
# `kubesight up`'s watch loop, and the worst case for a handler that calls Event.set() while
# Event.wait() holds the condition's lock (4 of 30 such runs hung for good).
WAITER = r"""
import sys, threading
from kubesight.process import stop_on_signals
stopped = threading.Event()
stop_on_signals(stopped.set)
print("ready", flush=True)
while not stopped.wait(0.0001):
    pass
print("stopped", flush=True)
"""


def test_a_signal_stops_a_process_waiting_on_its_stop_event_every_time() -> None:
    for sig in [signal.SIGINT, signal.SIGTERM] * 10:
        proc = subprocess.Popen([sys.executable, "-c", WAITER], cwd=REPO, text=True,
                                stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
            proc.send_signal(sig)
            out, _ = proc.communicate(timeout=10)
        finally:
            proc.kill()
            proc.wait()
        assert (proc.returncode, out) == (0, "stopped\n"), sig
