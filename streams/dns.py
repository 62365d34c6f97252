"""DNS over UDP and TCP for one connection: queries paired with their responses by id.

A UDP "connection" is what the kernel reports for one (UDP socket, peer address:port) pair, one
datagram per event; a TCP connection carries messages behind a 2-byte length prefix, several
per segment or one split across many. Which one it is comes from the bytes (or ``transport``,
when the caller knows): the first event that can only be a length-prefixed message switches the
connection to stream framing for good; an event too short to tell (a length and a message's
first bytes) waits for the next one in its direction. Until then every event is one whole
message, which is also right for the first message of a TCP connection whose 2-byte length
was read by its own syscalls (dnsmasq reads it as two 1-byte reads, then the message) and so
never reached this parser: the sniffer could not recognise it.

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
deadline (and a timeout's ``end_ns``) restarts from the retransmission. A resend after the
deadline is a new query: the first attempt was a timeout.

A TCP direction whose framing is lost (a message boundary in bytes the capture did not keep)
finds it again at an event that starts a message. Queries whose answers may have been in the
skipped bytes and that get none are reported with an empty status (not an error, not complete:
``lost_answers``), not as timeouts.

The wire format (names, pointers, what looks like a message) is in ``dns_wire``. Nothing in
here raises on input: ``feed`` and ``flush`` have a last-resort guard that counts
``parser_errors`` and drops the connection's framing and pending queries.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from .dns_wire import (
    HEADER,
    MIN_MESSAGE,
    U16,
    frame,
    frame_start,
    header_ok,
    plausible,
    qtype_name,
    rcode_name,
    read_name,
)
from .record import Request

if TYPE_CHECKING:
    from .protocols import ParserOptions

TIMEOUT_NS = 5_000_000_000  # a query unanswered this long after it was sent is a timeout
EXPIRE_GRACE_NS = 2_000_000_000  # wall-clock wait past a deadline before expire() decides
MAX_PENDING = 256  # queries waiting for an answer per connection
MAX_QUERY_CHARS = 256
HEAD_MAX = 512  # bytes kept of a TCP message: the header and question fit (12 + 255 + 4)
_RECENT_TIMEOUTS = 64  # ids remembered after a timeout, to tell late answers from orphans

ERROR_STATUSES = frozenset({"SERVFAIL", "REFUSED", "FORMERR", "NOTIMP", "TIMEOUT",
                            "UNANSWERED"})

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


def detect(buf: bytes) -> bool:
    """True if ``buf`` is a whole DNS message with one question (a UDP datagram), or starts
    with a 2-byte length and such a message (TCP; the message may continue in later reads)."""
    return frame(buf) or plausible(buf, whole=True)


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
            if frame(payload):
                self.state = _PREFIX
                counters["resyncs"] += 1
            elif whole and plausible(payload, whole=True):  # its length came in a lost read
                counters["resyncs"] += 1
                self.state = _PREFIX
                self.conn.message(self.out, ts, ts, size, payload, cut=False)
                return
            else:
                counters["unparsed_bytes"] += size
                return
        elif (self.state == _PREFIX and not self.prefix and whole
              and plausible(payload, whole=True) and not frame(payload)):
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
                    if before < 12 <= len(self.head) and not header_ok(self.head, 0):
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
                self.length = self.remaining = U16.unpack(self.prefix)[0]
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
        # Per direction while undecided: whole events, (ts, payload), that may together be
        # the start of a TCP message (fewer than 273 bytes in all).
        self._stash: dict[bool, list[tuple[int, bytes]]] = {}
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
        if self._stash and min(e[0][0] for e in self._stash.values()) < (
                now_ns - EXPIRE_GRACE_NS):  # no more bytes came: those were datagrams
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
            for out, events in stash.items():
                for ts, payload in events:
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
        if stash is not None:  # short events that may be a TCP message's first bytes
            joined = b"".join(p for _, p in stash) + payload
            if self._framing == _STREAM or frame(joined):
                self._framing = _STREAM
                for stashed_ts, stashed in stash:
                    self._streams[out].feed(stashed_ts, len(stashed), stashed)
            elif self._framing == _UNDECIDED and size == len(payload) and frame_start(
                    joined, len(joined)):
                stash.append((ts, payload))  # still too few bytes to tell
                self._stash[out] = stash
                return
            else:  # they were datagrams after all
                for stashed_ts, stashed in stash:
                    self.message(out, stashed_ts, stashed_ts, len(stashed), stashed, cut=False)
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
        if plausible(payload, whole=whole):
            return _DATAGRAM
        if size < 12 or frame(payload):
            self._framing = _STREAM
            return _STREAM
        if frame_start(payload, size):
            if whole:
                self._stash[out] = [(ts, payload)]
                return _UNDECIDED
            if not (len(payload) >= 12 and header_ok(payload, 0) and payload[5] == 1):
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
        qid, flags, qd = HEADER.unpack_from(msg)[:3]
        qname: str | None = None
        qtype = -1
        if qd:
            name, pos = read_name(msg, 12)
            if name is not None and pos + 4 <= len(msg):
                qname, qtype = name, U16.unpack_from(msg, pos)[0]
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
