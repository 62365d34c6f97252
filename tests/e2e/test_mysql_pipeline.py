"""MySQL protocol end to end: kernel → Kafka → Faust → Prometheus, checked against MariaDB.

A private mariadbd (its own datadir, loopback port and socket) serves two clients: mysqlslap
(text protocol, COM_QUERY, several connections at once) and a small mysql-connector-python
client that runs one prepared statement N times (COM_STMT_PREPARE once, COM_STMT_EXECUTE N
times) and a query on a missing table (ERR 1146). Truth is what the clients report and the
server's own ``Com_*`` counters (read over the unix socket, which the probe does not see).
Both ends are on this node, so every statement is seen twice: from the client (side=client)
and from mariadbd (side=server).
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_ports

from .harness import Pipeline, read_topic, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.bpf, pytest.mark.kafka]

REQ = "kubesight_requests_total"
ERR = "kubesight_request_errors_total"
SERVER = "mariadbd"  # the comm of mariadbd's connection threads
CLIENT = "ksmyprep"  # the prepared-statement client names its process so
SLAP_CLIENTS, SLAP_ITERATIONS = 4, 3
EXECUTES, FAILURES = 25, 3

SETUP_SQL = """
CREATE DATABASE ksmy;
CREATE TABLE ksmy.items (id INT PRIMARY KEY, name VARCHAR(32) NOT NULL);
INSERT INTO ksmy.items VALUES (1, 'alpha'), (2, 'bravo'), (3, 'charlie');
CREATE TABLE ksmy.log (id INT AUTO_INCREMENT PRIMARY KEY, v INT NOT NULL);
"""

# Runs as its own process (the test's process is kept out of the capture) under the comm
# CLIENT; prints what it did as JSON.
PREPARED_CLIENT = """
import ctypes, json, sys
ctypes.CDLL(None).prctl(15, sys.argv[2].encode(), 0, 0, 0)  # PR_SET_NAME
import mysql.connector
executes, failures = int(sys.argv[3]), int(sys.argv[4])
cnx = mysql.connector.connect(host="127.0.0.1", port=int(sys.argv[1]), user="root",
                              database="ksmy", ssl_disabled=True)
cur = cnx.cursor(prepared=True)
names = []
for i in range(executes):
    cur.execute("SELECT name FROM items WHERE id = %s", (i % 3 + 1,))
    names += [row[0] for row in cur.fetchall()]
cur.close()
errors = []
text = cnx.cursor()
for _ in range(failures):
    try:
        text.execute("SELECT * FROM missing_table")
    except mysql.connector.Error as exc:
        errors.append(exc.errno)
cnx.close()
print(json.dumps({"rows": len(names), "errors": errors}))
"""


class MariaDB:
    """A throwaway mariadbd on a free loopback port; admin over its unix socket."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        (self.port,) = free_ports(1)
        self.socket = str(workdir / "mysqld.sock")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        data = self.dir / "data"
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}",
                        "--user=root", "--auth-root-authentication-method=normal",
                        "--skip-test-db"], check=True, capture_output=True, timeout=120)
        self.proc = subprocess.Popen(
            ["mariadbd", "--no-defaults", f"--datadir={data}", "--user=root",
             f"--port={self.port}", "--bind-address=127.0.0.1", f"--socket={self.socket}",
             f"--pid-file={self.dir}/mysqld.pid", "--skip-log-bin",
             "--innodb-buffer-pool-size=16M", f"--log-error={self.dir}/error.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for("mariadbd to accept connections on its socket", self._ready, timeout=60)
        self.admin(SETUP_SQL)

    def _ready(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, "mariadbd exited"
        return subprocess.run(["mariadb", f"--socket={self.socket}", "-uroot", "-e", "SELECT 1"],
                              capture_output=True, timeout=30).returncode == 0

    def admin(self, sql: str) -> str:
        return subprocess.run(["mariadb", f"--socket={self.socket}", "-uroot", "-N"], input=sql,
                              capture_output=True, text=True, check=True, timeout=60).stdout

    def status(self) -> dict[str, int]:
        """The server's own statement counters (``SHOW GLOBAL STATUS``: ``Com_*``)."""
        rows = self.admin("SHOW GLOBAL STATUS LIKE 'Com\\_%'").splitlines()
        return {name: int(value) for name, value in (row.split("\t") for row in rows)}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


@pytest.fixture(scope="module")
def mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDB]:
    server = MariaDB(tmp_path_factory.mktemp("mariadb"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


def delta(before: dict[str, int], after: dict[str, int], name: str) -> int:
    return after[name] - before[name]


def mysql_records(pipeline: Pipeline) -> list[dict[str, Any]]:
    return [r for msg in read_topic(pipeline.config, "requests.v1") if msg
            for r in msg["requests"] if r["protocol"] == "mysql"]


def both_sides(src: str) -> list[dict[str, str]]:
    """Series filters for one client's statements as it saw them and as mariadbd saw them."""
    return [{"side": "client", "src_workload": src, "dst_workload": SERVER},
            {"side": "server", "src_workload": src, "dst_workload": SERVER}]


def test_mysqlslap_statement_counts_are_exact(pipeline: Pipeline, mariadb: MariaDB) -> None:
    before = mariadb.status()
    out = subprocess.run(
        ["mysqlslap", "-h", "127.0.0.1", "-P", str(mariadb.port), "--protocol=tcp", "-uroot",
         f"--concurrency={SLAP_CLIENTS}", f"--iterations={SLAP_ITERATIONS}",
         "--create-schema=ksmy", "--delimiter=;",
         "--query=SELECT COUNT(*) FROM items;INSERT INTO log (v) VALUES (7)"],
        capture_output=True, text=True, check=True, timeout=120).stdout
    after = mariadb.status()
    reported = dict(re.findall(r"(Number of clients running queries|queries per client): (\d+)",
                               out))
    assert reported == {"Number of clients running queries": str(SLAP_CLIENTS),
                        "queries per client": "2"}, out
    statements = SLAP_CLIENTS * SLAP_ITERATIONS  # of each kind: mysqlslap's own report
    assert delta(before, after, "Com_select") == delta(before, after, "Com_insert") == statements

    for labels in both_sides("mysqlslap"):
        pipeline.wait_total(statements, REQ, protocol="mysql", endpoint="SELECT items",
                            status="OK", **labels)
        pipeline.wait_total(statements, REQ, protocol="mysql", endpoint="INSERT log",
                            status="OK", **labels)
        assert pipeline.total(ERR, protocol="mysql", **labels) == 0

    texts = collections.Counter((r["side"], r["method"], r["query"])
                                for r in mysql_records(pipeline)
                                if r["src_workload"] == "mysqlslap")
    for side in ("client", "server"):
        assert texts[(side, "COM_QUERY", "SELECT COUNT(*) FROM items")] == statements
        assert texts[(side, "COM_QUERY", "INSERT INTO log (v) VALUES (?)")] == statements


def test_prepared_statement_executes_carry_their_text(pipeline: Pipeline,
                                                      mariadb: MariaDB) -> None:
    before = mariadb.status()
    out = subprocess.run([sys.executable, "-c", PREPARED_CLIENT, str(mariadb.port), CLIENT,
                          str(EXECUTES), str(FAILURES)],
                         capture_output=True, text=True, check=True, timeout=120)
    report = json.loads(out.stdout)
    after = mariadb.status()
    assert report == {"rows": EXECUTES, "errors": [1146] * FAILURES}
    assert delta(before, after, "Com_stmt_execute") == EXECUTES
    assert delta(before, after, "Com_stmt_prepare") == 1

    for labels in both_sides(CLIENT):
        pipeline.wait_total(EXECUTES, REQ, protocol="mysql", endpoint="SELECT items",
                            status="OK", **labels)
        pipeline.wait_total(FAILURES, ERR, protocol="mysql", endpoint="SELECT missing_table",
                            status="1146", **labels)
        pipeline.wait_total(1, REQ, protocol="mysql", endpoint="COM_STMT_PREPARE", **labels)

    def executes() -> collections.Counter[tuple[str, str]] | None:
        seen = collections.Counter((r["side"], r["query"]) for r in mysql_records(pipeline)
                                   if r["src_workload"] == CLIENT
                                   and r["method"] == "COM_STMT_EXECUTE")
        return seen if seen.total() >= 2 * EXECUTES else None

    text = "SELECT name FROM items WHERE id = ?"
    seen = wait_for("every execute on requests.v1", executes, timeout=30)
    assert seen == {("client", text): EXECUTES, ("server", text): EXECUTES}


def test_mysql_records_match_the_schema(pipeline: Pipeline, mariadb: MariaDB) -> None:
    from kubesight.schemas import validate

    subprocess.run(["mariadb", "-h", "127.0.0.1", "-P", str(mariadb.port), "--protocol=tcp",
                    "--skip-ssl", "-uroot", "ksmy", "-e", "SELECT name FROM items WHERE id = 2"],
                   check=True, capture_output=True, timeout=60)
    deadline = time.monotonic() + 60
    while True:
        msgs = [m for m in read_topic(pipeline.config, "requests.v1") if m and any(
            r["protocol"] == "mysql" and r["src_workload"] == "mariadb" for r in m["requests"])]
        if msgs or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert msgs, "no record of the mariadb client's statements on requests.v1"
    for msg in msgs:
        validate("requests.v1", msg)
