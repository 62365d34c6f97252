"""Redis requests and replies for one TCP connection, over the RESP framer (``resp.py``).

Pairing: requests wait in a FIFO, each reply answers the oldest (pipelining). What is not a
reply is never paired: RESP3 push messages (``>``), RESP2 pub/sub messages (``*3 message``
arrays while subscribed), ``MONITOR`` lines. ``SUBSCRIBE a b`` is answered by one confirmation
per channel, a bare ``UNSUBSCRIBE`` by one per channel subscribed. Requests under
``CLIENT REPLY OFF/SKIP`` get none and are recorded at once (status ""). After
``PSYNC``/``SYNC`` the connection carries replication and is only counted.

Gaps: a header line lost in a gap loses sync; the reader resumes at an event that starts a
message (a reply only once the client has spoken again, so the rest of a long reply read in
several events is not taken for the next one). Requests lost in a gap leave a marker in the
FIFO: replies that must be theirs (read before the next known request was sent) are recorded
as ``UNKNOWN`` requests, incomplete, instead of shifting every later pairing; counts stay
exact. A reply cut short answers its request, incomplete.

Endpoint and method are the command (``GET``, ``CLIENT SETNAME``), query the command and at
most its first key, never a value (``redis_commands.py``). Status is ``OK`` or the error's code
(``ERR``, ``WRONGTYPE``, ``NOAUTH``…); errors (``-`` and ``!``) have ``error=True``. Nothing in
here raises on input: ``feed`` has a last-resort guard.
"""

from __future__ import annotations

from collections import deque

from .record import Request
from .redis_commands import SUBSCRIBE_FAMILY, Argv, command, query
from .resp import (
    ARRAY,
    BLOB_ERROR,
    COMMAND_PREFIX,
    ERROR,
    ERROR_CODE,
    KEEP_LINE,
    MAP,
    PUSH,
    RESP3_KINDS,
    SIMPLE,
    UNREAD,
    Message,
    Reader,
    complete_replies,
    could_start,
    is_command,
    is_inline_command,
    reply_header,
)

MAX_PENDING = 4096  # requests waiting for replies (pipelines of thousands are common)
MAX_CHANNELS = 1024  # channel names remembered per subscription kind
_LOST_REQUESTS = -2  # kind of a FIFO marker: zero or more requests were lost in a gap here

_CONFIRMATIONS = frozenset(s.lower().encode() for s in SUBSCRIBE_FAMILY)
_SUBSCRIBED = frozenset((b"subscribe", b"psubscribe", b"ssubscribe"))
_SUBSCRIPTION = {k: k.replace(b"un", b"") for k in _CONFIRMATIONS}  # unsubscribe → subscribe
_MESSAGES = frozenset((b"message", b"pmessage", b"smessage"))
_PUBSUB_KINDS = _CONFIRMATIONS | _MESSAGES

COUNTERS = (
    "unparsed_bytes",  # bytes that belong to no record
    "sync_losses",  # times framing was lost (garbage, a header line in a gap)
    "resyncs",  # times it was found again at an event that starts a message
    "orphan_responses",  # replies with no request sent before them
    "unseen_requests",  # replies to requests lost in a gap: recorded as UNKNOWN, incomplete
    "unanswered_requests",  # requests dropped at close or when the FIFO overflowed
    "pushes",  # out-of-band messages: RESP3 pushes, pub/sub messages, MONITOR lines
    "tunneled_bytes",  # after PSYNC/SYNC: the replication stream
    "parser_errors",  # internal errors caught by the guard in feed(); should stay 0
)


def detect(buf: bytes) -> bool:
    """True if ``buf`` begins a Redis command (``*N\\r\\n$len\\r\\nNAME\\r\\n`` with a command
    Redis knows) or is entirely made of complete, well-formed RESP replies."""
    return is_command(buf, known=True) or complete_replies(buf)


class RedisConnection:
    """Redis reassembly for one TCP connection: feed its events in order, flush at close.

    ``role`` is "client" (it connected: out = requests), "server" (it accepted: in =
    requests) or "unknown" (decided by the first command or reply seen, in either direction).
    """

    __slots__ = ("role", "counters", "pending", "tunneled", "_requests", "_replies",
                 "_requests_out", "_completed", "_spoke", "_resp3", "_subscribed",
                 "_monitoring", "_reply_mode", "_channels", "_undecided")  # fmt: skip

    def __init__(self, role: str = "unknown") -> None:
        if role not in ("client", "server", "unknown"):
            raise ValueError(f"role must be client, server or unknown, not {role!r}")
        self.role = role
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.pending: deque[Message] = deque()  # requests waiting for replies, FIFO
        self.tunneled = False
        self._requests = Reader(self, requests=True)
        self._replies = Reader(self, requests=False)
        self._requests_out = role == "client"
        self._completed: list[Request] = []
        self._spoke = False  # a request event came after the last reply event
        self._resp3 = False
        self._subscribed = False
        self._monitoring = False
        self._reply_mode = b"on"  # CLIENT REPLY on | off | skip (the next command)
        # Channels (patterns, shard channels) subscribed, by confirmation kind: how many
        # confirmations a bare UNSUBSCRIBE will get.
        self._channels: dict[bytes, set[bytes]] = {}
        # Role unknown: per direction, an event too short to tell yet: (ts, payload, size).
        self._undecided: dict[bool, tuple[int, bytes, int]] = {}

    def feed(self, direction: str, ts_ns: int, size: int, payload: bytes) -> list[Request]:
        """One syscall's event ("out": this process wrote, "in": it read); returns the
        requests whose replies this event completed."""
        try:
            self._feed(direction == "out", ts_ns, size, payload)
        except Exception:  # never let one connection's bytes take the worker down
            self._reset_after_error(max(size, len(payload)))
        if not self._completed:
            return []
        completed, self._completed = self._completed, []
        return completed

    def _feed(self, out: bool, ts: int, size: int, payload: bytes) -> None:
        if self.tunneled:
            self.counters["tunneled_bytes"] += max(size, len(payload))
            return
        if self._undecided:
            stash = self._undecided.pop(out, None)
            if stash is not None:  # the first bytes of a message came as their own event
                ts, payload, size = stash[0], stash[1] + payload, stash[2] + max(size, len(payload))
        if self.role == "unknown" and not self._decide_role(out, payload):
            if size == len(payload) < KEEP_LINE and could_start(payload):
                self._undecided[out] = (ts, payload, size)
            else:
                self.counters["unparsed_bytes"] += max(size, len(payload))
            return
        if out == self._requests_out:
            self._spoke = True
            self._requests.feed(ts, size, payload)
        else:
            self._replies.feed(ts, size, payload)
            self._spoke = False

    def flush(self, ts_ns: int) -> list[Request]:
        """The connection closed: a reply cut short answers its request, incomplete; the
        requests still waiting are counted unanswered."""
        try:
            msg = self._replies.msg
            if msg is not None and msg.kind != UNREAD and not self.tunneled:
                msg.complete = False
                msg.last_ns = max(msg.last_ns, self._replies.last_ts)
                self.reply_done(msg)
        except Exception:
            self._reset_after_error(0)
        for reader in (self._requests, self._replies):
            reader.reset()
        for _, _, size in self._undecided.values():
            self.counters["unparsed_bytes"] += size
        self._undecided.clear()
        self.counters["unanswered_requests"] += sum(
            1 for r in self.pending if r.kind != _LOST_REQUESTS)
        self.pending.clear()
        completed, self._completed = self._completed, []
        return completed

    def _decide_role(self, out: bool, payload: bytes) -> bool:
        if is_command(payload, known=True) or is_inline_command(payload):
            self.role = "client" if out else "server"
        elif COMMAND_PREFIX.fullmatch(payload):
            return False  # "*1\r\n": a command or an array reply? Its first element will tell
        elif reply_header(payload):
            self.role = "server" if out else "client"
        else:
            return False
        self._requests_out = self.role == "client"
        return True

    def _reset_after_error(self, nbytes: int) -> None:
        self.counters["parser_errors"] += 1
        self.counters["unparsed_bytes"] += nbytes
        for reader in (self._requests, self._replies):
            reader.reset()
            reader.lost = True
        self.requests_lost(self._requests.last_ts)

    def resumes(self, reader: Reader, payload: bytes) -> bool:
        """Whether a lost reader can pick up at this event. A reply is only looked for once
        the client has spoken since the last reply event: until then, the event is more
        likely the rest of the long reply that was lost."""
        if reader.requests:
            return is_command(payload, known=False) or is_inline_command(payload)
        return self._spoke and reply_header(payload)

    # -- called by the readers -------------------------------------------------------------------

    def request_started(self, msg: Message) -> None:
        self.pending.append(msg)
        if len(self.pending) > MAX_PENDING:
            dropped = self.pending.popleft()
            if dropped.kind != _LOST_REQUESTS:
                self.counters["unanswered_requests"] += 1

    def requests_lost(self, ts: int) -> None:
        if not self.pending or self.pending[-1].kind != _LOST_REQUESTS:
            self.pending.append(Message(ts, _LOST_REQUESTS))

    def request_done(self, msg: Message) -> None:
        name = msg.name = command(msg.words)
        if name in SUBSCRIBE_FAMILY:
            # One confirmation per channel; a bare UNSUBSCRIBE: one per channel subscribed
            # then (-1: counted at its first confirmation).
            msg.confirmations = msg.argc - 1 if msg.argc > 1 else -1 if "UNSUB" in name else 1
        answered = True
        if name == "CLIENT REPLY":
            mode = (msg.words[2] or b"").lower() if len(msg.words) > 2 else b""
            if mode == b"on":
                self._reply_mode = b"on"
            elif mode in (b"off", b"skip"):
                answered = False
                if self._reply_mode == b"on" or mode == b"off":
                    self._reply_mode = mode
        elif self._reply_mode != b"on":
            answered = False
            if self._reply_mode == b"skip":
                self._reply_mode = b"on"
        if not answered:
            if self.pending and self.pending[-1] is msg:
                self.pending.pop()
            self._emit(msg, "", False, msg.last_ns, 0, True)
        elif name == "SYNC":  # the RDB payload follows without a reply header
            self._tunnel()

    def reply_done(self, reply: Message) -> None:
        kind = reply.kind
        if kind in RESP3_KINDS:
            self._resp3 = True
        if kind == PUSH or (kind == ARRAY and not self._resp3 and self._is_pubsub(reply)):
            self._push(reply)
            return
        first = (reply.words[0] if reply.words else None) or b""
        if self._monitoring and kind == SIMPLE and first[:1].isdigit():
            self.counters["pushes"] += 1  # "+1700000000.123456 [0 127.0.0.1:5000] ..."
            return
        request = self._answered_request(reply)
        if request is None:
            self.counters["orphan_responses"] += 1
            return
        if request.kind == _LOST_REQUESTS:  # it answers a request lost in a gap
            self.counters["unseen_requests"] += 1
            request = Message(request.start_ns)
            request.name = "UNKNOWN"
            request.complete = False
        status, error = _status(reply)
        if error and first.startswith(b"ERR unknown command"):
            request.name = "UNKNOWN"  # "FOO.BAR" is an endpoint only if the server knows it
        name = request.name
        if name == "HELLO" and not error:
            self._resp3 = kind == MAP
        elif name == "MONITOR" and not error:
            self._monitoring = True
        elif name == "RESET":
            self._resp3 = self._subscribed = self._monitoring = False
            self._reply_mode = b"on"
            self._channels.clear()
        self._emit(request, status, error, reply.last_ns, request.reply_bytes + reply.nbytes,
                   reply.complete)
        if name == "PSYNC":  # "+FULLRESYNC <id> <offset>": the RDB and the command stream follow
            self._tunnel()

    def replies_resumed(self, lost: Message | None, last_ts: int) -> None:
        """The reply direction found its footing again after losing it: the reply cut short
        answers its request; requests sent before the last lost event were answered in what
        could not be read (status unknown)."""
        if lost is not None:
            lost.complete = False
            self.reply_done(lost)
        while self.pending and self.pending[0].start_ns <= last_ts:
            request = self.pending.popleft()
            if request.kind != _LOST_REQUESTS:
                self._emit(request, "", False, last_ts, request.reply_bytes, False)

    # -- pairing ----------------------------------------------------------------------------------

    def _answered_request(self, reply: Message) -> Message | None:
        """The request a reply answers: the oldest waiting, a lost-requests marker (the reply
        answers one of them), or None (an orphan: nothing was sent before it started)."""
        pending = self.pending
        while pending and pending[0].kind == _LOST_REQUESTS:
            # A reply that started before the next known request was sent answers one of the
            # lost ones; a later one, that next request.
            if len(pending) > 1 and pending[1].start_ns < reply.start_ns:
                pending.popleft()
            else:
                return pending[0]
        if not pending or pending[0].start_ns > reply.start_ns:
            return None
        return pending.popleft()

    def _is_pubsub(self, reply: Message) -> bool:
        """A RESP2 array that is a pub/sub message or confirmation, not a reply."""
        if not reply.words or (reply.words[0] or b"").lower() not in _PUBSUB_KINDS:
            return False
        return self._subscribed or not self.pending or self.pending[0].name in SUBSCRIBE_FAMILY

    def _push(self, reply: Message) -> None:
        words = reply.words
        kind = (words[0] or b"").lower() if words else b""
        head = self.pending[0] if self.pending else None
        confirms_head = (kind in _CONFIRMATIONS and head is not None
                         and head.name.lower().encode() == kind)  # fmt: skip
        if confirms_head and head is not None and head.confirmations < 0:
            head.confirmations = max(1, len(self._channels.get(_SUBSCRIPTION[kind], ())))
        self._track_subscriptions(kind, words)
        if not confirms_head or head is None:
            self.counters["pushes"] += 1
            return
        # (UN)SUBSCRIBE a b: one confirmation per channel answers the request.
        head.reply_bytes += reply.nbytes
        head.confirmations -= 1
        if head.confirmations <= 0:
            self.pending.popleft()
            self._emit(head, "OK", False, reply.last_ns, head.reply_bytes, reply.complete)

    def _track_subscriptions(self, kind: bytes, words: Argv) -> None:
        channel = words[1] if len(words) > 1 else None
        if kind in _SUBSCRIBED:
            channels = self._channels.setdefault(kind, set())
            if channel is not None and len(channels) < MAX_CHANNELS:
                channels.add(channel)
        elif kind in _CONFIRMATIONS:
            self._channels.get(_SUBSCRIPTION[kind], set()).discard(channel or b"")
        if kind in _SUBSCRIBED or kind in _MESSAGES:
            self._subscribed = True
        elif kind in _CONFIRMATIONS and len(words) > 2 and words[2] == b"0":
            self._subscribed = False  # no subscription left: RESP2 replies are replies again

    def _tunnel(self) -> None:
        self.tunneled = True
        self.counters["unanswered_requests"] += sum(
            1 for r in self.pending if r.kind != _LOST_REQUESTS)
        self.pending.clear()

    def _emit(self, request: Message, status: str, error: bool, end_ns: int,
              response_bytes: int, complete: bool) -> None:
        name = request.name or command(request.words)
        self._completed.append(
            Request(
                protocol="redis",
                side=self.role,
                method=name,
                endpoint=name,
                raw_path="",
                status=status,
                error=error,
                start_ns=request.start_ns,
                end_ns=end_ns,
                request_bytes=request.nbytes,
                response_bytes=response_bytes,
                complete=complete and request.complete and request.done,
                query=query(request.words),
            )
        )


def _status(reply: Message) -> tuple[str, bool]:
    """("OK", False) or (error code, True); ("", False) if the reply's header was never read."""
    if reply.kind in (ERROR, BLOB_ERROR):
        text = (reply.words[0] if reply.words else None) or b""
        code = ERROR_CODE.match(text)
        if code is not None and text[code.end() : code.end() + 1] in (b"", b" "):
            return code.group().decode(), True
        return "ERR", True
    if reply.kind == UNREAD:
        return "", False
    return "OK", False
