"""The local single-node Apache Kafka broker (KRaft, combined broker+controller).

`kubesight up` runs this when ``kafka.bootstrap_servers`` is empty; tests use it when neither an
external broker nor Docker is available. It runs the real Apache Kafka from the jars that
`make kafka` fetched from Maven Central (``<repo>/.cache/kafka-<version>/libs``, or
``kafka.local.jars_dir``), as ``java -cp '<libs>/*' kafka.Kafka server.properties``.

Everything it writes lives under ``<state_dir>/kafka/``::

    server.properties   regenerated on every start from the config
    log4j.properties    the broker logs to stdout, i.e. to broker.log
    cluster.id          the KRaft cluster id, generated once
    data/               log.dirs (and metadata log); formatted once (meta.properties)
    broker.log          the broker's stdout+stderr (rotated to broker.log.1 at 16 MiB)
    broker.pid          pid of the running broker (its own process group)
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from kubesight.config import REPO_ROOT, Config, LocalBrokerConfig
from kubesight.process import pid_alive, who_listens

log = logging.getLogger(__name__)

LOG_ROTATE_BYTES = 16 * 1024 * 1024
_POLL_S = 0.1

_LOG4J = """\
# Written by kubesight.broker; the broker's stdout goes to broker.log.
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=INFO
log4j.logger.org.apache.kafka=INFO
log4j.logger.kafka.request.logger=WARN
log4j.logger.kafka.controller=INFO
log4j.logger.kafka.log.LogCleaner=INFO
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.authorizer.logger=WARN
log4j.logger.org.apache.zookeeper=WARN
"""

_LOG4J_TOOLS = """\
log4j.rootLogger=WARN, stderr
log4j.appender.stderr=org.apache.log4j.ConsoleAppender
log4j.appender.stderr.Target=System.err
log4j.appender.stderr.layout=org.apache.log4j.PatternLayout
log4j.appender.stderr.layout.ConversionPattern=[%d] %p %m (%c)%n
"""


class BrokerError(RuntimeError):
    """The local broker cannot be set up, started or stopped; the message says why."""


def default_jars_dir(version: str) -> Path:
    return REPO_ROOT / ".cache" / f"kafka-{version}" / "libs"


def jars_dir(local: LocalBrokerConfig | None = None) -> Path:
    """Where the broker's jars are: ``kafka.local.jars_dir`` or the `make kafka` cache."""
    local = local or LocalBrokerConfig()
    return Path(local.jars_dir) if local.jars_dir else default_jars_dir(local.version)


def jars_present(local: LocalBrokerConfig | None = None) -> bool:
    """True if the jars directory holds a Kafka broker jar (``kafka_2.13-*.jar``)."""
    d = jars_dir(local)
    return d.is_dir() and any(d.glob("kafka_2.1[23]-*.jar"))


def find_java() -> str | None:
    """``$JAVA_HOME/bin/java`` if set, else ``java`` on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home:
        cand = Path(home) / "bin" / "java"
        if os.access(cand, os.X_OK):
            return str(cand)
    return shutil.which("java")


def new_cluster_id() -> str:
    """A KRaft cluster id: a random UUID in Kafka's URL-safe base64 form (22 chars)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):  # Kafka avoids these too: they look like CLI options
            return cid


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # Java's ServerSocket sets SO_REUSEADDR too, so TIME_WAIT leftovers do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _tcp_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class LocalBroker:
    """One single-node KRaft Kafka broker, its files under ``<config.state_dir>/kafka/``.

    ``LocalBroker(config).start()`` formats storage the first time, starts the JVM and returns
    once the broker answers metadata requests. Use as a context manager to stop it on exit.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.local: LocalBrokerConfig = config.kafka.local
        self.dir = config.state_path / "kafka"
        self.data_dir = self.dir / "data"
        self.properties_path = self.dir / "server.properties"
        self.log4j_path = self.dir / "log4j.properties"
        self.log_path = self.dir / "broker.log"
        self.pid_path = self.dir / "broker.pid"
        self.cluster_id_path = self.dir / "cluster.id"
        self.jars = jars_dir(self.local)
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._log_offset = 0

    # -- properties ----------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        host = self.local.host
        return f"[{host}]:{self.local.port}" if ":" in host else f"{host}:{self.local.port}"

    @property
    def pid(self) -> int | None:
        """Pid of the broker JVM this object started or adopted, while it runs."""
        return self._pid if self.is_running() else None

    def is_running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self._pid is not None and pid_alive(self._pid)

    def __repr__(self) -> str:
        return f"LocalBroker({self.bootstrap}, dir={self.dir}, pid={self.pid})"

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- start ---------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> LocalBroker:
        """Start the broker (or adopt the one already running from this state dir) and wait
        until it answers metadata requests. Raises BrokerError with the log's tail on failure."""
        deadline = time.monotonic() + timeout
        if self.is_running():
            self._wait_ready(deadline)
            return self
        self._check_prerequisites()
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            adopted = self._adopt()
            if adopted is not None:
                log.info("reusing the Kafka broker already running from %s (pid %d)",
                         self.dir, adopted)
                self._pid = adopted
                self._log_offset = self._log_size()
                self._wait_ready(deadline)
                return self
            self._check_ports()
            self._write_files()
            self._format()
            self._spawn()
        t0 = time.monotonic()
        self._wait_ready(deadline)
        log.info("Kafka broker %s up in %.1fs (pid %s)", self.bootstrap, time.monotonic() - t0,
                 self._pid)
        return self

    def _check_prerequisites(self) -> None:
        if not jars_present(self.local):
            hint = ("run `make kafka` in the repository to fetch them"
                    if not self.local.jars_dir else
                    "point kafka.local.jars_dir at a Kafka libs directory, or clear it and run "
                    "`make kafka`")
            raise BrokerError(
                f"Kafka {self.local.version} jars not found in {self.jars} "
                f"(no kafka_2.13-*.jar): {hint}"
            )
        if find_java() is None:
            raise BrokerError(
                "java not found (JAVA_HOME unset and no `java` on PATH): the local Kafka broker "
                "needs a Java 17+ runtime, e.g. `apt-get install openjdk-17-jre-headless`"
            )

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.dir / "broker.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read_pid_file(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _is_our_broker(self, pid: int) -> bool:
        """The pid is alive and is `kafka.Kafka` run with this state dir's server.properties."""
        if not pid_alive(pid):
            return False
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return b"kafka.Kafka" in argv and str(self.properties_path).encode() in argv

    def _adopt(self) -> int | None:
        pid = self._read_pid_file()
        if pid is None:
            return None
        if self._is_our_broker(pid):
            try:
                running = self.properties_path.read_text()
            except OSError:
                running = ""
            if running != self._server_properties():
                raise BrokerError(
                    f"a Kafka broker from {self.dir} is already running (pid {pid}) with "
                    f"different settings than requested ({self.bootstrap}); stop it first"
                )
            return pid
        log.info("removing stale pid file %s (pid %d is not running a broker)", self.pid_path, pid)
        self.pid_path.unlink(missing_ok=True)
        return None

    def _check_ports(self) -> None:
        host = self.local.host
        for what, port in (("kafka.local.port", self.local.port),
                           ("kafka.local.controller_port", self.local.controller_port)):
            if not _port_free(host, port):
                who = who_listens(port)
                by = f" by {who}" if who else ""
                raise BrokerError(
                    f"cannot start the local Kafka broker: port {port} on {host} ({what}) is "
                    f"already in use{by}, not by the kubesight broker of {self.dir}; stop that "
                    f"process or choose another port"
                )

    def _server_properties(self) -> str:
        host, port, cport = self.local.host, self.local.port, self.local.controller_port
        h = f"[{host}]" if ":" in host else host
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{h}:{cport}",
            "listeners": f"PLAINTEXT://{h}:{port},CONTROLLER://{h}:{cport}",
            "advertised.listeners": f"PLAINTEXT://{h}:{port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": str(self.config.kafka.partitions),
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "8",
            "group.initial.rebalance.delay.ms": "0",
            # After a crash (kill -9) the restarted broker cannot register until the dead
            # incarnation's session expires (default 9 s); both live in this one JVM, so a
            # shorter session is safe and makes crash recovery quick.
            "broker.session.timeout.ms": "3000",
            "broker.heartbeat.interval.ms": "500",
            "auto.create.topics.enable": "false",
            "delete.topic.enable": "true",
            # A local broker keeps a modest amount of data: 24 h or 1 GiB per partition.
            "log.retention.hours": "24",
            "log.retention.bytes": str(1024 * 1024 * 1024),
            "log.segment.bytes": str(128 * 1024 * 1024),
            "log.retention.check.interval.ms": "60000",
            "num.network.threads": "3",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "2",
            "message.max.bytes": str(8 * 1024 * 1024),
            "replica.fetch.max.bytes": str(8 * 1024 * 1024),
        }
        lines = ["# Written by kubesight.broker on every start; edits are overwritten."]
        lines += [f"{k}={v}" for k, v in props.items()]
        return "\n".join(lines) + "\n"

    def _write_files(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.properties_path.write_text(self._server_properties())
        self.log4j_path.write_text(_LOG4J)
        (self.dir / "log4j-tools.properties").write_text(_LOG4J_TOOLS)

    def _java(self, *args: str) -> list[str]:
        java = find_java()
        assert java is not None  # checked in _check_prerequisites
        return [java, *args]

    def cluster_id(self) -> str:
        """The KRaft cluster id of this state dir, generated and persisted on first use."""
        try:
            cid = self.cluster_id_path.read_text().strip()
            if cid:
                return cid
        except OSError:
            pass
        cid = new_cluster_id()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cluster_id_path.write_text(cid + "\n")
        return cid

    def _format(self) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        cmd = self._java(
            f"-Dlog4j.configuration=file:{self.dir / 'log4j-tools.properties'}",
            "-cp", f"{self.jars}/*", "kafka.tools.StorageTool", "format",
            "-t", self.cluster_id(), "-c", str(self.properties_path), "--ignore-formatted",
        )
        try:
            res = subprocess.run(cmd, cwd=self.dir, stdin=subprocess.DEVNULL,
                                 capture_output=True, text=True, timeout=120, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BrokerError(f"formatting Kafka storage in {self.data_dir} timed out") from exc
        if res.returncode != 0:
            out = (res.stdout + res.stderr).strip()[-4000:]
            raise BrokerError(
                f"formatting Kafka storage in {self.data_dir} failed "
                f"(exit {res.returncode}):\n{out}"
            )

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _spawn(self) -> None:
        if self._log_size() > LOG_ROTATE_BYTES:
            os.replace(self.log_path, self.log_path.with_name("broker.log.1"))
        cmd = self._java(
            f"-Xmx{self.local.heap}",
            "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.log4j_path}",
            f"-Dkafka.logs.dir={self.dir}",
            "-cp", f"{self.jars}/*",
            "kafka.Kafka", str(self.properties_path),
        )
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n==== kubesight: starting Kafka broker at {time.ctime()} ====\n".encode())
            logf.flush()
            self._log_offset = logf.tell()
            self._proc = subprocess.Popen(
                cmd, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=logf,
                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
            )
        self._pid = self._proc.pid
        self.pid_path.write_text(f"{self._pid}\n")

    def _log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._log_offset)
                text = fh.read().decode(errors="replace")
        except OSError:
            return "(no broker log)"
        tail = text.splitlines()[-lines:]
        return "\n".join(tail) if tail else "(broker log is empty)"

    def _metadata_ok(self) -> bool:
        # Import here: confluent-kafka is only needed once a broker is actually started.
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({
            "bootstrap.servers": self.bootstrap,
            "socket.connection.setup.timeout.ms": 1000,
            "reconnect.backoff.max.ms": 200,
            "log_level": 0,
        })
        try:
            md = admin.list_topics(timeout=2)
        except KafkaException:
            return False
        return bool(md.brokers)

    def _wait_ready(self, deadline: float) -> None:
        host, port = self.local.host, self.local.port
        while True:
            if not self.is_running():
                code = self._proc.returncode if self._proc is not None else None
                status = f" (exit code {code})" if code is not None else ""
                self._proc = None
                self._pid = None
                self.pid_path.unlink(missing_ok=True)
                raise BrokerError(
                    f"the Kafka broker exited during start-up{status}; "
                    f"last lines of {self.log_path}:\n{self._log_tail()}"
                )
            if _tcp_answers(host, port) and self._metadata_ok():
                return
            if time.monotonic() >= deadline:
                tail = self._log_tail()
                self.stop(timeout=10)
                raise BrokerError(
                    f"the Kafka broker did not answer on {self.bootstrap} in time; "
                    f"last lines of {self.log_path}:\n{tail}"
                )
            time.sleep(_POLL_S)

    # -- stop ----------------------------------------------------------------------------

    def _signal(self, sig: int) -> None:
        pid = self._pid
        if pid is None:
            return
        try:
            # The JVM leads its own process group (start_new_session); signal the whole group.
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _wait_exit(self, deadline: float) -> bool:
        while True:
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=max(0.0, min(_POLL_S, deadline - time.monotonic())))
                    return True
                except subprocess.TimeoutExpired:
                    pass
            elif not self.is_running():
                return True
            else:
                time.sleep(_POLL_S)
            if time.monotonic() >= deadline:
                return not self.is_running()

    def stop(self, timeout: float = 20) -> None:
        """Stop the broker: SIGTERM (controlled shutdown), then SIGKILL after ``timeout``."""
        if self._pid is None:
            # Not started by this object: stop the broker recorded in the pid file, if ours.
            pid = self._read_pid_file()
            if pid is None or not self._is_our_broker(pid):
                return
            self._pid = pid
        if self.is_running():
            self._signal(signal.SIGTERM)
            if not self._wait_exit(time.monotonic() + timeout):
                log.warning("Kafka broker pid %s ignored SIGTERM for %.0fs; killing it",
                            self._pid, timeout)
                self._signal(signal.SIGKILL)
                if not self._wait_exit(time.monotonic() + 10):
                    raise BrokerError(f"Kafka broker pid {self._pid} survived SIGKILL")
        self._forget()

    def kill(self) -> None:
        """SIGKILL the broker, like a crash (the pid file is left behind, as after a crash)."""
        if self._pid is None:
            return
        self._signal(signal.SIGKILL)
        if not self._wait_exit(time.monotonic() + 10):
            raise BrokerError(f"Kafka broker pid {self._pid} survived SIGKILL")
        self._proc = None
        self._pid = None

    def _forget(self) -> None:
        if self._pid is not None and self._read_pid_file() == self._pid:
            self.pid_path.unlink(missing_ok=True)
        self._proc = None
        self._pid = None
