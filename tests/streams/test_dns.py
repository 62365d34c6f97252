from __future__ import annotations

import functools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kubesight.streams import dns, dns_wire
from kubesight.streams.dns import EXPIRE_GRACE_NS, TIMEOUT_NS, DnsConnection, detect
from kubesight.streams.protocols import PARSERS, Sniffer
from kubesight.streams.record import Request

from tests.streams import kit
from tests.streams.kit import FULL, PROPERTY, ROLES, Event

load = functools.partial(kit.load_events, "dns")
# run(events, role="client", capture=FULL, close_ns=...): by default flushed after every
# deadline, so unanswered queries are timeouts.
run = kit.runner(DnsConnection, close_ns=100 * TIMEOUT_NS)


def brief(records: list[Request]) -> list[tuple[str, str, str, bool, int, int]]:
    return [(r.method, r.query, r.status, r.error, r.request_bytes, r.response_bytes)
            for r in records]


def quiet(conn: DnsConnection, *allowed: str) -> dict[str, int]:
    """Counters that are set, other than ``allowed``."""
    return {k: v for k, v in conn.counters.items() if v and k not in allowed}


# Captured from dnsmasq 2.90 (see fixtures/dns/README.md): sizes are what went over the wire,
# TCP sizes include the 2-byte length.
CAPTURED = [
    ("udp_a", [("A", "A ok.test", "NOERROR", False, 48, 52)]),
    ("udp_aaaa", [("AAAA", "AAAA ok.test", "NOERROR", False, 48, 64)]),
    ("udp_txt", [("TXT", "TXT txt.ok.test", "NOERROR", False, 52, 70)]),
    ("udp_ptr", [("PTR", "PTR 1.0.0.10.in-addr.arpa", "NOERROR", False, 62, 75)]),
    ("udp_srv", [("SRV", "SRV _http._tcp.ok.test", "NOERROR", False, 59, 78)]),
    ("udp_nxdomain", [("A", "A nx.test", "NXDOMAIN", False, 48, 36)]),
    ("udp_servfail", [("A", "A fail.test", "SERVFAIL", True, 50, 27)]),
    ("udp_refused", [("MX", "MX ok.test", "REFUSED", True, 48, 42)]),
    ("udp_truncated", [("TXT", "TXT big.ok.test (truncated)", "NOERROR", False, 29, 29)]),
    ("udp_retransmit", [("A", "A hole.test", "TIMEOUT", True, 2 * 50, 0)]),
    ("udp_slow", [("A", "A slow.test", "NOERROR", False, 27, 43)]),
    ("tcp_a", [("A", "A ok.test", "NOERROR", False, 50, 54)]),
    ("tcp_big_txt", [("TXT", "TXT big.ok.test", "NOERROR", False, 54, 663)]),
    ("tcp_keepopen3", [("A", "A ok.test", "NOERROR", False, 50, 54),
                       ("A", "A nx.test", "NXDOMAIN", False, 50, 38),
                       ("SRV", "SRV _http._tcp.ok.test", "NOERROR", False, 61, 80)]),
    ("tcp_pipelined3", [("A", "A ok.test", "NOERROR", False, 27, 43),
                        ("AAAA", "AAAA ok.test", "NOERROR", False, 27, 55),
                        ("TXT", "TXT txt.ok.test", "NOERROR", False, 31, 61)]),
    ("tcp_unanswered", [("A", "A hole.test", "TIMEOUT", True, 29, 0)]),
]  # fmt: skip
EXPECTED_COUNTERS = {
    "udp_truncated": {"truncated_responses": 1},
    "udp_retransmit": {"retransmissions": 1, "timeouts": 1},
    "tcp_unanswered": {"timeouts": 1},
}


@pytest.mark.parametrize("name, expected", CAPTURED, ids=[c[0] for c in CAPTURED])
@pytest.mark.parametrize("side", ROLES)
def test_captured_exchanges(name: str, expected: list[tuple[str, ...]], side: str) -> None:
    records, conn = run(kit.seen_from(side, load(name)), role=side)
    assert brief(records) == expected
    assert all(r.complete and r.protocol == "dns" for r in records)
    assert {r.side for r in records} == {kit.decided_side(side)}
    assert {r.endpoint for r in records} == {r.method for r in records}  # never the name
    assert quiet(conn) == EXPECTED_COUNTERS.get(name, {})
    assert conn.framing == ("stream" if name.startswith("tcp") else "undecided")


@pytest.mark.parametrize("name", [c[0] for c in CAPTURED])
def test_every_captured_payload_is_detected_except_a_bare_length(name: str) -> None:
    for _, _, payload in load(name):
        assert detect(payload) is (len(payload) != 2), payload[:20]


def test_other_protocols_captured_bytes_are_not_detected() -> None:
    payloads = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"*1\r\n$4\r\nPING\r\n", b"+OK\r\n",
                b"\x00" * 64, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 60]
    found = kit.other_protocols_payloads("dns")
    payloads += [p[:4096] for _, p in found]
    protocols = {where.split("/")[0] for where, _ in found}
    assert len(payloads) > 1000 and {"http1", "redis"} <= protocols
    assert [p[:40] for p in payloads if detect(p)] == []


@pytest.mark.parametrize("name", [c[0] for c in CAPTURED])
@pytest.mark.parametrize("side", ["client", "server"])
def test_no_other_parser_claims_dns(name: str, side: str) -> None:
    events = kit.seen_from(side, load(name))
    sniffer = Sniffer(side)
    records = [r for i, (d, size, p) in enumerate(events) for r in sniffer.feed(d, i, size, p)]
    records += sniffer.flush(100 * TIMEOUT_NS)
    assert sniffer.protocol == "dns"
    assert brief(records) == dict(CAPTURED)[name]


def test_latency_is_from_the_query_to_its_answer() -> None:
    records, _ = run(load("tcp_pipelined3"))  # out: 3 queries; in: len, msg, len, msg, len, msg
    assert [(r.start_ns, r.end_ns) for r in records] == [(1000, 3000), (1000, 5000),
                                                          (1000, 7000)]


# -- TCP framing --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tcp_keepopen3", "tcp_pipelined3", "tcp_big_txt"])
def test_tcp_stream_split_at_every_byte_boundary(name: str) -> None:
    events = load(name)
    expected = dict(CAPTURED)[name]
    # Requests one way in one write, the answers the other way cut at every point: the
    # query bytes first so each cut still has its question waiting.
    queries, answers = kit.joined(events, "out"), kit.joined(events, "in")
    for cut in range(1, len(answers)):
        reads = kit.events_of("in", kit.split(answers, cut))
        records, conn = run([("out", len(queries), queries), *reads])
        assert brief(records) == expected, cut
        assert quiet(conn) == {}, cut
    for cut in range(1, len(queries) - 1):  # the first write too short to tell UDP from TCP
        for cuts in ((cut,), (cut, cut + 1)):
            writes = kit.events_of("out", kit.split(queries, *cuts))
            records, conn = run([*writes, ("in", len(answers), answers)])
            assert brief(records) == expected, cuts


def test_tcp_byte_by_byte() -> None:
    records, conn = run(kit.byte_by_byte(load("tcp_keepopen3")))
    assert brief(records) == dict(CAPTURED)["tcp_keepopen3"]
    assert quiet(conn) == {}


@pytest.mark.parametrize("length_reads", [[2], [1, 1]])
def test_server_reading_the_length_by_itself_through_the_sniffer(length_reads: list[int]
                                                                  ) -> None:
    """dnsmasq reads a TCP query's length with two 1-byte reads, then the message: the sniffer
    cannot recognise those bytes, so DNS starts at the bare message, and the answer's length
    settles TCP."""
    events = kit.as_server(load("tcp_keepopen3"))
    reads: list[Event] = []
    for d, size, payload in events:
        if d == "in":
            cuts = [sum(length_reads[: i + 1]) for i in range(len(length_reads))]
            reads += kit.events_of(d, kit.split(payload, *cuts))
        else:
            reads.append((d, size, payload))
    sniffer = Sniffer("server")
    records = [r for i, ev in enumerate(reads) for r in sniffer.feed(ev[0], i, ev[1], ev[2])]
    assert sniffer.protocol == "dns"
    assert sniffer.counters["unidentified_bytes"] == 2
    assert [(r.side, r.query, r.status) for r in records] == [
        ("server", "A ok.test", "NOERROR"), ("server", "A nx.test", "NXDOMAIN"),
        ("server", "SRV _http._tcp.ok.test", "NOERROR")]
    assert [r.request_bytes for r in records] == [48, 50, 61]  # the first length unseen
    parser = sniffer.parser
    assert isinstance(parser, DnsConnection) and parser.framing == "stream"
    assert quiet(parser) == {}


def test_a_known_transport_fixes_the_framing() -> None:
    (_, size, query), (_, asize, answer) = load("tcp_a")
    conn = DnsConnection("client", transport="tcp")
    assert conn.framing == "stream"
    conn.feed("out", 1, 2, query[:2])  # the length alone: a stream from the first byte
    conn.feed("out", 2, size - 2, query[2:])
    assert [r.status for r in conn.feed("in", 3, asize, answer)] == ["NOERROR"]
    assert DnsConnection("client", transport="udp").framing == "datagram"


def test_header_only_answer_pairs_by_id() -> None:
    """An answer without its question (FORMERR from some servers): 12 bytes that could also
    begin a TCP message, so they wait for the next event, or at the latest for expire()."""
    (_, size, query), _ = load("udp_a")
    header = query[:2] + struct.pack("!5H", 0x8181, 0, 0, 0, 0)
    conn = DnsConnection("client")
    conn.feed("out", 1, size, query)
    assert conn.feed("in", 2, len(header), header) == []
    assert conn.expire(2 + EXPIRE_GRACE_NS) == []  # TCP bytes may still be on their way
    (record,) = conn.expire(3 + EXPIRE_GRACE_NS)
    assert (record.query, record.status, record.error, record.end_ns) == (
        "A ok.test", "FORMERR", True, 2)
    assert conn.framing == "undecided"


# -- capture limits and gaps --------------------------------------------------------------------
@pytest.mark.parametrize("capture", [FULL, 64, 24])
def test_tcp_messages_longer_than_the_capture(capture: int) -> None:
    # The 663-byte TXT answer's header and question (31 bytes) fit 64 bytes, not 24: then the
    # records have neither type nor name, but lengths still frame every message.
    events = load("tcp_big_txt") + load("tcp_a")
    records, conn = run(events, capture=capture)
    expected = dict(CAPTURED)["tcp_big_txt"] + dict(CAPTURED)["tcp_a"]
    if capture == 24:
        expected = [("", "", *e[2:]) for e in expected]
    assert brief(records) == expected
    assert [r.complete for r in records] == [capture != 24] * 2
    assert conn.counters["cut_messages"] == {FULL: 0, 64: 1, 24: 4}[capture]
    assert conn.counters["sync_losses"] == 0


def test_message_boundary_in_a_gap_loses_sync_until_a_message_starts() -> None:
    events = load("tcp_keepopen3")
    answers = kit.joined(events, "in")
    # Three queries written; all three answers read at once, captured only to 40 bytes: the
    # second answer's length is in the gap.
    records, conn = run([*[e for e in events if e[0] == "out"],
                         ("in", len(answers), answers[:40])] + load("tcp_a"))
    # The two answers in the gap are not timeouts: their status is unknown.
    assert [(r.query, r.status, r.error, r.complete) for r in records] == [
        ("A ok.test", "NOERROR", False, True), ("A ok.test", "NOERROR", False, True),
        ("A nx.test", "", False, False), ("SRV _http._tcp.ok.test", "", False, False)]
    assert [r.end_ns for r in records[2:]] == [4000, 4000]  # the read that lost framing
    assert (conn.counters["sync_losses"], conn.counters["resyncs"]) == (1, 1)
    assert (conn.counters["lost_answers"], conn.counters["timeouts"]) == (2, 0)
    assert conn.counters["unparsed_bytes"] == len(answers) - 54


def test_udp_datagram_longer_than_the_capture_is_still_one_message() -> None:
    query, answer = load("udp_txt")
    records, conn = run([query, ("in", answer[1], answer[2][:40])])
    assert brief(records) == dict(CAPTURED)["udp_txt"]
    assert records[0].complete and conn.counters["cut_messages"] == 1
    records, conn = run([query, ("in", answer[1], answer[2][:20])])  # question cut
    assert [(r.status, r.complete) for r in records] == [("NOERROR", False)]


def test_syscall_moving_fewer_bytes_than_captured_is_trusted() -> None:
    query, answer = load("udp_a")
    records, _ = run([query, ("in", 30, answer[2])])
    assert [(r.status, r.response_bytes, r.complete) for r in records] == [
        ("NOERROR", 30, True)]


# -- pairing ------------------------------------------------------------------------------------
def _with_id(msg: bytes, qid: int) -> bytes:
    return struct.pack("!H", qid) + msg[2:]


def test_answers_pair_by_id_not_order() -> None:
    (_, s1, q1), (_, s2, a1) = load("udp_a")
    (_, s3, q2), (_, s4, a2) = load("udp_nxdomain")
    records, conn = run([("out", s1, q1), ("out", s3, q2), ("in", s4, a2), ("in", s2, a1)])
    assert [(r.query, r.status, r.end_ns) for r in records] == [
        ("A nx.test", "NXDOMAIN", 3000), ("A ok.test", "NOERROR", 4000)]
    assert quiet(conn) == {}


def test_answer_to_another_question_is_not_paired() -> None:
    (_, s1, q1), _ = load("udp_a")
    _, (_, s2, a2) = load("udp_nxdomain")
    records, conn = run([("out", s1, q1), ("in", s2, _with_id(a2, q1[0] << 8 | q1[1]))],
                        close_ns=3000)
    assert [(r.query, r.status) for r in records] == [("A ok.test", "UNANSWERED")]
    assert conn.counters["mismatched_responses"] == 1


def _udp_a_with(old: bytes, new: bytes) -> list[Event]:
    """udp_a's query and answer with the first ``old`` bytes (in the question) replaced."""
    return [(d, s, p.replace(old, new, 1)) for d, s, p in load("udp_a")]


def test_case_randomised_names_match_and_are_lowered() -> None:
    records, _ = run(_udp_a_with(b"\x02ok\x04test\x00", b"\x02Ok\x04tEsT\x00"))
    assert [(r.query, r.status) for r in records] == [("A ok.test", "NOERROR")]


def test_orphan_answer_and_duplicate_answer() -> None:
    query, answer = load("udp_a")
    records, conn = run([answer, query, answer, answer])
    assert len(records) == 1
    assert conn.counters["orphan_responses"] == 2


def test_unknown_qtype_is_named_by_number() -> None:
    a_type, odd = b"\x04test\x00\x00\x01\x00\x01", b"\x04test\x00\xff\xfe\x00\x01"
    records, _ = run(_udp_a_with(a_type, odd))
    assert [(r.method, r.endpoint, r.query) for r in records] == [
        ("TYPE65534", "TYPE65534", "TYPE65534 ok.test")]


def _query(qid: int, labels: list[bytes], qtype: int = 1) -> bytes:
    name = b"".join(bytes([len(x)]) + x for x in labels) + b"\0"
    return struct.pack("!6H", qid, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", qtype, 1)


def _answer(query: bytes, rcode: int = 0) -> bytes:
    flags = 0x8180 | rcode
    return query[:2] + struct.pack("!H", flags) + query[4:]


def test_query_text_is_bounded_and_escaped() -> None:
    labels = [b"x" * 63, b"y" * 63, b"z" * 63, b"w" * 61]  # 253 characters: the longest name
    q = _query(7, labels, qtype=28)
    records, _ = run([("out", len(q), q), ("in", len(q), _answer(q))])
    assert len(records[0].query) == dns.MAX_QUERY_CHARS
    assert records[0].query.startswith("AAAA " + "x" * 63 + "." + "y" * 63)
    q = _query(8, [b"a.b", b"\x00\xff", b"C"])
    records, _ = run([("out", len(q), q), ("in", len(q), _answer(q, 3))])
    assert [(r.query, r.status) for r in records] == [("A a\\.b.\\000\\255.c", "NXDOMAIN")]


@pytest.mark.parametrize("rcode, status, error", [
    (0, "NOERROR", False), (1, "FORMERR", True), (2, "SERVFAIL", True), (3, "NXDOMAIN", False),
    (4, "NOTIMP", True), (5, "REFUSED", True), (9, "NOTAUTH", False), (15, "RCODE15", False)])
def test_status_is_the_rcode_name(rcode: int, status: str, error: bool) -> None:
    q = _query(9, [b"svc", b"ns", b"svc", b"cluster", b"local"])
    records, _ = run([("out", len(q), q), ("in", len(q), _answer(q, rcode))])
    assert [(r.status, r.error) for r in records] == [(status, error)]


# -- deadlines ----------------------------------------------------------------------------------
def test_expire_reports_a_timeout_after_the_grace() -> None:
    query, answer = load("udp_a")
    conn = DnsConnection("client")
    assert conn.feed("out", 1000, query[1], query[2]) == []
    assert conn.expire(1000 + TIMEOUT_NS) == []  # due, but events may still be on their way
    assert conn.expire(1000 + TIMEOUT_NS + EXPIRE_GRACE_NS - 1) == []
    (record,) = conn.expire(1000 + TIMEOUT_NS + EXPIRE_GRACE_NS)
    assert (record.status, record.error, record.complete) == ("TIMEOUT", True, True)
    assert (record.start_ns, record.end_ns, record.response_bytes) == (1000, 1000 + TIMEOUT_NS, 0)
    assert conn.expire(10 * TIMEOUT_NS) == []
    assert conn.feed("in", 2 * TIMEOUT_NS, answer[1], answer[2]) == []  # the client gave up
    assert (conn.counters["timeouts"], conn.counters["late_responses"]) == (1, 1)
    assert conn.flush(20 * TIMEOUT_NS) == []


def test_answer_after_the_deadline_is_late_even_before_expire_runs() -> None:
    query, answer = load("udp_a")
    conn = DnsConnection("client")
    conn.feed("out", 0, query[1], query[2])
    assert conn.feed("in", TIMEOUT_NS, answer[1], answer[2])[0].status == "NOERROR"  # just in
    conn.feed("out", 10, query[1], query[2])
    (record,) = conn.feed("in", 11 + TIMEOUT_NS, answer[1], answer[2])
    assert (record.status, record.end_ns) == ("TIMEOUT", 10 + TIMEOUT_NS)
    assert conn.counters["late_responses"] == 1


def test_retransmission_merges_into_the_first_send() -> None:
    (_, size, query), (_, asize, answer) = load("udp_a")
    records, conn = run([("out", size, query), ("out", size, query), ("in", asize, answer)])
    assert [(r.status, r.start_ns, r.end_ns, r.request_bytes) for r in records] == [
        ("NOERROR", 1000, 3000, 2 * size)]
    assert conn.counters["retransmissions"] == 1
    # Resent 1 s later, never answered: the deadline runs from the last send.
    conn = DnsConnection("client")
    conn.feed("out", 0, size, query)
    conn.feed("out", 10**9, size, query)
    assert conn.expire(TIMEOUT_NS + EXPIRE_GRACE_NS) == []
    (record,) = conn.expire(10**9 + TIMEOUT_NS + EXPIRE_GRACE_NS)
    assert (record.start_ns, record.end_ns) == (0, 10**9 + TIMEOUT_NS)


def test_flush_before_the_deadline_is_unanswered_after_it_a_timeout() -> None:
    records, conn = run(load("tcp_unanswered"), close_ns=10**9)  # closed after 1 s
    assert [(r.status, r.error, r.end_ns) for r in records] == [("UNANSWERED", True, 10**9)]
    assert conn.counters["unanswered_queries"] == 1
    records, conn = run(load("tcp_unanswered"), close_ns=TIMEOUT_NS + 1001)
    assert [(r.status, r.end_ns) for r in records] == [("TIMEOUT", 1000 + TIMEOUT_NS)]


def test_pending_queries_are_bounded() -> None:
    conn = DnsConnection("client")
    for qid in range(dns.MAX_PENDING + 10):
        q = _query(qid, [b"n%d" % qid, b"test"])
        conn.feed("out", qid, len(q), q)
    assert conn.counters["dropped_queries"] == 10
    assert len(conn.flush(TIMEOUT_NS * 10)) == dns.MAX_PENDING


# -- compression pointers -----------------------------------------------------------------------
def test_compressed_answer_names_are_followed() -> None:
    _, (_, _, answer) = load("udp_srv")
    question_end = 12 + len(b"\x05_http\x04_tcp\x02ok\x04test\x00") + 4
    assert answer[question_end] >= 0xC0  # the answer's owner points to the question
    name, after = dns_wire.read_name(answer, question_end)
    assert (name, after) == ("_http._tcp.ok.test", question_end + 2)


@pytest.mark.parametrize("tail", [
    b"\xc0\x0c",  # the question name pointing at itself
    b"\x01a\xc0\x0c",  # a label, then back to its own start
    b"\xc0\x0e",  # forwards
    b"\xc0\x02",  # into the header
    b"\xc0",  # cut inside the pointer
    b"\x01a\xff\x00",  # an obsolete label type
])  # fmt: skip
def test_pointer_loops_and_bad_names_in_the_question(tail: bytes) -> None:
    msg = struct.pack("!6H", 1, 0x0100, 1, 0, 0, 0) + tail + b"\x00\x01\x00\x01"
    assert dns_wire.read_name(msg, 12)[0] is None
    assert not detect(msg)
    records, conn = run([("out", len(msg), msg), ("in", len(msg), _answer(msg))])
    assert [(r.method, r.status, r.complete) for r in records] == [("", "NOERROR", False)]
    assert conn.counters["parser_errors"] == 0


def test_pointer_chain_must_go_backwards_each_time() -> None:
    # The question "a.b" at 12; at 21 the name "c" then a pointer to 12; at 25 and 27 two
    # pointers to each other: a two-step loop.
    head = struct.pack("!6H", 1, 0x8180, 1, 0, 0, 0) + b"\x01a\x01b\x00\x00\x01\x00\x01"
    msg = head + b"\x01c\xc0\x0c" + b"\xc0\x1b" + b"\xc0\x19"
    assert dns_wire.read_name(msg, 21) == ("c.a.b", 25)
    assert dns_wire.read_name(msg, 25) == (None, -1)
    assert dns_wire.read_name(msg, 27) == (None, -1)
    chain = msg + b"\x01d\xc0\x15"  # d → c → a.b, each jump further back
    assert dns_wire.read_name(chain, len(msg)) == ("d.c.a.b", len(msg) + 4)


def test_names_longer_than_255_bytes_are_refused() -> None:
    labels = [b"x" * 63] * 4  # 4 * 64 + 1 = 257 bytes on the wire
    assert dns_wire.read_name(_query(1, labels), 12) == (None, -1)
    assert dns_wire.read_name(_query(1, labels[:3] + [b"x" * 61]), 12)[0] is not None


# -- the registry -------------------------------------------------------------------------------
def test_dns_is_tried_after_every_parser_but_the_http2_frame_check() -> None:
    names = [p.protocol for p in PARSERS]
    assert names.index("dns") == len(names) - 2 and names[-1] == "http2"


# -- robustness ---------------------------------------------------------------------------------
_event = st.tuples(st.sampled_from(["in", "out"]), st.integers(0, 5000), st.binary(max_size=80))


def _sane(records: list[Request], conn: DnsConnection, events: list[Event]) -> None:
    total = sum(max(size, 0) for _, size, _ in events) + sum(len(p) for _, _, p in events)
    assert conn.counters["parser_errors"] == 0
    assert all(v >= 0 for v in conn.counters.values())
    assert sum(r.request_bytes + r.response_bytes for r in records) <= total
    assert len(records) <= len(events)
    for r in records:
        assert r.end_ns >= r.start_ns and len(r.query) <= dns.MAX_QUERY_CHARS
        assert r.endpoint == r.method and len(r.method) <= 10


@PROPERTY
@given(st.lists(_event, max_size=30), st.sampled_from(ROLES))
def test_random_events_never_raise(events: list[Event], role: str) -> None:
    records, conn = run(events, role=role)
    _sane(records, conn, events)


@PROPERTY
@given(st.binary(max_size=600))
def test_detect_never_raises(buf: bytes) -> None:
    assert detect(buf) in (True, False)


_ALL = [c[0] for c in CAPTURED]


@PROPERTY
@given(st.sampled_from(_ALL), st.integers(1, 200), st.data())
def test_captured_bytes_cut_and_resplit_never_raise(name: str, capture: int,
                                                     data: st.DataObject) -> None:
    chopped = data.draw(kit.resplit(load(name), max_cuts=3))
    records, conn = run(chopped, capture=capture)
    _sane(records, conn, chopped)
    if name.startswith("tcp") and capture >= 200:  # nothing was cut: the same records
        assert brief(records) == dict(CAPTURED)[name]


@PROPERTY
@given(st.sampled_from(_ALL), st.data())
def test_corrupted_captured_bytes_never_raise(name: str, data: st.DataObject) -> None:
    events = load(name)
    i = data.draw(st.integers(0, len(events) - 1))
    d, size, payload = events[i]
    pos = data.draw(st.integers(0, len(payload) - 1))
    payload = payload[:pos] + bytes([data.draw(st.integers(0, 255))]) + payload[pos + 1 :]
    events[i] = (d, size, payload)
    records, conn = run(events)
    _sane(records, conn, events)
