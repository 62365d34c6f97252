"""DNS end to end: kernel → Kafka → Faust → Prometheus, checked against the clients' reports.

dnsmasq answers local names (NOERROR, NXDOMAIN; REFUSED for names it has no server for) and
forwards three domains to the upstream of ``tests/e2e/dnsprocs.py``: ``slow.test`` answered
after ``DELAY`` s, ``fail.test`` SERVFAIL, ``late.test`` only after 6 s, past kubesight's 5 s
deadline and the client's patience: a timeout on every edge it crosses. (Not a true blackhole:
dnsmasq resends an unanswered query to its upstream now and then, tens of seconds apart, and
each resend is another timeout on that edge; an answer, even late, ends that.) Queries come
from dnsprocs' client, with a comm of its own per test, and from dig. Counts are exact
against what the clients saw, and on dnsmasq's upstream edge against the upstream's own log.
Both transports run: over UDP each (socket, peer) pair is a flow of its own in the kernel.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubesight.streams.dns import EXPIRE_GRACE_NS, TIMEOUT_NS
from kubesight.streams.sketch import LatencySketch

from tests.conftest import free_ports

from .harness import REPO, Pipeline, read_topic, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.bpf, pytest.mark.kafka]

REQ = "kubesight_requests_total"
ERR = "kubesight_request_errors_total"
SLOW = "kubesight_slow_requests_total"
DELAY = 0.3  # the upstream's answer to slow.test
ERRORS = {"SERVFAIL", "REFUSED", "TIMEOUT"}

# (qtype, name, count, status dnsmasq gives): every kind of answer, on one connection.
PLAN = [
    ("A", "ok.test", 3, "NOERROR"), ("AAAA", "ok.test", 1, "NOERROR"),
    ("TXT", "txt.ok.test", 1, "NOERROR"), ("SRV", "_http._tcp.ok.test", 1, "NOERROR"),
    ("PTR", "1.0.0.10.in-addr.arpa", 1, "NOERROR"), ("A", "nx.test", 2, "NXDOMAIN"),
    ("MX", "ok.test", 1, "REFUSED"), ("A", "fail.test", 2, "SERVFAIL"),
    ("NS", "slow.test", 3, "NOERROR"),
]  # fmt: skip


class Dnsmasq:
    def __init__(self, workdir: Path, upstream: int, upstream_log: Path) -> None:
        self.dir = workdir
        self.upstream_log = upstream_log  # what the upstream did, one line per query
        (self.port,) = free_ports(1)
        self.argv = [
            # -k, not --no-daemon: in debug mode dnsmasq answers TCP in its main process, and
            # one slow upstream answer would stall it for everyone.
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", f"--port={self.port}",
            "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
            "--cache-size=0", f"--pid-file={workdir}/dnsmasq.pid",
            "--address=/ok.test/10.0.0.1", "--address=/ok.test/fd00::1", "--address=/nx.test/",
            '--txt-record=txt.ok.test,"hello kubesight"',
            "--srv-host=_http._tcp.ok.test,web.ok.test,80",
            "--ptr-record=1.0.0.10.in-addr.arpa,web.ok.test",
            *(f"--server=/{d}/127.0.0.1#{upstream}" for d in ("slow.test", "fail.test",
                                                                "late.test")),
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # Its own session: dnsmasq forks a child per TCP connection; stop() ends the group.
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for("dnsmasq to listen", self._listens, timeout=20)

    def _listens(self) -> bool:
        import socket

        assert self.proc is not None and self.proc.poll() is None, "dnsmasq exited"
        try:  # a bare connect: a query here would be one the tests did not count
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        # TCP children still waiting on the upstream do not mind SIGTERM.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    workdir = tmp_path_factory.mktemp("dnsmasq")
    log = workdir / "upstream.log"
    log.touch()
    upstream = subprocess.Popen([sys.executable, "-m", "tests.e2e.dnsprocs", "upstream",
                                 "ksdnsup", str(DELAY), str(log)], stdout=subprocess.PIPE,
                                text=True, cwd=REPO)
    assert upstream.stdout is not None
    server: Dnsmasq | None = None
    try:
        line = upstream.stdout.readline()
        assert line.startswith("listening "), f"upstream did not start: {line!r}"
        server = Dnsmasq(workdir, int(line.split()[1]), log)
        server.start()
        yield server
    finally:
        if server is not None:
            server.stop()
        upstream.kill()
        upstream.wait()
        upstream.stdout.close()


def client(comm: str, port: int, transport: str, conns: list[list[tuple[str, str]]],
           hold: float = 0.0) -> list[list[Any]]:
    """Run dnsprocs' client as ``comm``; its results: [qtype, name, status, seconds].

    Over TCP it waits 50 ms after connecting: dnsmasq's parent closes its copy of each
    accepted socket after forking the child that answers, and the probe reports that close
    as the connection's end (see test_forked_server_keeps_its_connection_after_the_parent_
    closes). Sending at once would race that close against the child's first answer."""
    plan = {"transport": transport, "timeout": 2.0, "hold": hold, "conns": conns,
            "pause": 0.05 if transport == "tcp" else 0.0}
    out = subprocess.run([sys.executable, "-m", "tests.e2e.dnsprocs", "client", comm,
                          str(port), json.dumps(plan)], capture_output=True, text=True,
                         cwd=REPO, timeout=120, check=True)
    results: list[list[Any]] = json.loads(out.stdout)["results"]
    return results


def statuses(results: list[list[Any]]) -> collections.Counter[str]:
    """What the client saw, named as kubesight names it (the client's "timeout" is ours)."""
    return collections.Counter("TIMEOUT" if r[2] == "timeout" else r[2] for r in results)


def upstream_report(log: Path, since: int) -> collections.Counter[str]:
    """What the upstream did after line ``since`` of its log, as kubesight must count it: an
    answer after the deadline is a TIMEOUT; a query resent from the same socket under the same
    id while it is still waiting is the same query (kubesight merges retransmissions)."""
    statuses: collections.Counter[str] = collections.Counter()
    waiting: dict[tuple[str, ...], int] = {}  # query → its deadline, while unanswered
    rows = sorted(line.split() for line in log.read_text().splitlines()[since:])
    for received, answered, source, qid, qtype, name, status in rows:
        key, sent = (source, qid, qtype, name), int(received)
        if sent <= waiting.get(key, -1):
            waiting[key] = sent + TIMEOUT_NS
            continue
        if status != "none" and int(answered) - sent <= TIMEOUT_NS:
            statuses[status] += 1
        else:
            statuses["TIMEOUT"] += 1
            waiting[key] = sent + TIMEOUT_NS
    return statuses


def wait_statuses(pipeline: Pipeline, expected: collections.Counter[str],
                  **labels: str) -> None:
    for status, count in sorted(expected.items()):
        pipeline.wait_total(count, REQ, protocol="dns", status=status, **labels)
    pipeline.wait_total(sum(expected.values()), REQ, protocol="dns", **labels)
    pipeline.wait_total(sum(n for s, n in expected.items() if s in ERRORS), ERR,
                        protocol="dns", **labels)


def run_plan(pipeline: Pipeline, dnsmasq: Dnsmasq, transport: str, comm: str) -> None:
    """Every kind of answer on one connection (or UDP socket), then on another a query the
    upstream answers too late, held open past kubesight's deadline."""
    for side, labels in (("client", {"src_workload": comm}),
                         ("server", {"src_workload": comm, "dst_workload": "dnsmasq"})):
        assert pipeline.total(REQ, side=side, **labels) == 0
    edges = [{"side": "client", "src_workload": "dnsmasq", "dst_workload": "ksdnsup"},
             {"side": "server", "dst_workload": "ksdnsup"}]
    before = [{s: pipeline.total(REQ, protocol="dns", status=s, **edge)
               for s in ("NOERROR", "SERVFAIL", "TIMEOUT")} for edge in edges]
    logged = len(dnsmasq.upstream_log.read_text().splitlines())
    queries = [(qtype, name) for qtype, name, count, _ in PLAN for _ in range(count)]
    hold = (TIMEOUT_NS + EXPIRE_GRACE_NS) / 1e9  # closed after the deadline, not before
    results = client(comm, dnsmasq.port, transport, [queries, [("A", "late.test")]], hold)

    expected = collections.Counter({status: 0 for *_, status in PLAN})
    for _, _, count, status in PLAN:
        expected[status] += count
    expected["TIMEOUT"] = 1
    seen = statuses(results)
    assert seen == expected, results
    wait_statuses(pipeline, seen, side="client", src_workload=comm)
    wait_statuses(pipeline, seen, side="server", src_workload=comm, dst_workload="dnsmasq")
    # dnsmasq's own calls to the upstream (delayed answers, SERVFAIL, the one too late), seen
    # from both ends, as the upstream itself reports them (dnsmasq decides what to forward).
    upstream = upstream_report(dnsmasq.upstream_log, logged)
    assert set(upstream) == {"NOERROR", "SERVFAIL", "TIMEOUT"}, upstream
    for edge, counts in zip(edges, before, strict=True):
        for status, count in upstream.items():
            pipeline.wait_total(counts[status] + count, REQ, protocol="dns", status=status,
                                **edge)
    # Slow (threshold 200 ms for dns): the three delayed answers and the timeout.
    pipeline.wait_total(4, SLOW, side="client", src_workload=comm)
    # The timeout is reported at its deadline, not when the client gave up or closed.
    p50 = pipeline.series("kubesight_request_duration_seconds", side="client",
                          src_workload=comm, status="TIMEOUT", quantile="0.5")
    assert p50 and all(abs(v - TIMEOUT_NS / 1e9) <= 0.05 for v in p50.values()), p50


def test_tcp_counts_statuses_and_errors_are_exact(pipeline: Pipeline, dnsmasq: Dnsmasq) -> None:
    run_plan(pipeline, dnsmasq, "tcp", "ksdnstcp")


def test_udp_counts_statuses_and_errors_are_exact(pipeline: Pipeline, dnsmasq: Dnsmasq) -> None:
    run_plan(pipeline, dnsmasq, "udp", "ksdnsudp")


def _p50(pipeline: Pipeline, side: str, src: str, dst: str | None, endpoint: str) -> float:
    sketch = LatencySketch()
    for rec in read_topic(pipeline.config, "golden.v1"):
        s = rec["series"]
        if (s["protocol"], s["side"], s["src_workload"], s["endpoint"]) == (
                "dns", side, src, endpoint) and dst in (None, s["dst_workload"]):
            sketch.merge(LatencySketch.from_wire(rec["sketch"]))
    assert sketch.count, f"no {endpoint} latencies for {side} {src} -> {dst}"
    return sketch.quantile(0.5)


def check_delayed_latency(pipeline: Pipeline, dnsmasq: Dnsmasq, transport: str,
                          comm: str) -> None:
    """NS slow.test: dnsmasq waits DELAY for the upstream. The client's P50 must be what the
    client measured itself; dnsmasq's (server side) and its upstream call's at least DELAY."""
    results = client(comm, dnsmasq.port, transport, [[("NS", "slow.test")] * 5])
    assert statuses(results) == {"NOERROR": 5}
    theirs = statistics.median(r[3] for r in results)
    pipeline.wait_total(5, REQ, side="client", src_workload=comm, endpoint="NS")
    pipeline.wait_total(5, REQ, side="server", src_workload=comm, dst_workload="dnsmasq",
                        endpoint="NS")
    ours = _p50(pipeline, "client", comm, None, "NS")
    assert abs(ours - theirs) <= 0.05 * theirs, f"P50: kubesight {ours} vs client {theirs}"
    server = _p50(pipeline, "server", comm, "dnsmasq", "NS")
    assert DELAY <= server <= ours * 1.02, (server, ours)
    upstream = _p50(pipeline, "client", "dnsmasq", "ksdnsup", "NS")
    assert DELAY <= upstream <= server * 1.02, (upstream, server)


def test_tcp_latency_of_a_delayed_answer(pipeline: Pipeline, dnsmasq: Dnsmasq) -> None:
    check_delayed_latency(pipeline, dnsmasq, "tcp", "ksdnsslowtcp")


def test_udp_latency_of_a_delayed_answer(pipeline: Pipeline, dnsmasq: Dnsmasq) -> None:
    check_delayed_latency(pipeline, dnsmasq, "udp", "ksdnsslowudp")


def dig(port: int, *args: str) -> str:
    """dig's status line for one query, e.g. "NOERROR"."""
    out = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+time=3", "+tries=1", *args],
                         capture_output=True, text=True, timeout=30, check=False).stdout
    found = re.search(r"status: (\w+)", out)
    assert found, out
    return found.group(1)


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_dig_is_counted_as_it_reports(pipeline: Pipeline, dnsmasq: Dnsmasq,
                                      transport: str) -> None:
    # dig does its I/O on a libuv thread ("isc-net-0000"): the workload is still the process.
    labels = {"side": "client", "src_workload": "dig", "dst_workload": "dnsmasq",
              "protocol": "dns"}
    before = {s: pipeline.total(REQ, status=s, **labels) for s in ("NOERROR", "NXDOMAIN")}
    flags = ["+tcp"] if transport == "tcp" else ["+notcp"]
    seen = collections.Counter(dig(dnsmasq.port, *flags, name, qtype) for name, qtype in (
        ("ok.test", "A"), ("ok.test", "AAAA"), ("_http._tcp.ok.test", "SRV"), ("nx.test", "A")))
    assert seen == {"NOERROR": 3, "NXDOMAIN": 1}
    for status, count in seen.items():
        pipeline.wait_total(before[status] + count, REQ, status=status, **labels)


def test_forked_server_keeps_its_connection_after_the_parent_closes(pipeline: Pipeline) -> None:
    """A forking server (dnsmasq over TCP, prefork HTTP servers): the parent closes its copy
    of the accepted socket while the child, which holds the other, is still answering."""
    server = subprocess.Popen([sys.executable, "-m", "tests.e2e.dnsprocs", "forking",
                               "ksdnsfork", str(DELAY)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO, start_new_session=True)
    assert server.stdout is not None
    try:
        port = int(server.stdout.readline().split()[1])
        plan = {"transport": "tcp", "timeout": 2.0, "conns": [[("A", "fork.test")]]}
        out = subprocess.run([sys.executable, "-m", "tests.e2e.dnsprocs", "client",
                              "ksdnsforkcli", str(port), json.dumps(plan)],
                             capture_output=True, text=True, cwd=REPO, timeout=60, check=True)
        assert statuses(json.loads(out.stdout)["results"]) == {"NOERROR": 1}
        pipeline.wait_total(1, REQ, side="client", src_workload="ksdnsforkcli",
                            status="NOERROR")
        pipeline.wait_total(1, REQ, side="server", dst_workload="ksdnsfork", timeout=30)
        assert pipeline.total(REQ, side="server", dst_workload="ksdnsfork",
                              status="NOERROR") == 1
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        server.stdout.close()
