"""PostgreSQL protocol 3.0 on the wire: message framing, structure checks, detection.

A connection opens with untyped start-up packets (``int32 length, int32 code``: StartupMessage,
SSLRequest or GSSENCRequest, each answered by one byte ``N``/``S``/``G``, or a CancelRequest);
every message after that is ``type byte, int32 length`` (the length counts itself, not the type
byte), in both directions. A ``Framer`` per direction frames messages across events and hands
each whole message to its ``Receiver`` (``postgres.PostgresConnection``). A body is kept only
as far as a record needs it (statement text, statement and portal names, the SQLSTATE of an
error) and never for password messages (``p``).

``size > len(payload)`` is a gap of known length: it is skipped with the current message's
length; a message header inside a gap loses the framing. A lost direction resyncs at an event
whose captured bytes frame exactly as messages of that direction (``walk``), or, for the
server's answers, at an event that ends with ReadyForQuery, whose completion message is found
backwards from it (``completion_before``).
"""

from __future__ import annotations

from typing import Protocol

SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST = 80877103, 80877104, 80877102
MAX_STARTUP = 10_000  # the server's own limit for a start-up packet
MAX_MESSAGE = 1 << 30  # the server's limit for any message
KEEP_SQL = 16_384  # bytes of a Query/Parse body kept for its statement text
MAX_NAME = 256  # statement/portal names are at most 63 bytes on the server; clients may send more
MAX_SCAN_BACK = 1024  # how far before a final ReadyForQuery its completion message is looked for

# Client messages: type → (min, max) of the length field.
CLIENT_LENGTHS = {ord(t): bounds for t, bounds in {
    "Q": (5, MAX_MESSAGE), "P": (8, MAX_MESSAGE), "B": (12, MAX_MESSAGE), "F": (12, MAX_MESSAGE),
    "D": (6, 1 << 16), "E": (9, 1 << 16), "C": (6, 1 << 16),
    "S": (4, 4), "H": (4, 4), "X": (4, 4), "c": (4, 4),
    "d": (4, MAX_MESSAGE), "f": (5, 1 << 20), "p": (5, 1 << 16),
}.items()}  # fmt: skip
SERVER_LENGTHS = {ord(t): bounds for t, bounds in {
    "R": (8, 1 << 16), "S": (6, 1 << 16), "K": (12, 12), "Z": (5, 5), "T": (6, MAX_MESSAGE),
    "D": (6, MAX_MESSAGE), "C": (5, 1 << 10), "E": (5, 1 << 20), "N": (5, 1 << 20),
    "I": (4, 4), "1": (4, 4), "2": (4, 4), "3": (4, 4), "n": (4, 4), "s": (4, 4), "c": (4, 4),
    "t": (6, 1 << 20), "A": (10, MAX_MESSAGE), "G": (7, 1 << 20), "H": (7, 1 << 20),
    "W": (7, 1 << 20), "d": (4, MAX_MESSAGE), "V": (8, MAX_MESSAGE), "v": (12, 1 << 16),
}.items()}  # fmt: skip
# Types only one side sends: what tells a connection's role from its bytes.
_CLIENT_ONLY = frozenset(b"QPBFXpf")
_SERVER_ONLY = frozenset(b"RKZTI123ntsAGNVWv")
# Types a connection's first captured payload may start with (see detect()).
_DETECT_FIRST_CLIENT = frozenset(b"QPB")
_DETECT_FIRST_SERVER = frozenset(b"RSKZTDCE12")
_WEAK = frozenset(b"dpFKV")  # types whose body has no structure to check
_WHOLE_WRITES = frozenset(b"QP")  # long client messages a client writes on their own
# Body bytes kept per type: what records need, nothing else (never a password).
_CLIENT_KEEP = {ord("Q"): KEEP_SQL, ord("P"): KEEP_SQL + MAX_NAME, ord("B"): 2 * MAX_NAME,
                ord("D"): MAX_NAME, ord("C"): MAX_NAME, ord("E"): MAX_NAME}
_SERVER_KEEP = {ord("C"): 64, ord("E"): 512, ord("Z"): 1}
UNTYPED = 256  # the "type" of a start-up packet
_READY = (b"Z\0\0\0\x05I", b"Z\0\0\0\x05T", b"Z\0\0\0\x05E")  # ReadyForQuery, any status
_AUTH_CODES = frozenset((0, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12))


class Receiver(Protocol):
    """What a ``Framer`` reports to: the connection that matches requests and answers."""

    counters: dict[str, int]

    def client_message(self, t: int, body: bytes, nbytes: int, start_ns: int,
                       cut: bool) -> None: ...

    def server_message(self, t: int, body: bytes, nbytes: int, ts: int) -> None: ...

    def startup_packet(self, code: int, nbytes: int, start_ns: int, end_ns: int) -> None: ...

    def encryption_answer(self, answer: int) -> None: ...

    def unframed(self, client: bool, nbytes: int) -> None: ...

    def stream_lost(self, client: bool, ts: int, nbytes: int, typed: bool) -> None: ...

    def lost_request(self, ts: int, size: int, payload: bytes) -> None: ...


def detect(buf: bytes) -> bool:
    """True if ``buf`` is a whole start-up packet, or typed messages whose lengths agree with
    the bytes, starting with a client Query/Parse/Bind or a server message
    (R, S, K, Z, T, D, C, E, 1, 2; Bind and BindComplete are what a connection opened before
    the probe shows of prepared statements). Conservative: every captured byte must frame."""
    if whole_startup(buf):
        return True
    if len(buf) < 5:
        return False
    first = buf[0]
    if first in _DETECT_FIRST_CLIENT:
        if walk(buf, len(buf), client=True) is not None:
            return True
        if first == ord("Q") and _long_query(buf):
            return True
    return first in _DETECT_FIRST_SERVER and walk(buf, len(buf), client=False) is not None


def _startup_code(head: bytes) -> int:
    """The code of a start-up packet from its first 8 bytes, or -1."""
    length = int.from_bytes(head[:4], "big")
    code = int.from_bytes(head[4:8], "big")
    if code in (SSL_REQUEST, GSSENC_REQUEST):
        return code if length == 8 else -1
    if code == CANCEL_REQUEST:
        return code if length == 16 else -1
    if code >> 16 == 3 and (code & 0xFFFF) < 100 and 8 < length <= MAX_STARTUP:
        return code
    return -1


def whole_startup(buf: bytes) -> bool:
    if len(buf) < 8 or int.from_bytes(buf[:4], "big") != len(buf):
        return False
    code = _startup_code(buf)
    if code < 0:
        return False
    # StartupMessage: "name\0value\0"... then a final \0; "user" is required.
    return code >> 16 != 3 or (buf.endswith(b"\0\0") and b"user\0" in buf)


def _long_query(buf: bytes) -> bool:
    """A Query whose text runs past the capture: at least 16 captured characters of text."""
    length = int.from_bytes(buf[1:5], "big")
    text = buf[5:]
    if not (len(buf) - 1 < length <= MAX_MESSAGE and len(text) >= 16 and b"\0" not in text):
        return False
    sql = text.decode("utf-8", "ignore").lstrip()
    return sql[:1].isalpha() and " " in sql and sql.translate(_WHITESPACE).isprintable()


_WHITESPACE = str.maketrans("\t\r\n", "   ")


def cstring_end(body: bytes, pos: int) -> int:
    """Index just past the NUL ending the string at ``pos``, or -1."""
    nul = body.find(b"\0", pos)
    return nul + 1 if nul >= 0 else -1


def _int16(body: bytes, pos: int) -> int:
    return int.from_bytes(body[pos : pos + 2], "big")


def _int32(body: bytes, pos: int) -> int:
    return int.from_bytes(body[pos : pos + 4], "big", signed=True)


def _skip_values(body: bytes, pos: int, count: int) -> int:
    """Skip ``count`` (int32 length, bytes) values (-1 = NULL); -1 if they overrun."""
    n = len(body)
    for _ in range(count):
        if pos + 4 > n:
            return -1
        size = _int32(body, pos)
        pos += 4
        if size > 0:
            pos += size
        elif size < -1:
            return -1
    return pos if pos <= n else -1


def valid_client(t: int, body: bytes) -> bool:
    """Whether a whole client message body has its type's structure."""
    n = len(body)
    if t == 0x51:  # Q
        return body.find(b"\0") == n - 1
    if t == 0x50:  # P: name, query, int16 n, n × int32
        end = cstring_end(body, cstring_end(body, 0))
        return end > 0 and n >= end + 2 and n == end + 2 + 4 * _int16(body, end)
    if t == 0x42:  # B: portal, statement, formats, values, result formats
        pos = cstring_end(body, cstring_end(body, 0))
        if pos < 0 or pos + 2 > n:
            return False
        pos += 2 + 2 * _int16(body, pos)
        if pos + 2 > n:
            return False
        pos = _skip_values(body, pos + 2, _int16(body, pos))
        return pos >= 0 and pos + 2 <= n and n == pos + 2 + 2 * _int16(body, pos)
    if t in (0x44, 0x43):  # D, C: 'S'|'P', name
        return body[:1] in (b"S", b"P") and body.find(b"\0") == n - 1
    if t == 0x45:  # E: portal, int32 max rows
        end = cstring_end(body, 0)
        return end > 0 and n == end + 4
    if t == 0x66:  # f: error message
        return body.find(b"\0") == n - 1
    return True


def valid_server(t: int, body: bytes) -> bool:
    """Whether a whole server message body has its type's structure."""
    n = len(body)
    if t == 0x44:  # D: int16 columns, (int32 length, bytes)...
        return n >= 2 and _skip_values(body, 2, _int16(body, 0)) == n
    if t == 0x43:  # C: "UPDATE 1"
        return 0x41 <= body[0] <= 0x5A and body.find(b"\0") == n - 1
    if t in (0x45, 0x4E):  # E, N: (code byte, string)... \0
        pos = 0
        while pos < n - 1:
            if not (0x41 <= body[pos] <= 0x5A or 0x61 <= body[pos] <= 0x7A):
                return False
            pos = cstring_end(body, pos + 1)
            if pos < 0:
                return False
        return pos == n - 1 and body[pos] == 0
    if t == 0x5A:  # Z: transaction status
        return body in (b"I", b"T", b"E")
    if t == 0x54:  # T: int16 fields, (name, 18 bytes)...
        pos = 2
        for _ in range(_int16(body, 0)):
            pos = cstring_end(body, pos)
            if pos < 0:
                return False
            pos += 18
        return pos == n
    if t == 0x53:  # S: name, value
        end = cstring_end(body, 0)
        return end > 1 and cstring_end(body, end) == n
    if t == 0x52:  # R: authentication request
        code = _int32(body, 0)
        if code not in _AUTH_CODES:
            return False
        return n == 4 if code in (0, 3) else (n == 8 if code == 5 else True)
    if t == 0x74:  # t: int16 n, n × int32
        return n == 2 + 4 * _int16(body, 0)
    if t in (0x47, 0x48, 0x57):  # G, H, W: format, int16 n, n × int16
        return body[0] in (0, 1) and n == 3 + 2 * _int16(body, 1)
    if t == 0x41:  # A: pid, channel, payload
        end = cstring_end(body, 4)
        return end > 0 and cstring_end(body, end) == n
    if t == 0x56:  # V: one value
        return _skip_values(body, 0, 1) == n
    return True


def walk(buf: bytes, size: int, client: bool) -> tuple[int, bool] | None:
    """Frame ``buf`` (captured bytes) as typed messages of one direction from its first byte.

    Returns (whole messages, whether a type only this direction sends was seen), or None if
    any captured byte contradicts the framing. ``size`` is what the syscall moved. A lone
    message must fill the bytes exactly, unless the capture cut the event and it is a message
    whose structure was checked; otherwise the bytes may end inside a message only after two
    whole ones."""
    lengths = CLIENT_LENGTHS if client else SERVER_LENGTHS
    only = _CLIENT_ONLY if client else _SERVER_ONLY
    valid = valid_client if client else valid_server
    n = len(buf)
    cut = size > n
    pos = whole = 0
    distinct = strong = False
    while pos < n:
        if pos + 5 > n:  # a header cut by the capture or the end of the event
            return (whole, distinct) if whole >= 2 or (whole and cut and strong) else None
        t = buf[pos]
        bounds = lengths.get(t)
        length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
        if bounds is None or not bounds[0] <= length <= bounds[1]:
            return None
        end = pos + 1 + length
        distinct = distinct or t in only
        if end > n:  # runs on past the capture (or into the next event)
            if not whole and end == size and t in _WHOLE_WRITES and b"\0" not in buf[pos + 5:]:
                return whole, distinct  # one long Query/Parse that is the whole write
            return (whole, distinct) if whole >= 2 or (whole and cut and strong) else None
        if not valid(t, buf[pos + 5 : end]):
            return None
        if not whole:
            strong = t not in _WEAK
        whole += 1
        pos = end
    return (whole, distinct) if whole else None


def sqlstate(body: bytes) -> str:
    """The SQLSTATE ('C' field) of an ErrorResponse body, or ""."""
    pos, n = 0, len(body)
    while pos < n and body[pos]:
        end = body.find(b"\0", pos + 1)
        if end < 0:
            return ""
        if body[pos] == 0x43:
            code = body[pos + 1 : end]
            return code.decode("ascii", "replace") if len(code) == 5 else ""
        pos = end + 1
    return ""


class Framer:
    """Frames the messages of one direction of a connection across events and gaps."""

    __slots__ = ("conn", "client", "lengths", "keeps", "lost", "untyped", "replies", "header",
                 "mtype", "remaining", "length", "body", "keep", "start_ns", "cut")  # fmt: skip

    def __init__(self, conn: Receiver, client: bool, lost: bool) -> None:
        self.conn = conn
        self.client = client
        self.lengths = CLIENT_LENGTHS if client else SERVER_LENGTHS
        self.keeps = _CLIENT_KEEP if client else _SERVER_KEEP
        self.lost = lost  # framing unknown until a resync
        self.untyped = False  # client: start-up packets (no type byte) come next
        self.replies = 0  # server: one-byte answers owed to SSLRequest/GSSENCRequest
        self.header = bytearray()  # a header split across events
        self.mtype = -1  # type of the message whose body is being read; -1 between messages
        self.remaining = 0  # its body bytes still to come
        self.length = 0  # its length on the wire (type byte included)
        self.body = bytearray()
        self.keep = 0
        self.start_ns = 0
        self.cut = False  # kept bytes were wanted but not captured

    def feed(self, ts: int, size: int, payload: bytes) -> None:
        n = len(payload)
        if size < n:  # the syscall moved fewer bytes than were captured: trust the syscall
            payload = payload[: max(size, 0)]
            n = size = len(payload)
        pos = 0
        if self.lost:
            pos = self._resync(ts, size, payload)
            if pos < 0:
                return
        while pos < n:
            if self.mtype < 0:
                pos = self._header(ts, payload, pos)
                if self.lost:
                    self.conn.unframed(self.client, size - pos)
                    return
                continue
            take = min(self.remaining, n - pos)
            room = self.keep - len(self.body)
            if room > 0:
                self.body += payload[pos : pos + min(take, room)]
            pos += take
            self.remaining -= take
            if not self.remaining:
                self._done(ts)
        if size > n:
            self._gap(ts, size - n)

    def _header(self, ts: int, payload: bytes, pos: int) -> int:
        """Read (the rest of) a header at ``pos``; returns where its body starts."""
        n = len(payload)
        if self.replies and not self.client and not self.header:
            self.replies -= 1  # the one-byte answer to SSLRequest / GSSENCRequest
            self.conn.encryption_answer(payload[pos])
            return pos + 1
        need = 8 if self.untyped else 5
        if not self.header:
            self.start_ns = ts
            if n - pos >= need:
                head = payload[pos : pos + need]
                pos += need
            else:
                self.header += payload[pos:]
                return n
        else:
            take = need - len(self.header)
            self.header += payload[pos : pos + take]
            pos = min(n, pos + take)
            if len(self.header) < need:
                return n
            head = bytes(self.header)
            self.header.clear()
        if self.untyped:
            code = _startup_code(head)
            if code >= 0:
                self._begin(UNTYPED, int.from_bytes(head[:4], "big"), 8, 0)
                self.body += head[4:8]
                if not self.remaining:
                    self._done(ts)
                return pos
            # No start-up packet: the connection is past it (its start was never seen).
            self.untyped = False
            if pos - need >= 0 and payload[pos - need : pos] == head:
                return pos - need
            self._lose(ts, need)
            return pos
        t = head[0]
        bounds = self.lengths.get(t)
        length = int.from_bytes(head[1:5], "big")
        if bounds is None or not bounds[0] <= length <= bounds[1]:
            self._lose(ts, need)
            return pos
        self._begin(t, length + 1, 5, self.keeps.get(t, 0))
        if not self.remaining:
            self._done(ts)
        return pos

    def _begin(self, mtype: int, length: int, header: int, keep: int) -> None:
        self.mtype = mtype
        self.length = length
        self.remaining = length - header
        self.keep = keep
        self.body.clear()
        self.cut = False

    def _done(self, ts: int) -> None:
        mtype, body = self.mtype, bytes(self.body)
        self.mtype = -1
        self.body.clear()
        if mtype == UNTYPED:
            self.conn.startup_packet(int.from_bytes(body[:4], "big"), self.length,
                                     self.start_ns, ts)
        elif self.client:
            self.conn.client_message(mtype, body, self.length, self.start_ns, self.cut)
        else:
            self.conn.server_message(mtype, body, self.length, ts)

    def _gap(self, ts: int, gap: int) -> None:
        """``gap`` bytes were moved but not captured; frame them by the length known."""
        if self.mtype >= 0:
            take = min(gap, self.remaining)
            if len(self.body) < self.keep:
                self.cut = True
                self.keep = len(self.body)  # bytes after the hole would not follow on
            self.remaining -= take
            gap -= take
            if not self.remaining:
                self._done(ts)
            if not gap:
                return
        self._lose(ts, gap)  # the next header is in bytes we cannot see

    def _lose(self, ts: int, nbytes: int) -> None:
        nbytes += len(self.header)
        if self.mtype >= 0:
            nbytes += self.length - self.remaining
        typed = not self.untyped
        self.lost = True
        self.header.clear()
        self.body.clear()
        self.mtype = -1
        self.remaining = 0
        self.conn.stream_lost(self.client, ts, nbytes, typed)

    def _resync(self, ts: int, size: int, payload: bytes) -> int:
        """Where framing resumes in this event (0), or -1 if it does not (bytes counted)."""
        n = len(payload)
        if walk(payload, size, self.client) is not None:
            self.lost = self.untyped = False
            self.conn.counters["resyncs"] += 1
            return 0
        if self.client:
            self.conn.lost_request(ts, size, payload)
            return -1
        if size == n and payload.endswith(_READY):
            # The answer to a Sync/Query ends here: its completion, if any, is just before.
            z = n - 6
            q = completion_before(payload, z)
            tail = [(payload[q], payload[q + 5 : z], z - q)] if q >= 0 else []
            self.conn.unframed(False, (q if q >= 0 else z))
            self.lost = False
            self.conn.counters["resyncs"] += 1
            for mtype, body, length in (*tail, (0x5A, payload[-1:], 6)):
                self.conn.server_message(mtype, body, length, ts)
            return n
        self.conn.unframed(False, size)
        return -1


def completion_before(buf: bytes, end: int) -> int:
    """Start of a CommandComplete/ErrorResponse/EmptyQueryResponse/PortalSuspended message
    that ends exactly at ``end``, or -1."""
    for q in range(end - 5, max(-1, end - MAX_SCAN_BACK), -1):
        t = buf[q]
        if t in b"CEIs" and int.from_bytes(buf[q + 1 : q + 5], "big") == end - q - 1 and (
            t in b"Is" or (buf[end - 1] == 0 and valid_server(t, buf[q + 5 : end]))
        ):
            return q
    return -1
