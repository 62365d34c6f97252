"""Incremental HTTP/2 (RFC 9113) and gRPC reassembly for one TCP connection.

Each direction has a ``_Framer`` that follows frames across events and gaps by their 9-byte
headers, and an HPACK ``Decoder`` (streams/hpack.py) for the header blocks that direction
carries. Streams are multiplexed on the connection; each becomes one ``Request`` when its
response ends (END_STREAM), is reset (RST_STREAM), or the connection closes::

    request HEADERS (+CONTINUATION) ─► DATA … ─► [trailers]           (client → server)
    response HEADERS ─► DATA … ─► trailers with END_STREAM ─► Request  (server → client)
    RST_STREAM from either side before that ────────────────► Request, an error

A streaming call is one Request from its first HEADERS to the END_STREAM of its response.

gRPC (``content-type: application/grpc*``) is reported as protocol "grpc": the endpoint is the
``:path`` (``/package.Service/Method``) as is, the status is ``grpc-status`` from the trailers
(or the headers of a trailers-only response), an error is any status but 0. Otherwise
"http2": the path is normalised (streams/endpoints.py), the status is ``:status``, an error is
5xx. A reset stream is an error: for gRPC its status is the code a gRPC client reports for that
RST_STREAM code (CANCEL → 1 CANCELLED, or 4 DEADLINE_EXCEEDED once the call's
``grpc-timeout`` has passed; REFUSED_STREAM → 14 UNAVAILABLE; ...), for plain HTTP/2 it is
``RST_<code name>`` unless a final ``:status`` already came (the body was then cut short).
Resets that follow END_STREAM are normal stream clean-up and change nothing.

What was not seen is never guessed (connections open before the probe started, capture gaps):

- without the client preface, a direction is framed only from an event whose bytes parse as
  a chain of well-formed frames (``plausible``); until then its bytes are ``unparsed_bytes``;
- a gap (``size > len(payload)``) inside a frame is skipped by the frame's length (DATA
  payloads are never needed); a gap that covers a frame header loses sync, and the next
  plausible event resyncs; a header block cut by a gap, or skipped, loses that direction's
  HPACK context (``lost_header_blocks``), though the fields wholly before the cut are read;
- header fields referencing dynamic-table entries we never saw are unknown (``hpack_lost``);
  a record that needed them is ``complete=False``, with endpoint ``{unknown}`` if its path is
  one of them, and status "" if it is; a stream whose content-type could not be read may be
  gRPC, so it gets no ``:status`` either.
Records and counters are built from sizes, so bytes in gaps are counted too. Nothing in here
raises on input: ``feed`` has a last-resort guard that counts ``parser_errors``.
"""

from __future__ import annotations

from .endpoints import normalise
from .hpack import Decoder, Field
from .record import Request

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = 9
MAX_HEADER_BLOCK = 65536  # header block bytes kept for decoding; a larger block is lost
MAX_STREAMS = 1024  # open streams per connection; the oldest is dropped beyond it
MAX_PATH = 256
UNKNOWN_ENDPOINT = "{unknown}"  # the path was a header we could not decode

(DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE,
 CONTINUATION) = range(10)  # fmt: skip
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
SETTINGS_HEADER_TABLE_SIZE = 0x1

_FLAGS = {DATA: 0x09, HEADERS: 0x2D, PRIORITY: 0, RST_STREAM: 0, SETTINGS: 0x01,
          PUSH_PROMISE: 0x0C, PING: 0x01, GOAWAY: 0, WINDOW_UPDATE: 0, CONTINUATION: 0x04}
_FIXED_LENGTH = {PRIORITY: 5, RST_STREAM: 4, PING: 8, WINDOW_UPDATE: 4}
_CONNECTION_FRAMES = (SETTINGS, PING, GOAWAY)  # on stream 0 only
_STREAM_FRAMES = (DATA, HEADERS, PRIORITY, RST_STREAM, PUSH_PROMISE, CONTINUATION)
_KEPT = (HEADERS, CONTINUATION, PUSH_PROMISE, SETTINGS, RST_STREAM, GOAWAY)  # payload needed

ERROR_CODES = ("NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR",
               "SETTINGS_TIMEOUT", "STREAM_CLOSED", "FRAME_SIZE_ERROR", "REFUSED_STREAM",
               "CANCEL", "COMPRESSION_ERROR", "CONNECT_ERROR", "ENHANCE_YOUR_CALM",
               "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED")  # fmt: skip
_CANCEL, _REFUSED_STREAM = 8, 7
# The gRPC status a client reports for a RST_STREAM code (gRPC's PROTOCOL-HTTP2.md); other
# codes are INTERNAL (13).
_GRPC_FOR_RESET = {_REFUSED_STREAM: 14, _CANCEL: 1, 11: 8, 12: 7}
# The gRPC status a client reports for an HTTP status without grpc-status; others UNKNOWN (2).
_GRPC_FOR_HTTP = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
_TIMEOUT_UNITS = {ord("H"): 3600 * 10**9, ord("M"): 60 * 10**9, ord("S"): 10**9,
                  ord("m"): 10**6, ord("u"): 10**3, ord("n"): 1}  # fmt: skip

COUNTERS = (
    "unparsed_bytes",  # bytes never framed: before the first sync, after a loss
    "sync_losses",  # times framing was lost (a frame header in a gap, an impossible frame)
    "resyncs",  # times framing was found again at a plausible event
    "lost_header_blocks",  # header blocks not seen whole: the HPACK context is lost after them
    "hpack_lost",  # header fields that referenced dynamic-table entries we never saw
    "orphan_responses",  # streams that ended without their request headers seen
    "unanswered_requests",  # requests without a response at close, or dropped over MAX_STREAMS
    "resets",  # streams ended by RST_STREAM before their response ended
    "refused_streams",  # streams above a GOAWAY's last stream id (the client retries them)
    "parser_errors",  # internal errors caught by the guard in feed(); should stay 0
)


def detect(buf: bytes) -> bool:
    """True if ``buf`` starts with the client connection preface (or is its first 16+ bytes)."""
    return buf.startswith(PREFACE) or (16 <= len(buf) < len(PREFACE) and PREFACE.startswith(buf))


def detect_frames(buf: bytes) -> bool:
    """True if ``buf`` looks like HTTP/2 frames mid-connection (see ``plausible``)."""
    return plausible(buf)


def _frame_header(buf: bytes | bytearray, pos: int) -> tuple[int, int, int, int]:
    """(length, type, flags, stream id) of the 9-byte frame header at ``pos``."""
    length = int.from_bytes(buf[pos : pos + 3], "big")
    stream = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
    return length, buf[pos + 3], buf[pos + 4], stream


def _well_formed(length: int, ftype: int, flags: int, stream: int, strict: bool) -> bool:
    """Whether a frame header obeys RFC 9113's rules for its type. ``strict`` also refuses
    unknown types and undefined flags (which a peer may send, but rarely does)."""
    if ftype > CONTINUATION:
        return not strict
    if strict and flags & ~_FLAGS[ftype]:
        return False
    if (stream != 0) if ftype in _CONNECTION_FRAMES else (stream == 0 and ftype in _STREAM_FRAMES):
        return False
    fixed = _FIXED_LENGTH.get(ftype)
    if fixed is not None:
        return length == fixed
    if ftype == SETTINGS:
        return length % 6 == 0 and not (flags & ACK and length)
    return ftype != GOAWAY or length >= 8


def plausible(buf: bytes) -> bool:
    """Whether ``buf`` starts at a frame boundary: a chain of well-formed frames that ends at
    its end (the last may run past it: a capture limit, or a read that ends mid-frame), with at
    least two whole frames or one whole frame of a type whose layout is checkable (not DATA)."""
    pos, n, whole, checkable = 0, len(buf), 0, False
    while pos + FRAME_HEADER <= n:
        length, ftype, flags, stream = _frame_header(buf, pos)
        if not _well_formed(length, ftype, flags, stream, strict=True):
            return False
        pos += FRAME_HEADER + length
        if pos > n:
            break
        whole += 1
        checkable = checkable or ftype != DATA
    return whole >= 2 or (whole == 1 and checkable)


def _grpc_timeout_ns(value: bytes) -> int:
    """``grpc-timeout`` ("201m") in ns, or 0 if malformed."""
    if 2 <= len(value) <= 9 and value[:-1].isdigit():
        return int(value[:-1]) * _TIMEOUT_UNITS.get(value[-1], 0)
    return 0


class _Half:
    """One direction of one stream: what its header blocks said, its bytes, its end."""

    __slots__ = ("blocks", "start_ns", "last_ns", "nbytes", "ended", "lost", "unknown",
                 "method", "path", "status", "content_type", "grpc_status", "grpc",
                 "timeout_ns", "trailers")  # fmt: skip

    def __init__(self) -> None:
        self.blocks = 0  # header blocks seen (whole or not)
        self.start_ns = 0
        self.last_ns = 0
        self.nbytes = 0
        self.ended = False  # END_STREAM seen
        self.lost = False  # a header block was not seen whole
        self.unknown = 0  # header fields we could not decode
        self.method: bytes | None = None
        self.path: bytes | None = None
        self.status: bytes | None = None  # final (non-1xx) :status
        self.content_type: bytes | None = None
        self.grpc_status: bytes | None = None
        self.grpc = False  # any grpc-* header, or "te: trailers" (required by gRPC)
        self.timeout_ns = 0
        self.trailers = False  # a header block after the response's head

    def apply(self, fields: list[Field]) -> None:
        if self.status is not None and not any(name == b":status" for name, _ in fields):
            self.trailers = True
        for name, value in fields:
            if name is None or value is None:
                self.unknown += 1
            elif name == b":method":
                self.method = value
            elif name == b":path":
                self.path = value
            elif name == b":status":
                if not value.startswith(b"1") or value == b"101":
                    self.status = value
            elif name == b"content-type":
                self.content_type = value
            elif name == b"te":
                self.grpc = self.grpc or value == b"trailers"
            elif name.startswith(b"grpc-"):
                self.grpc = True
                if name == b"grpc-status":
                    self.grpc_status = value
                elif name == b"grpc-timeout":
                    self.timeout_ns = _grpc_timeout_ns(value)


class _Stream:
    __slots__ = ("id", "halves", "in_sync")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.halves = {True: _Half(), False: _Half()}  # by direction: True = "out"
        self.in_sync = True  # False if framing was lost while it was open


class _Block:
    """A header block being collected (HEADERS or PUSH_PROMISE, then CONTINUATIONs)."""

    __slots__ = ("stream", "promised", "end_stream", "start_ns", "fragments", "cut", "lost",
                 "nbytes")  # fmt: skip

    def __init__(self, stream: int, promised: int, end_stream: bool, start_ns: int) -> None:
        self.stream = stream
        self.promised = promised  # PUSH_PROMISE's promised stream id, else 0
        self.end_stream = end_stream
        self.start_ns = start_ns
        self.fragments = bytearray()
        self.cut = False  # bytes after ``fragments`` were not captured: only a prefix decodes
        self.lost = False  # not seen whole (cut, or nothing of it usable)
        self.nbytes = 0  # its frames' sizes, counted into the stream once the block ends

    def add(self, fragment: bytes, cut: bool) -> None:
        if self.cut:
            return
        room = MAX_HEADER_BLOCK - len(self.fragments)
        self.fragments += fragment[:room]
        if cut or len(fragment) > room:
            self.cut = self.lost = True


class _Framer:
    """Frames one direction of the connection across events and gaps."""

    __slots__ = ("conn", "out", "decoder", "fresh", "synced", "ever_synced", "preface_left", "head",
                 "length", "ftype", "flags", "stream", "remaining", "keep", "payload",
                 "payload_lost", "frame_ns", "block")  # fmt: skip

    def __init__(self, conn: Http2Connection, out: bool, context_known: bool) -> None:
        self.conn = conn
        self.out = out
        self.decoder = Decoder(complete=context_known)
        self.fresh = context_known  # the connection's first bytes in this direction come to us
        self.synced = False
        self.ever_synced = False
        self.preface_left = 0  # bytes of the client preface still to match
        self.head = bytearray()  # the frame header being read
        self.length = self.ftype = self.flags = self.stream = 0
        self.remaining = -1  # payload bytes still to come; -1 while reading a header
        self.keep = False  # whether this frame's payload is needed
        self.payload = bytearray()
        self.payload_lost = False
        self.frame_ns = 0  # timestamp of the event that carried the frame's first byte
        self.block: _Block | None = None

    def feed(self, ts: int, size: int, payload: bytes) -> None:
        n = len(payload)
        if size < n:  # the syscall moved fewer bytes than were captured: trust the syscall
            payload = payload[: max(size, 0)]
            n = size = len(payload)
        if not self.synced and not self._sync(payload):
            self.conn.counters["unparsed_bytes"] += size
            return
        pos = 0
        while pos < n and self.synced:
            if self.preface_left:
                take = min(self.preface_left, n - pos)
                start = len(PREFACE) - self.preface_left
                if payload[pos : pos + take] != PREFACE[start : start + take]:
                    self.lose(n - pos)
                    return
                self.preface_left -= take
                pos += take
            elif self.remaining < 0:
                if not self.head:
                    self.frame_ns = ts
                    if pos + FRAME_HEADER <= n:  # usual case: a whole header, no copy
                        header = _frame_header(payload, pos)
                        pos += FRAME_HEADER
                        if not self._start_frame(ts, *header):
                            self.lose(n - pos)
                            return
                        continue
                take = min(FRAME_HEADER - len(self.head), n - pos)
                self.head += payload[pos : pos + take]
                pos += take
                if len(self.head) == FRAME_HEADER:
                    header = _frame_header(self.head, 0)
                    self.head.clear()
                    if not self._start_frame(ts, *header):
                        self.lose(n - pos)
                        return
            else:
                take = min(self.remaining, n - pos)
                if self.keep:
                    if take == self.remaining and not self.payload and take <= MAX_HEADER_BLOCK:
                        # usual case: the whole payload is in this event, no copy
                        self.remaining = 0
                        self._end_frame(ts, payload[pos : pos + take])
                        pos += take
                        continue
                    room = MAX_HEADER_BLOCK - len(self.payload)
                    self.payload += payload[pos : pos + min(take, room)]
                    self.payload_lost = self.payload_lost or take > room
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self._end_frame(ts)
        if size > n and self.synced:
            self._gap(ts, size - n)

    def _sync(self, payload: bytes) -> bool:
        """Whether framing can start at this event (it is not synced now)."""
        first = not self.ever_synced
        # The preface may come in pieces: any prefix of it starts a connection's first event.
        if first and payload and (payload.startswith(PREFACE) or PREFACE.startswith(payload)):
            self.preface_left = len(PREFACE)
            self.conn.saw_preface(self.out)
        elif first and self.fresh:
            pass  # seen from its connect/accept: the first byte starts a frame
        elif not plausible(payload):
            return False
        elif not first:
            self.conn.counters["resyncs"] += 1
        self.synced = self.ever_synced = True
        self.head.clear()
        self.remaining = -1
        return True

    def lose(self, unparsed: int) -> None:
        """Framing is lost: whatever follows is unparsed until a plausible event."""
        counters = self.conn.counters
        counters["sync_losses"] += 1
        counters["unparsed_bytes"] += unparsed
        self.synced = False
        self.preface_left = 0
        self.head.clear()
        self.remaining = -1
        self.payload.clear()
        self._lose_block()
        self.decoder.lose()  # header blocks may have passed unseen
        self.conn.out_of_sync()

    def _lose_block(self) -> None:
        block = self.block
        if block is not None:
            self.block = None
            block.lost = True
            self.conn.on_block(self.out, block, [], self.frame_ns)

    def _gap(self, ts: int, gap: int) -> None:
        if self.remaining > 0:
            take = min(gap, self.remaining)
            self.remaining -= take
            gap -= take
            self.payload_lost = self.payload_lost or self.keep
            if self.remaining == 0:
                self._end_frame(ts)
        if gap:  # a frame header lies in bytes we cannot see
            self.lose(gap)

    def _start_frame(self, ts: int, length: int, ftype: int, flags: int, stream: int) -> bool:
        if not _well_formed(length, ftype, flags, stream, strict=False):
            return False
        block = self.block
        if block is not None and (ftype != CONTINUATION or stream != block.stream):
            self._lose_block()  # a block must continue at once (RFC 9113 §6.10)
            self.decoder.lose()
        self.length, self.ftype, self.flags, self.stream = length, ftype, flags, stream
        self.keep = ftype in _KEPT
        self.payload.clear()
        self.payload_lost = False
        self.remaining = length
        if length == 0:
            self._end_frame(ts)
        return True

    def _end_frame(self, ts: int, payload: bytes | None = None) -> None:
        """The frame ended in this event; ``payload``: its payload if not in ``self.payload``."""
        self.remaining = -1
        ftype, flags, stream = self.ftype, self.flags, self.stream
        if payload is None:
            payload = bytes(self.payload) if self.keep else b""
        conn = self.conn
        size = FRAME_HEADER + self.length
        if ftype in (HEADERS, PUSH_PROMISE):
            self._block_start(ts, payload, size)
            return
        block = self.block
        if ftype == CONTINUATION and block is not None:
            block.nbytes += size
            block.add(payload, self.payload_lost)
            if flags & END_HEADERS:
                self._block_end(ts)
            return
        if ftype == CONTINUATION:  # its HEADERS was never framed: a block we missed
            self.conn.counters["lost_header_blocks"] += 1
            self.decoder.lose()
        if stream:
            conn.count_bytes(self.out, stream, size, ts)
        if ftype == DATA:
            if flags & END_STREAM:
                conn.end_stream(self.out, stream, ts)
        elif ftype == RST_STREAM and not self.payload_lost:
            conn.reset(self.out, stream, int.from_bytes(payload[:4], "big"), ts)
        elif ftype == SETTINGS and not flags & ACK and not self.payload_lost:
            for i in range(0, len(payload) - 5, 6):
                if int.from_bytes(payload[i : i + 2], "big") == SETTINGS_HEADER_TABLE_SIZE:
                    # The sender decodes with at most this table: the other direction's.
                    conn.framer(not self.out).decoder.limit(
                        int.from_bytes(payload[i + 2 : i + 6], "big"))
        elif ftype == GOAWAY and len(payload) >= 4:
            conn.goaway(self.out, int.from_bytes(payload[:4], "big") & 0x7FFFFFFF)

    def _block_start(self, ts: int, payload: bytes, size: int) -> None:
        """A HEADERS or PUSH_PROMISE frame ended: its fragment starts a header block. Its
        padding and priority fields are cut off by the frame's length, so a fragment whose
        end was not captured still yields its first bytes."""
        flags, length = self.flags, self.length
        pos, end = 0, length
        if flags & PADDED:
            end -= payload[0] if payload else length + 1
            pos = 1
        promised = 0
        if self.ftype == PUSH_PROMISE:
            promised = int.from_bytes(payload[pos : pos + 4], "big") & 0x7FFFFFFF
            pos += 4
        elif flags & PRIORITY_FLAG:
            pos += 5
        block = _Block(self.stream, promised, bool(flags & END_STREAM) and not promised,
                       self.frame_ns)
        block.nbytes = size
        if end < pos or len(payload) < min(pos, end):
            block.lost = True  # bad padding, or even the fixed fields were not captured
        else:
            block.add(payload[pos:end], self.payload_lost and len(payload) < end)
        self.block = block
        if flags & END_HEADERS:
            self._block_end(ts)

    def _block_end(self, ts: int) -> None:
        block = self.block
        assert block is not None
        self.block = None
        fields: list[Field] = []
        if block.lost and not block.cut:
            self.decoder.lose()
        else:
            # A cut block still gives the fields wholly captured before the cut (gRPC and
            # curl send :path / :status first); the context is lost after it.
            fields, whole = self.decoder.decode(bytes(block.fragments), cut=block.cut)
            block.lost = block.lost or not whole
        self.conn.on_block(self.out, block, fields, ts)


class Http2Connection:
    """HTTP/2 and gRPC reassembly for one TCP connection: feed its events in order, flush at
    close. ``role`` is "client", "server" or "unknown" (decided by the preface, or by the first
    header block with ``:method`` or ``:status``)."""

    __slots__ = ("role", "counters", "streams", "_requests_out", "_framers", "_completed",
                 "_last_id")  # fmt: skip

    def __init__(self, role: str = "unknown") -> None:
        if role not in ("client", "server", "unknown"):
            raise ValueError(f"role must be client, server or unknown, not {role!r}")
        self.role = role
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.streams: dict[int, _Stream] = {}
        self._requests_out: bool | None = None if role == "unknown" else role == "client"
        # Seen from connect/accept, the connection starts with empty HPACK tables.
        known = role != "unknown"
        self._framers = {True: _Framer(self, True, known), False: _Framer(self, False, known)}
        self._completed: list[Request] = []
        self._last_id = {0: 0, 1: 0}  # highest stream id opened, by parity (1: client's)

    def feed(self, direction: str, ts_ns: int, size: int, payload: bytes) -> list[Request]:
        """One syscall's event ("out": this process wrote, "in": it read); returns the
        requests whose responses this event completed."""
        framer = self._framers[direction == "out"]
        try:
            framer.feed(ts_ns, size, payload)
        except Exception:  # never let one connection's bytes take the worker down
            self.counters["parser_errors"] += 1
            framer.lose(0)
            self.counters["unparsed_bytes"] += max(size, len(payload))
        return self._take()

    def flush(self, ts_ns: int) -> list[Request]:
        """The connection closed: streams with a response under way end incomplete; the
        others are counted as unanswered."""
        try:
            requests_out = self._requests_out
            for stream in sorted(self.streams.values(), key=lambda s: s.id):
                response = stream.halves[not requests_out] if requests_out is not None else None
                if response is not None and response.blocks:
                    stream.in_sync = False
                    self._finish(stream, response.last_ns, None)
                else:
                    self.counters["unanswered_requests"] += 1
        except Exception:
            self.counters["parser_errors"] += 1
        self.streams.clear()
        return self._take()

    def _take(self) -> list[Request]:
        if not self._completed:
            return []
        completed = self._completed
        self._completed = []
        return completed

    # -- called by the framers --------------------------------------------------------------

    def framer(self, out: bool) -> _Framer:
        return self._framers[out]

    def saw_preface(self, out: bool) -> None:
        """The client preface starts a connection: ``out`` carries requests, tables are empty."""
        self._decide(out)
        for framer in self._framers.values():
            if not framer.ever_synced:  # this one, and the other if it has sent nothing yet
                framer.decoder = Decoder()

    def _decide(self, requests_out: bool) -> None:
        if self._requests_out is None:
            self._requests_out = requests_out
            self.role = "client" if requests_out else "server"

    def out_of_sync(self) -> None:
        for stream in self.streams.values():
            stream.in_sync = False

    def count_bytes(self, out: bool, stream_id: int, nbytes: int, ts: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            half = stream.halves[out]
            half.nbytes += nbytes
            half.last_ns = ts

    def on_block(self, out: bool, block: _Block, fields: list[Field], ts: int) -> None:
        """A header block ended (decoded, or lost with ``fields`` empty)."""
        unknown = sum(1 for name, value in fields if name is None or value is None)
        self.counters["hpack_lost"] += unknown
        if block.lost:
            self.counters["lost_header_blocks"] += 1
        if block.promised:  # PUSH_PROMISE: the request of a stream the server opens
            self._decide(not out)
            stream = self._open(block.promised, ts)
            if stream is not None:
                self._add_block(stream.halves[not out], block, fields, ts)
            return
        if any(name == b":method" for name, _ in fields):
            self._decide(out)
        elif any(name == b":status" for name, _ in fields):
            self._decide(not out)
        stream = self.streams.get(block.stream) or self._open(block.stream, ts)
        if stream is None:
            return  # trailers of a stream already finished, or one we never saw open
        self._add_block(stream.halves[out], block, fields, ts)
        if block.end_stream:
            self.end_stream(out, block.stream, ts)

    @staticmethod
    def _add_block(half: _Half, block: _Block, fields: list[Field], ts: int) -> None:
        if not half.blocks:
            half.start_ns = block.start_ns
        half.blocks += 1
        half.nbytes += block.nbytes
        half.last_ns = ts
        half.lost = half.lost or block.lost
        half.apply(fields)

    def _open(self, stream_id: int, ts: int) -> _Stream | None:
        """A new stream, if ``stream_id`` is above every id of its parity seen so far (ids
        only grow: a lower one belongs to a stream already finished)."""
        parity = stream_id & 1
        if stream_id <= self._last_id[parity]:
            return None
        self._last_id[parity] = stream_id
        if len(self.streams) >= MAX_STREAMS:
            del self.streams[min(self.streams)]
            self.counters["unanswered_requests"] += 1
        stream = self.streams[stream_id] = _Stream(stream_id)
        return stream

    def end_stream(self, out: bool, stream_id: int, ts: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        half = stream.halves[out]
        half.ended = True
        half.last_ns = ts
        if self._requests_out is not None and out != self._requests_out:
            self._finish(stream, ts, None)

    def reset(self, out: bool, stream_id: int, code: int, ts: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # reset after both ends finished: clean-up, nothing to report
        self.counters["resets"] += 1
        if self._requests_out is None:
            del self.streams[stream_id]
            return
        self._finish(stream, ts, code)

    def goaway(self, out: bool, last_stream_id: int) -> None:
        """GOAWAY from the server: client streams above ``last_stream_id`` were never
        processed, the client retries them elsewhere; they are not requests of this one."""
        if self._requests_out is None or out == self._requests_out:
            return
        for stream_id in [s for s in self.streams if s & 1 and s > last_stream_id]:
            del self.streams[stream_id]
            self.counters["refused_streams"] += 1

    # -- records ----------------------------------------------------------------------------

    def _finish(self, stream: _Stream, end_ns: int, reset: int | None) -> None:
        self.streams.pop(stream.id, None)
        assert self._requests_out is not None
        request = stream.halves[self._requests_out]
        response = stream.halves[not self._requests_out]
        if not request.blocks:
            self.counters["orphan_responses"] += 1
            return
        grpc = _is_grpc(request, response)
        if request.path is None:
            raw_path, endpoint = "", UNKNOWN_ENDPOINT
        elif grpc:
            raw_path = endpoint = request.path[:MAX_PATH].decode("latin-1")
        else:
            raw_path = _path(request.path)
            endpoint = normalise(raw_path)
        if grpc:
            ended = stream.in_sync and (response.ended or reset is not None)
            status = _grpc_status(request, response, reset, end_ns) if ended or (
                response.grpc_status is not None) else ""
            error = status not in ("0", "")
        else:
            # Perhaps gRPC after all, whose status would not be :status: leave it unknown.
            status, error = _http_status(None if _unsure(request, response) else response.status,
                                         reset)
        complete = (
            stream.in_sync
            and not (request.lost or response.lost or request.unknown or response.unknown)
            and (response.blocks > 0 or reset is not None)
            and (reset is not None or bool(status))
        )
        self._completed.append(
            Request(
                protocol="grpc" if grpc else "http2",
                side=self.role,
                method=request.method.decode("latin-1")[:16] if request.method else "",
                endpoint=endpoint,
                raw_path=raw_path,
                status=status,
                error=error,
                start_ns=request.start_ns,
                end_ns=end_ns,
                request_bytes=request.nbytes,
                response_bytes=response.nbytes,
                complete=complete,
            )
        )


def _is_grpc(request: _Half, response: _Half) -> bool:
    for content_type in (request.content_type, response.content_type):
        if content_type is not None:
            return content_type.startswith(b"application/grpc")
    # content-type undecodable: gRPC's other marks (grpc-* headers, "te: trailers", trailers)
    return request.grpc or response.grpc or response.trailers


def _unsure(request: _Half, response: _Half) -> bool:
    """Whether a stream not recognised as gRPC may still be one: no content-type was read,
    and some header could not be."""
    return request.content_type is None and response.content_type is None and bool(
        request.lost or request.unknown or response.lost or response.unknown)


def _path(target: bytes) -> str:
    path = target.decode("latin-1")
    for sep in "?#":
        cut = path.find(sep)
        if cut >= 0:
            path = path[:cut]
    return path[:MAX_PATH]


def _grpc_status(request: _Half, response: _Half, reset: int | None, end_ns: int) -> str:
    """The status code a gRPC client would report, as a decimal string; "" if unknown."""
    value = response.grpc_status
    if value is not None:
        return str(int(value)) if value.isdigit() and len(value) <= 3 else "2"
    if reset is not None:
        # DEADLINE_EXCEEDED if the client gave up at its deadline. grpc-timeout is what was
        # left when the call started, rounded up, and the clock starts before the HEADERS.
        timeout = request.timeout_ns
        if reset == _CANCEL and timeout and end_ns - request.start_ns >= timeout * 49 // 50:
            return "4"
        return str(_GRPC_FOR_RESET.get(reset, 13))
    status = response.status
    if status is not None and status != b"200" and status.isdigit():
        return str(_GRPC_FOR_HTTP.get(int(status), 2))
    if response.unknown or response.lost or not response.blocks:
        return ""  # grpc-status may be among what we could not read
    return "2"  # a gRPC response without grpc-status: UNKNOWN


def _http_status(status: bytes | None, reset: int | None) -> tuple[str, bool]:
    text = status.decode("latin-1")[:3] if status is not None else ""
    if reset is not None:
        if not text:
            name = ERROR_CODES[reset] if reset < len(ERROR_CODES) else "UNKNOWN"
            return f"RST_{name}", True
        return text, True
    return text, text.startswith("5")
