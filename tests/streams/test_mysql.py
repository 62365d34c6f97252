from __future__ import annotations

import functools
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubesight.streams.mysql import MAX_STATEMENTS, MysqlConnection, detect
from kubesight.streams.protocols import ParserOptions, Sniffer
from kubesight.streams.record import Request

from tests.streams import kit
from tests.streams.kit import PROPERTY, ROLES, SCHEMAS

load = functools.partial(kit.load_events, "mysql")
run = kit.runner(MysqlConnection, close_ns=999_999)  # run(events, role, capture, options=...)


def brief(records: list[Request]) -> list[tuple[str, str, str, int, int]]:
    return [(r.method, r.endpoint, r.status, r.request_bytes, r.response_bytes) for r in records]


def packet(seq: int, payload: bytes) -> bytes:
    return struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload


SELECT_ITEMS = "SELECT id, name FROM items WHERE id = ?"
PREPARED = [
    ("COM_QUERY", "SET", "OK", 53, 11), ("COM_QUERY", "SET", "OK", 35, 11),
    ("COM_PING", "COM_PING", "OK", 5, 11),
    ("COM_STMT_PREPARE", "COM_STMT_PREPARE", "OK", 44, 149),
    *[("COM_STMT_RESET", "COM_STMT_RESET", "OK", 9, 11),
      ("COM_STMT_EXECUTE", "SELECT items", "OK", 19, 127)] * 2,
    ("COM_STMT_RESET", "COM_STMT_RESET", "OK", 9, 11),
    ("COM_STMT_EXECUTE", "SELECT items", "OK", 19, 129),
    ("COM_STMT_CLOSE", "COM_STMT_CLOSE", "", 9, 0),
    ("COM_STMT_PREPARE", "COM_STMT_PREPARE", "OK", 40, 52),
    ("COM_STMT_RESET", "COM_STMT_RESET", "OK", 9, 11),
    ("COM_STMT_EXECUTE", "INSERT items", "OK", 23, 11),
    ("COM_STMT_CLOSE", "COM_STMT_CLOSE", "", 9, 0),
    ("COM_STMT_PREPARE", "COM_STMT_PREPARE", "1146", 45, 51),
    ("COM_STMT_CLOSE", "COM_STMT_CLOSE", "", 9, 0),
    ("COM_PING", "COM_PING", "OK", 5, 11), ("COM_QUIT", "COM_QUIT", "", 5, 0),
]  # fmt: skip
RAW_PREPARED = [
    ("COM_QUERY", "SELECT items", "OK", 45), ("COM_QUERY", "SELECT items", "OK", 38),
    ("COM_STMT_PREPARE", "COM_STMT_PREPARE", "OK", 44),
    ("COM_STMT_EXECUTE", "SELECT items", "OK", 26),
    ("COM_STMT_EXECUTE", "SELECT items", "OK", 26),  # with a cursor: ends at its EOF/OK
    ("COM_STMT_FETCH", "SELECT items", "OK", 13), ("COM_STMT_FETCH", "SELECT items", "OK", 13),
    ("COM_STMT_CLOSE", "COM_STMT_CLOSE", "", 9), ("COM_QUIT", "COM_QUIT", "", 5),
]  # fmt: skip

# Captured from MariaDB 10.11 with real clients (see fixtures/mysql/README.md): the sizes are
# the packets' own, as sent and received.
CAPTURED = [
    ("cli_queries", [
        ("COM_QUERY", "SELECT items", "OK", 43, 152), ("COM_QUERY", "INSERT items", "OK", 46, 11),
        ("COM_QUERY", "SELECT missing_table", "1146", 32, 51),
        ("COM_QUERY", "UPDATE items", "OK", 49, 52), ("COM_QUERY", "SELECT", "OK", 22, 68),
        ("COM_INIT_DB", "COM_INIT_DB", "OK", 10, 21),
        ("COM_QUERY", "SELECT ks.items", "OK", 34, 65), ("COM_QUIT", "COM_QUIT", "", 5, 0)]),
    ("connector_prepared", PREPARED),
    ("connector_admin", [
        ("COM_QUERY", "SET", "OK", 53, 11), ("COM_QUERY", "SET", "OK", 35, 11),
        ("COM_INIT_DB", "COM_INIT_DB", "OK", 7, 11),
        ("COM_STATISTICS", "COM_STATISTICS", "OK", 5, 116), ("COM_PING", "COM_PING", "OK", 5, 11),
        ("COM_STMT_PREPARE", "COM_STMT_PREPARE", "OK", 43, 79),
        ("COM_STMT_RESET", "COM_STMT_RESET", "OK", 9, 11),
        ("COM_STMT_EXECUTE", "UPDATE items", "OK", 27, 52),
        ("COM_STMT_RESET", "COM_STMT_RESET", "OK", 9, 11),
        ("COM_STMT_RESET", "COM_STMT_RESET", "OK", 9, 11),
        ("COM_STMT_EXECUTE", "UPDATE items", "OK", 27, 52),
        ("COM_STMT_CLOSE", "COM_STMT_CLOSE", "", 9, 0),
        ("COM_RESET_CONNECTION", "COM_RESET_CONNECTION", "OK", 5, 11),
        ("COM_QUERY", "SET", "OK", 53, 11), ("COM_QUERY", "SET", "OK", 35, 11),
        ("COM_CHANGE_USER", "COM_CHANGE_USER", "OK", 181 + 4, 48 + 11),  # with an auth switch
        ("COM_QUERY", "SET", "OK", 53, 11), ("COM_QUERY", "SET", "OK", 35, 11),
        ("COM_PING", "COM_PING", "OK", 5, 11), ("COM_QUERY", "SELECT items", "OK", 40, 79),
        ("COM_QUIT", "COM_QUIT", "", 5, 0)]),
    # The file (1608 bytes) belongs to the request; a progress report precedes the OK.
    ("cli_local_infile", [("COM_QUERY", "LOAD", "OK", 79 + 1608, 30 + 29 + 61),
                          ("COM_QUIT", "COM_QUIT", "", 5, 0)]),
    ("cli_multi_results", [("COM_QUERY", "CALL", "OK", 23, 1664),
                           ("COM_QUIT", "COM_QUIT", "", 5, 0)]),
    ("cli_large_packets", [("COM_QUERY", "SELECT", "OK", 17825818, 321),
                           ("COM_QUERY", "SELECT", "OK", 33, 17825881),
                           ("COM_QUIT", "COM_QUIT", "", 5, 0)]),
    # Responses without EOF packets are shorter (the cursor's OK is longer than an EOF).
    ("raw_prepared_eof", [(*r, n) for r, n in zip(
        RAW_PREPARED, [135, 65, 149, 3761, 102, 41, 43, 0, 0], strict=True)]),
    ("raw_prepared_deprecate_eof", [(*r, n) for r, n in zip(
        RAW_PREPARED, [128, 58, 131, 3754, 104, 43, 45, 0, 0], strict=True)]),
    ("raw_pipelined", [
        ("COM_QUERY", "SELECT items", "OK", 45, 135), ("COM_QUERY", "UPDATE items", "OK", 49, 52),
        ("COM_QUERY", "SELECT items", "1054", 27, 46), ("COM_PING", "COM_PING", "OK", 5, 11),
        ("COM_INIT_DB", "COM_INIT_DB", "OK", 10, 11), ("COM_QUIT", "COM_QUIT", "", 5, 0)]),
    ("cli_ssl", []),
    ("login_denied", []),
]  # fmt: skip
NAMES = [name for name, _ in CAPTURED]


@pytest.mark.parametrize("name, expected", CAPTURED, ids=NAMES)
@pytest.mark.parametrize("side", ROLES)
def test_captured_connections(name: str, expected: list[tuple[str, str, str, int, int]],
                              side: str):
    records, conn = run(kit.seen_from(side, load(name)), role=side)
    assert brief(records) == expected
    assert all(r.complete for r in records)
    assert {r.side for r in records} <= {kit.decided_side(side)}
    assert {r.error for r in records} == {r.status not in ("OK", "") for r in records}
    counters = conn.counters
    assert counters["unparsed_bytes"] == counters["sync_losses"] == counters["parser_errors"] == 0
    assert counters["orphan_responses"] == counters["unanswered_requests"] == 0


def test_executes_carry_the_text_their_prepare_named():
    records, conn = run(load("connector_prepared"))
    executes = [r for r in records if r.method == "COM_STMT_EXECUTE"]
    assert [r.query for r in executes] == [SELECT_ITEMS] * 3 + [
        "INSERT INTO items (name) VALUES (?)"]
    failed = [r for r in records if r.error]
    assert [(r.method, r.status, r.query) for r in failed] == [
        ("COM_STMT_PREPARE", "1146", "SELECT * FROM missing_table WHERE id = ?")]
    assert conn.statements == {}  # every statement was closed
    assert conn.counters["unknown_statements"] == 0


def test_query_text_is_masked_unless_configured_otherwise():
    events = load("cli_queries")
    masked, _ = run(events)
    raw, _ = run(events, options=ParserOptions(mask_sql_literals=False, max_query_chars=30))
    assert masked[1].query == "INSERT INTO items (name) VALUES (?)"
    assert raw[1].query == "INSERT INTO items (name) VALU…"
    assert raw[3].query == "UPDATE items SET name = 'brav…"


def test_pipelined_commands_pair_with_their_responses_in_order():
    records, _ = run(load("raw_pipelined"))
    first_three = records[:3]
    assert {r.start_ns for r in first_three} == {4000}  # one write carried all three
    assert [r.end_ns for r in first_three] == sorted(r.end_ns for r in first_three)
    assert [r.query for r in first_three] == [
        "SELECT id, name FROM items WHERE id <= ?", "UPDATE items SET name = ? WHERE id = ?",
        "SELECT nope FROM items"]


@pytest.mark.parametrize("name", ["cli_queries", "connector_prepared", "raw_prepared_eof",
                                  "raw_prepared_deprecate_eof", "cli_local_infile",
                                  "connector_admin"])
def test_events_split_byte_by_byte_give_the_same_records(name: str):
    whole, _ = run(load(name))
    records, conn = run(kit.byte_by_byte(load(name)))
    assert brief(records) == brief(whole)
    assert [r.query for r in records] == [r.query for r in whole]
    assert conn.counters["sync_losses"] == 0


@pytest.mark.parametrize("capture, losses", [(4096, 2), (64, 3)])
def test_16mib_packets_are_framed_across_capture_gaps(capture: int, losses: int):
    """The 17 MiB query and row arrive as reads of up to 64 KiB of which the probe keeps the
    first bytes: every packet header after the first is in a gap. The query ends when the
    server answers, the row when the next command is sent; sizes stay exact."""
    events = load("cli_large_packets")
    assert max(size for _, size, _ in events) == 1 << 16
    records, conn = run(events, capture=capture)
    assert brief(records) == CAPTURED[NAMES.index("cli_large_packets")][1]
    assert [r.complete for r in records] == [False, False, True]
    assert records[0].query == "SELECT LENGTH(?"  # the text's first bytes, literal masked
    assert conn.counters["sync_losses"] == losses
    assert conn.counters["unparsed_bytes"] == 0


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("cli_large_packets",
                                                                  "raw_pipelined")])
def test_short_captures_keep_counts_and_sizes(name: str):
    """With 64-byte captures the long result sets lose their framing, but every command is
    still counted once with its exact sizes and status."""
    expected = CAPTURED[NAMES.index(name)][1]
    records, conn = run(load(name), capture=64)
    assert [(m, s, q, a) for m, _, s, q, a in brief(records)] == [
        (m, s, q, a) for m, _, s, q, a in expected]
    assert conn.counters["parser_errors"] == 0


def test_commands_pipelined_into_a_gap_end_incomplete_and_parsing_recovers():
    """Three commands in one 121-byte write captured to 64 bytes: the third one's header is
    in the gap, so it cannot be counted; the next command ends the lost responses."""
    records, conn = run(load("raw_pipelined"), capture=64)
    assert [(r.method, r.endpoint, r.complete) for r in records] == [
        ("COM_QUERY", "SELECT items", False), ("COM_QUERY", "UPDATE items", False),
        ("COM_PING", "COM_PING", True), ("COM_INIT_DB", "COM_INIT_DB", True),
        ("COM_QUIT", "COM_QUIT", True)]
    assert sum(r.request_bytes for r in records[:2]) == 121
    assert conn.counters["sync_losses"] == 2


def test_resync_in_the_middle_of_a_packet_is_refused_by_its_sequence_id():
    """A lost result set is still streaming when the client sends its next command: the
    server's next event starts mid-row. Its would-be header has the wrong sequence id, so
    the event is dropped and the command's own response is framed from the next event."""
    events = load("raw_prepared_eof")
    i = next(i for i, (d, size, _) in enumerate(events) if d == "in" and size == 3761)
    response = events[i][2]
    ping, pong = packet(0, b"\x0e"), packet(1, b"\x00\x00\x00\x02\x00\x00\x00")
    records, conn = run([*events[:i], ("in", 2000, response[:64]), ("out", 5, ping),
                         ("in", 1761, response[2000:]), ("in", 11, pong)])
    execute, answered = records[3], records[4]
    assert (execute.method, execute.complete, execute.response_bytes) == (
        "COM_STMT_EXECUTE", False, 2000)
    assert (answered.method, answered.status, answered.response_bytes, answered.complete) == (
        "COM_PING", "OK", 11, True)
    assert conn.counters["unparsed_bytes"] == 1761
    assert conn.counters["resyncs"] == 1 and conn.counters["sync_losses"] == 2


def test_gap_inside_a_packet_is_skipped_by_its_length():
    query = b"SELECT name FROM items WHERE name = '" + b"a" * 5000 + b"'"
    events = [("out", 4 + 1 + len(query), packet(0, b"\x03" + query)[:4096]),
              ("in", 11, packet(1, b"\x00\x00\x00\x02\x00\x00\x00"))]
    (record,), conn = run(events)
    assert (record.endpoint, record.status, record.complete) == ("SELECT items", "OK", True)
    assert record.request_bytes == 5 + len(query)
    assert conn.counters["sync_losses"] == 0


def test_tls_request_stops_parsing():
    events = load("cli_ssl")
    records, conn = run(events)
    assert records == []
    ssl_request = events[1]
    assert ssl_request[1] == 36 and ssl_request[0] == "out"  # 32-byte payload, CLIENT_SSL set
    after = sum(size for _, size, _ in events[2:])
    assert (conn.counters["tls_sessions"], conn.counters["opaque_bytes"]) == (1, after)


class _Recording(MysqlConnection):
    """Keeps every client packet's payload as the parser held it."""

    def __init__(self, role: str) -> None:
        super().__init__(role)
        self.held: list[tuple[int, bytes]] = []

    def packet(self, from_client: bool, start_ns: int, ts: int, seq: int, length: int,
               data: bytes, continues: bool) -> None:
        if from_client:
            self.held.append((seq, data))
        super().packet(from_client, start_ns, ts, seq, length, data, continues)


@pytest.mark.parametrize("name", ["login_denied", "connector_admin", "cli_queries"])
def test_credentials_are_never_held(name: str):
    """Of a HandshakeResponse only the capability flags (32 bytes, before the user name) are
    kept; of COM_CHANGE_USER the command byte; of auth-switch replies nothing."""
    conn = _Recording("client")
    for i, (d, size, payload) in enumerate(load(name)):
        conn.feed(d, i, size, payload)
    handshake = [data for seq, data in conn.held if seq == 1]
    assert handshake and all(len(data) <= 32 for data in handshake)
    assert all(b"root" not in data for _, data in conn.held)
    change_user = [data for seq, data in conn.held if data[:1] == b"\x11"]
    assert change_user == ([b"\x11"] if name == "connector_admin" else [])


def test_refused_login_is_counted_not_recorded():
    records, conn = run(load("login_denied"))
    assert records == [] and conn.counters["login_errors"] == 1


@pytest.mark.parametrize("start", range(2, 36))
def test_connection_seen_mid_way_is_picked_up_at_a_command(start: int):
    """The probe started while the connection was open (role unknown): records begin with
    the first command seen whole; a statement prepared earlier runs without its text."""
    events = load("connector_prepared")
    full, _ = run(events)
    for side, evs in (("client", events), ("server", kit.as_server(events))):
        records, conn = run(evs[start:], role="unknown")
        assert conn.role == side
        assert [r.method for r in records] == [r.method for r in full][-len(records):]
        assert len(records) >= len([d for d, _, _ in events[start:] if d == "out"]) - 1
        unknown = [r for r in records if r.method == "COM_STMT_EXECUTE" and not r.query]
        assert conn.counters["unknown_statements"] == len(unknown)
        assert all(r.endpoint == "COM_STMT_EXECUTE" for r in unknown)


def test_unknown_capabilities_still_frame_prepares_and_result_sets():
    """Without the handshake, CLIENT_DEPRECATE_EOF is unknown: the EOF after a block of
    definitions is told apart by its length, a trailing one absorbed."""
    for name in ("raw_prepared_eof", "raw_prepared_deprecate_eof", "connector_prepared"):
        events = load(name)
        records, conn = run(events[3:], role="unknown")  # from the first command on
        expected = CAPTURED[NAMES.index(name)][1]
        skipped = len(expected) - len(records)
        assert brief(records) == expected[skipped:], name
        assert conn.counters["unparsed_bytes"] == conn.counters["orphan_responses"] == 0, name


def test_statements_are_bounded_per_connection():
    conn = MysqlConnection("client")
    conn.feed("in", 1, *_sized(load("raw_prepared_eof")[0][2]))
    conn.feed("out", 2, *_sized(packet(1, struct.pack("<IIB23x", 0x2A20A, 1 << 24, 45))))
    conn.feed("in", 3, *_sized(packet(2, b"\x00\x00\x00\x02\x00\x00\x00")))
    for stmt_id in range(1, MAX_STATEMENTS + 11):
        conn.feed("out", 10 + stmt_id, *_sized(packet(0, b"\x16SELECT %d" % stmt_id)))
        ok = b"\x00" + struct.pack("<IHHxH", stmt_id, 0, 0, 0)
        (record,) = conn.feed("in", 10 + stmt_id, *_sized(packet(1, ok)))
        assert record.status == "OK"
    assert len(conn.statements) == MAX_STATEMENTS
    assert min(conn.statements) == 11  # the oldest went first


def _sized(data: bytes) -> tuple[int, bytes]:
    return len(data), data


@pytest.mark.parametrize(
    "buf, expected",
    [
        (load("cli_queries")[0][2], True),  # MariaDB greeting
        (packet(0, b"\x0a8.0.36\x00" + bytes(60)), True),  # MySQL 8 greeting
        (packet(0, b"\x03SELECT 1"), True),
        (packet(0, b"\x03\x00\x01SELECT 1"), True),  # with query attributes (MySQL 8)
        (packet(0, b"\x16INSERT INTO t VALUES (?)"), True),
        (packet(0, b"\x0e"), True),  # COM_PING
        (packet(0, b"\x01"), True),  # COM_QUIT
        (packet(0, b"\x19\x01\x00\x00\x00"), True),  # COM_STMT_CLOSE
        (packet(0, b"\x02ks"), True),  # COM_INIT_DB
        (packet(0, b"\x03SELECT 1")[:-1], False),  # length disagrees
        (packet(1, b"\x03SELECT 1"), False),  # not sequence 0
        (packet(0, b"\x03\x00\x00\x00\x01garbage"), False),
        (packet(0, b"\x0e\x00"), False),  # COM_PING has no argument
        (packet(0, b"\x42hello"), False),  # no such command
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\n\r\n", False),
        (b"*1\r\n$4\r\nPING\r\n", False),
        (b"+PONG\r\n", False),
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", False),  # PostgreSQL SSLRequest
        (b"\x00\x00\x00\x29\x00\x03\x00\x00user\x00postgres\x00database\x00x\x00\x00", False),
        (b"Q\x00\x00\x00\x0dselect 1\x00", False),  # PostgreSQL simple query
        (b"R\x00\x00\x00\x08\x00\x00\x00\x00", False),  # PostgreSQL AuthenticationOk
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", False),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", False),  # TLS ClientHello
        (b"", False),
    ],
)
def test_detect(buf: bytes, expected: bool):
    assert detect(buf) is expected


def test_detect_claims_no_other_protocols_captured_bytes():
    """Every event of every other protocol's fixtures (HTTP, Redis, PostgreSQL, DNS, ...)."""
    others = kit.other_protocols_payloads("mysql")
    assert others, "no other protocol's fixtures to check against"
    for where, payload in others:
        assert not detect(payload[:4096]), (where, payload[:40])


@pytest.mark.parametrize("name", NAMES)
def test_sniffer_hands_mysql_connections_to_this_parser(name: str):
    """Through the registry: no parser tried before this one claims a MySQL greeting."""
    events = load(name)
    sniffer = Sniffer("client")
    records = [r for i, (d, s, p) in enumerate(events) for r in sniffer.feed(d, i, s, p)]
    assert sniffer.protocol == "mysql"
    assert len(records) == len(CAPTURED[NAMES.index(name)][1])
    assert {r.protocol for r in records} <= {"mysql"}


def test_wire_form_uses_the_requests_schema_fields():
    records, _ = run(load("cli_queries"))
    wire = records[2].to_wire()
    schema = json.loads((SCHEMAS / "requests.v1.json").read_text())
    assert set(wire) <= set(schema["properties"]["requests"]["items"]["properties"])
    assert (wire["status"], wire["error"], wire["query"]) == (
        "1146", True, "SELECT * FROM missing_table")


# --- properties -------------------------------------------------------------------------------

PROPERTY_200 = settings(PROPERTY, max_examples=200)
SMALL = [n for n in NAMES if n != "cli_large_packets"]


@PROPERTY_200
@given(st.sampled_from(SMALL), st.sampled_from(ROLES), st.data())
def test_real_connections_split_anywhere_give_the_same_records(name: str, role: str,
                                                                data: st.DataObject):
    events = load(name)
    # Unknown role: the greeting is what tells who is who, so it stays one read.
    events = events[:1] + data.draw(kit.resplit(events[1:])) if role == "unknown" else data.draw(
        kit.resplit(events))
    records, conn = run(kit.seen_from(role, events), role=role)
    assert brief(records) == CAPTURED[NAMES.index(name)][1]
    assert conn.counters["sync_losses"] == conn.counters["parser_errors"] == 0


@PROPERTY_200
@given(st.sampled_from(SMALL), st.data())
def test_truncated_real_connections_never_raise_or_invent_commands(name: str,
                                                                   data: st.DataObject):
    events = load(name)
    records, conn = run(kit.truncate_randomly(data.draw, events))
    truth = CAPTURED[NAMES.index(name)][1]
    assert len(records) <= len(truth)
    assert conn.counters["parser_errors"] == 0
    sent = sum(s for d, s, _ in events if d == "out")
    received = sum(s for d, s, _ in events if d == "in")
    assert sum(r.request_bytes for r in records) <= sent
    assert sum(r.response_bytes for r in records) <= received
    assert all(r.end_ns >= r.start_ns for r in records)


@PROPERTY_200
@given(
    st.lists(st.tuples(st.sampled_from(["in", "out"]), st.binary(max_size=300),
                       st.integers(0, 70000)), max_size=30),
    st.sampled_from(ROLES),
)
def test_random_bytes_never_raise(events: list[tuple[str, bytes, int]], role: str):
    conn = MysqlConnection(role)
    records: list[Request] = []
    total = 0
    for i, (direction, payload, extra) in enumerate(events):
        size = len(payload) + (extra if extra > 60000 else 0)  # now and then a gap
        total += size
        records += conn.feed(direction, i, size, payload)
    records += conn.flush(10**6)
    assert conn.counters["parser_errors"] == 0
    assert len(records) <= total // 5  # every command is at least a header and a byte
    assert all(r.request_bytes >= 5 and r.response_bytes >= 0 for r in records)
