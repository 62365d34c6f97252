"""``kubesight up``: run everything on this machine, say where to look, stop cleanly.

Order: local Kafka broker (unless a cluster is configured) → topics → sink → stream worker →
Kubernetes metadata watcher (only when a kubeconfig or in-cluster config is found) → probe.
Each component is a child process with its log in ``<state>/logs``; one that dies is
restarted with backoff, and one that keeps dying is reported and left down. Ctrl-C (or
SIGTERM) stops the probe first, so that everything it captured drains through the pipeline's
buffers, then the worker, the sink, and the broker last.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

from .config import Config
from .process import own_command, pid_in, stop_on_signals, take_lock

if TYPE_CHECKING:
    from .broker import LocalBroker

RESTART_LIMIT = 5  # restarts within RESTART_WINDOW_S before a component is left down
RESTART_WINDOW_S = 60.0
STOP_TIMEOUT_S = 30.0


def say(msg: str) -> None:
    print(f"kubesight: {msg}", flush=True)


@dataclasses.dataclass
class Component:
    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: list[float] = dataclasses.field(default_factory=list)
    given_up: bool = False
    # Written here for a component that writes none itself (the Faust worker), at every
    # start: the probe excludes what pid files name, and `kubesight status` reads them.
    pid_path: Path | None = None
    _log: IO[bytes] | None = None

    def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the child)
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        if self.pid_path is not None:
            self.pid_path.write_text(f"{self.proc.pid}\n")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            say(f"{self.name} did not stop within {timeout:.0f}s; killing it")
            self.proc.kill()
            self.proc.wait(5)
        if self._log:
            self._log.close()


def _restart_allowed(restarts: list[float], name: str, log_path: Path) -> bool:
    """Whether what exited may be started again: at most RESTART_LIMIT times within
    RESTART_WINDOW_S (``restarts``, its restart times, is kept to that window and gets this
    one). When not, says it is left down and where to look."""
    now = time.monotonic()
    restarts[:] = [t for t in restarts if now - t < RESTART_WINDOW_S]
    if len(restarts) >= RESTART_LIMIT:
        say(f"{name} exited {len(restarts)} times within {RESTART_WINDOW_S:.0f}s; leaving it "
            f"down. See {log_path}")
        return False
    restarts.append(now)
    return True


class Supervisor:
    def __init__(self, config: Config, config_path: str | None, *, with_probe: bool = True):
        self.config = config
        self.state = config.state_path
        self._stop = threading.Event()
        self.broker: LocalBroker | None = None
        self._lock: IO[str] | None = None  # run/supervisor.lock, held while running
        self._broker_restarts: list[float] = []
        self._broker_given_up = False
        env = dict(os.environ)
        if config_path:
            env["KUBESIGHT_CONFIG"] = str(Path(config_path).resolve())
        # Children must see the same effective state dir and node name as we do.
        env["KUBESIGHT_STATE_DIR"] = str(self.state)
        env["KUBESIGHT_NODE_NAME"] = config.node_name
        if config.kafka.uses_local_broker:
            env["KUBESIGHT_KAFKA__BOOTSTRAP_SERVERS"] = config.kafka.bootstrap
        self.env = env
        logs = self.state / "logs"
        me = own_command()
        self.components = [
            Component("sink", [*me, "sink"], logs / "sink.log"),
            Component("worker", [*me, "worker"], logs / "worker.log",
                      pid_path=self.state / "run" / "worker.pid"),
        ]
        from .k8smeta import cluster_configured

        if cluster_configured(config.kubernetes.kubeconfig):  # a kubeconfig or in a pod
            self.components.append(Component("meta", [*me, "meta"], logs / "meta.log"))
        if with_probe:
            self.components.append(Component("probe", [*me, "probe"], logs / "probe.log"))

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def run(self) -> int:
        from .broker import LocalBroker
        from .topics import ensure_topics

        run_dir = self.state / "run"
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"kubesight: cannot use {self.state} as the state directory: "
                  f"{exc.strerror}: {exc.filename}. Set state_dir (KUBESIGHT_STATE_DIR) to a "
                  "directory this user can write", file=sys.stderr)
            return 2
        self._lock = take_lock(run_dir / "supervisor.lock")
        if self._lock is None:
            holder = pid_in(run_dir / "supervisor.pid")
            print(f"kubesight: `kubesight up` is already running with state directory "
                  f"{self.state}{f' (pid {holder})' if holder else ''}. `kubesight status` "
                  "shows it; Ctrl-C in its terminal"
                  f"{f' or kill -INT {holder}' if holder else ''} stops it. Another one "
                  "needs a state directory (KUBESIGHT_STATE_DIR) and ports of its own.",
                  file=sys.stderr)
            return 2
        (run_dir / "supervisor.pid").write_text(f"{os.getpid()}\n")
        stop_on_signals(self.request_stop)
        try:
            if self.config.kafka.uses_local_broker:
                self.broker = LocalBroker(self.config)
                say(f"starting Kafka {self.config.kafka.local.version} (KRaft, single node), "
                    f"data in {self.state / 'kafka'} ...")
                self.broker.start()
                say(f"kafka      up    {self.broker.bootstrap} (pid {self.broker.pid})")
            else:
                say(f"kafka      using {self.config.kafka.bootstrap}")
            created = ensure_topics(self.config)
            say(f"topics     ready ({self.config.kafka.topic_prefix}*; "
                f"{len(created)} created)")
            for comp in self.components:
                if self._stop.is_set():  # Ctrl-C while starting: start nothing more
                    return 0
                comp.start(self.env)
                say(f"{comp.name:<10} up    pid {comp.proc.pid if comp.proc else '?'}, "
                    f"log {comp.log_path}")
            prom = self.config.sinks.prometheus
            say("ready. Where to look:")
            if prom.enabled:
                say(f"  metrics    http://{prom.listen}/metrics")
            say("  status     kubesight status")
            say(f"  logs       {self.state / 'logs'}")
            say("  topics     " + ", ".join(
                self.config.topic(t) for t in ("raw.v1", "requests.v1", "golden.v1")))
            say("Ctrl-C stops everything.")
            self._watch()
        finally:
            self._shutdown()
            (run_dir / "supervisor.pid").unlink(missing_ok=True)
        return 0

    def _watch_broker(self) -> None:
        """The local broker is restarted like any component (the others buffer meanwhile)."""
        from .broker import BrokerError

        broker = self.broker
        if broker is None or self._broker_given_up or broker.is_running():
            return
        if not _restart_allowed(self._broker_restarts, "kafka", broker.log_path):
            self._broker_given_up = True
            return
        say(f"kafka exited; restarting (see {broker.log_path})")
        try:
            broker.start()
        except BrokerError as exc:
            say(f"kafka did not come back: {exc}")
            return
        say(f"kafka      up    {broker.bootstrap} (pid {broker.pid})")

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            self._watch_broker()
            for comp in self.components:
                if comp.given_up or comp.proc is None or comp.proc.poll() is None:
                    continue
                if not _restart_allowed(comp.restarts, comp.name, comp.log_path):
                    comp.given_up = True
                    continue
                say(f"{comp.name} exited with status {comp.proc.returncode}; restarting "
                    f"(see {comp.log_path})")
                comp.start(self.env)

    def _shutdown(self) -> None:
        say("stopping ...")
        for comp in reversed(self.components):  # probe first: let its data drain
            if comp.proc is None:
                continue  # never started (startup failed before it)
            comp.stop()
            say(f"{comp.name:<10} stopped")
        (self.state / "run" / "worker.pid").unlink(missing_ok=True)
        if self.broker is not None and self.broker.is_running():
            self.broker.stop()
            say("kafka      stopped")
