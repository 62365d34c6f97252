from __future__ import annotations

import collections
import functools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubesight.streams.http2 import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PREFACE,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    UNKNOWN_ENDPOINT,
    Http2Connection,
    detect,
    detect_frames,
)
from kubesight.streams.protocols import Sniffer
from kubesight.streams.record import Request

from tests.streams import kit
from tests.streams.kit import PROPERTY, ROLES, SCHEMAS, Event

load = functools.partial(kit.load_events, "http2")
run = kit.runner(Http2Connection, close_ns=999_999_999)  # run(events, role="client", capture=FULL)


def brief(records: list[Request]) -> list[tuple[str, str, str, str, bool, int, int]]:
    return [(r.protocol, r.method, r.endpoint, r.status, r.error, r.request_bytes,
             r.response_bytes) for r in records]  # fmt: skip


def frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    head = len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big")
    return head + payload


def frames_of(payload: bytes) -> list[tuple[int, int, int, bytes]]:
    """The frames of an event that holds whole frames (after the preface, if any)."""
    out, pos = [], len(PREFACE) if payload.startswith(PREFACE) else 0
    while pos < len(payload):
        length = int.from_bytes(payload[pos : pos + 3], "big")
        stream = int.from_bytes(payload[pos + 5 : pos + 9], "big")
        end = pos + 9 + length
        out.append((payload[pos + 3], payload[pos + 4], stream, payload[pos + 9 : end]))
        pos = end
    assert pos == len(payload), "the event does not end at a frame boundary"
    return out


def reframe(events: list[Event], change) -> list[Event]:  # type: ignore[no-untyped-def]
    """Rewrite every frame of frame-aligned events with change(type, flags, stream, payload)
    → bytes; the preface is kept."""
    out = []
    for direction, _, payload in events:
        data = PREFACE if payload.startswith(PREFACE) else b""
        data += b"".join(change(*f) for f in frames_of(payload))
        out.append((direction, len(data), data))
    return out


SERVICE = "/kubesight.test.Echo/"
G, H = "grpc", "http2"
# Captured through a recording proxy (fixtures/http2/README.md): grpcio 1.85 client and server,
# curl 7.88 --http2-prior-knowledge against nginx 1.22. The truth is what the clients reported.
CAPTURED = [
    ("grpc_unary", [(G, "POST", SERVICE + "Unary", "0", False, 258, 152),
                    (G, "POST", SERVICE + "Unary", "0", False, 51, 63),
                    (G, "POST", SERVICE + "Unary", "0", False, 51, 63),
                    (G, "POST", SERVICE + "Unary", "5", True, 51, 53),  # trailers-only
                    (G, "POST", SERVICE + "Unary", "0", False, 47, 65587)]),
    ("grpc_streaming", [(G, "POST", SERVICE + "ServerStream", "0", False, 278, 226),
                        (G, "POST", SERVICE + "ServerStream", "8", True, 37, 103),
                        (G, "POST", SERVICE + "ClientStream", "0", False, 139, 61),
                        (G, "POST", SERVICE + "Bidi", "0", False, 129, 117)]),
    ("grpc_concurrent", [(G, "POST", SERVICE + "Unary", "0", False, 253, 147)]
                        + [(G, "POST", SERVICE + "Unary", "0", False, 46, 58)] * 4
                        + [(G, "POST", SERVICE + "Unary", "5", True, 51, 53),
                           (G, "POST", SERVICE + "Unary", "0", False, 46, 58),
                           (G, "POST", SERVICE + "Unary", "5", True, 51, 39)]),
    ("grpc_cancel", [(G, "POST", SERVICE + "ServerStream", "1", True, 291, 107),  # CANCELLED
                     (G, "POST", SERVICE + "Unary", "4", True, 100, 100)]),  # DEADLINE_EXCEEDED
    ("h2c_get", [(H, "GET", "/api/users/{id}", "200", False, 59, 77)]),
    ("h2c_404", [(H, "GET", "/missing.png", "404", False, 50, 221)]),
    ("h2c_503", [(H, "GET", "/unavailable", "503", True, 50, 81)]),
    ("h2c_post", [(H, "POST", "/upload", "200", False, 100, 73)]),
    ("h2c_head", [(H, "HEAD", "/index.html", "200", False, 45, 115)]),
    ("h2c_big", [(H, "GET", "/big.txt", "200", False, 47, 180319)]),
]  # fmt: skip


@pytest.mark.parametrize("name, expected", CAPTURED, ids=[c[0] for c in CAPTURED])
@pytest.mark.parametrize("side", ROLES)
def test_captured_exchanges(name: str, expected: list[tuple], side: str):
    records, conn = run(kit.seen_from(side, load(name)), role=side)
    assert brief(records) == expected
    assert all(r.complete for r in records)
    assert {r.side for r in records} == {kit.decided_side(side)}
    assert not any(conn.counters[k] for k in ("unparsed_bytes", "sync_losses", "hpack_lost",
                                               "lost_header_blocks", "orphan_responses",
                                               "unanswered_requests", "parser_errors"))


# With the default 4 KiB capture, a 64 KiB read is mostly a gap: inside one gRPC DATA frame it
# is skipped by the frame's length; nginx's 16 KiB frames put frame headers in it.
@pytest.mark.parametrize("name, expected", CAPTURED, ids=[c[0] for c in CAPTURED])
def test_captured_exchanges_with_4k_capture(name: str, expected: list[tuple]):
    records, conn = run(load(name), capture=4096)
    if name == "h2c_big":
        (record,) = records
        assert (record.endpoint, record.status, record.complete) == ("/big.txt", "200", False)
        assert conn.counters["sync_losses"] == 1
        return
    assert brief(records) == expected
    assert all(r.complete for r in records)


def test_timestamps_are_the_request_headers_and_the_end_of_the_response():
    records, _ = run(load("grpc_unary"))
    # events 3 (request HEADERS) .. 6 (trailers), 7 .. 9, ...; the 64 KiB response ends at 16
    assert [(r.start_ns, r.end_ns) for r in records] == [
        (3000, 6000), (7000, 9000), (10000, 11000), (12000, 13000), (14000, 16000)]


def test_concurrent_streams_on_one_connection_each_end_when_their_response_does():
    records, _ = run(load("grpc_concurrent"))
    assert {r.start_ns for r in records} == {3000}  # all 8 requests in one write
    assert [r.end_ns for r in records] == [7000, 8000, 11000, 11000, 12000, 12000, 13000, 14000]


def test_cancelled_stream_is_one_error_record_and_later_resets_change_nothing():
    records, conn = run(load("grpc_cancel"))
    assert [(r.status, r.error, r.complete) for r in records] == [("1", True, True),
                                                                 ("4", True, True)]
    # The client's RST_STREAM(CANCEL) ended stream 1; the resets after stream 3's trailers
    # (server NO_ERROR, client CANCEL) came after its response ended.
    assert conn.counters["resets"] == 1


@pytest.mark.parametrize("rst_after_ms, status", [(199.5, "4"), (120, "1")])
def test_client_reset_at_its_deadline_is_deadline_exceeded(rst_after_ms: float, status: str):
    """grpc-timeout 201m: a CANCEL when that time has passed is the client's deadline (gRPC
    reports DEADLINE_EXCEEDED); earlier it is a cancellation."""
    events = load("grpc_deadline_client_first")
    request_at = next(i for i, (_, _, p) in enumerate(events) if b"201m" in p)
    rst_at = request_at + 3
    assert frames_of(events[rst_at][2]) == [(RST_STREAM, 0, 3, (8).to_bytes(4, "big"))]
    conn = Http2Connection("client")
    records = []
    for i, (d, size, payload) in enumerate(events):
        ts = 10**9 + (int(rst_after_ms * 10**6) if i >= rst_at else i * 1000)
        records += conn.feed(d, ts, size, payload)
    assert [(r.endpoint, r.status, r.error) for r in records] == [
        (SERVICE + "ServerStream", "1", True), (SERVICE + "Unary", status, True)]


def test_split_byte_by_byte():
    records, conn = run(kit.byte_by_byte(load("grpc_streaming")))
    assert brief(records) == CAPTURED[1][1]
    assert all(r.complete for r in records)


def test_response_split_at_every_pair_of_boundaries():
    request, response, ack = load("h2c_get")
    n = len(response[2])
    for a in range(1, n):
        for b in range(a, n, 7):
            records, conn = run([request, *kit.events_of("in", kit.split(response[2], a, b)), ack])
            assert brief(records) == CAPTURED[4][1], (a, b)
            assert records[0].complete, (a, b)


# --- gaps and connections joined mid-way ------------------------------------------------------


def true_calls(name: str) -> collections.Counter[tuple[str, str]]:
    records, _ = run(load(name))
    return collections.Counter((r.endpoint, r.status) for r in records)


def assert_never_wrong(records: list[Request], truth: collections.Counter[tuple[str, str]]):
    """Every record is one of the true calls, with what could not be read left unknown."""
    endpoints = {e for e, _ in truth} | {UNKNOWN_ENDPOINT}
    statuses = {s for _, s in truth} | {""}
    assert len(records) <= sum(truth.values())
    for r in records:
        assert r.endpoint in endpoints, r
        # A reset stream not known to be gRPC keeps the HTTP/2 reset code as its status.
        assert r.status in statuses or (r.status.startswith("RST_") and r.error), r
        if r.complete:
            assert (r.endpoint, r.status) in truth, r


GRPC = ["grpc_unary", "grpc_streaming", "grpc_concurrent", "grpc_cancel"]


@pytest.mark.parametrize("name", GRPC)
@pytest.mark.parametrize("capture", [9, 20, 64, 100, 300])
def test_small_captures_never_give_wrong_names(name: str, capture: int):
    records, conn = run(load(name), capture=capture)
    assert_never_wrong(records, true_calls(name))
    assert conn.counters["parser_errors"] == 0


@pytest.mark.parametrize("name", GRPC)
def test_joined_mid_connection_at_every_event(name: str):
    """The probe started while the connection was open: the first events are missing and the
    role is unknown. What is reported is right or unknown, never wrong."""
    events, truth = load(name), true_calls(name)
    for start in range(1, len(events)):
        sniffer = Sniffer("unknown")
        records: list[Request] = []
        for i, (d, size, payload) in enumerate(events[start:]):
            records += sniffer.feed(d, i, size, payload)
        records += sniffer.flush(10**9)
        assert sniffer.protocol in ("http2", ""), start
        assert_never_wrong(records, truth)
        assert {r.side for r in records} <= {"client"}, start
        counters = sniffer.parser_counters()
        assert counters.get("http2_parser_errors", 0) == 0


def test_joined_after_the_first_call_paths_are_unknown_and_counted():
    records, conn = run(load("grpc_unary")[6:], role="unknown")
    # The first call inserted :path and content-type into both tables; later calls only
    # reference them.
    assert [(r.endpoint, r.status, r.complete) for r in records] == [
        (UNKNOWN_ENDPOINT, "", False), (UNKNOWN_ENDPOINT, "", False),
        (UNKNOWN_ENDPOINT, "5", False), (UNKNOWN_ENDPOINT, "", False)]
    assert conn.role == "client"  # decided by the static :method of the requests
    assert conn.counters["hpack_lost"] > 0


PROBE_SERVICE = {"_8iov": "/ks90231724.Echo/", "": "/ks86d808c4.Echo/"}


@pytest.mark.parametrize("side", ["client", "server"])
def test_pipeline_capture_with_whole_payloads(side: str):
    """raw.v1 of tests/e2e/grpc_apps.py with every payload whole: exactly what both apps
    reported (30 unary, 6 NOT_FOUND; 9 server streams, 3 RESOURCE_EXHAUSTED; 4 bidi)."""
    records, conn = run(load(f"probe_grpc_{side}"), role=side)
    service = PROBE_SERVICE[""]
    assert collections.Counter((r.endpoint, r.status) for r in records) == {
        (service + "Unary", "0"): 24, (service + "Unary", "5"): 6,
        (service + "ServerStream", "0"): 6, (service + "ServerStream", "8"): 3,
        (service + "Bidi", "0"): 4}
    assert all(r.complete for r in records) and conn.counters["hpack_lost"] == 0


def test_pipeline_capture_cut_after_8_iovecs_client_side():
    """The probe copies 8 iovecs of a sendmsg; grpc-core writes its first request headers as
    22. The cut block still gives its :path, then the request direction's table is unknown:
    later unary calls (fully indexed) are {unknown}; reads are whole, so statuses are exact."""
    records, conn = run(load("probe_grpc_client_8iov"), role="client")
    service = PROBE_SERVICE["_8iov"]
    assert collections.Counter((r.endpoint, r.status) for r in records) == {
        (service + "Unary", "5"): 1, (UNKNOWN_ENDPOINT, "0"): 24, (UNKNOWN_ENDPOINT, "5"): 5,
        (service + "ServerStream", "0"): 6, (service + "ServerStream", "8"): 3,
        (service + "Bidi", "0"): 4}
    assert not any(r.complete for r in records)
    assert conn.counters["lost_header_blocks"] == 1 and conn.counters["hpack_lost"] > 0


def test_pipeline_capture_cut_after_8_iovecs_server_side():
    """Server side: requests are read whole (endpoints exact); its first response's trailers
    fell in a cut write, so OK statuses that reference them are unknown."""
    records, conn = run(load("probe_grpc_server_8iov"), role="server")
    service = PROBE_SERVICE["_8iov"]
    assert collections.Counter(r.endpoint for r in records) == {
        service + "Unary": 30, service + "ServerStream": 9, service + "Bidi": 4}
    statuses = collections.Counter(r.status for r in records)
    assert statuses["8"] == 3 and statuses["5"] + statuses[""] + statuses["0"] == 40
    assert_never_wrong(records, collections.Counter({
        (service + "Unary", "0"): 24, (service + "Unary", "5"): 6,
        (service + "ServerStream", "0"): 6, (service + "ServerStream", "8"): 3,
        (service + "Bidi", "0"): 4}))


def test_gap_over_a_headers_frame_loses_the_table_and_resyncs():
    events = load("grpc_streaming")
    # Event 14 (client) holds stream 5's request HEADERS + DATA; say only 5 bytes were captured.
    d, size, payload = events[14]
    assert d == "out" and frames_of(payload)[0][:3] == (HEADERS, END_HEADERS, 5)
    events[14] = (d, size, payload[:5])
    records, conn = run(events)
    assert_never_wrong(records, true_calls("grpc_streaming"))
    assert conn.counters["sync_losses"] == 1 and conn.counters["resyncs"] == 1
    assert [r.endpoint for r in records][:2] == [SERVICE + "ServerStream"] * 2


# --- frames no fixture has: built around real ones --------------------------------------------


def test_headers_split_into_continuation_frames():
    def cut(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
        if ftype != HEADERS or len(payload) < 20:
            return frame(ftype, flags, stream, payload)
        a, b, c = kit.split(payload, 7, 15)
        return (frame(HEADERS, flags & ~END_HEADERS, stream, a) + frame(CONTINUATION, 0, stream, b)
                + frame(CONTINUATION, END_HEADERS, stream, c))

    records, conn = run(reframe(load("grpc_streaming"), cut))
    truth = CAPTURED[1][1]
    assert [b[:5] for b in brief(records)] == [t[:5] for t in truth]
    # 18 bytes more per header block of 20 bytes or more: request headers, response headers
    # and trailers
    assert records[0].request_bytes == truth[0][5] + 18 and records[0].response_bytes == 226 + 36
    assert all(r.complete for r in records)


def test_padding_and_priority_fields_are_skipped():
    def pad(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
        if ftype == HEADERS:
            return frame(HEADERS, flags | PADDED | PRIORITY_FLAG, stream,
                         b"\x03" + b"\x00\x00\x00\x00\x0f" + payload + b"\x00" * 3)
        if ftype == DATA:
            return frame(DATA, flags | PADDED, stream, b"\x02" + payload + b"\x00\x00")
        return frame(ftype, flags, stream, payload)

    records, _ = run(reframe(load("grpc_concurrent"), pad))
    assert [(r.endpoint, r.status) for r in records] == [(b[2], b[3]) for b in CAPTURED[2][1]]
    assert all(r.complete for r in records)


def test_push_promise_is_a_request_of_its_own():
    request, response, ack = load("h2c_get")
    promise_block = bytes([0x82, 0x86, 0x04, 0x0A]) + b"/style.css"  # GET http, :path literal
    pushed = (frame(PUSH_PROMISE, END_HEADERS, 1, (2).to_bytes(4, "big") + promise_block)
              + frame(HEADERS, END_HEADERS, 2, bytes([0x88]))  # :status 200
              + frame(DATA, END_STREAM, 2, b"body{}"))
    records, conn = run([request, ("in", len(pushed), pushed), response, ack])
    assert [(r.method, r.endpoint, r.status, r.complete) for r in records] == [
        ("GET", "/style.css", "200", True), ("GET", "/api/users/{id}", "200", True)]


def test_goaway_drops_streams_the_server_never_processed():
    events = load("grpc_concurrent")
    goaway = frame(GOAWAY, 0, 0, (5).to_bytes(4, "big") + (0).to_bytes(4, "big"))
    at = next(i for i, (d, _, _) in enumerate(events) if d == "in" and i > 2)
    records, conn = run(events[:at] + [("in", len(goaway), goaway)] + events[at:])
    assert conn.counters["refused_streams"] == 5  # streams 7, 9, 11, 13, 15
    assert len(records) == 3 and conn.counters["orphan_responses"] == 0


@pytest.mark.parametrize(
    "name, before_response, status",
    [("h2c_get", 1, "RST_CANCEL"), ("grpc_unary", 5, "1")],  # gRPC: CANCELLED
)
def test_reset_before_the_response_is_an_error(name: str, before_response: int, status: str):
    """The client gives up (RST_STREAM CANCEL) before any response header came."""
    events = load(name)[:before_response]
    rst = frame(RST_STREAM, 0, 1, (8).to_bytes(4, "big"))
    records, conn = run([*events, ("out", len(rst), rst)])
    assert [(r.status, r.error, r.end_ns) for r in records] == [
        (status, True, (before_response + 1) * 1000)]
    assert conn.counters["resets"] == 1


def test_settings_header_table_size_limits_the_other_directions_table():
    conn = Http2Connection("client")
    settings_frame = frame(SETTINGS, 0, 0, (1).to_bytes(2, "big") + (256).to_bytes(4, "big"))
    conn.feed("out", 1, 24 + len(settings_frame), PREFACE + settings_frame)
    assert conn.framer(False).decoder.max_size == 256  # the server's blocks, read by us
    assert conn.framer(True).decoder.max_size == 4096


def test_unknown_frame_types_are_skipped_by_length():
    request, response, ack = load("h2c_get")
    extension = frame(0xFA, 0xFF, 0, b"whatever")
    records, conn = run([request, ("in", len(extension), extension), response, ack])
    assert brief(records) == CAPTURED[4][1]
    assert conn.counters["sync_losses"] == 0


# --- detection -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "buf, preface, frames",
    [
        (PREFACE + frame(SETTINGS, 0, 0), True, False),
        (PREFACE[:16], True, False),
        (PREFACE[:15], False, False),
        (load("grpc_unary")[1][2], False, True),  # the server's SETTINGS, WINDOW_UPDATE, ACK
        (frame(SETTINGS, 1, 0), False, True),  # one checkable frame
        (frame(SETTINGS, 0, 0, b"\x00" * 5), False, False),  # not a multiple of 6
        (frame(SETTINGS, 0, 1), False, False),  # SETTINGS on a stream
        (frame(DATA, 0, 1, b"x"), False, False),  # one DATA frame: too weak alone
        (frame(DATA, 0, 1, b"x") * 2, False, True),
        (frame(HEADERS, END_HEADERS, 0, b"\x82"), False, False),  # HEADERS on stream 0
        (frame(HEADERS, END_HEADERS | 0x40, 1, b"\x82"), False, False),  # undefined flag
        (frame(HEADERS, END_HEADERS, 3, b"\x82") + frame(DATA, 0, 3, b"x" * 100)[:20], False,
         True),  # the last frame runs past the capture
        (b"GET / HTTP/1.1\r\n\r\n", False, False),
        (b"HTTP/1.1 200 OK\r\n", False, False),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", False, False),  # TLS ClientHello
        (b"", False, False),
    ],
)
def test_detect(buf: bytes, preface: bool, frames: bool):
    assert detect(buf) is preface
    assert detect_frames(buf) is frames


def test_no_event_of_another_protocols_fixtures_looks_like_http2():
    payloads = [p for _, p in kit.other_protocols_payloads("http2")]
    assert len(payloads) > 100
    assert [p[:32] for p in payloads if detect(p) or detect_frames(p)] == []


def test_sniffer_picks_http2_by_preface_or_by_frames():
    events = load("grpc_unary")
    sniffer = Sniffer("client")
    records = [r for i, (d, s, p) in enumerate(events) for r in sniffer.feed(d, i, s, p)]
    assert sniffer.protocol == "http2" and len(records) == 5
    # The server's SETTINGS arrive before the preface is seen: frames detect it.
    server_first = Sniffer("client")
    reordered = [events[1], events[0], *events[2:]]
    records = [r for i, (d, s, p) in enumerate(reordered) for r in server_first.feed(d, i, s, p)]
    assert server_first.protocol == "http2" and len(records) == 5
    assert all(r.complete for r in records)


def test_wire_form_uses_the_requests_schema_fields():
    records, _ = run(load("grpc_unary"))
    wire = records[3].to_wire()
    schema = json.loads((SCHEMAS / "requests.v1.json").read_text())
    assert set(wire) <= set(schema["properties"]["requests"]["items"]["properties"])
    assert (wire["protocol"], wire["status"], wire["error"]) == ("grpc", "5", True)


# --- properties -------------------------------------------------------------------------------

PROPERTY_150 = settings(PROPERTY, max_examples=150)
ALL = [c[0] for c in CAPTURED]


@PROPERTY_150
@given(st.sampled_from(ALL), st.data())
def test_random_splits_give_the_same_records(name: str, data: st.DataObject):
    records, conn = run(data.draw(kit.resplit(load(name))))
    assert brief(records) == dict(CAPTURED)[name]
    assert all(r.complete for r in records)


@PROPERTY_150
@given(st.sampled_from(ALL), st.data())
def test_random_truncation_never_raises_and_never_gives_wrong_names(name: str,
                                                                    data: st.DataObject):
    events = kit.truncate_randomly(data.draw, load(name))
    role = data.draw(st.sampled_from(["client", "unknown"]))
    records, conn = run(events, role=role)
    assert_never_wrong(records, true_calls(name))
    assert conn.counters["parser_errors"] == 0


# The property every stream parser has (kit.py): random bytes after some of these.
test_random_bytes_never_raise = PROPERTY_150(kit.random_bytes_never_raise(Http2Connection, [
    PREFACE, frame(SETTINGS, 0, 0), frame(HEADERS, END_HEADERS, 1), frame(HEADERS, 0, 1, b"\x82"),
    frame(CONTINUATION, 4, 1, b"\xbe"), frame(DATA, END_STREAM, 1),
    frame(RST_STREAM, 0, 1, b"\0\0\0\x08"), frame(GOAWAY, 0, 0, b"\0" * 8),
    b"\x00\x00\x05\x01\x24\x00"]))
