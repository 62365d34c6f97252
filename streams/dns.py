"""DNS over UDP and TCP for one connection: queries paired with their responses by id.

A UDP "connection" is what the kernel reports for one (UDP socket, peer address:port) pair, one
datagram per event; a TCP connection carries messages behind a 2-byte length prefix, several
per segment or one split across many. The parser is told neither: the first event that can
only be a length-prefixed message switches the connection to stream framing for good. Until
then every event is taken as one whole message, which is also right for the first message of a
TCP connection whose 2-byte length was read by its own syscall (a server like dnsmasq reads the
length, then the message) and so never reached the parser.

Records (one per query):
- ``method`` and ``endpoint``: the query type name (``A``, ``AAAA``, ``SRV``, ``TYPE65534``):
  DNS names have unbounded cardinality and never become a label. ``query``: "qtype name",
  lower-cased, at most ``MAX_QUERY_CHARS``, with " (truncated)" when the answer had TC set.
- ``status``: the response code name (``NOERROR``, ``NXDOMAIN``, ``SERVFAIL``...; the extended
  bits of an EDNS OPT record are ignored), or ``TIMEOUT`` / ``UNANSWERED`` (below).
- ``error``: SERVFAIL, REFUSED, FORMERR and NOTIMP (the resolver failed the caller), TIMEOUT and
  UNANSWERED. NXDOMAIN and NOERROR without data are answers: "that name does not exist" is
  what a search-path lookup gets most of the time, so counting it as an error would drown the
  real failures.
- ``side``: "client" if this process sent the query, "server" if it received it, from the QR bit
  and the direction, whatever the connection's role says.

Deadlines. A query not answered ``TIMEOUT_NS`` after it was sent is a timeout: status
``TIMEOUT``, error, ``end_ns = start + TIMEOUT_NS``. Timeouts are decided on event time when a
later event of the connection shows the deadline passed (a response after the deadline is
``late_responses``, not an answer), by ``expire(now_ns)`` once the wall clock is
``EXPIRE_GRACE_NS`` past the deadline (the grace covers events still on their way through the
pipeline), and by ``flush()`` at close. A query still pending at close whose deadline has not
passed is ``UNANSWERED`` (error, ended at the close). A retransmission (same id and question
while the query is pending: UDP resolvers resend) is merged into the first: its bytes are
added, ``start_ns`` stays the first send, so the latency is what the caller waited, and the
deadline restarts from the retransmission.

Nothing in here raises on input: ``feed`` and ``flush`` have a last-resort guard that counts
``parser_errors`` and drops the connection's framing and pending queries.
"""

from __future__ import annotations

import collections
import struct
from typing import TYPE_CHECKING

from .record import Request

if TYPE_CHECKING:
    from .protocols import ParserOptions

TIMEOUT_NS = 5_000_000_000  # a query unanswered this long after it was sent is a timeout
EXPIRE_GRACE_NS = 2_000_000_000  # wall-clock wait past a deadline before expire() decides
MAX_PENDING = 256  # queries waiting for an answer per connection
MAX_QUERY_CHARS = 256
HEAD_MAX = 512  # bytes kept of a TCP message: the header and question fit (12 + 255 + 4)
MIN_MESSAGE = 17  # header + root name + type + class
_RECENT_TIMEOUTS = 64  # ids remembered after a timeout, to tell late answers from orphans

QTYPE_NAMES = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 10: "NULL", 11: "WKS", 12: "PTR", 13: "HINFO",
    15: "MX", 16: "TXT", 17: "RP", 18: "AFSDB", 24: "SIG", 25: "KEY", 28: "AAAA", 29: "LOC",
    33: "SRV", 35: "NAPTR", 36: "KX", 37: "CERT", 39: "DNAME", 41: "OPT", 42: "APL", 43: "DS",
    44: "SSHFP", 45: "IPSECKEY", 46: "RRSIG", 47: "NSEC", 48: "DNSKEY", 49: "DHCID",
    50: "NSEC3", 51: "NSEC3PARAM", 52: "TLSA", 53: "SMIMEA", 55: "HIP", 59: "CDS",
    60: "CDNSKEY", 61: "OPENPGPKEY", 62: "CSYNC", 63: "ZONEMD", 64: "SVCB", 65: "HTTPS",
    99: "SPF", 108: "EUI48", 109: "EUI64", 249: "TKEY", 250: "TSIG", 251: "IXFR", 252: "AXFR",
    255: "ANY", 256: "URI", 257: "CAA",
}  # fmt: skip
RCODE_NAMES = {
    0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED",
    6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH", 10: "NOTZONE", 11: "DSOTYPENI",
}  # fmt: skip
ERROR_STATUSES = frozenset({"SERVFAIL", "REFUSED", "FORMERR", "NOTIMP", "TIMEOUT",
                            "UNANSWERED"})
_CLASSES = frozenset({1, 3, 4, 254, 255})  # IN, CH, HS, NONE, ANY

# How much of a connection was not understood; reported next to the metrics it affects.
COUNTERS = (
    "unparsed_bytes",  # bytes that belong to no record
    "sync_losses",  # TCP framing lost (a bad length, a message boundary in a capture gap)
    "resyncs",  # TCP framing found again at an event that starts a message
    "orphan_responses",  # responses with no query waiting under their id
    "late_responses",  # responses to a query already reported as a timeout
    "mismatched_responses",  # id waiting, but another question: not paired
    "retransmissions",  # queries resent under the same id, merged into the first
    "timeouts",  # queries reported TIMEOUT
    "unanswered_queries",  # queries pending at close before their deadline (UNANSWERED)
    "dropped_queries",  # pending queries forgotten (id reused for another question, overflow)
    "lost_answers",  # queries whose answer was in bytes that could not be framed: status ""
    "truncated_responses",  # answers with TC set
    "cut_messages",  # messages longer than the capture: header and question still parsed
    "parser_errors",  # internal errors caught by the guards; should stay 0
)

_HEADER = struct.Struct("!6H")
_U16 = struct.Struct("!H")
_PLAIN = bytes(b for b in range(0x21, 0x7F) if b not in b".\\")  # kept as is in names


# -- wire format --------------------------------------------------------------------------------
def _read_name(msg: bytes, pos: int) -> tuple[str | None, int]:
    """(name, index just past it) of the name at ``pos``; (None, -1) if malformed or cut.

    Compression pointers are followed only backwards, each to before the previous jump, so a
    pointer loop cannot run forever; the name is at most 255 bytes as on the wire.
    """
    end = len(msg)
    labels: list[str] = []
    after = -1
    limit = pos  # a pointer must land before the name, then before each earlier jump
    wire = 1
    while True:
        if pos >= end:
            return None, -1
        n = msg[pos]
        if n >= 0xC0:
            if pos + 1 >= end:
                return None, -1
            target = ((n & 0x3F) << 8) | msg[pos + 1]
            if after < 0:
                after = pos + 2
            if not 12 <= target < limit:
                return None, -1
            pos = limit = target
            continue
        if n >= 0x40:  # extended and binary labels: obsolete, never valid in a question
            return None, -1
        if n == 0:
            break
        wire += n + 1
        if wire > 255 or pos + 1 + n > end:
            return None, -1
        label = msg[pos + 1 : pos + 1 + n].lower()
        if label.translate(None, _PLAIN):  # dots, backslashes, non-printable bytes: escaped
            labels.append("".join(_escape(b) for b in label))
        else:
            labels.append(label.decode("ascii"))
        pos += 1 + n
    return (".".join(labels) or "."), (after if after >= 0 else pos + 1)


def _escape(byte: int) -> str:
    """A name's byte as dig prints it: "\\." inside a label, "\\000" for non-printables."""
    if byte in _PLAIN:
        return chr(byte)
    return f"\\{chr(byte)}" if byte in b".\\" else f"\\{byte:03d}"


def _skip_name(msg: bytes, pos: int) -> int:
    """Index just past the name at ``pos`` without following pointers; -1 if malformed."""
    end = len(msg)
    start = pos
    while pos < end:
        n = msg[pos]
        if n >= 0xC0:
            if pos + 1 >= end or not 12 <= (((n & 0x3F) << 8) | msg[pos + 1]) < start:
                return -1
            return pos + 2
        if n >= 0x40:
            return -1
        if n == 0:
            return pos + 1
        pos += 1 + n
        if pos - start > 255:
            return -1
    return -1


def _header_ok(buf: bytes | bytearray, pos: int) -> bool:
    """A header a real peer would send: opcode QUERY, Z clear, at most one question."""
    flags = (buf[pos + 2] << 8) | buf[pos + 3]
    return flags & 0x7840 == 0 and buf[pos + 4] == 0 and buf[pos + 5] <= 1


def _plausible(msg: bytes, whole: bool) -> bool:
    """A message with one question whose counts fit: every record parses to exactly its end
    when ``whole``; only the question when the message is cut short."""
    if len(msg) < MIN_MESSAGE or not _header_ok(msg, 0):
        return False
    _id, flags, qd, an, ns, ar = _HEADER.unpack_from(msg)
    if qd != 1:
        return False
    if not flags & 0x8000 and (flags & 0x000F or an or ns > 1 or ar > 2):
        return False  # a query carries no answers; at most an OPT and a TSIG record
    pos = _skip_name(msg, 12)
    if pos < 0 or pos + 4 > len(msg) or _U16.unpack_from(msg, pos + 2)[0] not in _CLASSES:
        return False
    pos += 4
    if not whole:
        return True
    end = len(msg)
    records = an + ns + ar
    if records * 11 > end - pos:
        return False
    for _ in range(records):
        pos = _skip_name(msg, pos)
        if pos < 0 or pos + 10 > end:
            return False
        pos += 10 + _U16.unpack_from(msg, pos + 8)[0]
    return pos == end


def _frame(buf: bytes) -> bool:
    """Whether ``buf`` starts with a length-prefixed message (TCP): whole, with every record
    parsed, or at least its question when the message goes on beyond ``buf``."""
    if len(buf) < 2 + MIN_MESSAGE:
        return False
    length = _U16.unpack_from(buf)[0]
    if length < MIN_MESSAGE:
        return False
    msg = buf[2 : 2 + length]
    return _plausible(msg, whole=len(msg) == length)


def _frame_start(buf: bytes, size: int) -> bool:
    """Whether ``buf`` may be the first bytes of a length-prefixed message, too few to show
    its question: a length (beyond ``buf`` if the event is whole) and the header so far."""
    if not 2 <= len(buf) < 2 + 12 + 255 + 4:
        return False
    length = _U16.unpack_from(buf)[0]
    if length < MIN_MESSAGE or (size == len(buf) and length + 2 <= len(buf)):
        return False
    return len(buf) < 14 or _header_ok(buf, 2)


def detect(buf: bytes) -> bool:
    """True if ``buf`` is a whole DNS message with one question (a UDP datagram), or starts
    with a 2-byte length and such a message (TCP; the message may continue in later reads)."""
    return _frame(buf) or _plausible(buf, whole=True)


def qtype_name(qtype: int) -> str:
    return QTYPE_NAMES.get(qtype) or f"TYPE{qtype}"


def rcode_name(rcode: int) -> str:
    return RCODE_NAMES.get(rcode) or f"RCODE{rcode}"


# -- one connection -----------------------------------------------------------------------------
class _Query:
    __slots__ = ("out", "qname", "qtype", "start_ns", "deadline", "nbytes", "complete",
                 "lost_ns")

    def __init__(self, out: bool, qname: str | None, qtype: int, start_ns: int, nbytes: int,
                 complete: bool) -> None:
        self.out = out  # this process sent it: the client side
        self.qname = qname
        self.qtype = qtype
        self.start_ns = start_ns
        self.deadline = start_ns + TIMEOUT_NS
        self.nbytes = nbytes
        self.complete = complete
        self.lost_ns = 0  # when framing of its answer's direction was lost (0: it was not)


_UNDECIDED, _DATAGRAM, _STREAM = range(3)  # framing of a connection
_PREFIX, _BODY, _LOST = range(3)  # state of a TCP direction


class _Stream:
    """Frames one direction of a TCP connection: a 2-byte length, then the message."""

    __slots__ = ("conn", "out", "state", "prefix", "start_ns", "head", "length", "remaining",
                 "nbytes")  # fmt: skip

    def __init__(self, conn: DnsConnection, out: bool) -> None:
        self.conn = conn
        self.out = out
        self.state = _PREFIX
        self.prefix = b""  # the first byte of a length split across reads
        self.start_ns = 0
        self.head = bytearray()  # the message's first HEAD_MAX bytes
        self.length = 0
        self.remaining = 0
        self.nbytes = 0  # of the message so far, prefix included

    def feed(self, ts: int, size: int, payload: bytes) -> None:
        counters = self.conn.counters
        n = len(payload)
        whole = size == n
        if self.state == _LOST:
            if _frame(payload):
                self.state = _PREFIX
                counters["resyncs"] += 1
            elif whole and _plausible(payload, whole=True):  # its length came in a lost read
                counters["resyncs"] += 1
                self.state = _PREFIX
                self.conn.message(self.out, ts, ts, size, payload, cut=False)
                return
            else:
                counters["unparsed_bytes"] += size
                return
        elif (self.state == _PREFIX and not self.prefix and whole
              and _plausible(payload, whole=True) and not _frame(payload)):
            # A whole message without its length: the length was read by its own syscall,
            # before this parser existed (the sniffer saw 2 bytes it could not recognise).
            self.conn.message(self.out, ts, ts, size, payload, cut=False)
            return
        pos = 0
        while pos < n:
            if self.state == _BODY:
                take = min(self.remaining, n - pos)
                room = HEAD_MAX - len(self.head)
                if room > 0:
                    before = len(self.head)
                    self.head += payload[pos : pos + min(take, room)]
                    if before < 12 <= len(self.head) and not _header_ok(self.head, 0):
                        self.lose(ts)  # the length was not a length: garbage or lost framing
                        counters["unparsed_bytes"] += size - pos
                        return
                self.nbytes += take
                self.remaining -= take
                pos += take
                if not self.remaining:
                    self.done(ts, cut=False)
            else:  # _PREFIX
                if not self.prefix:
                    self.start_ns = ts
                need = 2 - len(self.prefix)
                self.prefix += payload[pos : pos + need]
                pos += need
                if len(self.prefix) < 2:
                    break
                self.length = self.remaining = _U16.unpack(self.prefix)[0]
                self.prefix = b""
                self.nbytes = 2
                self.head.clear()
                self.state = _BODY
                if self.length < MIN_MESSAGE:
                    self.lose(ts)
                    counters["unparsed_bytes"] += size - min(pos, n)
                    return
        if size > n:
            self.gap(ts, size - n)

    def gap(self, ts: int, gap: int) -> None:
        """``gap`` bytes moved but not captured: skip them by the length being read."""
        counters = self.conn.counters
        if self.state == _BODY:
            take = min(gap, self.remaining)
            self.nbytes += take
            self.remaining -= take
            gap -= take
            if not self.remaining:
                self.done(ts, cut=len(self.head) < min(self.length, HEAD_MAX))
        if gap:
            if self.state != _LOST:  # the next message's length is in bytes we cannot see
                self.lose(ts)
            counters["unparsed_bytes"] += gap

    def done(self, ts: int, cut: bool) -> None:
        head, nbytes = bytes(self.head), self.nbytes
        self.head.clear()
        self.nbytes = 0
        self.state = _PREFIX
        self.conn.message(self.out, self.start_ns, ts, nbytes, head, cut=cut)

    def lose(self, ts: int) -> None:
        counters = self.conn.counters
        counters["sync_losses"] += 1
        self.conn.answers_lost(not self.out, ts)
        counters["unparsed_bytes"] += self.nbytes + len(self.prefix)
        self.state = _LOST
        self.prefix = b""
        self.head.clear()
        self.nbytes = self.remaining = 0

    def flush(self, ts: int) -> None:
        """At close, a message still being read ends here, incomplete."""
        if self.state == _BODY and len(self.head) >= 12:
            self.state = _PREFIX
            self.conn.message(self.out, self.start_ns, ts, self.nbytes, bytes(self.head),
                              cut=True, complete=False)
        elif self.state == _BODY or self.prefix:
            self.conn.counters["unparsed_bytes"] += self.nbytes + len(self.prefix)
        self.state = _PREFIX
        self.prefix = b""
        self.head.clear()
        self.nbytes = self.remaining = 0


class DnsConnection:
    """DNS for one TCP connection or one UDP (socket, peer) flow: feed its events in order,
    call ``expire`` now and then, flush at close.

    ``role`` ("client", "server", "unknown") is kept for reference only: who asked is read
    from each message's QR bit and direction. ``transport`` ("udp"/"tcp") fixes the framing
    when the caller knows it; otherwise it is read from the bytes.
    """

    __slots__ = ("role", "counters", "_framing", "_streams", "_stash", "_pending",
                 "_next_deadline", "_timed_out", "_completed")  # fmt: skip

    def __init__(self, role: str = "unknown", options: ParserOptions | None = None,
                 transport: str = "") -> None:
        if role not in ("client", "server", "unknown"):
            raise ValueError(f"role must be client, server or unknown, not {role!r}")
        self.role = role
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._framing = {"udp": _DATAGRAM, "tcp": _STREAM}.get(transport, _UNDECIDED)
        self._streams = {True: _Stream(self, True), False: _Stream(self, False)}
        self._stash: dict[bool, tuple[int, bytes]] = {}  # per direction, while undecided
        # (query sent by this process, id) → query; insertion order is arrival order.
        self._pending: dict[tuple[bool, int], _Query] = {}
        self._next_deadline = 1 << 63  # no pending query's deadline is earlier
        self._timed_out: collections.OrderedDict[tuple[bool, int], None] = (
            collections.OrderedDict())
        self._completed: list[Request] = []

    @property
    def framing(self) -> str:
        return ("undecided", "datagram", "stream")[self._framing]

    def feed(self, direction: str, ts_ns: int, size: int, payload: bytes) -> list[Request]:
        """One syscall's event ("out": this process sent, "in": it received); returns the
        queries this event answered, or showed to have timed out."""
        try:
            self._feed(direction == "out", ts_ns, size, payload)
        except Exception:  # never let one connection's bytes take the worker down
            self._reset_after_error(max(size, len(payload)))
        return self._take()

    def expire(self, now_ns: int) -> list[Request]:
        """Queries whose deadline passed ``EXPIRE_GRACE_NS`` before ``now_ns`` (wall clock),
        as timeouts."""
        if self._stash:  # no more bytes came: those were datagrams after all
            self._drain_stash()
        if now_ns - EXPIRE_GRACE_NS < self._next_deadline:
            return self._take()
        try:
            self._time_out(now_ns - EXPIRE_GRACE_NS)
        except Exception:
            self._reset_after_error(0)
        return self._take()

    def flush(self, ts_ns: int) -> list[Request]:
        """The connection closed: a message being read ends incomplete; pending queries are
        timeouts if their deadline passed, else UNANSWERED (ended at the close)."""
        try:
            self._drain_stash()
            for stream in self._streams.values():
                stream.flush(ts_ns)
            self._time_out(ts_ns - 1)
            for query in self._pending.values():
                if query.lost_ns:
                    self.counters["lost_answers"] += 1
                    self._emit(query, "", max(query.lost_ns, query.start_ns), 0, False, False)
                    continue
                self.counters["unanswered_queries"] += 1
                self._emit(query, "UNANSWERED", max(ts_ns, query.start_ns), 0, True, False)
            self._pending.clear()
            self._next_deadline = 1 << 63
        except Exception:
            self._reset_after_error(0)
        return self._take()

    def _drain_stash(self) -> None:
        stash, self._stash = self._stash, {}
        try:
            for out, (ts, payload) in stash.items():
                self.message(out, ts, ts, len(payload), payload, cut=False)
        except Exception:
            self._reset_after_error(0)

    def _take(self) -> list[Request]:
        if not self._completed:
            return []
        completed, self._completed = self._completed, []
        return completed

    def _feed(self, out: bool, ts: int, size: int, payload: bytes) -> None:
        if size < len(payload):  # the syscall moved fewer bytes than were captured
            payload = payload[: max(size, 0)]
        size = max(size, len(payload))
        if not size:
            return
        if ts > self._next_deadline:  # a later event shows these deadlines passed
            self._time_out(ts - 1)
        stash = self._stash.pop(out, None)
        if stash is not None:  # a short event that may be a TCP message's first bytes
            if self._framing == _STREAM or _frame(stash[1] + payload):
                self._framing = _STREAM
                self._streams[out].feed(stash[0], len(stash[1]), stash[1])
            else:
                self.message(out, stash[0], stash[0], len(stash[1]), stash[1], cut=False)
        framing = self._framing
        if framing == _UNDECIDED:
            framing = self._decide(out, ts, size, payload)
        if framing == _STREAM:
            self._streams[out].feed(ts, size, payload)
        elif framing == _DATAGRAM:
            self.message(out, ts, ts, size, payload, cut=size > len(payload))

    def _decide(self, out: bool, ts: int, size: int, payload: bytes) -> int:
        """Stream framing for good once an event can only be a length-prefixed message (or is
        too short to be a datagram); otherwise this event is one whole message. An event too
        short to tell (a message's length and first bytes) waits for the next one."""
        whole = size == len(payload)
        if _plausible(payload, whole=whole):
            return _DATAGRAM
        if size < 12 or _frame(payload):
            self._framing = _STREAM
            return _STREAM
        if _frame_start(payload, size):
            if whole:
                self._stash[out] = (ts, payload)
                return _UNDECIDED
            if not (len(payload) >= 12 and _header_ok(payload, 0) and payload[5] == 1):
                self._framing = _STREAM  # cut by the capture, and no datagram header either
                return _STREAM
        return _DATAGRAM

    def message(self, out: bool, start_ns: int, end_ns: int, nbytes: int, msg: bytes,
                cut: bool, complete: bool = True) -> None:
        """One DNS message (without its TCP length) of ``nbytes`` on the wire."""
        counters = self.counters
        if len(msg) < 12:
            counters["unparsed_bytes"] += nbytes
            return
        if cut:
            counters["cut_messages"] += 1
        qid, flags, qd = _HEADER.unpack_from(msg)[:3]
        qname: str | None = None
        qtype = -1
        if qd:
            name, pos = _read_name(msg, 12)
            if name is not None and pos + 4 <= len(msg):
                qname, qtype = name, _U16.unpack_from(msg, pos)[0]
        complete = complete and (qd == 0 or qname is not None)
        if not flags & 0x8000:
            self._query(out, qid, qname, qtype, start_ns, nbytes, complete)
            return
        key = (not out, qid)
        query = self._pending.get(key)
        if query is None:
            late = key in self._timed_out
            counters["late_responses" if late else "orphan_responses"] += 1
            return
        if qname is not None and query.qname is not None and (
                qname != query.qname or qtype != query.qtype):
            counters["mismatched_responses"] += 1
            return
        del self._pending[key]
        if flags & 0x0200:
            counters["truncated_responses"] += 1
        self._emit(query, rcode_name(flags & 0x000F), end_ns, nbytes, complete,
                   bool(flags & 0x0200))

    def _query(self, out: bool, qid: int, qname: str | None, qtype: int, start_ns: int,
               nbytes: int, complete: bool) -> None:
        if self.role == "unknown":
            self.role = "client" if out else "server"
        key = (out, qid)
        pending = self._pending
        old = pending.get(key)
        if old is not None:
            if old.qname == qname and old.qtype == qtype:  # resent: one query, waited longer
                old.nbytes += nbytes
                old.deadline = start_ns + TIMEOUT_NS
                old.complete = old.complete and complete
                self.counters["retransmissions"] += 1
                return
            del pending[key]  # the id was reused for another question: never answerable
            self.counters["dropped_queries"] += 1
        elif len(pending) >= MAX_PENDING:
            del pending[next(iter(pending))]
            self.counters["dropped_queries"] += 1
        query = pending[key] = _Query(out, qname, qtype, start_ns, nbytes, complete)
        self._next_deadline = min(self._next_deadline, query.deadline)

    def answers_lost(self, queries_out: bool, ts: int) -> None:
        """Framing of one direction was lost at ``ts``: the answers to the queries sent the
        other way may be in the bytes skipped. Those not answered later are not timeouts."""
        for query in self._pending.values():
            if query.out == queries_out and not query.lost_ns:
                query.lost_ns = ts

    def _time_out(self, latest_deadline: int) -> None:
        """Report every pending query whose deadline is at or before ``latest_deadline``."""
        pending = self._pending
        due = [key for key, q in pending.items() if q.deadline <= latest_deadline]
        for key in due:
            query = pending.pop(key)
            if query.lost_ns:  # its answer was probably in bytes that could not be read
                self.counters["lost_answers"] += 1
                self._emit(query, "", max(query.lost_ns, query.start_ns), 0, False, False)
                continue
            self.counters["timeouts"] += 1
            self._emit(query, "TIMEOUT", query.deadline, 0, True, False)
            self._timed_out[key] = None
            if len(self._timed_out) > _RECENT_TIMEOUTS:
                self._timed_out.popitem(last=False)
        self._next_deadline = min((q.deadline for q in pending.values()), default=1 << 63)

    def _emit(self, query: _Query, status: str, end_ns: int, response_bytes: int,
              complete: bool, truncated: bool) -> None:
        method = qtype_name(query.qtype) if query.qtype >= 0 else ""
        detail = method
        if query.qname is not None:
            suffix = " (truncated)" if truncated else ""
            detail = f"{method} {query.qname}"[: MAX_QUERY_CHARS - len(suffix)] + suffix
        self._completed.append(Request(
            protocol="dns",
            side="client" if query.out else "server",
            method=method,
            endpoint=method,
            raw_path="",
            status=status,
            error=status in ERROR_STATUSES,
            start_ns=query.start_ns,
            end_ns=end_ns,
            request_bytes=query.nbytes,
            response_bytes=response_bytes,
            complete=query.complete and complete,
            query=detail,
        ))

    def _reset_after_error(self, nbytes: int) -> None:
        self.counters["parser_errors"] += 1
        self.counters["unparsed_bytes"] += nbytes
        self.counters["dropped_queries"] += len(self._pending)
        self._pending.clear()
        self._next_deadline = 1 << 63
        for stream in self._streams.values():
            stream.state = _LOST
            stream.prefix = b""
            stream.head.clear()
            stream.nbytes = stream.remaining = 0
