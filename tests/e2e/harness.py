"""Run kubesight's real components (probe, stream worker, sink) as processes, and real servers.

Nothing here is faked: the probe loads BPF into this kernel, the worker is the Faust app, the
sink serves Prometheus text that we scrape over HTTP, and traffic comes from nginx, wrk, curl
and small stdlib servers, all on loopback.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import yaml

from kubesight.config import Config, load
from kubesight.process import own_command
from kubesight.topics import ensure_topics
from tests.conftest import free_ports
from tests.promtext import Labels, parse

REPO = Path(__file__).resolve().parents[2]


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0,
             interval: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def _cpu_busy_idle() -> tuple[int, int]:
    """Busy and idle jiffies of all CPUs together (/proc/stat's "cpu" line)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle, idle


def wait_quiet(min_idle: float = 0.6, window: float = 0.5, timeout: float = 30.0) -> float:
    """Wait until the machine's CPUs were at least ``min_idle`` idle over one ``window``
    (what earlier tests left running, a worker chewing a backlog, has settled), or the
    deadline; returns the last window's idle fraction either way: a busy machine is
    reported, not a failure of the caller's test."""
    deadline = time.monotonic() + timeout
    busy0, idle0 = _cpu_busy_idle()
    frac = 0.0
    while True:
        time.sleep(window)
        busy1, idle1 = _cpu_busy_idle()
        total = (busy1 - busy0) + (idle1 - idle0)
        frac = (idle1 - idle0) / total if total else 0.0
        if frac >= min_idle or time.monotonic() >= deadline:
            return frac
        busy0, idle0 = busy1, idle1


class Component:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.argv, self.env, self.log = name, argv, env, log
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    def start(self) -> None:
        self._out = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._out is not None:
            self._out.close()
            self._out = None


class Pipeline:
    """probe + worker + sink on one broker, with a config of their own."""

    def __init__(self, base: Config, workdir: Path, *, window_seconds: int = 2,
                 extra: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        web_port, prom_port = free_ports(2)
        app_id = f"ks-{base.kafka.topic_prefix.rstrip('.')}"
        tree: dict[str, Any] = {
            "node_name": "e2e-node",
            "state_dir": str(workdir / "state"),
            "log_level": "info",
            "kafka": {"bootstrap_servers": base.kafka.bootstrap,
                      "topic_prefix": base.kafka.topic_prefix, "partitions": 2},
            "streams": {"window_seconds": window_seconds, "grace_seconds": 1.0,
                        "web_port": web_port, "app_id": app_id},
            "sinks": {"prometheus": {"listen": f"127.0.0.1:{prom_port}"}},
        }
        for section, values in (extra or {}).items():
            tree.setdefault(section, {}).update(values)
        self.config_path = workdir / "kubesight.yaml"
        self.config_path.write_text(yaml.safe_dump(tree))
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBESIGHT_")}
        env["KUBESIGHT_CONFIG"] = str(self.config_path)
        env["PYTHONUNBUFFERED"] = "1"
        self.config = load(self.config_path, environ=env)
        self.metrics_url = f"http://127.0.0.1:{prom_port}/metrics"
        run = self.config.state_path / "run"
        run.mkdir(parents=True, exist_ok=True)
        logs = workdir / "logs"
        logs.mkdir(exist_ok=True)
        me = own_command()
        self.components = {name: Component(name, [*me, name], env, logs / f"{name}.log")
                           for name in ("sink", "worker", "probe")}

    def exclude(self, name: str, pid: int) -> None:
        """Keep a test-side process (this pytest, the broker) out of the capture."""
        (self.config.state_path / "run" / f"{name}.pid").write_text(f"{pid}\n")

    def start(self) -> None:
        ensure_topics(self.config)
        self.exclude("pytest", os.getpid())
        for name in ("sink", "worker"):
            self.components[name].start()
        worker = self.components["worker"]
        self.exclude("worker", worker.proc.pid if worker.proc else 0)
        self.exclude("sink", self.components["sink"].proc.pid)  # type: ignore[union-attr]
        wait_for("the stream worker to be ready", lambda: self._ready("worker", "Ready"),
                 timeout=90)
        wait_for("the sink's metrics endpoint", self.scrape_ok, timeout=30)
        self.components["probe"].start()
        wait_for("the probe to attach", lambda: self._ready("probe", "attached"), timeout=30)

    def _ready(self, name: str, marker: str) -> bool:
        comp = self.components[name]
        if not comp.alive():
            raise AssertionError(f"{name} exited early:\n{comp.log_text()[-4000:]}")
        return marker in comp.log_text()

    def stop(self) -> None:
        for name in ("probe", "worker", "sink"):
            self.components[name].stop()

    # -- reading what kubesight says --------------------------------------------------------
    def scrape_ok(self) -> bool:
        try:
            self.scrape()
            return True
        except OSError:
            return False

    def scrape(self) -> dict[tuple[str, Labels], float]:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            samples, _helps, _types = parse(resp.read().decode())
        return samples

    def total(self, metric: str, **labels: str) -> float:
        want = set(labels.items())
        return sum(v for (name, lab), v in self.scrape().items()
                   if name == metric and want <= set(lab))

    def series(self, metric: str, **labels: str) -> dict[Labels, float]:
        want = set(labels.items())
        return {lab: v for (name, lab), v in self.scrape().items()
                if name == metric and want <= set(lab)}

    def wait_total(self, expected: float, metric: str, timeout: float = 90,
                   **labels: str) -> float:
        """Poll until the summed counter equals ``expected`` and stays there for a while."""
        seen: list[float] = []

        def check() -> bool:
            value = self.total(metric, **labels)
            seen.append(value)
            settled = len(seen) >= 4 and len(set(seen[-4:])) == 1
            return value == expected and settled

        try:
            wait_for(f"{metric}{labels} == {expected}", check, timeout=timeout, interval=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; values seen: {seen[-8:]}\n{self.diagnostics()}") from None
        return seen[-1]

    def wait_settled(self, metric: str, timeout: float = 90, **labels: str) -> float:
        """The summed counter once it has stopped changing for a few windows."""
        seen: list[float] = []

        def check() -> bool:
            seen.append(self.total(metric, **labels))
            return len(seen) >= 12 and len(set(seen[-12:])) == 1

        wait_for(f"{metric}{labels} to settle", check, timeout=timeout, interval=0.5)
        return seen[-1]

    def diagnostics(self) -> str:
        parts = []
        for name, comp in self.components.items():
            parts.append(f"--- {name} log (tail) ---\n{comp.log_text()[-2500:]}")
        samples = self.scrape()
        pipeline = {k: v for k, v in samples.items()
                    if k[0].startswith("kubesight_pipeline_counter")}
        parts.append("--- pipeline counters ---\n" + "\n".join(
            f"{dict(k[1])}: {v}" for k, v in sorted(pipeline.items(), key=str)))
        calls: dict[tuple[str, str, str], float] = {}
        for (name, lab), v in samples.items():
            if name == "kubesight_requests_total":
                d = dict(lab)
                key = (d.get("side", ""), d.get("src_workload", ""), d.get("dst_workload", ""))
                calls[key] = calls.get(key, 0.0) + v
        parts.append("--- requests by side, src, dst ---\n" + "\n".join(
            f"{k}: {v}" for k, v in sorted(calls.items())))
        parts.append(f"--- raw.v1: the group's committed offset / end ---\n{self._raw_offsets()}")
        return "\n".join(parts)

    def _raw_offsets(self) -> str:
        from confluent_kafka import Consumer, TopicPartition

        topic = self.config.topic("raw.v1")
        try:
            group = Consumer({**self.config.kafka.librdkafka(),
                              "group.id": self.config.streams.app_id})  # asks, never joins
            try:
                tps = [TopicPartition(topic, p) for p in range(self.config.kafka.partitions)]
                return ", ".join(
                    f"{tp.partition}: {tp.offset} / "
                    f"{group.get_watermark_offsets(tp, timeout=5)[1]}"
                    for tp in group.committed(tps, timeout=10))
            finally:
                group.close()
        except Exception as exc:  # noqa: BLE001 - diagnostics must not hide the failure
            return f"(not read: {type(exc).__name__}: {exc})"


# -- real servers and clients -------------------------------------------------------------------
NGINX_CONF = """
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format counted '$status $request_method $uri $request_length';
    access_log {dir}/access.log counted;
    client_max_body_size 16m;
    client_body_buffer_size 2m;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port}{tls};
        location = / {{ return 200 "{body}"; }}
        location = /small {{ return 200 "ok"; }}
        location = /error {{ return 503 "unavailable"; }}
        location = /upload {{ return 200 "stored"; }}
        location /items/ {{ return 200 "item"; }}
    }}
}}
"""


class Nginx:
    """nginx on loopback; with ``tls=True`` it serves HTTPS with a throwaway self-signed
    certificate (clients must skip verification: curl -k; wrk never verifies)."""

    def __init__(self, workdir: Path, *, tls: bool = False) -> None:
        self.dir = workdir / "nginx"
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.port,) = free_ports(1)
        self.tls = tls
        body = "x" * 600  # about the size of nginx's default index page
        listen_tls = ""
        if tls:
            cert, key = self.dir / "cert.pem", self.dir / "key.pem"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                            "-keyout", str(key), "-out", str(cert), "-days", "2",
                            "-subj", "/CN=localhost"], check=True, capture_output=True,
                           timeout=60)
            listen_tls = (f" ssl;\n        ssl_certificate {cert};"
                          f"\n        ssl_certificate_key {key}")
        (self.dir / "nginx.conf").write_text(NGINX_CONF.format(dir=self.dir, port=self.port,
                                                               body=body, tls=listen_tls))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = subprocess.Popen([nginx, "-c", str(self.dir / "nginx.conf"),
                                      "-p", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # A bare TCP connect: an HTTP probe here would be a request the tests did not count.
        wait_for("nginx to listen", lambda: _listens(self.port), timeout=20)

    def access_log(self) -> list[str]:
        try:
            return (self.dir / "access.log").read_text().splitlines()
        except FileNotFoundError:
            return []

    def served(self, path: str | None = None) -> int:
        """Requests nginx has logged, once its log stops growing (it logs after responding)."""
        seen: list[int] = []

        def settled() -> bool:
            seen.append(self._logged(path))
            return len(seen) >= 3 and seen[-1] == seen[-3]

        wait_for("nginx's access log to settle", settled, timeout=30, interval=0.25)
        return seen[-1]

    def _logged(self, path: str | None) -> int:
        lines = self.access_log()
        if path is None:
            return len(lines)
        return sum(1 for line in lines if line.split()[2] == path)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _listens(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


WRK_SUMMARY = re.compile(r"(\d+) requests in ([\d.]+)(\w+)")
WRK_LATENCY = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


class WrkResult:
    def __init__(self, text: str) -> None:
        self.text = text
        m = WRK_SUMMARY.search(text)
        if not m:
            raise AssertionError(f"wrk printed no summary:\n{text}")
        self.requests = int(m.group(1))
        self.latency = {int(p): float(v) * _UNIT[u] for p, v, u in WRK_LATENCY.findall(text)}
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        self.non_2xx = int(non2xx.group(1)) if non2xx else 0


def wrk(url: str, *, connections: int = 8, threads: int = 2, seconds: float = 3,
        script: Path | None = None, extra: Iterable[str] = ()) -> WrkResult:
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency",
            "--timeout", "10s", *extra]
    if script is not None:
        argv += ["-s", str(script)]
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=True,
                         timeout=seconds + 60)
    return WrkResult(out.stdout)


def curl(*args: str) -> int:
    """Run curl; returns the HTTP status it reports."""
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", *args],
                         capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout)


def read_topic(config: Config, logical: str, timeout: float = 20) -> list[Any]:
    """Every record on a topic right now, msgpack-decoded (empty values as None)."""
    import msgpack
    from confluent_kafka import Consumer, TopicPartition

    topic = config.topic(logical)
    consumer = Consumer({**config.kafka.librdkafka(), "group.id": "kubesight-tests",
                         "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=10)
        ends = {}
        assign = []
        for p in meta.topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
                assign.append(TopicPartition(topic, p, low))
        out: list[Any] = []
        if not assign:
            return out
        consumer.assign(assign)
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            for m in consumer.consume(num_messages=1000, timeout=0.5):
                if m.error():
                    continue
                value = m.value()
                out.append(msgpack.unpackb(value, raw=False) if value else None)
                if m.offset() + 1 >= ends.get(m.partition(), 0):
                    ends.pop(m.partition(), None)
        assert not ends, f"could not read {topic} to its end within {timeout}s"
        return out
    finally:
        consumer.close()


@contextlib.contextmanager
def running_server(kind: str, comm: str, *args: str) -> Iterator[int]:
    """One of tests/e2e/servers.py's servers as its own process; yields its port."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.e2e.servers", kind, comm, *args],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        if not line.startswith("listening "):
            raise AssertionError(f"{kind} server did not start: {line!r}")
        yield int(line.split()[1])
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
