"""Kafka's wire protocol on one TCP connection: requests and their responses → request records.

Framing (kafka.apache.org/protocol): every message is an int32 size and that many bytes. A
request starts with api_key, api_version, correlation_id and client_id (flexible versions add
tagged fields to that header); a response starts with the correlation_id (plus tagged fields in
flexible versions, except ApiVersions, whose response header never has them). Sizes frame
everything: bytes the probe did not capture (``size > len(payload)``, e.g. a Fetch response of
megabytes) are counted against the open message, and the next message is read right after it.
Only a message boundary inside such a gap loses sync; a direction then waits for an event that
starts with something that checks out (a known request header; a response to a request still
waiting) and counts what it skipped.

Each direction has a ``_Reader``::

    SIZE ─(4 bytes: 0 < size ≤ MAX_MESSAGE)─► BODY ─(size bytes, captured or not)─► SIZE
    any ─► LOST (a bad size or header, a boundary in a gap) ─(an event that starts a message)─► SIZE

Pairing: a client may have many requests in flight (pipelining). Responses carry their request's
correlation id and, on one connection, come back in request order; so a response also ends the
wait of any request sent before its own (their responses were in bytes that could not be
parsed): those are emitted incomplete. A response whose header was not captured pairs with the
oldest waiting request.

Records: method and endpoint are the API's name ("Produce", "Fetch", "JoinGroup", ...: one per
API key, so cardinality is bounded); raw_path is the first topic of a Produce or Fetch request
(while they carry names: Produce ≤ v12, Fetch ≤ v12); query reads "Produce v9 client_id=rdkafka".
status is the error the response reports (``kafka_messages.response_error``: the top-level
error code, or the first non-zero one of a topic or partition for Produce, Fetch, Metadata,
CreateTopics, ...) by name: "NONE" for 0, "NOT_LEADER_OR_FOLLOWER", or the number when unknown;
"" when no error code could be read. error is a non-zero code.

Produce with acks=0 has no response at all: its record is emitted, complete, when the request's
last byte has been sent, with no response bytes, end_ns = that event's time and status "".
"""

from __future__ import annotations

from .kafka_messages import (
    APIS,
    Cursor,
    Truncated,
    api_known,
    error_name,
    flexible,
    response_error,
)
from .record import Request

MAX_MESSAGE = 1 << 30  # beyond any broker's socket.request.max.bytes or fetch.max.bytes
MAX_DETECT_SIZE = 100 << 20  # socket.request.max.bytes' default: a request larger is not detected
KEEP = 8192  # captured bytes kept from the start of each message (headers, error codes)
MAX_PENDING = 1024  # requests waiting for a response
MAX_CLIENT_ID = 64  # characters of client_id kept in ``query``
_HEADER = 10  # api_key, api_version, correlation_id, client_id length
_PRINTABLE = bytes(range(0x20, 0x7F))
_PRODUCE, _FETCH, _API_VERSIONS = 0, 1, 18

_SIZE, _BODY, _LOST = range(3)

COUNTERS = (
    "unparsed_bytes",  # bytes that belong to no record
    "sync_losses",  # times framing was lost (a bad size or header, a message boundary in a gap)
    "resyncs",  # times it was found again at an event that starts a message
    "orphan_responses",  # responses to no waiting request
    "lost_responses",  # requests whose response was in unparsed bytes (emitted incomplete)
    "unanswered_requests",  # requests still waiting at close, or pushed out of a full queue
    "truncated_headers",  # messages whose header was not captured
    "unknown_versions",  # responses of versions newer than the layouts: status not read
    "parser_errors",  # internal errors caught by the guard in feed(); should stay 0
)


def detect(buf: bytes) -> bool:
    """True if ``buf`` is one or more whole Kafka requests (pipelined requests share a write),
    the last of which may be cut where the capture ended (``len(buf)``: a power of two ≥ 256).
    Sizes must agree exactly with the bytes otherwise, so text protocols and other binary ones
    (whose first bytes read as a huge or mismatched size) are not claimed."""
    n = len(buf)
    cut = n >= 256 and n & (n - 1) == 0
    pos = 0
    while pos < n:
        if n - pos < 4 + _HEADER:
            return False
        size = int.from_bytes(buf[pos : pos + 4], "big", signed=True)
        if not _HEADER <= size <= MAX_DETECT_SIZE or not _request_header_ok(buf, pos + 4, size):
            return False
        pos += 4 + size
        if pos > n and not cut:
            return False
    return True


def _request_header_ok(buf: bytes, start: int, size: int, strict: bool = True) -> bool:
    """Whether ``buf[start:]`` begins a request header of a message of ``size`` bytes: a known
    API and version, a non-negative correlation id and a client_id that fits (printable when
    ``strict``, as detection must not guess); a Produce's acks must be -1, 0 or 1."""
    if len(buf) - start < 8:
        return False
    api_key = int.from_bytes(buf[start : start + 2], "big", signed=True)
    version = int.from_bytes(buf[start + 2 : start + 4], "big", signed=True)
    if not api_known(api_key, version) or buf[start + 4] & 0x80:  # correlation id < 0
        return False
    if len(buf) - start < _HEADER:
        return not strict
    id_len = int.from_bytes(buf[start + 8 : start + 10], "big", signed=True)
    if id_len < -1 or id_len > size - _HEADER:
        return False
    client_id = buf[start + _HEADER : start + _HEADER + max(0, id_len)]
    if strict and client_id.translate(None, _PRINTABLE):
        return False
    flex = flexible(api_key, version)
    tags = start + _HEADER + max(0, id_len)
    if flex and tags < len(buf) and buf[tags] >= 0x10:  # header tagged fields: none in practice
        return False
    if api_key == _PRODUCE:
        acks = _produce_acks(buf, tags, version, flex)
        return acks is None or acks in (-1, 0, 1)
    return True


def _produce_acks(buf: bytes, header_tags: int, version: int, flex: bool) -> int | None:
    cursor = Cursor(buf, header_tags, flex)
    try:
        if flex:
            cursor.tagged_fields()
        if version >= 3:
            cursor.string()  # transactional_id
        return cursor.int_(2)
    except Truncated:
        return None


class _Pending:
    """A request that was read whole; waits for its response unless acks=0."""

    __slots__ = ("api_key", "version", "correlation_id", "client_id", "topic", "acks",
                 "start_ns", "end_ns", "nbytes", "complete")  # fmt: skip

    def __init__(self, start_ns: int, end_ns: int, nbytes: int) -> None:
        self.api_key = -1  # header not captured
        self.version = -1
        self.correlation_id = -1
        self.client_id = ""
        self.topic = ""
        self.acks = -1
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.nbytes = nbytes
        self.complete = True


def _read_request(head: bytes, start_ns: int, end_ns: int, nbytes: int) -> _Pending:
    """What a request's captured head says: its header, and for Produce/Fetch acks and topic."""
    req = _Pending(start_ns, end_ns, nbytes)
    if len(head) < 8:
        req.complete = False
        return req
    api_key = req.api_key = int.from_bytes(head[0:2], "big", signed=True)
    version = req.version = int.from_bytes(head[2:4], "big", signed=True)
    req.correlation_id = int.from_bytes(head[4:8], "big", signed=True)
    flex = flexible(api_key, version)
    cursor = Cursor(head, 8, False)
    try:
        req.client_id = cursor.string(MAX_CLIENT_ID) or ""
        cursor.flex = flex
        if flex:
            cursor.tagged_fields()
        if api_key == _PRODUCE:
            if version >= 3:
                cursor.string()  # transactional_id
            req.acks = cursor.int_(2)
            cursor.skip(4)  # timeout_ms
            req.topic = _first_topic(cursor, version <= 12)
        elif api_key == _FETCH:
            cursor.skip((4 if version <= 14 else 0) + 8 + (4 if version >= 3 else 0)
                        + (1 if version >= 4 else 0) + (8 if version >= 7 else 0))
            req.topic = _first_topic(cursor, version <= 12)
    except Truncated:
        pass  # the head ended before these fields: they stay unknown
    return req


def _first_topic(cursor: Cursor, named: bool) -> str:
    if not named or cursor.length(wide=True) <= 0:
        return ""
    return cursor.string() or ""


def _request_name(api_key: int) -> str:
    api = APIS.get(api_key)
    return api[0] if api is not None else "Unknown"


class _Reader:
    """One direction's framing: messages in, ``message_done`` out."""

    __slots__ = ("conn", "requests", "state", "size_bytes", "remaining", "start_ns", "nbytes",
                 "head", "whole", "checked")  # fmt: skip

    def __init__(self, conn: KafkaConnection, requests: bool) -> None:
        self.conn = conn
        self.requests = requests
        self.state = _SIZE
        self.size_bytes = bytearray()
        self.remaining = 0
        self.start_ns = 0
        self.nbytes = 0  # size prefix + size
        self.head = bytearray()  # captured bytes of the open message (after its size), ≤ KEEP
        self.whole = True  # head has every byte so far (no gap yet)
        self.checked = False  # the open message's header was checked

    def feed(self, ts: int, size: int, payload: bytes) -> None:
        n = len(payload)
        counters = self.conn.counters
        if self.state == _LOST:
            if not self.conn.starts_message(self.requests, payload):
                counters["unparsed_bytes"] += max(size, n)
                return
            self.state = _SIZE
            counters["resyncs"] += 1
        pos = 0
        while pos < n:
            if self.state == _SIZE:
                if not self.size_bytes:
                    self.start_ns = ts
                take = min(4 - len(self.size_bytes), n - pos)
                self.size_bytes += payload[pos : pos + take]
                pos += take
                if len(self.size_bytes) < 4:
                    break
                msg_size = int.from_bytes(self.size_bytes, "big", signed=True)
                self.size_bytes.clear()
                if not 0 < msg_size <= MAX_MESSAGE:
                    self.lose(max(size, n) - pos + 4, ts)
                    return
                self.state = _BODY
                self.remaining = msg_size
                self.nbytes = msg_size + 4
                self.head.clear()
                self.whole = True
                self.checked = False
            else:
                take = min(self.remaining, n - pos)
                room = KEEP - len(self.head)
                if room > 0:
                    self.head += payload[pos : pos + min(take, room)]
                pos += take
                self.remaining -= take
                if not self.checked and not self.check_header():
                    self.lose(max(size, n) - pos + self.nbytes - self.remaining, ts)
                    return
                if self.remaining == 0:
                    self.state = _SIZE
                    self.conn.message_done(self, ts)
        gap = size - n
        if gap <= 0:
            return
        if self.state == _BODY:
            take = min(gap, self.remaining)
            self.remaining -= take
            gap -= take
            self.whole = False
            if self.remaining == 0:
                self.state = _SIZE
                self.conn.message_done(self, ts)
        if gap > 0:  # the next message's size is among the bytes not captured
            self.lose(gap, ts)

    def check_header(self) -> bool:
        """Once the head holds the header (or can't any more): is it one? False loses sync."""
        need = 8 if self.requests else 4
        if len(self.head) < need and self.remaining and self.whole:
            return True  # not yet
        self.checked = True
        if len(self.head) < need:
            return True  # never captured: paired by order, counted in message_done
        if self.requests:
            return _request_header_ok(bytes(self.head[:_HEADER]), 0, self.nbytes - 4, strict=False)
        correlation_id = int.from_bytes(self.head[0:4], "big", signed=True)
        if correlation_id in self.conn.pending:
            return True
        self.conn.counters["orphan_responses"] += 1
        return False

    def lose(self, nbytes: int, ts: int, closing: bool = False) -> None:
        """Framing is lost (or the connection closed): the open message, if any, is dropped and
        its bytes are counted unparsed."""
        counters = self.conn.counters
        counters["sync_losses"] += not closing
        counters["unparsed_bytes"] += max(0, nbytes)
        if self.state == _BODY and not self.requests and self.checked and len(self.head) >= 4:
            # The response's header was read: its request is known to be answered.
            self.conn.response_lost(int.from_bytes(self.head[0:4], "big", signed=True), ts)
        self.state = _LOST
        self.size_bytes.clear()
        self.head.clear()
        self.remaining = 0

    def flush(self, ts: int) -> None:
        if self.state == _BODY:
            self.lose(self.nbytes - self.remaining, ts, closing=True)
        elif self.size_bytes:
            self.conn.counters["unparsed_bytes"] += len(self.size_bytes)
        self.state = _SIZE
        self.size_bytes.clear()
        self.head.clear()


class KafkaConnection:
    """Kafka on one TCP connection: feed its events in order, flush at close.

    ``role`` is "client" (it connected: out = requests), "server" (it accepted: in = requests)
    or "unknown" (the direction of the first event that is a request decides).
    """

    __slots__ = ("role", "counters", "pending", "_requests_out", "_readers", "_completed")

    def __init__(self, role: str = "unknown") -> None:
        if role not in ("client", "server", "unknown"):
            raise ValueError(f"role must be client, server or unknown, not {role!r}")
        self.role = role
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        # correlation id → request waiting for its response, in the order sent
        self.pending: dict[int, _Pending] = {}
        self._requests_out = role == "client"
        self._readers = {True: _Reader(self, requests=True), False: _Reader(self, requests=False)}
        self._completed: list[Request] = []

    def feed(self, direction: str, ts_ns: int, size: int, payload: bytes) -> list[Request]:
        """One syscall's event ("out": this process wrote, "in": it read); returns the requests
        this event completed."""
        out = direction == "out"
        try:
            if self.role == "unknown":
                if not detect(payload):
                    self.counters["unparsed_bytes"] += max(size, len(payload))
                    return []
                self.role = "client" if out else "server"
                self._requests_out = out
            self._readers[out == self._requests_out].feed(ts_ns, size, payload)
        except Exception:  # never let one connection's bytes take the worker down
            self.counters["parser_errors"] += 1
            self.counters["unparsed_bytes"] += max(size, len(payload))
            for reader in self._readers.values():
                reader.state = _LOST
                reader.head.clear()
                reader.size_bytes.clear()
        return self._take()

    def flush(self, ts_ns: int) -> list[Request]:
        """The connection closed: count what is still waiting."""
        try:
            for reader in self._readers.values():
                reader.flush(ts_ns)
        except Exception:
            self.counters["parser_errors"] += 1
        self.counters["unanswered_requests"] += len(self.pending)
        self.pending.clear()
        return self._take()

    def _take(self) -> list[Request]:
        if not self._completed:
            return []
        completed = self._completed
        self._completed = []
        return completed

    def starts_message(self, requests: bool, payload: bytes) -> bool:
        """Whether an event may start a message, to find framing again after losing it."""
        n = len(payload)
        if n < 4:
            return False
        size = int.from_bytes(payload[0:4], "big", signed=True)
        if n == 4:  # a reader that reads the size alone (the JVM): the header is checked next
            return 0 < size <= MAX_MESSAGE
        if requests:
            return _HEADER <= size <= MAX_MESSAGE and _request_header_ok(payload, 4, size)
        return (n >= 8 and 4 <= size <= MAX_MESSAGE
                and int.from_bytes(payload[4:8], "big", signed=True) in self.pending)

    # Called by the readers.

    def message_done(self, reader: _Reader, ts: int) -> None:
        head = bytes(reader.head)
        if reader.requests:
            self._request_done(_read_request(head, reader.start_ns, ts, reader.nbytes))
        else:
            self._response_done(head, reader.whole, reader.start_ns, ts, reader.nbytes)

    def _request_done(self, req: _Pending) -> None:
        if not req.complete:
            self.counters["truncated_headers"] += 1
        if req.api_key == _PRODUCE and req.acks == 0:
            self._emit(req, None, req.end_ns, 0, complete=req.complete)
            return
        pending = self.pending
        if req.correlation_id in pending:  # a reused id: the older request will not be answered
            del pending[req.correlation_id]
            self.counters["unanswered_requests"] += 1
        pending[req.correlation_id] = req
        if len(pending) > MAX_PENDING:
            del pending[next(iter(pending))]
            self.counters["unanswered_requests"] += 1

    def _response_done(self, head: bytes, whole: bool, start_ns: int, end_ns: int,
                       nbytes: int) -> None:
        pending = self.pending
        if len(head) >= 4:
            correlation_id = int.from_bytes(head[0:4], "big", signed=True)
            if correlation_id not in pending:
                self.counters["orphan_responses"] += 1
                self.counters["unparsed_bytes"] += nbytes
                return
            self._lost_before(correlation_id, end_ns)
            req = pending.pop(correlation_id)
        elif pending:  # the header fell in a gap: responses come in request order
            self.counters["truncated_headers"] += 1
            req = pending.pop(next(iter(pending)))
            self._emit(req, None, end_ns, nbytes, complete=False)
            return
        else:
            self.counters["orphan_responses"] += 1
            self.counters["unparsed_bytes"] += nbytes
            return
        self._emit(req, _response_code(self.counters, req, head), end_ns, nbytes,
                   complete=req.complete)

    def response_lost(self, correlation_id: int, ts: int) -> None:
        """The response to this request began, but its framing was lost (or the connection
        closed) before its end."""
        req = self.pending.get(correlation_id)
        if req is not None:
            self._lost_before(correlation_id, ts)
            del self.pending[correlation_id]
            self.counters["lost_responses"] += 1
            self._emit(req, None, ts, 0, complete=False)

    def _lost_before(self, correlation_id: int, end_ns: int) -> None:
        """Requests sent before this one whose responses were never seen: emit them incomplete,
        ending when that became known (their latency is at most that)."""
        pending = self.pending
        while pending:
            oldest = next(iter(pending))
            if oldest == correlation_id:
                return
            self.counters["lost_responses"] += 1
            self._emit(pending.pop(oldest), None, end_ns, 0, complete=False)

    def _emit(self, req: _Pending, code: int | None, end_ns: int, response_bytes: int,
              complete: bool) -> None:
        name = _request_name(req.api_key)
        query = f"{name} v{req.version}" if req.version >= 0 else name
        if req.client_id:
            query += f" client_id={req.client_id}"
        self._completed.append(
            Request(
                protocol="kafka",
                side=self.role,
                method=name,
                endpoint=name,
                raw_path=req.topic,
                status="" if code is None else error_name(code),
                error=bool(code),
                start_ns=req.start_ns,
                end_ns=end_ns,
                request_bytes=req.nbytes,
                response_bytes=response_bytes,
                complete=complete,
                query=query,
            )
        )


def _response_code(counters: dict[str, int], req: _Pending, head: bytes) -> int | None:
    """The error code a response (``head``: its captured bytes after the size) reports."""
    api = APIS.get(req.api_key)
    if api is None:
        return None
    if req.version > api[1]:
        counters["unknown_versions"] += 1
        return None
    cursor = Cursor(head, 4, True)
    try:
        if req.api_key != _API_VERSIONS and flexible(req.api_key, req.version):
            cursor.tagged_fields()  # response header v1
    except Truncated:
        return None
    return response_error(req.api_key, req.version, head, cursor.pos)
