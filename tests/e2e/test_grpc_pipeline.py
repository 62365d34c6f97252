"""gRPC end to end: a grpcio server and a grpcio client, each its own process (grpc_apps.py),
→ kernel → Kafka → Faust → Prometheus. Counts must equal what the apps report themselves:
the client what each call returned, the server what it answered.

The client makes, on one channel (one HTTP/2 connection): unary calls, some NOT_FOUND
(trailers-only responses); server-streaming calls of 5 messages, some ending with
RESOURCE_EXHAUSTED after 2; bidi calls of 3 messages. Endpoints are named after a service
unique to this run, so no other test's traffic can be counted.

grpc-core does its socket I/O on threads it names "event_engine": the probe names a workload
by its process (the thread group leader's comm), so the apps' own names are what we see. It
writes a connection's first header blocks with one iovec per literal (14 to 22 per sendmsg):
the probe walks up to ``L7_MAX_IOVECS`` (32) of them, so the HPACK tables stay whole.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from .harness import REPO, Pipeline

pytestmark = [pytest.mark.e2e, pytest.mark.bpf, pytest.mark.kafka]

REQ = "kubesight_requests_total"
ERR = "kubesight_request_errors_total"
SERVER, CLIENT = "grpc-srv-e2e", "grpc-cli-e2e"
PLAN = {"unary_ok": 24, "unary_not_found": 6, "stream_ok": 6, "stream_fail": 3, "bidi": 4}
CODES = {"OK": "0", "NOT_FOUND": "5", "RESOURCE_EXHAUSTED": "8"}
METHODS = ("Unary", "ServerStream", "Bidi")
Report = dict[str, dict[str, int]]  # method → status name → calls


@pytest.fixture(scope="module")
def calls(pipeline: Pipeline) -> Iterator[tuple[str, Report, Report]]:
    """(service, client report, server report) of one client run against one server."""
    service = f"ks{uuid.uuid4().hex[:8]}.Echo"
    env = dict(os.environ)
    app = [sys.executable, "-m", "tests.e2e.grpc_apps"]
    server = subprocess.Popen([*app, "server", SERVER, service], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    assert server.stdin is not None and server.stdout is not None
    try:
        line = server.stdout.readline()
        assert line.startswith("listening "), f"gRPC server did not start: {line!r}"
        out = subprocess.run([*app, "client", CLIENT, line.split()[1], service, json.dumps(PLAN)],
                             capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
                             check=True)
        client: Report = json.loads(out.stdout)
        server.stdin.write("stats\n")
        server.stdin.flush()
        served: Report = json.loads(server.stdout.readline())
        yield service, client, served
    finally:
        server.stdin.close()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server.stdout.close()


def test_the_apps_agree_on_what_happened(calls: tuple[str, Report, Report]) -> None:
    _, client, served = calls
    assert {m: client[m] for m in METHODS} == served == {
        "Unary": {"OK": 24, "NOT_FOUND": 6}, "ServerStream": {"OK": 6, "RESOURCE_EXHAUSTED": 3},
        "Bidi": {"OK": 4}}
    assert client["ServerStream messages"] == {"5": 6, "2": 3}


def test_server_side_counts_per_endpoint(pipeline: Pipeline,
                                         calls: tuple[str, Report, Report]) -> None:
    """The server reads its requests whole: every call is counted under its endpoint."""
    service, _, served = calls
    for method in METHODS:
        pipeline.wait_total(sum(served[method].values()), REQ, side="server", protocol="grpc",
                            src_workload=CLIENT, dst_workload=SERVER,
                            endpoint=f"/{service}/{method}")


def test_client_side_counts_per_status(pipeline: Pipeline,
                                       calls: tuple[str, Report, Report]) -> None:
    """The client reads its responses whole: every call is counted under its gRPC status,
    non-OK ones as errors."""
    _, client, _ = calls
    by_status: dict[str, int] = {}
    for method in METHODS:
        for name, n in client[method].items():
            by_status[CODES[name]] = by_status.get(CODES[name], 0) + n
    for status, n in sorted(by_status.items()):
        labels = {"side": "client", "protocol": "grpc", "src_workload": CLIENT,
                  "dst_workload": SERVER, "status": status}
        pipeline.wait_total(n, REQ, **labels)
        pipeline.wait_total(0 if status == "0" else n, ERR, **labels)


@pytest.mark.parametrize("side", ["client", "server"])
def test_counts_per_endpoint_and_status_are_exact(pipeline: Pipeline,
                                                  calls: tuple[str, Report, Report],
                                                  side: str) -> None:
    service, client, served = calls
    report = client if side == "client" else served
    for method in METHODS:
        for name, n in report[method].items():
            labels = {"side": side, "protocol": "grpc", "src_workload": CLIENT,
                      "dst_workload": SERVER, "endpoint": f"/{service}/{method}",
                      "status": CODES[name]}
            pipeline.wait_total(n, REQ, timeout=30, **labels)
            pipeline.wait_total(0 if name == "OK" else n, ERR, timeout=30, **labels)
