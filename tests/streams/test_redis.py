from __future__ import annotations

import functools
import json

import pytest
from hypothesis import strategies as st
from kubesight.streams.protocols import Sniffer
from kubesight.streams.record import Request
from kubesight.streams.redis import RedisConnection, detect
from kubesight.streams.redis_commands import command, query

from tests.streams import kit
from tests.streams.kit import PROPERTY, ROLES, Exchange

load = functools.partial(kit.load_events, "redis")
run = kit.runner(RedisConnection, close_ns=999_999_999)  # run(events, role="client", capture=FULL)


def brief(records: list[Request]) -> list[tuple[str, str, str]]:
    return [(r.method, r.status, r.query) for r in records]


def resp(*args: bytes | str) -> bytes:
    out = b"*%d\r\n" % len(args)
    for arg in args:
        raw = arg.encode() if isinstance(arg, str) else arg
        out += b"$%d\r\n%s\r\n" % (len(raw), raw)
    return out


# Captured from redis-server 7.0 on loopback (see fixtures/redis/README.md).
OK = "OK"
CAPTURED: list[tuple[str, list[tuple[str, str, str]], int]] = [
    ("basic", [
        ("SET", OK, "SET user:42"), ("GET", OK, "GET user:42"), ("GET", OK, "GET missing"),
        ("INCR", OK, "INCR counter"), ("INCR", "ERR", "INCR user:42"),
        ("LPUSH", "WRONGTYPE", "LPUSH user:42"), ("RPUSH", OK, "RPUSH list"),
        ("LRANGE", OK, "LRANGE list"), ("MGET", OK, "MGET user:42"), ("HSET", OK, "HSET hash"),
        ("HGETALL", OK, "HGETALL hash"), ("CLIENT SETNAME", OK, "CLIENT SETNAME"),
        ("CONFIG GET", OK, "CONFIG GET"), ("OBJECT ENCODING", OK, "OBJECT ENCODING list"),
        ("PING", OK, "PING"), ("ECHO", OK, "ECHO"), ("UNKNOWN", "ERR", "UNKNOWN"),
        ("DEL", OK, "DEL user:42")], 0),
    ("pipelined", [("SET", OK, "SET key:__rand_int__")] * 16 + [
        ("SET", OK, "SET k1"), ("GET", OK, "GET k1"), ("INCR", OK, "INCR n"),
        ("LPUSH", OK, "LPUSH l"), ("LRANGE", OK, "LRANGE l"), ("INCR", "ERR", "INCR k1"),
        ("GET", OK, "GET nope"), ("MGET", OK, "MGET k1"), ("DEL", OK, "DEL k1"),
        ("PING", OK, "PING")], 0),
    ("resp3", [
        ("HELLO", OK, "HELLO"), ("SET", OK, "SET k"), ("GET", OK, "GET k"),
        ("GET", OK, "GET missing"), ("HSET", OK, "HSET h"), ("HGETALL", OK, "HGETALL h"),
        ("SADD", OK, "SADD s"), ("SMEMBERS", OK, "SMEMBERS s"), ("ZADD", OK, "ZADD z"),
        ("ZSCORE", OK, "ZSCORE z"), ("EVAL", OK, "EVAL"), ("EVAL", OK, "EVAL k"),
        ("EVAL", OK, "EVAL"), ("CLIENT INFO", OK, "CLIENT INFO"), ("INCR", "ERR", "INCR k"),
        ("CLIENT TRACKING", OK, "CLIENT TRACKING"), ("GET", OK, "GET k"),
        ("SUBSCRIBE", OK, "SUBSCRIBE"), ("PING", OK, "PING"), ("GET", OK, "GET k"),
        ("UNSUBSCRIBE", OK, "UNSUBSCRIBE"), ("DEL", OK, "DEL k")],
     3),  # pushes: invalidate, message, invalidate
    ("pubsub", [
        ("SUBSCRIBE", OK, "SUBSCRIBE"), ("PSUBSCRIBE", OK, "PSUBSCRIBE"), ("PING", OK, "PING"),
        ("UNSUBSCRIBE", OK, "UNSUBSCRIBE"), ("PUNSUBSCRIBE", OK, "PUNSUBSCRIBE"),
        ("GET", OK, "GET after")],
     2),  # message, pmessage
    ("big_values", [("SET", OK, "SET big"), ("GET", OK, "GET big")] + [
        ("SET", OK, f"SET item:{i}") for i in range(100)] + [
        ("GET", OK, "GET item:7"), ("RPUSH", OK, "RPUSH biglist"), ("LRANGE", OK, "LRANGE biglist"),
        ("DEL", OK, "DEL big")], 0),
    ("multi_exec", [
        ("MULTI", OK, "MULTI"), ("SET", OK, "SET t"), ("INCR", OK, "INCR t"), ("EXEC", OK, "EXEC"),
        ("MULTI", OK, "MULTI"), ("UNKNOWN", "ERR", "UNKNOWN"), ("EXEC", "EXECABORT", "EXEC"),
        ("MULTI", OK, "MULTI"), ("DISCARD", OK, "DISCARD"), ("DEL", OK, "DEL t")], 0),
    ("inline", [("PING", OK, "PING"), ("SET", OK, "SET inline"), ("GET", OK, "GET inline"),
                ("INCR", OK, "INCR inline"), ("DEL", OK, "DEL inline")], 0),
    ("auth", [("AUTH", "ERR", "AUTH"), ("AUTH", "WRONGPASS", "AUTH"), ("HELLO", OK, "HELLO"),
              ("PING", OK, "PING")], 0),
    ("client_reply", [
        ("CLIENT REPLY", "", "CLIENT REPLY"), ("SET", "", "SET a"), ("SET", "", "SET b"),
        ("CLIENT REPLY", OK, "CLIENT REPLY"), ("CLIENT REPLY", "", "CLIENT REPLY"),
        ("SET", "", "SET c"), ("GET", OK, "GET c"), ("DEL", OK, "DEL a")], 0),
    ("monitor", [("MONITOR", OK, "MONITOR"), ("RESET", OK, "RESET"),
                 ("GET", OK, "GET watched")], 1),  # the MONITOR line
    ("psync", [("PING", OK, "PING"), ("REPLCONF", OK, "REPLCONF"),
               ("REPLCONF", OK, "REPLCONF"), ("PSYNC", OK, "PSYNC")], 0),
]  # fmt: skip
NAMES = [c[0] for c in CAPTURED]


@pytest.mark.parametrize("name, expected, pushes", CAPTURED, ids=NAMES)
@pytest.mark.parametrize("side", ROLES)
def test_captured_exchanges(name: str, expected: list[tuple[str, str, str]], pushes: int,
                            side: str):
    records, conn = run(kit.seen_from(side, load(name)), role=side)
    assert brief(records) == expected
    assert all(r.complete for r in records)
    assert {r.side for r in records} == {kit.decided_side(side)}
    assert {r.protocol for r in records} == {"redis"}
    assert conn.counters["pushes"] == pushes
    for counter in ("unparsed_bytes", "sync_losses", "orphan_responses", "unanswered_requests",
                    "unseen_requests", "parser_errors"):
        assert conn.counters[counter] == 0, counter


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("resp3", "pubsub", "monitor",
                                                                "psync")])
def test_every_byte_belongs_to_a_request_or_its_reply(name: str):
    events = load(name)
    records, _ = run(events)
    assert sum(r.request_bytes + r.response_bytes for r in records) == kit.total_bytes(events)


def test_request_and_reply_sizes_and_timestamps():
    records, _ = run(load("basic"))
    assert [(r.request_bytes, r.response_bytes) for r in records[:5]] == [
        (45, 5), (26, 19), (26, 5), (27, 4), (27, 46)
    ]  # fmt: skip
    assert [(r.start_ns, r.end_ns) for r in records[:3]] == [(1000, 2000), (3000, 4000),
                                                            (5000, 6000)]  # fmt: skip


def test_errors_are_errors_with_their_code():
    records = run(load("basic"))[0] + run(load("multi_exec"))[0] + run(load("auth"))[0]
    errors = {(r.method, r.status) for r in records if r.error}
    assert errors == {("INCR", "ERR"), ("LPUSH", "WRONGTYPE"), ("UNKNOWN", "ERR"),
                      ("EXEC", "EXECABORT"), ("AUTH", "ERR"), ("AUTH", "WRONGPASS")}
    assert all(r.status == "OK" for r in records if not r.error)


def test_values_and_passwords_never_leave_the_parser():
    records = [r for name in NAMES for r in run(load(name))[0]]
    wire = json.dumps([r.to_wire() for r in records])
    for secret in ("s3cret-value", "hunter2", "do-not-log-me", "admin", "hello", "changed",
                   "vvvv", "element-"):
        assert secret not in wire, secret
    assert max(len(r.query) for r in records) <= 128


# --- pipelining and splits ---------------------------------------------------------------------


def test_pipelined_replies_pair_in_order_with_the_event_that_completed_them():
    records, _ = run(load("pipelined"))
    assert [r.end_ns for r in records[16:]] == [4000, 4000, 4000, 5000, 5000, 7000, 8000, 9000,
                                                9000, 9000]  # fmt: skip
    assert {r.start_ns for r in records[16:]} == {3000}


@pytest.mark.parametrize("name", ["pipelined", "resp3", "pubsub"])
def test_reply_stream_split_at_every_byte_boundary(name: str):
    events = load(name)
    expected = brief(run(events)[0])
    replies, requests = kit.joined(events, "in"), kit.joined(events, "out")
    if name != "pipelined":  # keep request/reply order: one split inside each direction
        events = [e for e in events if e[0] == "out"][:1]
        replies = kit.joined(load(name)[:2], "in")
        requests = b""
        expected = expected[:1]
    for cut in range(1, len(replies)):
        reads = kit.events_of("in", kit.split(replies, cut))
        writes = [("out", len(requests), requests)] if requests else events
        records, conn = run([*writes, *reads])
        assert brief(records) == expected, cut
        assert conn.counters["sync_losses"] == 0, cut


@pytest.mark.parametrize("name", ["basic", "resp3", "pubsub", "inline", "multi_exec"])
def test_every_event_split_byte_by_byte(name: str):
    records, conn = run(kit.byte_by_byte(load(name)))
    assert brief(records) == brief(run(load(name))[0])
    assert all(r.complete for r in records)
    assert conn.counters["sync_losses"] == 0


def test_pipelined_requests_split_mid_command():
    events = load("pipelined")
    writes = events[2][2]
    reads = [e for e in events[3:]]
    for cut in range(1, len(writes)):
        records, _ = run([*kit.events_of("out", kit.split(writes, cut)), *reads])
        assert [r.method for r in records] == [
            "SET", "GET", "INCR", "LPUSH", "LRANGE", "INCR", "GET", "MGET", "DEL", "PING"], cut


# --- gaps: the probe's capture limit -----------------------------------------------------------


def test_gaps_inside_bulk_strings_are_framed_by_their_length():
    events = load("big_values")[:4]  # SET big <10 KiB>, +OK, GET big, $10240 ...
    records, conn = run(events, capture=64)
    assert brief(records) == [("SET", OK, "SET big"), ("GET", OK, "GET big")]
    assert [(r.request_bytes, r.response_bytes, r.complete) for r in records] == [
        (10272, 5, True), (22, 10250, True)
    ]  # fmt: skip
    assert conn.counters["sync_losses"] == 0


def test_with_4k_capture_a_pipeline_beyond_it_keeps_its_count():
    """100 pipelined SETs in one 13 KiB write: the commands in the gap cannot be named, but
    each reply read before the next known command was sent is theirs: UNKNOWN, incomplete."""
    records, conn = run(load("big_values"), capture=4096)
    truth = CAPTURED[NAMES.index("big_values")][1]
    assert len(records) == len(truth)
    seen = sum(1 for r in records[2:102] if r.method == "SET")
    assert 20 < seen < 40  # what fitted in the first 4 KiB
    assert [r.method for r in records[2 + seen : 102]] == ["UNKNOWN"] * (100 - seen)
    assert {(r.status, r.complete) for r in records[2 + seen : 102]} == {(OK, False)}
    assert brief(records[102:]) == truth[102:]  # found again at the next command
    assert conn.counters["unseen_requests"] == 100 - seen
    assert conn.counters["resyncs"] >= 1 and conn.counters["parser_errors"] == 0


def test_long_reply_losing_sync_ends_when_the_client_speaks_again():
    """A 300-element LRANGE read 1 KiB at a time, each read cut to 64 bytes: the element headers
    are in the gaps. The reply ends, incomplete, when the next command's reply starts."""
    records, conn = run(load("big_values")[-9:], capture=64)  # LRANGE ... DEL
    assert [(r.method, r.status, r.complete) for r in records] == [
        ("LRANGE", OK, False), ("DEL", OK, False)]  # the 1.3 KiB DEL lost its framing too
    events = load("big_values")[-9:]
    assert records[0].response_bytes == sum(s for d, s, _ in events[1:7])
    assert conn.counters["sync_losses"] == 2 and conn.counters["resyncs"] == 1


def test_reply_lost_between_pipelined_replies_completes_the_earlier_requests_unknown():
    writes = b"".join(resp("GET", f"k{i}") for i in range(4))
    replies = b"$3\r\nabc\r\n" * 4
    events = [("out", len(writes), writes), ("in", len(replies), replies[:12]),
              ("out", 14, resp("PING")), ("in", 7, b"+PONG\r\n")]
    records, conn = run(events)
    assert [(r.method, r.status, r.complete) for r in records] == [
        ("GET", OK, True), ("GET", "", False), ("GET", "", False), ("GET", "", False),
        ("PING", OK, True)]
    assert records[1].end_ns == 2000


# --- RESP3 and out-of-band messages ------------------------------------------------------------

# RESP3 forms Redis 7 does not send on its own (examples from the RESP3 specification).
RESP3_REPLIES = [
    (b"|1\r\n+key-popularity\r\n%2\r\n$1\r\na\r\n,0.1923\r\n$1\r\nb\r\n,0.0012\r\n"
     b"*2\r\n:2039123\r\n:9543892\r\n", OK),  # attribute, then the reply
    (b"*2\r\n|1\r\n+ttl\r\n:3600\r\n:1\r\n:2\r\n", OK),  # attribute on an element
    (b"$?\r\n;4\r\nHell\r\n;5\r\no wor\r\n;1\r\nd\r\n;0\r\n", OK),  # streamed string
    (b"*?\r\n:1\r\n:2\r\n:3\r\n.\r\n", OK),  # streamed array
    (b"%?\r\n+a\r\n:1\r\n+b\r\n:2\r\n.\r\n", OK),  # streamed map
    (b"!21\r\nSYNTAX invalid syntax\r\n", "SYNTAX"),  # blob error
    (b"=15\r\ntxt:Some string\r\n", OK),
    (b"(3492890328409238509324850943850943825024385\r\n", OK),
    (b",inf\r\n", OK), (b",-1.5e3\r\n", OK), (b"#f\r\n", OK), (b"_\r\n", OK),
    (b"~2\r\n%1\r\n+a\r\n*0\r\n*-1\r\n", OK),
    (b"-ERR\r\n", "ERR"), (b"-my lowercase error\r\n", "ERR"),
]


@pytest.mark.parametrize("reply, status", RESP3_REPLIES)
def test_resp3_replies_from_the_spec(reply: bytes, status: str):
    request = resp("GET", "k")
    push = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n"
    stream = push + reply + push + b"+OK\r\n"  # pushes between replies are not replies
    events = [("out", len(request) * 2, request * 2)]
    events += [("in", 1, stream[i : i + 1]) for i in range(len(stream))]
    records, conn = run(events)
    assert [(r.status, r.error) for r in records] == [(status, status != OK), (OK, False)]
    assert records[0].response_bytes == len(reply)
    assert conn.counters["pushes"] == 2 and conn.counters["sync_losses"] == 0


def test_resp2_pubsub_messages_are_not_paired_but_lrange_of_message_is():
    events = [("out", 0, resp("LRANGE", "l", "0", "-1")),
              ("in", 0, resp("message", "a", "b"))]  # a list that happens to start "message"
    records, conn = run([(d, len(p), p) for d, _, p in events])
    assert [r.method for r in records] == ["LRANGE"] and conn.counters["pushes"] == 0


def test_bare_unsubscribe_waits_for_one_confirmation_per_channel():
    records, _ = run(load("pubsub"))
    unsubscribe = records[3]
    events = load("pubsub")
    assert unsubscribe.method == "UNSUBSCRIBE"
    assert unsubscribe.response_bytes == events[9][1] == 66  # both confirmations, one read


def test_monitor_lines_are_pushes():
    records, conn = run(load("monitor"))
    assert [r.end_ns for r in records] == [2000, 5000, 7000]
    assert conn.counters["pushes"] == 1 and conn.counters["orphan_responses"] == 0


def test_client_reply_off_requests_are_recorded_at_once_without_reply():
    records, _ = run(load("client_reply"))
    silent = [r for r in records if r.status == ""]
    assert len(silent) == 5
    assert all(r.response_bytes == 0 and r.end_ns == r.start_ns for r in silent)
    assert records[6].method == "GET" and records[6].response_bytes == 7


def test_replication_stream_after_psync_is_counted_not_parsed():
    events = load("psync")
    records, conn = run(events)
    assert records[-1].method == "PSYNC" and records[-1].response_bytes == 56
    after = sum(size for _, size, _ in events[8:])
    assert conn.counters["tunneled_bytes"] == after


# --- roles, detection, registry ---------------------------------------------------------------


def test_unknown_role_is_decided_by_the_first_command_or_reply():
    conn = RedisConnection("unknown")
    conn.feed("out", 1, 7, b"lue\r\n*3")  # mid-command when the probe started: skipped
    assert conn.role == "unknown"
    assert conn.feed("in", 2, 5, b"+OK\r\n") == []  # a reply first: the process is a client
    assert conn.role == "client" and conn.counters["orphan_responses"] == 1
    records = [r for i, (d, s, p) in enumerate(load("basic")) for r in conn.feed(d, 10 + i, s, p)]
    assert len(records) == 18 and {r.side for r in records} == {"client"}
    assert conn.counters["unparsed_bytes"] == 7


def test_server_side_of_unknown_role():
    conn = RedisConnection("unknown")
    records = [r for i, (d, s, p) in enumerate(kit.as_server(load("basic")))
               for r in conn.feed(d, i, s, p)]  # fmt: skip
    assert conn.role == "server" and len(records) == 18


@pytest.mark.parametrize(
    "buf, expected",
    [
        (resp("SET", "k", "v"), True),
        (resp("get", "k"), True),
        (resp("CLIENT", "SETNAME", "x")[:30], True),  # cut after the command name
        (b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100000\r\nvvvv", True),  # a gap follows
        (b"+OK\r\n", True),
        (b"+OK\r\n+OK\r\n+OK\r\n", True),
        (b"-ERR unknown command 'x'\r\n", True),
        (b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n", True),
        (b":1\r\n", True),
        (b"$-1\r\n", True),
        (b"$5\r\nhello\r\n", True),
        (b"*2\r\n$1\r\na\r\n:1\r\n", True),
        (b"%1\r\n+a\r\n:1\r\n", True),
        (b">3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nb\r\n", True),
        (resp("NOSUCHCOMMAND", "x")[:24], False),  # only commands Redis knows
        (b"*3\r\n$3\r\nSE", False),  # cut inside the name
        (b"$5\r\nhel", False),  # a reply cut short: decided on a later event
        (b"+OK POP3 server ready\r\n", False),  # POP3
        (b"* OK IMAP4rev1 ready\r\n", False),  # IMAP
        (b"get k\r\n", False),  # memcached text protocol (and Redis inline: not detected)
        (b"set k 0 0 5\r\nhello\r\n", False),
        (b"220 mail.example.com ESMTP\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\n", False),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", False),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", False),  # TLS ClientHello
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", False),  # PostgreSQL SSLRequest
        (b"\x00\x00\x00\x1e\x00\x03\x00\x00\x00\x00\x00\x01\x00\x07client", False),  # Kafka
        (b"\x00\x1d\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00", False),  # DNS over TCP
        (b":12\x00\x01", False),
        (b"-\r\n", False),
        (b"", False),
    ],
)
def test_detect(buf: bytes, expected: bool):
    assert detect(buf) is expected


def test_sniffer_chooses_redis_and_http_stays_http():
    sniffer = Sniffer("client")
    records = [r for i, (d, s, p) in enumerate(load("pipelined"))
               for r in sniffer.feed(d, i, s, p)]  # fmt: skip
    assert sniffer.protocol == "redis" and len(records) == 26
    http = Sniffer("client")
    http.feed("out", 1, 18, b"GET / HTTP/1.1\r\n\r\n")
    assert http.protocol == "http"


@pytest.mark.parametrize(
    "argv, endpoint, text",
    [
        ([b"set", b"user:1", b"secret"], "SET", "SET user:1"),
        ([b"client", b"setname", b"app"], "CLIENT SETNAME", "CLIENT SETNAME"),
        ([b"CLIENT", b"nonsense"], "CLIENT", "CLIENT"),
        ([b"config", b"set", b"requirepass", b"pw"], "CONFIG SET", "CONFIG SET"),
        ([b"AUTH", b"user", b"pw"], "AUTH", "AUTH"),
        ([b"HELLO", b"3", b"AUTH", b"u"], "HELLO", "HELLO"),
        ([b"EVAL", b"return 1", b"2", b"key1"], "EVAL", "EVAL key1"),
        ([b"EVAL", b"return 1", b"0", b"notakey"], "EVAL", "EVAL"),
        ([b"MIGRATE", b"host", b"6379", b"k", b"0"], "MIGRATE", "MIGRATE k"),
        ([b"XGROUP", b"CREATE", b"stream", b"g"], "XGROUP CREATE", "XGROUP CREATE stream"),
        ([b"ZUNION", b"2", b"za", b"zb"], "ZUNION", "ZUNION za"),
        ([b"JSON.GET", b"doc", b"$"], "JSON.GET", "JSON.GET"),
        ([b"\xff\xfe"], "UNKNOWN", "UNKNOWN"),
        ([None, b"k"], "UNKNOWN", "UNKNOWN"),
        ([b"GET", b"\x00bin\xffkey"], "GET", "GET \\x00bin\\xffkey"),
        ([b"GET", b"k" * 300], "GET", "GET " + "k" * 123 + "…"),
    ],
)
def test_endpoint_and_query_of_a_command(argv: list[bytes | None], endpoint: str, text: str):
    assert command(argv) == endpoint
    assert query(argv) == text


def test_module_like_names_are_endpoints_only_if_the_server_knows_them():
    events = [("out", 0, resp("JSON.GET", "doc")), ("in", 0, b"$2\r\n{}\r\n"),
              ("out", 0, resp("X.Y", "doc")), ("in", 0, b"-ERR unknown command 'X.Y'\r\n")]
    records, _ = run([(d, len(p), p) for d, _, p in events])
    assert [(r.endpoint, r.status) for r in records] == [("JSON.GET", OK), ("UNKNOWN", "ERR")]


# --- properties -------------------------------------------------------------------------------

NAMES_AND_KEYS = st.sampled_from(["GET", "SET", "INCR", "LPUSH", "HGETALL", "DEL", "PING",
                                  "EVAL", "CLIENT", "MGET", "XADD"])
# Values never contain "*": a value starting an event with "*N\r\n$" would look like a command.
VALUE = st.binary(max_size=300).map(lambda b: b.replace(b"*", b"."))


@st.composite
def replies(draw: st.DrawFn, depth: int = 0) -> tuple[bytes, str]:
    """A RESP2/RESP3 reply and the status it means."""
    kinds = ["simple", "error", "int", "bulk", "null", "bool", "double", "big", "verbatim"]
    if depth < 2:
        kinds += ["array", "map", "set"]
    kind = draw(st.sampled_from(kinds))
    if kind == "simple":
        return b"+" + draw(st.sampled_from([b"OK", b"PONG", b"QUEUED", b"x y"])) + b"\r\n", OK
    if kind == "error":
        code = draw(st.sampled_from(["ERR", "WRONGTYPE", "NOSCRIPT"]))
        return f"-{code} something failed\r\n".encode(), code
    if kind == "int":
        return b":%d\r\n" % draw(st.integers(-(10**12), 10**12)), OK
    if kind == "bulk":
        value = draw(VALUE)
        return b"$%d\r\n%s\r\n" % (len(value), value), OK
    if kind == "null":
        return draw(st.sampled_from([b"$-1\r\n", b"*-1\r\n", b"_\r\n"])), OK
    if kind == "bool":
        return draw(st.sampled_from([b"#t\r\n", b"#f\r\n"])), OK
    if kind == "double":
        return b",%r\r\n" % draw(st.floats(allow_nan=False, allow_infinity=False)), OK
    if kind == "big":
        return b"(%d\r\n" % draw(st.integers(10**30, 10**40)), OK
    if kind == "verbatim":
        value = b"txt:" + draw(VALUE)
        return b"=%d\r\n%s\r\n" % (len(value), value), OK
    children = draw(st.lists(replies(depth + 1), max_size=4))
    if kind == "map" and len(children) % 2:
        children = children[:-1]
    head = {"array": b"*", "map": b"%", "set": b"~"}[kind]
    count = len(children) // 2 if kind == "map" else len(children)
    return head + b"%d\r\n" % count + b"".join(c for c, _ in children), OK


@st.composite
def exchanges(draw: st.DrawFn) -> Exchange:
    """One command and its reply, with the endpoint and status the truth says."""
    name = draw(NAMES_AND_KEYS)
    args = [name.encode(), *draw(st.lists(VALUE, max_size=4))]
    if draw(st.booleans()):
        request = resp(*args)
    else:  # inline
        request = b" ".join([name.encode(), b"key", b"value"]) + b"\r\n"
        args = [name.encode(), b"key", b"value"]
    reply, status = draw(replies())
    return request, reply, command(list(args)), status


def _bounded(records: list[Request], conn: RedisConnection) -> None:
    """What random bytes cannot grow: a record's query text, the bytes held between events."""
    assert all(len(r.query) <= 128 for r in records)
    assert len(conn.pending) <= 4097


# The properties every stream parser has (kit.py), over Redis exchanges; sometimes a push
# comes before a reply.
PUSH = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$3\r\nkey\r\n"
REDIS = kit.StreamProperties(run, exchanges(), PROPERTY, captures=st.integers(0, 5000), push=PUSH)
test_valid_streams_split_anywhere_give_the_true_requests = REDIS.true_requests
test_truncated_streams_never_raise_and_never_invent_requests = REDIS.none_invented
# Error lines are heads too: their status is kept.
test_truncated_payloads_keep_requests_and_statuses = REDIS.requests_kept_when_cut
test_random_bytes_never_raise = PROPERTY(kit.random_bytes_never_raise(RedisConnection, [
    b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", b"+OK\r\n", b"$-1\r\n", b"*99999999999\r\n",
    b"$99999999999\r\n", b"|1\r\n", b"$?\r\n", b">3\r\n$9\r\nsubscribe\r\n",
    b"*1\r\n$11\r\nUNSUBSCRIBE\r\n", b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$3\r\nOFF\r\n",
    b"*1\r\n$7\r\nMONITOR\r\n", b"PING\r\n", b";0\r\n", b".\r\n"], check=_bounded))
