from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubesight.streams import kafka_messages
from kubesight.streams.kafka import KafkaConnection, detect
from kubesight.streams.protocols import Sniffer
from kubesight.streams.record import Request

from tests.streams import kit
from tests.streams.kit import FIXTURES, FULL, PROPERTY, ROLES, Event

KAFKA = FIXTURES / "kafka"


def load(name: str) -> tuple[dict[str, Any], list[list[Event]]]:
    doc = kit.read_fixture("kafka", name)
    return doc, [kit.decode(c["events"]) for c in doc["connections"]]


run = kit.runner(KafkaConnection, close_ns=999_999)  # run(events, role="client", capture=FULL)


def run_all(conns: list[list[Event]], role: str = "client", capture: int = FULL
            ) -> tuple[list[Request], Counter[str]]:
    records: list[Request] = []
    counters: Counter[str] = Counter()
    for events in conns:
        recs, conn = run(kit.seen_from(role, events), role, capture)
        records += recs
        counters.update(conn.counters)
    return records, counters


def version(record: Request) -> int:
    return int(record.query.split()[1][1:])


# -- what the clients themselves said ------------------------------------------------------------
# librdkafka (debug=protocol): "<client> <broker>: Sent ProduceRequest (v10, 157 bytes @ 0,
# CorrId 2)", "<client> <broker>: Received ProduceResponse (v10, 57 bytes, CorrId 2, rtt 0.71ms)".
# Sent bytes include the size prefix; received bytes exclude it and the correlation id (8 bytes).
RDKAFKA = re.compile(r"^(?P<conn>\S+ \S+): (?P<dir>Sent|Received) (?P<api>\w+?)(?:Request|Response)"
                     r" \(v(?P<v>\d+), (?P<bytes>\d+) bytes.*CorrId (?P<corr>\d+)")
# Java NetworkClient: "[Consumer clientId=c, groupId=g] Sending FETCH request with header
# RequestHeader(apiKey=FETCH, apiVersion=17, clientId=c, correlationId=11, ...) ... to node 1",
# "... Received FETCH response from node 1 for request with header RequestHeader(...)".
JAVA = re.compile(r"\[(?P<client>[^\]]+)\] (?P<dir>Sending|Received) (?P<api>\w+) (?:request|"
                  r"response from node (?P<rnode>-?\d+)).*apiVersion=(?P<v>\d+),.*"
                  r"correlationId=(?P<corr>\d+)(?:.*to node (?P<snode>-?\d+))?")
RDKAFKA_NAMES = {"ApiVersion": "ApiVersions"}
FIRE_AND_FORGET = {"produce_acks0"}  # its Produce requests (acks=0) get no response


def client_account(name: str, doc: dict[str, Any]
                   ) -> tuple[Counter[tuple[str, int, int | None, int | None]], int]:
    """(api, version, request bytes, response bytes) of every request the client reports
    answered (or sent with acks=0), and how many it reports still in flight at the end.
    The Java client logs no sizes: bytes are None there."""
    sent: dict[tuple[str, int], tuple[str, int, int | None]] = {}
    received: dict[tuple[str, int], int | None] = {}
    for line in doc["client_log"]:
        if m := RDKAFKA.match(line):
            api = RDKAFKA_NAMES.get(m["api"], m["api"])
            key = (m["conn"], int(m["corr"]))
            if m["dir"] == "Sent":
                sent[key] = (api, int(m["v"]), int(m["bytes"]))
            else:
                received[key] = int(m["bytes"]) + 8
        elif m := JAVA.search(line):
            api = "".join(w.capitalize() for w in m["api"].split("_"))
            key = (f'{m["client"]} {m["snode"] or m["rnode"]}', int(m["corr"]))
            if m["dir"] == "Sending":
                sent[key] = (api, int(m["v"]), None)
            else:
                received[key] = None
    answered: Counter[tuple[str, int, int | None, int | None]] = Counter()
    in_flight = 0
    for key, (api, v, nbytes) in sent.items():
        if key in received:
            answered[(api, v, nbytes, received[key])] += 1
        elif api == "Produce" and name in FIRE_AND_FORGET:
            answered[(api, v, nbytes, 0)] += 1
        else:
            in_flight += 1
    return answered, in_flight


def account_of(records: list[Request], with_bytes: bool
               ) -> Counter[tuple[str, int, int | None, int | None]]:
    return Counter((r.method, version(r), r.request_bytes if with_bytes else None,
                    r.response_bytes if with_bytes else None) for r in records)


SCENARIOS = ["produce_acks_all", "produce_acks0", "consumer_group", "fetch_big", "errors",
             "java_clients"]


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("side", ROLES)
@pytest.mark.parametrize("capture", [FULL, 4096])
def test_records_match_what_the_client_reports(name: str, side: str, capture: int) -> None:
    doc, conns = load(name)
    records, counters = run_all(conns, side, capture)
    expected, in_flight = client_account(name, doc)
    assert account_of(records, with_bytes=name != "java_clients") == expected
    assert all(r.complete for r in records)
    assert {r.side for r in records} == {kit.decided_side(side)}
    assert counters["unanswered_requests"] == in_flight
    assert counters["unparsed_bytes"] == counters["sync_losses"] == 0
    assert counters["orphan_responses"] == counters["lost_responses"] == 0
    assert counters["parser_errors"] == counters["truncated_headers"] == 0


# Errors the clients reported to the application, under librdkafka's names for Kafka's codes.
RDKAFKA_ERRORS = {"UNKNOWN_TOPIC_OR_PART": "UNKNOWN_TOPIC_OR_PARTITION",
                  "MSG_SIZE_TOO_LARGE": "MESSAGE_TOO_LARGE"}


def test_errors_are_the_ones_the_client_reported() -> None:
    doc, conns = load("errors")
    report = doc["client_report"]
    records, _ = run_all(conns, capture=4096)
    errors = Counter((r.method, r.status) for r in records if r.error)
    assert errors == {
        ("Metadata", RDKAFKA_ERRORS[report["metadata_error"]]): 2,  # the producer asked twice
        ("Produce", RDKAFKA_ERRORS[report["produce_error"][0]]): 1,
        ("CreateTopics", report["create_topics_error"]): 1,
    }
    assert {r.status for r in records if not r.error} == {"NONE"}
    produce = next(r for r in records if r.method == "Produce")
    assert (produce.raw_path, produce.query) == ("ks-wire-tiny",
                                                 "Produce v10 client_id=ks-wire-errors")


@pytest.mark.parametrize("name", ["consumer_group", "java_clients"])
def test_group_flow_statuses(name: str) -> None:
    """The first JoinGroup of a new member is answered MEMBER_ID_REQUIRED (KIP-394) and retried;
    everything else succeeds."""
    _, conns = load(name)
    records, _ = run_all(conns)
    assert Counter(r.status for r in records) == {"MEMBER_ID_REQUIRED": 1,
                                                  "NONE": len(records) - 1}
    joins = [r for r in records if r.method == "JoinGroup"]
    assert [(j.status, j.error) for j in joins] == [("MEMBER_ID_REQUIRED", True), ("NONE", False)]
    assert {r.endpoint for r in records} == {r.method for r in records} >= {
        "ApiVersions", "Metadata", "FindCoordinator", "JoinGroup", "SyncGroup", "OffsetFetch",
        "ListOffsets", "Fetch", "OffsetCommit", "LeaveGroup"}


def test_acks0_produce_is_complete_without_a_response() -> None:
    _, conns = load("produce_acks0")
    records, counters = run_all(conns)
    produce = [r for r in records if r.method == "Produce"]
    assert [(r.status, r.error, r.response_bytes, r.latency_ns, r.complete, r.raw_path)
            for r in produce] == [("", False, 0, 0, True, "ks-wire-orders")] * 3
    assert counters["unanswered_requests"] == 0


@pytest.mark.parametrize("capture", [FULL, 4096, 64])
def test_fetch_response_is_framed_across_what_was_not_captured(capture: int) -> None:
    """A 400 KB Fetch response read in reads of about 100 KB: with as little as 64 bytes of
    each captured, sizes alone find the ListOffsets responses that follow it."""
    doc, conns = load("fetch_big")
    reported = max(int(m["bytes"]) + 8 for line in doc["client_log"]
                   if (m := RDKAFKA.match(line)) and m["api"] == "Fetch" and m["dir"] == "Received")
    events = next(c for c in conns if any(size > 90_000 for _, size, _ in c))
    records, conn = run(events, capture=capture)
    fetch = max((r for r in records if r.method == "Fetch"), key=lambda r: r.response_bytes)
    last_read = max(i for i, (d, size, _) in enumerate(events) if d == "in" and size > 90_000)
    assert reported > 400_000
    assert (fetch.response_bytes, fetch.end_ns, fetch.status) == (reported,
                                                                  (last_read + 1) * 1000, "NONE")
    after = [r.method for r in records if r.start_ns > fetch.end_ns]
    assert "ListOffsets" in after
    assert brief(records) == brief(run(events)[0])
    assert conn.counters["sync_losses"] == conn.counters["unparsed_bytes"] == 0


def rechunk(events: list[Event], k: int) -> list[Event]:
    """Every event cut into k-byte pieces (an uncaptured tail stays with the last piece)."""
    out: list[Event] = []
    for d, size, payload in events:
        pieces = [payload[i : i + k] for i in range(0, len(payload), k)] or [b""]
        for p in pieces[:-1]:
            out.append((d, len(p), p))
        out.append((d, size - sum(len(p) for p in pieces[:-1]), pieces[-1]))
    return out


def brief(records: list[Request]) -> list[tuple[str, str, int, int, bool]]:
    return [(r.method, r.status, r.request_bytes, r.response_bytes, r.complete) for r in records]


@pytest.mark.parametrize("name", ["consumer_group", "java_clients", "fetch_big"])
@pytest.mark.parametrize("k", [1, 2, 3, 7, 64, 1000])
def test_messages_split_across_events_at_any_byte(name: str, k: int) -> None:
    _, conns = load(name)
    for events in conns:
        whole, _ = run(events, capture=4096)
        records, conn = run(rechunk(events, k), capture=4096)
        assert brief(records) == brief(whole)
        assert conn.counters["sync_losses"] == 0


def directions(events: list[Event]) -> tuple[bytes, bytes]:
    return kit.joined(events, "out"), kit.joined(events, "in")


def test_pipelined_requests_in_one_write_and_responses_in_reads_cut_anywhere() -> None:
    """All four requests of the producer's broker connection in one write (in flight together),
    the four responses in two reads cut at every byte."""
    _, conns = load("produce_acks_all")
    sequential, _ = run(conns[1])
    requests, responses = directions(conns[1])
    for cut in range(1, len(responses)):
        records, conn = run([("out", len(requests), requests),
                             ("in", cut, responses[:cut]),
                             ("in", len(responses) - cut, responses[cut:])])
        assert brief(records) == brief(sequential), cut
        assert conn.counters["sync_losses"] == 0, cut
    assert [r.method for r in sequential] == ["ApiVersions", "Produce", "Produce", "Produce"]


def test_responses_lost_in_a_gap_end_their_requests_incomplete() -> None:
    """Responses 2 and 3 of 4 arrive in one read of which only 10 bytes were captured: the 2nd
    is framed by its size (its error code unread), the 3rd's size is in the gap, so framing is
    lost, and found again at the 4th response, which ends the 3rd's wait."""
    _, conns = load("produce_acks_all")
    requests, responses = directions(conns[1])
    ends = [0]
    while ends[-1] < len(responses):
        ends.append(ends[-1] + 4 + int.from_bytes(responses[ends[-1] : ends[-1] + 4], "big"))
    first, lost, last = (responses[: ends[1]], responses[ends[1] : ends[3]],
                         responses[ends[3] :])
    records, conn = run([("out", len(requests), requests), ("in", len(first), first),
                         ("in", len(lost), lost[:10]), ("in", len(last), last)])
    assert [(r.method, r.status, r.complete, r.end_ns) for r in records] == [
        ("ApiVersions", "NONE", True, 2000), ("Produce", "", True, 3000),
        ("Produce", "", False, 4000), ("Produce", "NONE", True, 4000)]
    counters = conn.counters
    assert (counters["sync_losses"], counters["resyncs"], counters["lost_responses"]) == (1, 1, 1)
    assert counters["unparsed_bytes"] == len(lost) - (ends[2] - ends[1])


def test_a_version_newer_than_the_layouts_is_named_but_its_status_not_read() -> None:
    _, conns = load("produce_acks_all")
    requests, responses = directions(conns[1])
    bumped = bytearray(requests)
    produce = 4 + int.from_bytes(requests[:4], "big")  # the second request: a Produce v10
    assert bumped[produce + 4 : produce + 8] == b"\x00\x00\x00\x0a"
    bumped[produce + 7] = 12  # v12: beyond 3.9.1's v11, within the headroom
    records, conn = run([("out", len(bumped), bytes(bumped)), ("in", len(responses), responses)])
    assert [(r.method, r.status, r.query.split()[1]) for r in records][1] == ("Produce", "", "v12")
    assert conn.counters["unknown_versions"] == 1


# -- detection -------------------------------------------------------------------------------------
def test_detect_accepts_every_request_of_every_capture() -> None:
    for name in SCENARIOS:
        _, conns = load(name)
        for events in conns:
            assert detect(events[0][2]), name  # ApiVersions opens every connection
            for d, size, payload in events:
                if d == "out":
                    assert detect(payload) and detect(payload[:4096]), (name, payload[:20])
                    if size > 4000:  # cut, but not at a capture boundary
                        assert not detect(payload[:4000]), name


def test_sniffer_hands_kafka_connections_to_the_kafka_parser() -> None:
    for name in SCENARIOS:
        doc, conns = load(name)
        answered, _ = client_account(name, doc)
        count = 0
        for events in conns:
            sniffer = Sniffer("client")
            count += sum(len(sniffer.feed(d, i, size, p)) for i, (d, size, p) in enumerate(events))
            count += len(sniffer.flush(0))
            assert sniffer.protocol == "kafka", name
        assert count == sum(answered.values()), name


# From the protocols' specifications, for what the captures above may lack.
NOT_KAFKA = [
    b"\x00\x00\x00\x08\x04\xd2\x16\x2f",  # PostgreSQL SSLRequest
    b"\x00\x00\x00\x54\x00\x03\x00\x00user\x00postgres\x00database\x00postgres\x00"
    b"application_name\x00psql\x00client_encoding\x00UTF8\x00\x00" + b"\x00" * 11,
    b"\x00\x00\x00\x40\x00\x03\x00\x00user\x00" + b"1" * 40 + b"\x00database\x00x\x00\x00",
    b"Q\x00\x00\x00\x0dSELECT 1\x00",  # PostgreSQL simple query
    b"\x21\x00\x00\x00\x03SELECT * FROM t WHERE id = 1",  # MySQL COM_QUERY
    b"\x05\x00\x00\x00\x0e\x00\x00\x00\x00",  # MySQL COM_PING-ish
    b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n",  # Redis
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"\x00\x00\x12\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64\x00\x04\x00\x10\x00\x00"
    b"\x00\x06\x00\x00\x40\x00",  # HTTP/2 SETTINGS
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32,  # TLS ClientHello
    b"\x00\x1c\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01"
    b"\x00\x01",  # DNS over TCP
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
]


def test_detect_claims_no_other_protocol() -> None:
    payloads = kit.other_protocols_payloads("kafka") + [("spec", b) for b in NOT_KAFKA]
    assert len(payloads) > len(NOT_KAFKA)  # at least the HTTP/1 captures are there
    assert [(where, p[:24]) for where, p in payloads if detect(p)] == []


def test_detect_needs_sizes_that_agree() -> None:
    _, conns = load("produce_acks_all")
    request = conns[0][0][2]
    assert detect(request) and detect(request + request)  # two pipelined in one write
    assert not detect(request[:-1]) and not detect(request + request[:-1])
    assert not detect(request + b"\x00")
    _, conns = load("errors")
    produce = next(p for d, size, p in conns[1] if d == "out" and size == 4130)
    # Cut short: only where a capture ends (a power of two, at least 256 bytes).
    assert detect(produce[:256]) and detect(produce[:4096])
    assert not detect(produce[:255]) and not detect(produce[:300]) and not detect(produce[:128])


# -- the response layouts, against bodies Kafka's own classes serialised ---------------------------
# Layouts that describe the whole body, so a walk without errors must end exactly at its end.
EXHAUSTIVE = {0, 1, 2, 3, 8, 9, 10, 15, 19, 20, 21, 23, 27, 28, 30, 33, 34, 37, 42, 44, 51}
MARK = 0x7ABC


def library_bodies() -> list[tuple[int, int, int, bytes]]:
    rows = []
    for line in (KAFKA / "library_bodies.txt").read_text().splitlines():
        api, ver, mode, body = line.split()
        rows.append((int(api), int(ver), int(mode), bytes.fromhex(body)))
    return rows


def test_layouts_read_every_version_kafka_serialises() -> None:
    rows = library_bodies()
    assert len({(api, ver) for api, ver, _, _ in rows}) == sum(
        hi + 1 for key, (_, hi, _) in kafka_messages.APIS.items() if key < 88)
    wrong = []
    for api, ver, mode, body in rows:
        code, end = kafka_messages.walk_response(api, ver, body)
        if mode == 0:  # no errors anywhere
            ok = code == 0 and (api not in EXHAUSTIVE or end == len(body))
        elif mode == 1:  # every error code set: the first one read is found
            ok = code == MARK
        else:  # only in the last element of each array: found by skipping the ones before
            ok = code == MARK if api in EXHAUSTIVE and ver >= (4 if api == 10 else 0) else (
                code in (0, MARK))
        if not ok:
            wrong.append((kafka_messages.APIS[api][0], ver, mode, code, end, len(body)))
    assert wrong == []


# -- robustness ------------------------------------------------------------------------------------
event_strategy = st.tuples(st.sampled_from(["in", "out"]), st.integers(0, 1 << 20),
                           st.binary(max_size=64))


@settings(max_examples=300, deadline=None)
@given(st.lists(event_strategy, max_size=30), st.sampled_from(ROLES))
def test_random_events_never_raise(events: list[tuple[str, int, bytes]], role: str) -> None:
    conn = KafkaConnection(role)
    records = []
    fed = {"in": 0, "out": 0}
    for i, (d, size, payload) in enumerate(events):
        size = max(size, len(payload))
        fed[d] += size
        records += conn.feed(d, i, size, payload)
    records += conn.flush(len(events))
    assert conn.counters["parser_errors"] == 0
    assert all(v >= 0 for v in conn.counters.values())
    assert sum(r.request_bytes for r in records) <= fed["in"] + fed["out"]


CAPTURED = [events for name in SCENARIOS for events in load(name)[1]]


@settings(PROPERTY, max_examples=200)
@given(st.sampled_from(range(len(CAPTURED))), st.data())
def test_cut_and_corrupted_captures_never_raise(index: int, data: st.DataObject) -> None:
    """Real connections with each payload cut to a random length and some bytes flipped: never
    an exception, and never more records or bytes than the connection carried."""
    events = CAPTURED[index]
    mangled = []
    for d, size, payload in events:
        keep = data.draw(st.integers(0, len(payload)))
        cut = bytearray(payload[:keep])
        if cut and data.draw(st.booleans()):
            cut[data.draw(st.integers(0, len(cut) - 1))] ^= data.draw(st.integers(1, 255))
        mangled.append((d, size, bytes(cut)))
    records, conn = run(mangled)
    requests_sent = sum(1 for d, _, _ in events if d == "out")
    assert conn.counters["parser_errors"] == 0
    assert len(records) <= requests_sent
    assert sum(r.request_bytes for r in records) <= sum(s for d, s, _ in events if d == "out")
    assert sum(r.response_bytes for r in records) <= sum(s for d, s, _ in events if d == "in")
    assert all(r.method in {name for name, _, _ in kafka_messages.APIS.values()} | {"Unknown"}
               for r in records)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(range(len(CAPTURED))), st.integers(64, 512))
def test_any_capture_size_keeps_the_framing(index: int, capture: int) -> None:
    """Sizes frame every message whatever the capture size, as long as the headers (and a
    Produce's acks) are seen."""
    events = CAPTURED[index]
    whole, _ = run(events)
    records, conn = run(events, capture=capture)
    assert [(r.method, r.request_bytes, r.response_bytes) for r in records] == [
        (r.method, r.request_bytes, r.response_bytes) for r in whole]
    assert conn.counters["sync_losses"] == 0
