"""Redis end to end: kernel → Kafka → Faust → Prometheus, checked against the server's report.

redis-server and redis-benchmark are the Debian binaries, run through symlinks whose names
(the process ``comm``, so the workload labels) belong to this test alone: other pipelines on
the machine see this traffic too. Exact counts per command come from the server's own
``INFO commandstats`` (calls + rejected calls), read over a socket of this (excluded) pytest
process so the reading itself is never captured client-side.
"""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_ports

from .harness import Pipeline, read_topic, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.bpf, pytest.mark.kafka]

REQ = "kubesight_requests_total"
ERR = "kubesight_request_errors_total"
SERVER, BENCH, CLI = "ks-redis-e2e", "ks-rbench-e2e", "ks-rcli-e2e"  # comm: at most 15 chars
N = 2000  # a multiple of the pipeline depth: redis-benchmark issues whole pipelines
COMMANDS = ("SET", "GET", "INCR", "LPUSH")


class Redis:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.bin = workdir / "bin"
        self.bin.mkdir()
        for name, target in ((SERVER, "redis-server"), (BENCH, "redis-benchmark"),
                             (CLI, "redis-cli")):
            (self.bin / name).symlink_to(f"/usr/bin/{target}")
        (self.port,) = free_ports(1)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(self.bin / SERVER), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for("redis-server to answer", lambda: self._ping(), timeout=20)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(15)

    def call(self, *args: str) -> bytes:
        """One command on a fresh connection of this (uncaptured) process; the raw reply."""
        payload = b"*%d\r\n" % len(args) + b"".join(
            b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(payload)
            reply = b""
            while not reply.endswith(b"\r\n") or (reply[:1] == b"$" and reply.count(b"\r\n") < 2):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        return reply

    def _ping(self) -> bool:
        try:
            return self.call("PING") == b"+PONG\r\n"
        except OSError:
            return False

    def commandstats(self) -> dict[str, dict[str, int]]:
        """Per command ("CONFIG GET"): calls, rejected_calls, failed_calls."""
        out: dict[str, dict[str, int]] = {}
        for m in re.finditer(rb"cmdstat_([^:]+):(\S+)", self.call("INFO", "commandstats")):
            name = m.group(1).decode().replace("|", " ").upper()
            out[name] = {k: int(float(v)) for k, v in
                         (kv.split("=") for kv in m.group(2).decode().split(","))}
        return out

    def benchmark(self, *args: str) -> dict[str, float]:
        """redis-benchmark -q: requests per second per test, as it reports them."""
        out = subprocess.run(
            [str(self.bin / BENCH), "-h", "127.0.0.1", "-p", str(self.port), "-q", *args],
            capture_output=True, text=True, timeout=120, check=True)
        return {m.group(1): float(m.group(2))
                for m in re.finditer(r"(\w+): ([\d.]+) requests per second", out.stdout)}

    def cli(self, *args: str) -> str:
        out = subprocess.run([str(self.bin / CLI), "-p", str(self.port), *args],
                             capture_output=True, text=True, timeout=30, check=True)
        return out.stdout.strip()


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    server = Redis(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def served(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, int]:
    """Commands the server received between two readings (executed or rejected)."""
    def count(stats: dict[str, dict[str, int]], name: str) -> int:
        s = stats.get(name, {})
        return s.get("calls", 0) + s.get("rejected_calls", 0)

    delta = {name: count(after, name) - count(before, name) for name in after}
    delta.pop("INFO", None)  # our own readings
    return {name: n for name, n in delta.items() if n}


def totals(pipeline: Pipeline, names: list[str], **labels: str) -> dict[str, float]:
    return {name: pipeline.total(REQ, protocol="redis", endpoint=name, **labels)
            for name in names}


@pytest.mark.parametrize("depth", [1, 16], ids=["unpipelined", "pipelined-16"])
def test_benchmark_counts_are_exact(pipeline: Pipeline, redis: Redis, depth: int) -> None:
    names = [*COMMANDS, "CONFIG GET"]
    client0 = totals(pipeline, names, side="client", src_workload=BENCH, dst_workload=SERVER)
    server0 = totals(pipeline, names, side="server", dst_workload=SERVER)
    stats0 = redis.commandstats()

    report = redis.benchmark("-n", str(N), "-c", "8", "-P", str(depth),
                             "-t", ",".join(c.lower() for c in COMMANDS))

    assert set(report) == set(COMMANDS), report
    delta = served(stats0, redis.commandstats())
    # The server saw exactly N of each, plus redis-benchmark's start-up CONFIG GETs.
    assert {c: delta.get(c) for c in COMMANDS} == dict.fromkeys(COMMANDS, N), delta
    assert set(delta) == set(names), delta
    for name in names:
        pipeline.wait_total(client0[name] + delta[name], REQ, protocol="redis", side="client",
                            src_workload=BENCH, dst_workload=SERVER, endpoint=name, status="OK")
        pipeline.wait_total(server0[name] + delta[name], REQ, protocol="redis", side="server",
                            dst_workload=SERVER, endpoint=name, status="OK")


def test_error_replies_are_counted_as_errors(pipeline: Pipeline, redis: Redis) -> None:
    assert redis.call("SET", "e2e:text", "not a number") == b"+OK\r\n"
    stats0 = redis.commandstats()
    err0 = pipeline.total(ERR, protocol="redis", side="server", dst_workload=SERVER)

    incr = redis.cli("INCR", "e2e:text")
    lpush = redis.cli("-3", "LPUSH", "e2e:text", "x")  # RESP3: HELLO 3 first

    assert incr.startswith("ERR value is not an integer"), incr
    assert lpush.startswith("WRONGTYPE"), lpush
    delta = served(stats0, redis.commandstats())
    stats = redis.commandstats()
    assert stats["INCR"]["failed_calls"] >= 1 and stats["LPUSH"]["failed_calls"] >= 1
    assert delta == {"INCR": 1, "LPUSH": 1, "HELLO": 1}, delta
    for side, who in (("client", {"src_workload": CLI}), ("server", {})):
        labels = {"protocol": "redis", "side": side, "dst_workload": SERVER, **who}
        pipeline.wait_total(1, ERR, endpoint="INCR", status="ERR", **labels)
        pipeline.wait_total(1, ERR, endpoint="LPUSH", status="WRONGTYPE", **labels)
        pipeline.wait_total(1, REQ, endpoint="HELLO", status="OK", **labels)
    pipeline.wait_total(err0 + 2, ERR, protocol="redis", side="server", dst_workload=SERVER)

    # The request records carry the command and its key, never the value.
    def cli_records() -> list[dict[str, object]]:
        return [r for batch in read_topic(pipeline.config, "requests.v1") if batch
                for r in batch["requests"]
                if r["protocol"] == "redis" and r["src_workload"] == CLI and r["side"] == "client"]

    records = wait_for("the CLI's records on requests.v1", lambda: len(cli_records()) >= 3 and
                       cli_records(), timeout=60)
    assert sorted((r["query"], r["status"], r["error"]) for r in records) == [
        ("HELLO", "OK", False), ("INCR e2e:text", "ERR", True),
        ("LPUSH e2e:text", "WRONGTYPE", True)]
