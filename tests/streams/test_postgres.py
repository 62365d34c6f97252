from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubesight.streams.postgres import PostgresConnection, detect, split_statements
from kubesight.streams.protocols import ParserOptions, Sniffer
from kubesight.streams.record import Request

from tests.pgserver import PASSWORD_ROLES
from tests.streams import kit
from tests.streams.kit import FIXTURES, PROPERTY, ROLES, Event


def load(name: str, connection: int = -1) -> list[Event]:
    """One connection of a fixture (by default the last: pgbench's first one only reads the
    scale and checks partitioning, the last runs the transactions)."""
    return kit.decode(kit.read_fixture("postgres", name)["connections"][connection])


run = kit.runner(PostgresConnection, close_ns=999_999)  # run(events, role, capture, options=...)


def brief(records: list[Request]) -> list[tuple[str, str, str]]:
    return [(r.method, r.endpoint, r.status) for r in records]


def rechunk(events: list[Event], cuts: list[int]) -> list[Event]:
    """The same bytes, each run of one direction re-cut at ``cuts`` (offsets into the run)."""
    runs: list[tuple[str, bytes]] = []
    for d, _, payload in events:
        if runs and runs[-1][0] == d:
            runs[-1] = (d, runs[-1][1] + payload)
        else:
            runs.append((d, payload))
    out: list[Event] = []
    for d, data in runs:
        bounds = sorted({0, len(data), *(c for c in cuts if 0 < c < len(data))})
        out += [(d, b - a, data[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    return out


def tpcb(method: str) -> list[tuple[str, str, str]]:
    """pgbench's built-in tpcb-like transaction: seven statements."""
    return [(method, e, "OK") for e in (
        "BEGIN", "UPDATE pgbench_accounts", "SELECT pgbench_accounts", "UPDATE pgbench_tellers",
        "UPDATE pgbench_branches", "INSERT pgbench_history", "END")]


PIPELINE = [("Execute", e, "OK") for e in ("SELECT pgbench_accounts", "UPDATE pgbench_tellers",
                                           "SELECT")]
PSQL = [("Query", "INSERT items", "OK"), ("Query", "SELECT items", "OK"),
        ("Query", "UPDATE items", "OK"), ("Query", "SELECT no_such_table", "42P01"),
        ("Query", "EMPTY", "OK"),
        ("Query", "BEGIN", "OK"), ("Query", "UPDATE items", "OK"), ("Query", "SELECT items", "OK"),
        ("Query", "COMMIT", "OK"),
        ("Query", "SELECT", "OK"), ("Query", "SELECT no_such_table", "42P01")]
WHO_AM_I = [("Query", "SELECT", "OK")]

# Captured from PostgreSQL 15 with psql and pgbench (see fixtures/postgres/README.md).
CAPTURED = [
    ("psql_queries", -1, PSQL),
    ("pgbench_simple", -1, tpcb("Query") * 2),
    ("pgbench_simple", 0, [("Query", "SELECT pgbench_branches", "OK"),
                           ("Query", "SELECT pg_catalog.pg_class", "OK")]),
    ("pgbench_extended", -1, tpcb("Execute") * 2),
    ("pgbench_prepared", -1, tpcb("Execute") * 2),
    ("pipeline_extended", -1, PIPELINE * 2),
    ("pipeline_prepared", -1, PIPELINE * 2),
    ("error_extended", -1, [("Execute", "SELECT no_such_table", "42P01")]),
    ("error_prepared", -1, [("Parse", "SELECT no_such_table", "42P01"),
                            ("Execute", "SELECT no_such_table", "26000")]),
    ("auth_md5", -1, WHO_AM_I),
    ("auth_scram_sha_256", -1, WHO_AM_I),
    ("auth_password", -1, WHO_AM_I),
    ("copy", 0, [("Query", "COPY items", "OK")]),
    ("copy", 1, [("Query", "COPY items", "OK")]),
    ("big_result", -1, [("Query", "SELECT generate_series", "OK")]),
    ("long_query", -1, [("Query", "SELECT", "OK")]),
]
IDS = [f"{name}[{conn}]" for name, conn, _ in CAPTURED]


@pytest.mark.parametrize("name, connection, expected", CAPTURED, ids=IDS)
@pytest.mark.parametrize("side", ROLES)
def test_captured_exchanges(name: str, connection: int, expected: list[tuple[str, str, str]],
                            side: str) -> None:
    records, conn = run(kit.seen_from(side, load(name, connection)), role=side)
    assert brief(records) == expected
    assert all(r.complete for r in records)
    assert {r.side for r in records} == {kit.decided_side(side)}
    assert {r.protocol for r in records} == {"postgresql"}
    assert [r.error for r in records] == [s != "OK" for _, _, s in expected]
    for key in ("unparsed_bytes", "sync_losses", "orphan_responses", "unanswered_requests",
                "parser_errors"):
        assert conn.counters[key] == 0, key


# Request and response bytes are the messages' own sizes: each Query event is one request,
# each answer event one response; the statements of one Query share its answer.
def test_psql_bytes_and_timestamps() -> None:
    records, _ = run(load("psql_queries"))
    assert [(r.request_bytes, r.response_bytes) for r in records] == [
        (53, 22), (51, 90), (48, 20), (33, 119), (7, 11),
        (91, 11), (0, 14), (0, 57), (0, 12 + 6),  # BEGIN; UPDATE; SELECT; COMMIT: 100 bytes
        (53, 60), (0, 113 + 6),  # SELECT 1; (failing) SELECT ...; SELECT 2 is never run
    ]  # fmt: skip
    assert [(r.start_ns, r.end_ns) for r in records] == [
        (5000, 6000), (7000, 8000), (9000, 10000), (11000, 12000), (13000, 14000),
        (15000, 16000), (16000, 16000), (16000, 16000), (16000, 16000),
        (17000, 18000), (18000, 18000)]  # fmt: skip


def test_statement_text_is_masked_and_bounded() -> None:
    records, _ = run(load("psql_queries"))
    assert records[1].query == "SELECT id, name FROM items WHERE name = ?"
    assert records[6].query == "UPDATE items SET name = ? WHERE id = ?"
    records, _ = run(load("psql_queries"), options=ParserOptions(mask_sql_literals=False))
    assert records[1].query == "SELECT id, name FROM items WHERE name = 'two'"
    records, _ = run(load("long_query"), options=ParserOptions(max_query_chars=100))
    assert records[0].query == "SELECT ?" and records[0].request_bytes == 6031
    records, _ = run(load("long_query"), options=ParserOptions(False, max_query_chars=100))
    assert len(records[0].query) == 100 and records[0].query.endswith("yyy…")


def test_extended_protocol_text_comes_from_parse_by_statement_name() -> None:
    unnamed, _ = run(load("pgbench_extended"))
    named, _ = run(load("pgbench_prepared"))
    assert unnamed[1].query == named[1].query == (
        "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2")
    assert [r.raw_path for r in unnamed] == [""] * 14
    assert [r.raw_path for r in named] == [f"P_{i}" for i in range(7)] * 2


def test_prepare_round_trip_is_not_a_request_but_its_bytes_are_counted() -> None:
    """-M prepared: Parse+Sync once per statement, then Bind/Describe/Execute/Sync. The
    first Execute's record carries the prepare's bytes; its clock starts at its own batch."""
    records, _ = run(load("pgbench_prepared"))
    first, again = records[1], records[8]  # UPDATE pgbench_accounts, 1st and 2nd time
    assert (first.start_ns, first.end_ns) == (11000, 12000)  # not 9000, the Parse's write
    assert first.request_bytes == 85 + 56 and first.response_bytes == 11 + 30
    assert (again.request_bytes, again.response_bytes) == (57, 30)


def test_extended_batch_bytes() -> None:
    records, _ = run(load("pgbench_extended"))
    # Parse+Bind+Describe+Execute+Sync in one write; 1 2 T|n (D) C Z in one read.
    assert [(r.request_bytes, r.response_bytes) for r in records[:3]] == [
        (52, 32), (131, 35), (108, 79)]


def test_pipelined_batch_matches_answers_in_order() -> None:
    """Three Parse/Bind/Describe/Execute and one Sync in one write, answers in one read."""
    events = load("pipeline_extended")
    writes = [p for d, _, p in events if d == "out" and p.startswith(b"P")]
    assert len(writes) == 2 and writes[0].count(b"S\0\0\0\x04") == 1
    records, _ = run(events)
    assert brief(records) == PIPELINE * 2
    assert [r.query for r in records[:3]] == [
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
        "UPDATE pgbench_tellers SET tbalance = tbalance + ? WHERE tid = ?", "SELECT ?"]
    assert len({(r.start_ns, r.end_ns) for r in records[:3]}) == 1
    # Each Execute takes its own Parse/Bind/Describe; the last one the Sync.
    assert [r.request_bytes for r in records[:3]] == [103, 106, 55]
    assert sum(r.request_bytes for r in records[:3]) == len(writes[0])


def test_many_batches_in_one_write_and_one_read() -> None:
    """Deeper pipelining: every batch of a pgbench run written at once, answered at once."""
    events = load("pgbench_extended")
    start = next(i for i, (d, _, p) in enumerate(events) if d == "out" and p[:1] == b"P")
    head, body = events[:start], events[start:]
    out, back = kit.joined(body, "out"), kit.joined(body, "in")
    records, conn = run([*head, ("out", len(out), out), ("in", len(back), back)])
    assert brief(records) == tpcb("Execute") * 2
    assert conn.counters["orphan_responses"] == 0


@pytest.mark.parametrize("name", ["psql_queries", "pipeline_prepared", "error_prepared", "copy",
                                  "auth_scram_sha_256"])
def test_split_at_every_byte(name: str) -> None:
    expected = brief(run(load(name))[0])
    records, conn = run(kit.byte_by_byte(load(name)))
    assert brief(records) == expected
    assert all(r.complete for r in records) and conn.counters["sync_losses"] == 0


def test_pipelined_answers_split_at_every_boundary() -> None:
    events = load("pipeline_extended")
    i = max(i for i, (d, _, _) in enumerate(events) if d == "in")
    answer = events[i][2]
    for cut in range(1, len(answer)):
        parts = [("in", len(p), p) for p in (answer[:cut], answer[cut:])]
        records, conn = run([*events[:i], *parts, *events[i + 1 :]])
        assert brief(records) == PIPELINE * 2, cut
        # The last CommandComplete ends 6 bytes (a ReadyForQuery) before the answer does.
        assert records[-1].end_ns == (i + 1 + (cut < len(answer) - 6)) * 1000, cut


# -- errors -----------------------------------------------------------------------------------
def test_error_in_extended_batch_is_the_executes_record() -> None:
    """Parse fails (42P01): the server skips Bind/Describe/Execute up to Sync; the record is
    the Execute's, with the Parse's text, and the batch's bytes (ReadyForQuery came in a read
    of its own, after the record was made)."""
    (record,), conn = run(load("error_extended"))
    assert (record.method, record.status, record.error) == ("Execute", "42P01", True)
    assert record.query == "SELECT * FROM no_such_table"
    assert (record.request_bytes, record.response_bytes) == (74, 113)
    assert conn.counters["skipped_requests"] == 0


def test_error_without_execute_is_the_failing_messages_record() -> None:
    parse, execute = run(load("error_prepared"))[0]
    assert (parse.method, parse.status, parse.raw_path) == ("Parse", "42P01", "P_0")
    assert (execute.method, execute.status) == ("Execute", "26000")


def test_error_skips_later_executes_of_the_batch() -> None:
    """A pipeline whose first Execute fails: the two after it are never run."""
    events = load("pipeline_extended")
    error = next(p for d, _, p in load("error_extended") if d == "in" and p[:1] == b"E")
    write = next(p for d, _, p in events if d == "out" and p[:1] == b"P")
    records, conn = run([*events[:4], ("out", len(write), write),
                         ("in", len(error) + 6, error + b"Z\0\0\0\x05I")])
    assert brief(records) == [("Execute", "SELECT pgbench_accounts", "42P01")]
    assert records[0].request_bytes == len(write)
    assert conn.counters["skipped_requests"] == 2


# -- authentication: the exchange is framed and ignored ----------------------------------------
@pytest.mark.parametrize("method", list(PASSWORD_ROLES))
def test_password_never_reaches_a_record(method: str) -> None:
    name = f"auth_{method.replace('-', '_')}"
    events = load(name)
    password = PASSWORD_ROLES[method].encode()
    wire = b"".join(p for _, _, p in events)
    assert any(p[:1] == b"p" for d, _, p in events if d == "out")  # a password message was sent
    if method == "password":
        assert password in wire  # cleartext: the fixture really holds it
    for role, evs in (("client", events), ("server", kit.as_server(events))):
        records, conn = run(evs, role)
        assert brief(records) == WHO_AM_I
        text = repr([r.to_wire() for r in records]) + repr(conn.statements) + repr(conn.portals)
        assert PASSWORD_ROLES[method] not in text
        assert records[0].request_bytes == 25  # the Query alone: no start-up, no password


# -- the 4 KiB capture: gaps of known length ----------------------------------------------------
@pytest.mark.parametrize("name, connection, expected", CAPTURED, ids=IDS)
def test_captured_exchanges_with_4k_capture(name: str, connection: int,
                                            expected: list[tuple[str, str, str]]) -> None:
    records, conn = run(load(name, connection), capture=4096)
    # Only answers longer than the capture lose their end (the statuses are in the gap).
    lost = name in ("big_result", "long_query")
    assert brief(records) == [(m, e, "" if lost else s) for m, e, s in expected]
    assert [r.complete for r in records] == [not lost] * len(expected)
    assert conn.counters["parser_errors"] == 0


def test_answer_longer_than_the_capture_ends_at_its_last_read() -> None:
    events = load("big_result")
    reads = [i for i, (d, _, _) in enumerate(events) if d == "in"]
    (record,), conn = run(events, capture=4096)
    assert record.end_ns == (reads[-1] + 1) * 1000  # not the close (999_999)
    assert record.response_bytes == sum(events[i][1] for i in reads[2:])  # not N, start-up
    assert conn.counters["sync_losses"] == 1


def test_answer_found_again_at_a_final_ready_for_query() -> None:
    """8 KiB reads cut to 4 KiB: framing is lost in the first; a last read short enough to be
    captured whole ends with ReadyForQuery, and its CommandComplete is found before it."""
    events = load("big_result")
    first = next(i for i, (d, _, p) in enumerate(events) if d == "in" and p[:1] == b"T")
    answer = b"".join(p for d, _, p in events[first:] if d == "in")
    cuts = [*range(8192, len(answer) - 1000, 8192), len(answer) - 1000]
    reads = rechunk([("in", len(answer), answer)], cuts)
    records, conn = run([*events[:first], *reads], capture=4096)
    assert brief(records) == [("Query", "SELECT generate_series", "OK")]
    assert records[0].complete is False and records[0].response_bytes == len(answer)
    assert conn.counters["resyncs"] == 1


def test_gap_inside_one_message_keeps_the_framing() -> None:
    """A 6 KB DataRow cut by the capture: its length frames the gap; the next read is whole."""
    events = load("long_query")
    i = next(i for i, (d, _, p) in enumerate(events) if d == "in" and p[:1] == b"T")
    answer = events[i][2]
    done = answer.index(b"C\0\0\0\x0dSELECT 1\0")
    reads = [("in", done, answer[:done]), ("in", len(answer) - done, answer[done:])]
    records, conn = run([*events[:i], *reads, *events[i + 1 :]], capture=4096)
    assert brief(records) == [("Query", "SELECT", "OK")]
    assert records[0].complete and records[0].response_bytes == len(answer)
    assert conn.counters["sync_losses"] == 0 and conn.counters["truncated"] == 1


@pytest.mark.parametrize("name", ["pgbench_extended", "pgbench_prepared", "pgbench_simple"])
def test_64_byte_capture_still_counts_every_statement(name: str) -> None:
    """Batches longer than the capture lose their tail (Bind.. Sync): a placeholder takes their
    answers, named by the visible start of the Parse."""
    expected = brief(run(load(name))[0])
    records, conn = run(load(name), capture=64)
    assert [m for m, _, _ in brief(records)] == [m for m, _, _ in expected]
    assert [e for _, e, _ in brief(records)] == [e for _, e, _ in expected]
    assert conn.counters["parser_errors"] == 0


# -- connections open before the probe started --------------------------------------------------
def test_mid_connection_role_from_bytes_and_unknown_prepared_statements() -> None:
    events = load("pgbench_prepared")
    # From the second transaction on: the statements were prepared before we looked.
    start = next(i for i, (d, _, p) in enumerate(events)
                 if i > 30 and d == "out" and p.startswith(b"B\0\0\0\x11\0P_0"))
    for side, evs in (("client", events[start:]), ("server", kit.as_server(events[start:]))):
        records, conn = run(evs, role="unknown")
        assert conn.role == side
        assert brief(records) == [("Execute", "UNKNOWN", "OK")] * 7
        assert [r.raw_path for r in records] == [f"P_{i}" for i in range(7)]


def test_mid_connection_first_event_is_an_answer() -> None:
    events = load("psql_queries")[5:]  # starts with the answer to the INSERT
    assert events[0][0] == "in"
    records, conn = run(events, role="unknown")
    assert conn.role == "client" and brief(records) == PSQL[1:]
    assert conn.counters["orphan_responses"] == 2  # the INSERT's CommandComplete and Z


# -- detection ---------------------------------------------------------------------------------
def test_detects_every_first_payload() -> None:
    for path in sorted((FIXTURES / "postgres").glob("*.json")):
        for i in range(len(kit.read_fixture("postgres", path.stem)["connections"])):
            events = load(path.stem, i)
            assert detect(events[0][2]), (path.stem, i)  # SSLRequest
            assert detect(events[2][2]), (path.stem, i)  # StartupMessage
            assert detect(events[3][2][:4096]), (path.stem, i)  # R.. S.. K Z


def test_detects_mid_connection_messages() -> None:
    for name in ("pgbench_simple", "pgbench_extended", "pgbench_prepared", "pipeline_extended"):
        events = load(name)[4:]
        assert all(detect(p) for _, _, p in events if len(p) > 5), name


@pytest.mark.parametrize("protocol", ["http1", "http2", "dns", "redis", "mysql"])
def test_does_not_claim_other_protocols(protocol: str) -> None:
    for _, payload in kit.captured_payloads(protocol):
        assert not detect(payload[:4096]), payload[:60]


@pytest.mark.parametrize("payload", [
    b"", b"Q", b"Q\0\0\0\x05", b"Q\0\0\0\x06x", b"Q\0\0\0\x05\0trailing", b"X\0\0\0\x04",
    b"\0\0\0\x08\x04\xd2\x16\x31", b"\0\0\0\x09\x04\xd2\x16\x2f\0",
    b"GET / HTTP/1.1\r\n\r\n", b"*1\r\n$4\r\nPING\r\n",
    b"Z\0\0\0\x05Q", b"C\0\0\0\x05\0", b"E\0\0\0\x06xx", b"\x16\x03\x01\x02\x00\x01",
])  # fmt: skip
def test_detect_rejects(payload: bytes) -> None:
    assert not detect(payload)


def test_sniffer_picks_postgres_from_the_ssl_request() -> None:
    sniffer = Sniffer("client")
    records = []
    for i, (d, size, p) in enumerate(load("pgbench_extended")):
        records += sniffer.feed(d, i, size, p)
    assert sniffer.protocol == "postgresql" and len(records) == 14


# -- statements of a simple Query ---------------------------------------------------------------
@pytest.mark.parametrize("sql, statements", [
    ("SELECT 1", ["SELECT 1"]),
    ("SELECT 1; SELECT 2;", ["SELECT 1", "SELECT 2"]),
    (";", []),
    ("  -- only a comment", []),
    ("SELECT ';'; SELECT \"a;b\" FROM t", ["SELECT ';'", "SELECT \"a;b\" FROM t"]),
    ("SELECT $$a;b$$; SELECT $f$;$f$", ["SELECT $$a;b$$", "SELECT $f$;$f$"]),
    ("SELECT E'\\';'; SELECT 2 /* ; */", ["SELECT E'\\';'", "SELECT 2 /* ; */"]),
    ("BEGIN;;COMMIT", ["BEGIN", "COMMIT"]),
])  # fmt: skip
def test_split_statements(sql: str, statements: list[str]) -> None:
    assert split_statements(sql) == statements


# -- robustness ----------------------------------------------------------------------------------
def _sane(records: list[Request], conn: PostgresConnection) -> None:
    assert conn.counters["parser_errors"] == 0
    assert all(v >= 0 for v in conn.counters.values())
    for r in records:
        assert r.side in ("client", "server") and r.request_bytes >= 0 and r.response_bytes >= 0
        assert r.end_ns >= r.start_ns >= 0 and len(r.query) <= 1024


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from(["in", "out"]), st.binary(max_size=300),
                          st.integers(0, 5000)), max_size=20),
       st.sampled_from(ROLES))
def test_random_bytes_never_raise(events: list[tuple[str, bytes, int]], role: str) -> None:
    conn = PostgresConnection(role)
    records: list[Request] = []
    for i, (d, payload, extra) in enumerate(events):
        records += conn.feed(d, i, len(payload) + extra, payload)
    records += conn.flush(len(events))
    _sane(records, conn)


SMALL = [c for c in CAPTURED if c[0] not in ("big_result", "long_query")]


@settings(PROPERTY, max_examples=150)
@given(st.sampled_from(SMALL), st.lists(st.integers(1, 600), max_size=12))
def test_any_split_gives_the_same_records(case: tuple[str, int, list[tuple[str, str, str]]],
                                          cuts: list[int]) -> None:
    name, connection, expected = case
    records, conn = run(rechunk(load(name, connection), cuts))
    assert brief(records) == expected
    assert conn.counters["sync_losses"] == 0


@settings(PROPERTY, max_examples=200)
@given(st.sampled_from(CAPTURED), st.integers(1, 4096), st.integers(0, 60),
       st.sampled_from(ROLES), st.lists(st.integers(1, 600), max_size=6))
def test_cut_captures_and_early_ends_never_invent_requests(
        case: tuple[str, int, list[tuple[str, str, str]]], capture: int, skip: int, role: str,
        cuts: list[int]) -> None:
    """Any capture size, starting anywhere (probe started late), split anywhere: no error,
    and never more records than statements the server ran."""
    name, connection, expected = case
    events = kit.seen_from(role, rechunk(load(name, connection), cuts)[skip:])
    records, conn = run(events, role=role, capture=capture)
    _sane(records, conn)
    assert len(records) <= len(expected)
    verbs = {e.split()[0] for _, e, _ in expected} | {"UNKNOWN"}  # a cut text keeps its verb
    assert {e.split()[0] for _, e, _ in brief(records)} <= verbs
