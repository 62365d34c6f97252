"""Incremental HTTP/1.x reassembly for one TCP connection.

The probe gives one event per read/write syscall: ``size`` is what the syscall really moved,
``payload`` only its first bytes (the capture size); the rest is a *gap* of known length and
unknown content. Framing is therefore counted from sizes and parsed from payload only where
it must be (start lines, headers, chunk-size lines); bodies are never needed.

Each direction has a ``_Reader`` (requests one way, responses the other, by the connection's
role) that carries its state across events like httpx's ``LineDecoder``::

    IDLE ─► HEAD ─┬─► (no body: HEAD, 1xx, 204, 304, no length on a request) ─┐
                  ├─► LENGTH ───────────────────────────────────────────────────┤
                  ├─► CHUNK_SIZE ⇄ CHUNK_DATA ─► CHUNK_END … TRAILER ──────────┼─► IDLE
                  └─► UNTIL_CLOSE (response without length) ─► flush() ────────┘
    any ─► LOST (garbage, header overflow, a chunk boundary in a gap): the open message, if
           any, keeps counting bytes and ends, marked incomplete, at the next event that starts
           a message in its direction, at a captured chunked terminator, or when the other
           direction starts the next message (request/response alternate when not pipelined).
    101 / CONNECT 2xx ─► TUNNEL (both directions; bytes counted, never parsed)

Requests whose head has been read wait in a FIFO; a final response pairs with the oldest
(pipelining). Nothing in here raises on input: ``feed`` has a last-resort guard that counts
``parser_errors`` and drops sync, so a bug costs one connection's records, not the worker.
"""

from __future__ import annotations

from collections import deque

from .endpoints import normalise
from .record import Request

MAX_HEAD = 8192  # bytes of start line + headers kept per message; beyond it the message is lost
MAX_LINE = 1024  # chunk-size / trailer line
MAX_PENDING = 64  # requests waiting for a response (pipelining depth)
MAX_PATH = 256

_METHOD_NAMES = {
    m.encode(): m
    for m in (
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
        "PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "PURGE",
    )
}  # fmt: skip
_METHOD_SPAN = max(len(m) for m in _METHOD_NAMES) + 1  # where the space after a method must be
# Every prefix of "METHOD ", so a start line cut after a few bytes can still be recognised.
_REQUEST_PREFIXES = frozenset((m + b" ")[:i] for m in _METHOD_NAMES for i in range(1, len(m) + 2))
_STATUS_PREFIX = b"HTTP/1."
_CHUNKED_END = b"0\r\n\r\n"
_HEX = b"0123456789abcdefABCDEF"

# Reader states. The last three swallow whole events.
_IDLE, _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER = range(7)
_UNTIL_CLOSE, _LOST, _TUNNEL = range(7, 10)


def detect(buf: bytes) -> bool:
    """True if ``buf`` begins an HTTP/1.x request ("GET ") or response ("HTTP/1.")."""
    return _is_request_start(buf, 0) or buf.startswith(_STATUS_PREFIX)


def _is_request_start(buf: bytes, pos: int) -> bool:
    sp = buf.find(b" ", pos, pos + _METHOD_SPAN)
    return sp > pos and buf[pos:sp] in _METHOD_NAMES


def _could_start(buf: bytes, pos: int, requests: bool) -> bool:
    """Whether buf[pos:] is, or may still become, a start line (it may be cut short)."""
    if requests:
        if _is_request_start(buf, pos):
            return True
        return len(buf) - pos < _METHOD_SPAN and buf[pos:] in _REQUEST_PREFIXES
    if len(buf) - pos >= len(_STATUS_PREFIX):
        return buf.startswith(_STATUS_PREFIX, pos)
    return _STATUS_PREFIX.startswith(buf[pos:])


def _head_end(buf: bytes | bytearray, start: int) -> int:
    """Index just past the blank line ending a head, or -1. Accepts CRLF and bare LF."""
    crlf = buf.find(b"\n\r\n", start)
    lf = buf.find(b"\n\n", start)
    if crlf < 0:
        return lf + 2 if lf >= 0 else -1
    if 0 <= lf < crlf:
        return lf + 2
    return crlf + 3


def _first_line(block: bytes) -> bytes:
    nl = block.find(b"\n")
    line = block if nl < 0 else block[:nl]
    return line[:-1] if line.endswith(b"\r") else line


def _parse_request_line(line: bytes, strict: bool) -> tuple[str, bytes] | None:
    """(method, request-target) of "GET /x HTTP/1.1"; lenient mode accepts a cut-off line."""
    sp = line.find(b" ", 0, _METHOD_SPAN)
    if sp <= 0:
        return None
    method = _METHOD_NAMES.get(line[:sp])
    if method is None:
        return None
    end = line.rfind(b" ")
    if end > sp and line.startswith(_STATUS_PREFIX, end + 1):
        return method, line[sp + 1 : end]
    if strict:
        return None
    end = line.find(b" ", sp + 1)
    return method, line[sp + 1 : end if end > 0 else len(line)]


def _parse_status(line: bytes) -> int:
    """Status code of "HTTP/1.1 200 OK", or -1."""
    code = line[9:12]
    if line.startswith(_STATUS_PREFIX) and line[8:9] == b" " and len(code) == 3 and code.isdigit():
        return int(code)
    return -1


def _header(low: bytes, name: bytes) -> bytes | None:
    """Value of header ``name`` (lower-case, with "\\n" before and ":" after) in a lowered head."""
    i = low.find(name)
    if i < 0:
        return None
    start = i + len(name)
    end = low.find(b"\n", start)
    return low[start : end if end >= 0 else len(low)].strip()


# Body framing of a head: a length >= 0, or one of these.
_NO_LENGTH, _CHUNKED, _OTHER_CODING, _BAD_LENGTH = -1, -2, -3, -4


def _framing(block: bytes) -> int:
    low = block.lower()
    coding = _header(low, b"\ntransfer-encoding:")
    if coding is not None:  # wins over Content-Length (RFC 9112 §6.3)
        return _CHUNKED if coding.endswith(b"chunked") else _OTHER_CODING
    length = _header(low, b"\ncontent-length:")
    if length is None:
        return _NO_LENGTH
    comma = length.find(b",")  # "5, 5": repeated header folded into one
    if comma >= 0:
        length = length[:comma].rstrip()
    # isdigit rejects "+5", "-1" and "1_0"; the bound keeps int() away from its digit limit.
    if length.isdigit() and len(length) <= 18:
        return int(length)
    return _BAD_LENGTH


def _request_path(target: bytes) -> str:
    path = target.decode("latin-1")
    for sep in "?#":
        cut = path.find(sep)
        if cut >= 0:
            path = path[:cut]
    if not path.startswith("/"):
        scheme = path.find("://", 0, 12)
        if scheme > 0:  # absolute-form "http://host/x" → "/x"
            slash = path.find("/", scheme + 3)
            path = path[slash:] if slash >= 0 else "/"
    return path[:MAX_PATH]


# How much of a connection was not understood; reported next to the metrics it affects.
# ``Http1Connection.counters`` is a plain dict with these keys, so callers can sum them.
COUNTERS = (
    "unparsed_bytes",  # bytes that belong to no record
    "sync_losses",  # times framing was lost (garbage, a boundary in a gap, a bad header)
    "resyncs",  # times it was found again at an event that starts a message
    "orphan_responses",  # final responses with no request waiting
    "unanswered_requests",  # requests dropped at close or when the FIFO overflowed
    "header_overflows",  # heads longer than MAX_HEAD
    "tunneled_bytes",  # after 101 Switching Protocols / CONNECT
    "parser_errors",  # internal errors caught by the guard in feed(); should stay 0
)


class _Message:
    """One request or response being read; becomes half of a Request record."""

    __slots__ = ("method", "target", "status", "start_ns", "last_ns", "nbytes", "complete", "done")

    def __init__(self, start_ns: int, nbytes: int) -> None:
        self.method = ""
        self.target = b""
        self.status = -1
        self.start_ns = start_ns
        self.last_ns = start_ns
        self.nbytes = nbytes
        self.complete = True
        self.done = False  # every byte of it has been seen


class _Reader:
    """Frames the messages of one direction of a connection."""

    __slots__ = ("conn", "requests", "state", "head", "head_ns", "msg", "remaining", "line",
                 "interim_bytes")  # fmt: skip

    def __init__(self, conn: Http1Connection, requests: bool) -> None:
        self.conn = conn
        self.requests = requests
        self.state = _IDLE
        self.head = bytearray()  # a head split across events
        self.head_ns = 0
        self.msg: _Message | None = None
        self.remaining = 0  # body or chunk bytes still to come
        self.line = bytearray()  # a chunk-size or trailer line split across events
        self.interim_bytes = 0  # 1xx responses, counted into the final one

    def starts_message(self, payload: bytes) -> bool:
        if self.requests:
            return _is_request_start(payload, 0)
        return payload.startswith(_STATUS_PREFIX)

    def resumes_at(self, payload: bytes, whole: bool) -> bool:
        """Whether a lost reader can pick up at this event: it starts a message, or is
        entirely a start line's first bytes (a client may write "G" then "ET / ...")."""
        if self.starts_message(payload):
            return True
        return whole and 0 < len(payload) < _METHOD_SPAN and _could_start(payload, 0, self.requests)

    def feed(self, ts: int, size: int, payload: bytes) -> None:
        n = len(payload)
        if size < n:  # the syscall moved fewer bytes than were captured: trust the syscall
            payload = payload[: max(size, 0)]
            n = len(payload)
            size = n
        if self.state >= _UNTIL_CLOSE:
            if self.state == _LOST and self.resumes_at(payload, size == n):
                self.end_lost()
                self.conn.counters["resyncs"] += 1
            else:
                self.swallow(size)
                self._after(ts, payload, size == n)
                return
        pos = 0
        while pos < n:
            state = self.state
            if state in (_LENGTH, _CHUNK_DATA):
                msg = self.msg
                assert msg is not None
                take = n - pos
                if take < self.remaining:
                    self.remaining -= take
                    msg.nbytes += take
                    break
                take = self.remaining
                pos += take
                msg.nbytes += take
                self.remaining = 0
                if state == _LENGTH:
                    self.message_done(ts)
                else:
                    self.state = _CHUNK_END
            elif state == _IDLE:
                pos = self._start(ts, payload, pos)
            elif state == _HEAD:
                pos = self._head(ts, payload, pos)
            elif state <= _TRAILER:
                pos = self._chunk_line(ts, payload, pos)
            else:  # lost, tunnelled or close-delimited from here to the end of the event
                self.swallow(n - pos)
                break
        if size > n:
            self._gap(ts, size - n)
        self._after(ts, payload, size == n)

    def _after(self, ts: int, payload: bytes, whole: bool) -> None:
        msg = self.msg
        if msg is None:
            return
        msg.last_ns = ts
        # A chunked message that lost sync ends where its terminator is seen, if it is seen.
        if self.state == _LOST and whole and payload.endswith(_CHUNKED_END):
            self.end_lost()
            self.conn.counters["resyncs"] += 1

    def swallow(self, nbytes: int) -> None:
        if self.state == _TUNNEL:
            self.conn.counters["tunneled_bytes"] += nbytes
        elif self.msg is not None:
            self.msg.nbytes += nbytes
        else:
            self.conn.counters["unparsed_bytes"] += nbytes

    def lose(self) -> None:
        self.state = _LOST
        self.head.clear()
        self.line.clear()
        self.conn.counters["sync_losses"] += 1
        if self.msg is not None:
            self.msg.complete = False

    def end_lost(self) -> None:
        """End the open message (if any) of a lost or close-delimited reader, incomplete."""
        msg = self.msg
        self.msg = None
        self.state = _IDLE
        if msg is not None:
            msg.complete = False
            if not self.requests:
                self.conn.response_done(msg)

    def message_done(self, ts: int) -> None:
        msg = self.msg
        assert msg is not None
        msg.last_ns = ts
        msg.done = True
        self.msg = None
        self.state = _IDLE
        if not self.requests:
            self.conn.response_done(msg)

    def _start(self, ts: int, payload: bytes, pos: int) -> int:
        n = len(payload)
        while pos < n and payload[pos] in b"\r\n":  # empty lines between messages are allowed
            pos += 1
        if pos == n:
            return n
        if _could_start(payload, pos, self.requests):
            self.state = _HEAD
            self.head_ns = ts
            return pos
        self.lose()
        self.conn.counters["unparsed_bytes"] += n - pos
        return n

    def _head(self, ts: int, payload: bytes, pos: int) -> int:
        n = len(payload)
        head = self.head
        if not head:  # usual case: the whole head is in this payload, no copy until it is
            end = _head_end(payload, pos)
            if 0 <= end - pos <= MAX_HEAD:
                self._head_done(ts, payload[pos:end])
                return end
            head += payload[pos : pos + MAX_HEAD + 1]
            if len(head) <= MAX_HEAD:
                return n
            self._overflow(ts, n - pos)
            return n
        old = len(head)
        head += payload[pos : pos + MAX_HEAD + 1 - old]
        if old < _METHOD_SPAN and not _could_start(bytes(head), 0, self.requests):
            self._lose_head(ts, len(head))  # what looked like "GE" became garbage
            self.swallow(n - pos - (len(head) - old))
            return n
        end = _head_end(head, max(0, old - 2))
        if 0 <= end <= MAX_HEAD:
            block = bytes(head[:end])
            head.clear()
            self._head_done(ts, block)
            return pos + end - old
        if len(head) > MAX_HEAD:
            self._overflow(ts, n - pos - (len(head) - old) + len(head))
        return n

    def _overflow(self, ts: int, consumed: int) -> None:
        self.conn.counters["header_overflows"] += 1
        self._lose_head(ts, consumed)

    def _lose_head(self, ts: int, consumed: int) -> None:
        """The head will not be seen whole: keep what its start line tells, then lose sync."""
        buf = bytes(self.head[: MAX_PATH + 64])
        line = _first_line(buf)
        msg: _Message | None = None
        if self.requests:
            parsed = _parse_request_line(line, strict=False)
            if parsed is not None:
                msg = _Message(self.head_ns, consumed)
                msg.method, msg.target = parsed
                self.conn.request_started(msg)
        elif buf.startswith(_STATUS_PREFIX[: len(buf)]) and len(buf) >= 5:
            msg = _Message(self.head_ns, consumed + self.interim_bytes)
            msg.status = _parse_status(line)
            self.interim_bytes = 0
        if msg is None:
            self.conn.counters["unparsed_bytes"] += consumed
        self.msg = msg
        self.lose()

    def _head_done(self, ts: int, block: bytes) -> None:
        line = _first_line(block)
        if self.requests:
            parsed = _parse_request_line(line, strict=True)
            if parsed is None:
                self.lose()
                self.conn.counters["unparsed_bytes"] += len(block)
                return
            msg = _Message(self.head_ns, len(block))
            msg.method, msg.target = parsed
            self.msg = msg
            self.conn.request_started(msg)
            framing = _framing(block)
            if framing == _NO_LENGTH or framing == 0:
                self.message_done(ts)
            else:
                self._body(ts, framing)
            return
        status = _parse_status(line)
        if status < 0:
            self.lose()
            self.conn.counters["unparsed_bytes"] += len(block)
            return
        if 100 <= status < 200 and status != 101:  # 100 Continue, 103 Early Hints: not the answer
            self.interim_bytes += len(block)
            self.state = _IDLE
            return
        msg = _Message(self.head_ns, len(block) + self.interim_bytes)
        msg.status = status
        self.interim_bytes = 0
        self.msg = msg
        method = self.conn.answering()
        if status == 101 or (method == "CONNECT" and 200 <= status < 300):
            self.message_done(ts)
            self.conn.tunnel()
        elif method == "HEAD" or status == 204 or status == 304:
            self.message_done(ts)
        else:
            framing = _framing(block)
            if framing == 0:
                self.message_done(ts)
            elif framing in (_NO_LENGTH, _OTHER_CODING):
                self.state = _UNTIL_CLOSE
            else:
                self._body(ts, framing)

    def _body(self, ts: int, framing: int) -> None:
        if framing > 0:
            self.state = _LENGTH
            self.remaining = framing
        elif framing == _CHUNKED:
            self.state = _CHUNK_SIZE
        else:  # a bad Content-Length, or a request coding we cannot frame
            self.lose()

    def _chunk_line(self, ts: int, payload: bytes, pos: int) -> int:
        n = len(payload)
        msg = self.msg
        assert msg is not None
        nl = payload.find(b"\n", pos)
        if nl < 0:
            self.line += payload[pos:]
            msg.nbytes += n - pos
            if len(self.line) > MAX_LINE:
                self.lose()
            return n
        msg.nbytes += nl + 1 - pos
        if self.line:
            self.line += payload[pos:nl]
            line = bytes(self.line)
            self.line.clear()
        else:
            line = payload[pos:nl]
        pos = nl + 1
        state = self.state
        if state == _CHUNK_SIZE:
            semi = line.find(b";")  # chunk extensions
            size = (line if semi < 0 else line[:semi]).strip()
            if not size or len(size) > 15 or size.translate(None, _HEX):
                self.lose()
            elif size.strip(b"0"):
                self.remaining = int(size, 16)
                self.state = _CHUNK_DATA
            else:
                self.state = _TRAILER
        elif line.strip():
            if state == _CHUNK_END:  # data must be followed by CRLF
                self.lose()
            # else: a trailer field, skipped
        elif state == _CHUNK_END:
            self.state = _CHUNK_SIZE
        else:
            self.message_done(ts)
        return pos

    def _gap(self, ts: int, gap: int) -> None:
        """``gap`` bytes were moved but not captured; frame them by the lengths already known."""
        state = self.state
        if state in (_LENGTH, _CHUNK_DATA):
            msg = self.msg
            assert msg is not None
            take = min(gap, self.remaining)
            msg.nbytes += take
            self.remaining -= take
            gap -= take
            if self.remaining == 0:
                if state == _LENGTH:
                    self.message_done(ts)
                else:
                    self.state = _CHUNK_END
            if not gap:
                return
            state = self.state
        if state == _HEAD:
            self._lose_head(ts, len(self.head))
        elif state in (_IDLE, _CHUNK_SIZE, _CHUNK_END, _TRAILER):
            # A chunk boundary, or the next (pipelined) message, is in bytes we cannot see.
            self.lose()
        self.swallow(gap)

    def flush(self, ts: int) -> None:
        if self.state == _HEAD and self.head:
            self._lose_head(ts, len(self.head))
        msg = self.msg
        if msg is not None and not self.requests:
            if self.state == _UNTIL_CLOSE:
                msg.last_ns = ts
                msg.done = True
            else:
                msg.complete = False  # closed before the response was whole
            self.conn.response_done(msg)
        self.msg = None
        self.state = _IDLE
        self.head.clear()
        self.line.clear()
        self.remaining = 0
        self.interim_bytes = 0


class Http1Connection:
    """HTTP/1.x reassembly for one TCP connection: feed its events in order, flush at close.

    ``role`` is "client" (it connected: out = requests), "server" (it accepted: in = requests)
    or "unknown" (decided by the first start line seen, in either direction).
    """

    __slots__ = ("role", "counters", "pending", "_requests", "_responses", "_requests_out",
                 "_completed", "_undecided")  # fmt: skip

    def __init__(self, role: str = "unknown") -> None:
        if role not in ("client", "server", "unknown"):
            raise ValueError(f"role must be client, server or unknown, not {role!r}")
        self.role = role
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.pending: deque[_Message] = deque()  # requests waiting for their response, FIFO
        self._requests = _Reader(self, requests=True)
        self._responses = _Reader(self, requests=False)
        self._requests_out = role == "client"
        self._completed: list[Request] = []
        # Per direction, an event too short to tell the role yet: (ts, payload, size).
        self._undecided: dict[bool, tuple[int, bytes, int]] = {}

    def feed(self, direction: str, ts_ns: int, size: int, payload: bytes) -> list[Request]:
        """One syscall's event ("out": this process wrote, "in": it read); returns the
        requests whose responses this event completed."""
        try:
            self._feed(direction == "out", ts_ns, size, payload)
        except Exception:  # never let one connection's bytes take the worker down
            self._reset_after_error(max(size, len(payload)))
        if not self._completed:
            return []
        completed = self._completed
        self._completed = []
        return completed

    def _feed(self, out: bool, ts: int, size: int, payload: bytes) -> None:
        if self.role == "unknown":
            stash = self._undecided.pop(out, None)
            if stash is not None:  # the first bytes of a start line came as their own write
                ts, payload, size = stash[0], stash[1] + payload, stash[2] + max(size, len(payload))
            if not self._decide_role(out, payload):
                if (
                    size == len(payload)
                    and 0 < size < _METHOD_SPAN
                    and (_could_start(payload, 0, True) or _could_start(payload, 0, False))
                ):
                    self._undecided[out] = (ts, payload, size)
                else:
                    self.counters["unparsed_bytes"] += max(size, len(payload))
                return
        requests, responses = self._requests, self._responses
        if out == self._requests_out:
            # Not pipelined: a new request ends a response whose end could not be framed.
            if (
                responses.msg is not None
                and responses.state >= _UNTIL_CLOSE
                and requests.starts_message(payload)
            ):
                responses.end_lost()
            requests.feed(ts, size, payload)
        else:
            # A final response starts: the request whose end could not be framed is over.
            if (
                requests.state == _LOST
                and requests.msg is not None
                and responses.starts_message(payload)
                and payload[9:10] != b"1"  # 100 Continue: the request body is still to come
            ):
                requests.msg.complete = False
                requests.msg = None
            responses.feed(ts, size, payload)

    def flush(self, ts_ns: int) -> list[Request]:
        """The connection closed: complete a close-delimited response; count the unanswered."""
        try:
            self._requests.flush(ts_ns)
            self._responses.flush(ts_ns)
        except Exception:
            self._reset_after_error(0)
        for _, _, size in self._undecided.values():
            self.counters["unparsed_bytes"] += size
        self._undecided.clear()
        self.counters["unanswered_requests"] += len(self.pending)
        self.pending.clear()
        completed = self._completed
        self._completed = []
        return completed

    def _decide_role(self, out: bool, payload: bytes) -> bool:
        if _is_request_start(payload, 0):
            self.role = "client" if out else "server"
        elif payload.startswith(_STATUS_PREFIX):
            self.role = "server" if out else "client"
        else:
            return False
        self._requests_out = self.role == "client"
        return True

    def _reset_after_error(self, nbytes: int) -> None:
        self.counters["parser_errors"] += 1
        self.counters["unparsed_bytes"] += nbytes
        for reader in (self._requests, self._responses):
            reader.msg = None
            reader.lose()

    # Called by the readers.

    def request_started(self, msg: _Message) -> None:
        self.pending.append(msg)
        if len(self.pending) > MAX_PENDING:
            self.pending.popleft()
            self.counters["unanswered_requests"] += 1

    def answering(self) -> str:
        """Method of the request the next final response answers ("" if none)."""
        return self.pending[0].method if self.pending else ""

    def tunnel(self) -> None:
        for reader in (self._requests, self._responses):
            if reader.msg is not None:
                reader.msg.complete = False
                reader.msg = None
            reader.state = _TUNNEL

    def response_done(self, response: _Message) -> None:
        if not self.pending:
            self.counters["orphan_responses"] += 1
            return
        request = self.pending.popleft()
        status = response.status
        path = _request_path(request.target)
        self._completed.append(
            Request(
                protocol="http",
                side=self.role,
                method=request.method,
                endpoint=normalise(path),
                raw_path=path,
                status=str(status) if status >= 0 else "",
                error=status >= 500,
                start_ns=request.start_ns,
                end_ns=response.last_ns,
                request_bytes=request.nbytes,
                response_bytes=response.nbytes,
                complete=request.complete and request.done and response.complete,
            )
        )
