"""PostgreSQL end to end: kernel → Kafka → Faust → Prometheus, checked against pgbench and psql.

A private PostgreSQL 15 (its own data dir, loopback port and socket dir) is loaded with
``pgbench -i`` over its Unix socket (which the probe does not see), then driven over TCP by
``pgbench -c 4 -t 200`` in each query mode: ``simple`` (Query), ``extended`` (unnamed
Parse/Bind/Describe/Execute/Sync) and ``prepared`` (named statements, Parse once per
connection). Truth is pgbench's own report: every transaction of the tpcb-like script runs each
of its seven statements once. Both ends are on this node, so each statement is seen twice: by
pgbench (side=client) and by the backend serving it (side=server; backends are forked by the
postmaster and keep its comm, ``postgres``).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.pgserver import BIN, PostgresServer

from .harness import Pipeline, read_topic

pytestmark = [pytest.mark.e2e, pytest.mark.bpf, pytest.mark.kafka]

REQ = "kubesight_requests_total"
ERR = "kubesight_request_errors_total"
SERVER = "postgres"  # comm of the postmaster and of every backend it forks
CLIENTS, TRANSACTIONS = 4, 200
TPCB = ("BEGIN", "UPDATE pgbench_accounts", "SELECT pgbench_accounts", "UPDATE pgbench_tellers",
        "UPDATE pgbench_branches", "INSERT pgbench_history", "END")


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    if not (BIN / "postgres").exists():
        pytest.skip(f"PostgreSQL 15 is not installed ({BIN}): see APT_PACKAGES in the Makefile")
    server = PostgresServer()
    try:
        server.start()
        server.pgbench_init()
        yield server
    finally:
        server.stop()


def pgbench(server: PostgresServer, mode: str) -> int:
    """Run pgbench over TCP; returns the transactions it reports as processed."""
    out = subprocess.run(
        [str(BIN / "pgbench"), "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres",
         "-c", str(CLIENTS), "-t", str(TRANSACTIONS), "-M", mode, "postgres"],
        capture_output=True, text=True, timeout=300, check=True)
    processed = re.search(r"number of transactions actually processed: (\d+)/(\d+)", out.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    assert processed and failed, out.stdout + out.stderr
    assert failed.group(1) == "0" and processed.group(1) == processed.group(2), out.stdout
    return int(processed.group(1))


def both_sides(src: str) -> list[dict[str, str]]:
    return [{"side": side, "protocol": "postgresql", "src_workload": src,
             "dst_workload": SERVER} for side in ("client", "server")]


# What each mode sends for pgbench's second statement: (method, prepared statement name, text
# as records carry it: literals masked in simple Queries, $n parameters otherwise).
UPDATE_ACCOUNTS = {
    "simple": ("Query", "", "UPDATE pgbench_accounts SET abalance = abalance + ? WHERE aid = ?"),
    "extended": ("Execute", "",
                 "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2"),
    "prepared": ("Execute", "P_1",
                 "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2"),
}


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_statement_counts_are_exact(pipeline: Pipeline, postgres: PostgresServer,
                                            mode: str) -> None:
    before = {(side["side"], endpoint): pipeline.total(REQ, endpoint=endpoint, **side)
              for side in both_sides("pgbench") for endpoint in TPCB}
    errors = sum(pipeline.total(ERR, **side) for side in both_sides("pgbench"))

    processed = pgbench(postgres, mode)

    assert processed == CLIENTS * TRANSACTIONS
    for side in both_sides("pgbench"):
        for endpoint in TPCB:
            pipeline.wait_total(before[(side["side"], endpoint)] + processed, REQ,
                                endpoint=endpoint, **side)
    assert sum(pipeline.total(ERR, **side) for side in both_sides("pgbench")) == errors

    # The request records of this run, told from the other runs' by method and statement name.
    method, name, text = UPDATE_ACCOUNTS[mode]
    mine = [r for r in _records(pipeline) if r["src_workload"] == "pgbench"
            and r["dst_workload"] == SERVER and r["endpoint"] == "UPDATE pgbench_accounts"
            and (r["method"], r["path"]) == (method, name)]
    for side in ("client", "server"):
        assert [r["query"] for r in mine if r["side"] == side] == [text] * processed
    assert all(r["complete"] and r["status"] == "OK" and not r["error"] for r in mine)


def test_failing_query_is_an_error_with_its_sqlstate(pipeline: Pipeline,
                                                     postgres: PostgresServer) -> None:
    out = subprocess.run(
        [str(BIN / "psql"), "-X", "-h", "127.0.0.1", "-p", str(postgres.port), "-U", "postgres",
         "-d", "postgres", "-c", "SELECT * FROM no_such_table"],
        capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1 and "does not exist" in out.stderr
    for side in both_sides("psql"):
        pipeline.wait_total(1, ERR, endpoint="SELECT no_such_table", status="42P01", **side)
        assert pipeline.total(REQ, endpoint="SELECT no_such_table", **side) == 1
    failing = [(r["side"], r["method"], r["status"], r["error"], r["query"])
               for r in _records(pipeline) if r["endpoint"] == "SELECT no_such_table"]
    assert sorted(failing) == [
        (side, "Query", "42P01", True, "SELECT * FROM no_such_table")
        for side in ("client", "server")]


def _records(pipeline: Pipeline) -> list[dict[str, Any]]:
    return [r for msg in read_topic(pipeline.config, "requests.v1", timeout=60) if msg
            for r in msg["requests"] if r["protocol"] == "postgresql"]
