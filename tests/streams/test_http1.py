from __future__ import annotations

import functools
import json

import pytest
from hypothesis import strategies as st
from kubesight.streams.http1 import MAX_HEAD, Http1Connection, detect
from kubesight.streams.record import Request

from tests.streams import kit
from tests.streams.kit import FULL, PROPERTY, ROLES, SCHEMAS, Event, Exchange

load = functools.partial(kit.load_events, "http1")
run = kit.runner(Http1Connection, close_ns=999_999)  # run(events, role="client", capture=FULL)


def brief(records: list[Request]) -> list[tuple[str, str, str, int, int]]:
    return [(r.method, r.raw_path, r.status, r.request_bytes, r.response_bytes) for r in records]


# Captured from nginx 1.22 on loopback (see fixtures/http1/README.md): the truth is what was sent.
CAPTURED = [
    ("keepalive3", [("GET", "/index.html", "200", 81, 272),
                    ("GET", "/api/users/42", "200", 59, 158),
                    ("GET", "/missing.png", "404", 46, 308)]),
    ("pipelined10", [("GET", f"/api/items/{i}", "200", 46, 158) for i in range(10)]),
    ("chunked_gzip", [("GET", "/big.txt", "200", 65, 8260)]),
    ("head_204", [("HEAD", "/index.html", "200", 46, 236), ("GET", "/empty", "204", 40, 110)]),
    ("etag_304", [("GET", "/index.html", "200", 45, 272), ("GET", "/index.html", "304", 75, 179)]),
    ("unavailable_503", [("GET", "/unavailable", "503", 46, 187)]),
    ("expect_100_continue", [("POST", "/upload/form", "200", 138 + 27, 25 + 154)]),
    ("chunked_upload", [("POST", "/upload/chunked", "200", 78 + 11 + 13 + 11 + 5, 154)]),
    ("post_1mib", [("POST", "/upload/blob", "200", 72 + (1 << 20), 154)]),
    ("http10_close", [("GET", "/big.txt", "200", 65, 8214)]),
]  # fmt: skip


@pytest.mark.parametrize("name, expected", CAPTURED, ids=[c[0] for c in CAPTURED])
@pytest.mark.parametrize("side", ROLES)
def test_captured_exchanges(name: str, expected: list[tuple[str, str, str, int, int]], side: str):
    records, conn = run(kit.seen_from(side, load(name)), role=side)
    assert brief(records) == expected
    assert all(r.complete for r in records)
    assert {r.side for r in records} == {kit.decided_side(side)}
    assert conn.counters["unparsed_bytes"] == conn.counters["sync_losses"] == 0
    assert conn.counters["unanswered_requests"] == conn.counters["orphan_responses"] == 0


# With the default 4 KiB capture only a chunked body larger than it loses framing.
@pytest.mark.parametrize("name, expected", CAPTURED, ids=[c[0] for c in CAPTURED])
def test_captured_exchanges_with_4k_capture(name: str, expected: list[tuple[str, ...]]):
    records, conn = run(load(name), capture=4096)
    assert brief(records) == expected
    assert [r.complete for r in records] == [name != "chunked_gzip"] * len(expected)
    assert conn.counters["parser_errors"] == 0


def test_keepalive_timestamps_pair_each_request_with_its_response():
    records, _ = run(load("keepalive3"))
    assert [(r.start_ns, r.end_ns, r.latency_ns) for r in records] == [
        (1000, 2000, 1000), (3000, 4000, 1000), (5000, 6000, 1000)
    ]  # fmt: skip
    assert [r.endpoint for r in records] == ["/index.html", "/api/users/{id}", "/missing.png"]


@pytest.mark.parametrize("status, error", [("503", True), ("404", False), ("200", False)])
def test_error_is_status_5xx(status: str, error: bool):
    name = {"503": "unavailable_503", "404": "keepalive3", "200": "keepalive3"}[status]
    records, _ = run(load(name))
    assert {r.error for r in records if r.status == status} == {error}


# The 10 pipelined responses (158 bytes each: a 148-byte head, a 10-byte body) re-read in two
# reads split inside a body.
@pytest.mark.parametrize("cut", [150, 5 * 158 + 152, 9 * 158 + 157])
def test_pipelined_responses_split_mid_body(cut: int):
    events = load("pipelined10")
    reads = kit.events_of("in", kit.split(kit.joined(events, "in"), cut))
    records, conn = run([events[0], *reads])
    assert brief(records) == [("GET", f"/api/items/{i}", "200", 46, 158) for i in range(10)]
    assert [r.end_ns for r in records] == [2000] * (cut // 158) + [3000] * (10 - cut // 158)
    assert all(r.complete for r in records)


def _chunked_exchange() -> tuple[Event, bytes]:
    request, response = load("chunked_gzip")
    return request, response[2]


def test_chunked_response_split_at_every_byte_boundary():
    request, response = _chunked_exchange()
    for cut in range(1, len(response)):
        records, conn = run([request, *kit.events_of("in", kit.split(response, cut))])
        assert brief(records) == [("GET", "/big.txt", "200", 65, 8260)], cut
        assert records[0].complete and records[0].end_ns == 3000, cut
        assert conn.counters["sync_losses"] == 0, cut


# Chunk extensions, a trailer, a zero-padded size and a bare-LF line: every 2-way split.
SMALL_CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    b"5;name=value\r\nhello\r\n000A\r\n0123456789\r\n1\nx\r\n0\r\nX-Trailer: yes\r\n\r\n"
)


def test_small_chunked_response_split_at_every_pair_of_boundaries():
    request = ("out", 18, b"GET / HTTP/1.1\r\n\r\n")
    n = len(SMALL_CHUNKED)
    for a in range(1, n):
        for b in range(a, n):
            records, conn = run([request, *kit.events_of("in", kit.split(SMALL_CHUNKED, a, b))])
            assert brief(records) == [("GET", "/", "200", 18, n)], (a, b)
            assert records[0].complete, (a, b)


def test_start_line_and_headers_split_byte_by_byte():
    records, conn = run(kit.byte_by_byte(load("keepalive3")))
    assert brief(records) == CAPTURED[0][1]
    assert all(r.complete for r in records)


# 1 MiB POST: a head write then 256 writes of 4 KiB, whose payloads the probe cut to 64 bytes.
@pytest.mark.parametrize(
    "capture, complete, sync_losses",
    [(FULL, True, 0), (64, False, 2)],  # at 64 bytes both heads (72 and 154 bytes) are cut
)
def test_1mib_post_in_256_writes_is_one_request(capture: int, complete: bool, sync_losses: int):
    events = load("post_1mib")
    assert len(events) == 1 + 256 + 1 and {len(p) for _, _, p in events[1:-1]} == {64}
    records, conn = run(events, capture=capture)
    assert brief(records) == [("POST", "/upload/blob", "200", 72 + (1 << 20), 154)]
    assert records[0].complete is complete
    assert conn.counters["sync_losses"] == sync_losses


def test_head_response_has_no_body_despite_content_length():
    records, _ = run(load("head_204"))
    head = load("head_204")[1][2]
    assert b"Content-Length: 36" in head and head.endswith(b"\r\n\r\n")
    assert [(r.method, r.status, r.response_bytes) for r in records] == [
        ("HEAD", "200", 236), ("GET", "204", 110)
    ]  # fmt: skip


def test_interim_100_continue_is_not_the_final_response():
    records, _ = run(load("expect_100_continue"))
    assert [(r.status, r.start_ns, r.end_ns) for r in records] == [("200", 1000, 4000)]


def test_response_without_length_completes_at_close():
    events = load("http10_close")
    conn = Http1Connection("client")
    assert conn.feed(*events[0][:1], 1000, *events[0][1:]) == []
    assert conn.feed(*events[1][:1], 2000, *events[1][1:]) == []  # body until the server closes
    (record,) = conn.flush(3000)
    assert (record.status, record.end_ns, record.response_bytes, record.complete) == (
        "200", 3000, 8214, True
    )  # fmt: skip


# A 4 KiB capture of an 8 KiB chunked response: a chunk boundary falls in the gap.
def test_gap_in_chunked_body_loses_sync_and_next_request_ends_it():
    request, response = _chunked_exchange()
    events = [request, ("in", len(response), response[:4096])] + load("keepalive3")
    records, conn = run(events)
    assert [(r.raw_path, r.status, r.response_bytes, r.complete) for r in records] == [
        ("/big.txt", "200", 8260, False),
        ("/index.html", "200", 272, True),
        ("/api/users/42", "200", 158, True),
        ("/missing.png", "404", 308, True),
    ]
    assert records[0].end_ns == 2000  # ended by the next request, timed by its own last byte
    assert conn.counters["sync_losses"] == 1


def test_gap_in_chunked_body_ends_at_a_captured_terminator():
    request, response = _chunked_exchange()
    # One 7995-byte chunk: its end and the terminator are in the gap of the first read, the
    # second read is the terminator alone.
    first, rest = response[:8255], response[8255:]
    assert rest == b"0\r\n\r\n"
    events = [request, ("in", len(first), first[:4096]), ("in", len(rest), rest)]
    conn = Http1Connection("client")
    assert conn.feed(*events[0][:1], 1, *events[0][1:]) == []
    assert conn.feed(*events[1][:1], 2, *events[1][1:]) == []
    (record,) = conn.feed(*events[2][:1], 3, *events[2][1:])
    assert (record.response_bytes, record.end_ns, record.complete) == (8260, 3, False)
    assert conn.counters["resyncs"] == 1


@pytest.mark.parametrize(
    "first, role, orphans",
    [
        (("out", b"GET / HTTP/1.1\r\n\r\n"), "client", 0),
        (("in", b"GET / HTTP/1.1\r\n\r\n"), "server", 0),
        (("out", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), "server", 1),
        (("in", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), "client", 1),
    ],
)
def test_unknown_role_is_decided_by_the_first_start_line(
    first: tuple[str, bytes], role: str, orphans: int
):
    conn = Http1Connection("unknown")
    conn.feed(first[0], 1, 5, b"\x00body")  # mid-message when the probe started: skipped
    conn.feed(first[0], 2, len(first[1]), first[1])
    assert conn.role == role
    assert (conn.counters["unparsed_bytes"], conn.counters["orphan_responses"]) == (5, orphans)
    events = kit.seen_from(role, load("keepalive3"))
    records = [r for i, (d, s, p) in enumerate(events) for r in conn.feed(d, 10 + i, s, p)]
    assert [r.status for r in records] == ["200", "200", "404"][len(records) - 3 :]
    assert {r.side for r in records} == {role}


def test_garbage_is_counted_and_parsing_resumes_at_the_next_message():
    garbage = bytes(range(256)) * 4
    events = [("out", len(garbage), garbage), ("in", 7, b"\xff\xfe!!!\r\n")] + load("keepalive3")
    records, conn = run(events)
    assert [r.status for r in records] == ["200", "200", "404"]
    assert conn.counters["unparsed_bytes"] == len(garbage) + 7
    assert conn.counters["parser_errors"] == 0


def test_huge_header_is_bounded_and_the_next_request_parses():
    cookie = b"Cookie: " + b"a" * (2 * MAX_HEAD) + b"\r\n\r\n"
    head = b"GET /with/cookie HTTP/1.1\r\n" + cookie
    events = [("out", len(head), head[i : i + 1000]) for i in range(0, len(head), 1000)]
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    events = [(d, len(p), p) for d, _, p in events] + [("in", len(ok), ok)] + load("keepalive3")
    records, conn = run(events)
    assert [(r.raw_path, r.status, r.complete) for r in records][:2] == [
        ("/with/cookie", "200", False), ("/index.html", "200", True)
    ]  # fmt: skip
    assert records[0].request_bytes == len(head)
    assert conn.counters["header_overflows"] == 1


def test_upgrade_tunnels_the_rest_of_the_connection():
    events = [
        ("out", 0, b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
        ("in", 0, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"),
        ("out", 0, b"\x81\x05GET /"),
        ("in", 0, b"HTTP/1.1 200 OK\r\n\r\n"),
    ]
    records, conn = run([(d, len(p), p) for d, _, p in events])
    assert [r.status for r in records] == ["101"]
    assert conn.counters["tunneled_bytes"] == 7 + 19


@pytest.mark.parametrize(
    "target, path, endpoint",
    [
        (b"/users/42?x=1", "/users/42", "/users/{id}"),
        (b"http://example.com/a/b?q", "/a/b", "/a/b"),
        (b"http://example.com", "/", "/"),
        (b"*", "*", "*"),
        (b"/" + b"p" * 400, "/" + "p" * 255, "/{token}"),
    ],
)
def test_request_target_becomes_path_and_endpoint(target: bytes, path: str, endpoint: str):
    request = b"OPTIONS " + target + b" HTTP/1.1\r\n\r\n"
    records, _ = run(
        [
            ("out", len(request), request),
            ("in", 38, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        ]
    )
    assert [(r.raw_path, r.endpoint) for r in records] == [(path, endpoint)]


@pytest.mark.parametrize(
    "buf, expected",
    [
        (b"GET / HTTP/1.1\r\n", True),
        (b"PATCH /x HTTP/1.1", True),
        (b"HTTP/1.1 200 OK\r\n", True),
        (b"HTTP/1.0 404", True),
        (b"GET/ HTTP/1.1", False),
        (b"get / HTTP/1.1", False),
        (b"HTTP/2 200", False),
        (b"PRI * HTTP/2.0\r\n", False),
        (b"\x16\x03\x01\x02\x00", False),  # TLS ClientHello
        (b"", False),
    ],
)
def test_detect(buf: bytes, expected: bool):
    assert detect(buf) is expected


def test_wire_form_uses_the_requests_schema_fields():
    (record,) = run(load("unavailable_503"))[0]
    wire = record.to_wire()
    schema = json.loads((SCHEMAS / "requests.v1.json").read_text())
    item = schema["properties"]["requests"]["items"]
    assert set(wire) <= set(item["properties"])
    assert wire["path"] == "/unavailable" and wire["error"] is True


# --- properties -------------------------------------------------------------------------------


@st.composite
def exchanges(draw: st.DrawFn) -> Exchange:
    """One request and its response(s), with the method and final status the truth says."""
    method = draw(st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE"]))
    path = "/" + draw(st.from_regex(r"[a-z0-9/]{0,20}", fullmatch=True))
    request = f"{method} {path} HTTP/1.1\r\nHost: h\r\n".encode()
    body_kind = draw(st.sampled_from(["none", "length", "chunked"]))
    if method in ("GET", "HEAD", "DELETE"):
        body_kind = "none"
    body = b"x" * draw(st.integers(0, 3000))
    if body_kind == "length":
        request += b"content-length: %d\r\n\r\n" % len(body) + body
    elif body_kind == "chunked":
        request += b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(draw, body)
    else:
        request += b"\r\n"
    status = draw(st.sampled_from([200, 201, 204, 304, 404, 500, 503]))
    response = b""
    if draw(st.booleans()):
        response += b"HTTP/1.1 100 Continue\r\n\r\n"
    response += b"HTTP/1.1 %d Whatever\r\nServer: t\r\n" % status
    body = b"y" * draw(st.integers(0, 6000))
    if status in (204, 304) or method == "HEAD":
        response += b"Content-Length: %d\r\n\r\n" % len(body)  # announced, never sent
    elif draw(st.booleans()):
        response += b"CONTENT-LENGTH:   %d \r\n\r\n" % len(body) + body
    else:
        response += b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(draw, body)
    return request, response, method, str(status)


def _chunked(draw: st.DrawFn, body: bytes) -> bytes:
    out, pos = b"", 0
    while pos < len(body):
        n = draw(st.integers(1, max(1, len(body) - pos)))
        out += b"%x\r\n%s\r\n" % (n, body[pos : pos + n])
        pos += n
    return out + b"0\r\n\r\n"


# The properties every stream parser has (kit.py), over HTTP/1 exchanges.
HTTP1 = kit.StreamProperties(run, exchanges(), PROPERTY, captures=st.integers(16, 5000))
test_valid_streams_split_anywhere_give_the_true_requests = HTTP1.true_requests
test_truncated_streams_never_raise_and_never_invent_requests = HTTP1.none_invented
# Bodies become gaps.
test_truncated_bodies_keep_the_request_count = HTTP1.requests_kept_when_cut
test_random_bytes_never_raise = PROPERTY(kit.random_bytes_never_raise(Http1Connection, [
    b"GET / HTTP/1.1\r\n", b"HTTP/1.1 200 OK\r\n", b"\r\n\r\n", b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 99999999999\r\n", b"0\r\n\r\n", b"ffffffffffffffffff\r\n",
    b"HEAD * HTTP/1.0\n\n"]))
