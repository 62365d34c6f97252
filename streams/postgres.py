"""PostgreSQL frontend/backend protocol 3.0 for one TCP connection: requests and answers.

Framing is ``postgres_wire``'s (a ``Framer`` per direction: start-up packets, gaps of known
length, resync); here the framed messages are matched. The server answers messages in the order
it receives them, so each client message it answers is queued as an ``_Op`` and each server
message goes to the op at the head::

    Parse → 1   Bind → 2   Describe → [t] T|n   Execute → D* (C|I|s)   Close → 3   Sync → Z
    Query → ((T D* | G.. | H..) C | I | E)* Z     FunctionCall → (V|E) Z     start-up → R.. K Z

Records. One ``Request`` per Execute and per statement of a simple Query: a Query produces one
record per CommandComplete / EmptyQueryResponse / ErrorResponse, its text split at top-level
semicolons ("BEGIN; UPDATE ...; COMMIT" is three records; each later one starts where the
previous ended). Parse/Bind/Describe/Close/Sync make no records of their own; an Execute's text
comes from Parse, through the statement name (named or unnamed) that Bind gives the portal. The
start-up and authentication exchange makes none either (its failures are counted,
``startup_errors``), and password messages are never read.

Status is ``OK`` for every success (the verb is already in the endpoint, and ``OK``/SQLSTATE
keeps series few) and the SQLSTATE of an ErrorResponse (``42P01``, error=True). After an
ErrorResponse the server skips the rest of the batch up to Sync: the error becomes the record of
the batch's first Execute from the failing message on or, with no Execute, of the failing
message itself (method ``Parse``, ``Bind``, ...); the Executes skipped are counted.

Bytes and time. An Execute's record spans its batch: it starts with the batch's first message
(Parse, Bind) and takes the bytes of every message before it and, at Sync, of those after it;
a Parse+Sync round trip of its own (prepared statements) only adds its bytes to the next
record. A Query's first statement carries the Query's bytes. Answers go to the op they answer;
a ReadyForQuery read with the completion goes to that record, one read later to the next.

Lost framing. When the answers lose framing (a header in an uncaptured gap: a result longer
than the capture), the head op ends, incomplete, at the first of: a whole read that ends with
ReadyForQuery (status of the completion found just before it), the client's next request
(clients that do not pipeline wait for ReadyForQuery; status "", end at the last answer read),
or the close. When requests lose framing, a placeholder op takes the answers up to the next
ReadyForQuery, one incomplete Execute record per completion, named by the visible start of the
batch's Parse. Connections open before the probe started (role "unknown") take their role from
the first event that frames as messages only one side sends (``Q``/``P``/``B`` → client,
``Z``/``T``/``1``/``2`` → server); the other direction starts lost. Nothing in here raises on
input: ``feed`` has a last-resort guard that counts ``parser_errors`` and drops sync.
"""

from __future__ import annotations

import functools
import re
from collections import deque
from typing import TYPE_CHECKING, TypeVar

from .postgres_wire import (
    GSSENC_REQUEST,
    MAX_NAME,
    SERVER_LENGTHS,
    SSL_REQUEST,
    Framer,
    cstring_end,
    detect,
    sqlstate,
    walk,
    whole_startup,
)
from .record import Request
from .sql import MAX_QUERY_CHARS, statement_endpoint, statement_text

if TYPE_CHECKING:
    from .protocols import ParserOptions

_V = TypeVar("_V")

__all__ = ["PostgresConnection", "detect", "split_statements"]

PROTOCOL = "postgresql"
MAX_PENDING = 256  # queued client messages awaiting an answer (pipelining depth)
MAX_STATEMENTS = 256  # prepared statements remembered per connection (name → text)
MAX_PORTALS = 64
# Queued client messages.
_STARTUP, _QUERY, _PARSE, _BIND, _DESCRIBE, _EXECUTE, _CLOSE, _SYNC, _FUNCTION, _LOST = range(10)
_METHOD = {_QUERY: "Query", _PARSE: "Parse", _BIND: "Bind", _DESCRIBE: "Describe",
           _EXECUTE: "Execute", _CLOSE: "Close", _SYNC: "Sync", _FUNCTION: "FunctionCall",
           _LOST: "Execute"}
_RECORDED = frozenset((_QUERY, _EXECUTE, _FUNCTION, _LOST))  # ops that make records
_BATCH_END = frozenset((_STARTUP, _QUERY, _SYNC, _FUNCTION, _LOST))  # answered by Z
# Server messages each op accepts; N (notice), A (notification), S (parameter status) may come
# at any time and belong to no op.
_FITS = {
    _STARTUP: frozenset(b"RKvZE"),
    _QUERY: frozenset(b"TDCIEZGHWdc"),
    _PARSE: frozenset(b"1E"),
    _BIND: frozenset(b"2E"),
    _DESCRIBE: frozenset(b"tTnE"),
    _EXECUTE: frozenset(b"DCIsEGHWdc"),
    _CLOSE: frozenset(b"3E"),
    _SYNC: frozenset(b"ZE"),
    _FUNCTION: frozenset(b"VEZ"),
    _LOST: frozenset(SERVER_LENGTHS),
}
_ASYNC = frozenset(b"NAS")
_DONE = frozenset(b"CIs")  # CommandComplete, EmptyQueryResponse, PortalSuspended

COUNTERS = (
    "unparsed_bytes",  # bytes that belong to no record (lost framing, undecided role, orphans)
    "sync_losses",  # times a direction's framing was lost
    "resyncs",  # times it was found again
    "orphan_responses",  # server messages that answer nothing queued
    "unanswered_requests",  # Executes/Queries never answered (closed, lost, queue overflow)
    "skipped_requests",  # Executes the server skipped after an earlier error in their batch
    "truncated",  # messages whose kept text (statement, name) was cut by the capture
    "startup_errors",  # ErrorResponse during start-up/authentication (no record)
    "tls_bytes",  # after SSLRequest answered 'S' (or GSSENCRequest 'G'): encrypted, not parsed
    "parser_errors",  # internal errors caught by the guard in feed(); should stay 0
)


# Statement boundaries: literals, quoted identifiers and comments may hold ';'.
_STATEMENT_TOKENS = re.compile(
    r"""
      [Ee]'(?:[^'\\]|''|\\.)*'?
    | '(?:[^']|'')*'?
    | "(?:[^"]|"")*"?
    | --[^\n]*
    | /\*.*?(?:\*/|\Z)
    | \$(?P<tag>(?:[A-Za-z_][A-Za-z0-9_]*)?)\$.*?(?:\$(?P=tag)\$|\Z)
    | (?P<semi>;)
    """,
    re.VERBOSE | re.DOTALL,
)
_COMMENTS = re.compile(r"--[^\n]*|/\*.*?(?:\*/|\Z)", re.DOTALL)


def split_statements(sql: str) -> list[str]:
    """The statements of a simple Query, as the server runs them (empty ones skipped)."""
    out: list[str] = []
    start = 0
    for m in _STATEMENT_TOKENS.finditer(sql):
        if m.group("semi"):
            part = sql[start : m.start()]
            if _COMMENTS.sub(" ", part).strip():
                out.append(part.strip())
            start = m.end()
    part = sql[start:]
    if _COMMENTS.sub(" ", part).strip():
        out.append(part.strip())
    return out


@functools.lru_cache(maxsize=4096)
def _describe(sql: str, mask: bool, limit: int) -> tuple[str, str]:
    """(query text as records carry it, endpoint) of one statement. A trailing ';' is dropped,
    so a statement reads the same sent alone (Parse, Query) or split out of a longer Query."""
    text = statement_text(sql.rstrip(" \t\r\n;"), mask=mask, limit=limit)
    return text, statement_endpoint(text)


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


_CUT_WORD = re.compile(r"[A-Za-z0-9_$\x80-\uffff]+\Z")


def _text(raw: bytes, cut: bool) -> str:
    """Statement text; when the capture cut it, without the last (maybe partial) word, so a
    cut "FROM pgbench_acc" never becomes an endpoint."""
    text = _decode(raw)
    return _CUT_WORD.sub("", text) if cut else text


def _visible_parse(payload: bytes) -> str:
    """The statement text visible in a Parse at the start of ``payload`` (may be cut)."""
    if payload[:1] != b"P" or len(payload) < 7:
        return ""
    start = payload.find(b"\0", 5, 5 + MAX_NAME) + 1
    if start <= 0:
        return ""
    end = payload.find(b"\0", start)
    return _text(payload[start : end if end >= 0 else len(payload)], end < 0)


class _Op:
    """A client message the server will answer; Executes and Queries become records."""

    __slots__ = ("kind", "sql", "name", "statements", "done", "start_ns", "req_bytes",
                 "resp_bytes", "lost", "failed", "executes")  # fmt: skip

    def __init__(self, kind: int, start_ns: int, sql: str = "", name: str = "") -> None:
        self.kind = kind
        self.sql = sql  # statement text (raw: masked when the record is made)
        self.name = name  # prepared statement name, if any
        self.statements: list[str] = []  # a Query's statements
        self.done = 0  # a Query's statements answered so far
        self.start_ns = start_ns
        self.req_bytes = 0
        self.resp_bytes = 0
        self.lost = False  # part of its answer was in bytes that could not be framed
        self.failed = False  # a Query's statement failed: the rest are not run
        self.executes = True  # a placeholder: whether its unseen messages hold an Execute


class PostgresConnection:
    """PostgreSQL reassembly for one TCP connection: feed its events in order, flush at close.

    ``role`` is "client" (it connected: out = frontend messages), "server" (it accepted) or
    "unknown" (decided from the bytes, see the module docstring).
    """

    __slots__ = ("role", "counters", "ops", "statements", "portals", "_mask", "_limit",
                 "_client", "_server", "_client_out", "_tls", "_skipping", "_batch_op",
                 "_req_carry", "_req_carry_ns", "_resp_carry", "_last_record", "_completed",
                 "_answered_ns", "_turn")  # fmt: skip

    def __init__(self, role: str = "unknown", options: ParserOptions | None = None) -> None:
        if role not in ("client", "server", "unknown"):
            raise ValueError(f"role must be client, server or unknown, not {role!r}")
        self.role = role
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.ops: deque[_Op] = deque()  # answered in order
        self.statements: dict[str, str] = {}  # prepared statement name → text
        self.portals: dict[str, tuple[str, str]] = {}  # portal → (statement name, text)
        self._mask = options.mask_sql_literals if options is not None else True
        self._limit = options.max_query_chars if options is not None else MAX_QUERY_CHARS
        self._client = Framer(self, client=True, lost=False)
        self._client.untyped = True
        self._server = Framer(self, client=False, lost=False)
        self._client_out = role == "client"
        self._tls = False
        self._skipping = False  # after an error the server ignores messages up to Sync
        self._batch_op: _Op | None = None  # the record op of the batch being written
        self._req_carry = 0  # request bytes not yet given to a record
        self._req_carry_ns = -1
        self._resp_carry = 0  # response bytes not yet given to a record
        self._last_record: Request | None = None  # made by the current event
        self._completed: list[Request] = []
        self._answered_ns = -1  # the last event of the server's answers, before this one
        self._turn = False  # the server wrote since the client last did

    # -- events -----------------------------------------------------------------------------
    def feed(self, direction: str, ts_ns: int, size: int, payload: bytes) -> list[Request]:
        """One syscall's event ("out": this process wrote, "in": it read); returns the
        requests whose answers this event completed."""
        self._last_record = None
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
        if self._tls:
            self.counters["tls_bytes"] += max(size, len(payload))
            return
        if self.role == "unknown" and not self._decide_role(out, size, payload):
            self.counters["unparsed_bytes"] += max(size, len(payload))
            return
        if out == self._client_out:
            self._client.feed(ts, size, payload)
            self._turn = False
        else:
            self._server.feed(ts, size, payload)
            self._answered_ns = ts
            self._turn = True

    def flush(self, ts_ns: int) -> list[Request]:
        """The connection closed: answers in progress end incomplete; the rest is unanswered."""
        self._last_record = None
        try:
            while self.ops:
                self._abandon(self.ops.popleft(), ts_ns)
        except Exception:
            self._reset_after_error(0)
        self.ops.clear()
        completed = self._completed
        self._completed = []
        return completed

    def _decide_role(self, out: bool, size: int, payload: bytes) -> bool:
        """Role from bytes: a start-up packet or messages only one side sends."""
        if whole_startup(payload[:size]):
            sender_is_client = True
            self._client.untyped = True
            self._server.lost = False
        else:
            as_client = walk(payload[:size], size, client=True)
            as_server = walk(payload[:size], size, client=False)
            client_says = as_client is not None and as_client[1]
            server_says = as_server is not None and as_server[1]
            if client_says == server_says:
                return False
            sender_is_client = client_says
            # This direction frames from here; the other is found later (resync).
            self._client.untyped = False
            self._client.lost = not sender_is_client
            self._server.lost = sender_is_client
        self._client_out = out == sender_is_client
        self.role = "client" if self._client_out else "server"
        return True

    def _reset_after_error(self, nbytes: int) -> None:
        self.counters["parser_errors"] += 1
        self.counters["unparsed_bytes"] += nbytes
        for stream in (self._client, self._server):
            stream.lost = True
            stream.header.clear()
            stream.body.clear()
            stream.mtype = -1
        for op in self.ops:
            op.lost = True

    # -- called by the streams --------------------------------------------------------------
    def unframed(self, client: bool, nbytes: int) -> None:
        """Bytes of a lost stream: part of the answer in progress, or of nothing."""
        if nbytes <= 0:
            return
        if not client and self.ops:
            self.ops[0].resp_bytes += nbytes
        elif client and self._batch_op is not None:
            self._batch_op.req_bytes += nbytes
        else:
            self.counters["unparsed_bytes"] += nbytes

    def stream_lost(self, client: bool, ts: int, nbytes: int, typed: bool) -> None:
        """``nbytes``: what is left of the event from the lost header on."""
        self.counters["sync_losses"] += 1
        if client and typed:
            # Messages we cannot see are being sent: whatever they are, their answers come
            # before those of later messages. A placeholder takes them, up to a ReadyForQuery.
            last = self.ops[-1] if self.ops else None
            sql = last.sql if last is not None and last.kind in (_PARSE, _BIND) else ""
            op = _Op(_LOST, ts, sql)  # the batch's earlier messages are carried: its start
            op.lost = True
            op.executes = nbytes > 5  # more than a Sync is unseen
            self._queue(op)
            self._take_carry(op)
            self._batch_op = op
        else:
            for op in self.ops:
                op.lost = True
        self.unframed(client, nbytes)

    def lost_request(self, ts: int, size: int, payload: bytes) -> None:
        """A client event whose messages cannot be framed. Written after the server answered,
        it is a new batch (clients that do not pipeline write one per round trip): a
        placeholder takes its answers, with what is visible of its statement."""
        length = int.from_bytes(payload[1:5], "big") if len(payload) >= 5 else 0
        if not self._turn or payload[:1] not in (b"P", b"B") or not 8 <= length < size:
            self.unframed(True, size)  # not visibly the start of a batch: count it, no more
            return
        if self._server.lost and self.ops:
            self._answers_over(ts)
        op = _Op(_LOST, ts, _visible_parse(payload))
        op.lost = True
        # Bind..Execute..Sync, or Parse followed by more than a Sync: an Execute, most likely.
        op.executes = payload[:1] == b"B" or size > length + 1 + 5
        self._queue(op)
        self._take_carry(op)
        op.req_bytes += size
        self._batch_op = op

    def encryption_answer(self, answer: int) -> None:
        if answer in b"SG":  # TLS / GSSAPI encryption from here on: nothing to parse
            self._tls = True

    def startup_packet(self, code: int, nbytes: int, start_ns: int, end_ns: int) -> None:
        if code in (SSL_REQUEST, GSSENC_REQUEST):
            self._server.replies += 1
        elif code >> 16 == 3:
            self._client.untyped = False
            self._queue(_Op(_STARTUP, start_ns))
        # Start-up and authentication bytes belong to no record, by design.

    # -- client messages --------------------------------------------------------------------
    def client_message(self, t: int, body: bytes, nbytes: int, start_ns: int, cut: bool) -> None:
        if cut:
            self.counters["truncated"] += 1
        if t == 0x70:  # password / SASL: never read, never counted into a record
            return
        if t in b"QPBF" and self._server.lost and self.ops:
            self._answers_over(start_ns)
        if self._skipping:
            if t != 0x53:  # the server discards everything up to Sync
                self._attach_request(nbytes, start_ns)
                return
            self._skipping = False
        op: _Op | None = None
        if t == 0x51:  # Query
            op = _Op(_QUERY, start_ns, _text(body.rstrip(b"\0"), body[-1:] != b"\0"))
            op.statements = split_statements(op.sql)
        elif t == 0x50:  # Parse: name, query
            end = cstring_end(body, 0)
            if end > 0:
                name = _decode(body[: end - 1])
                qend = body.find(b"\0", end)
                sql = _text(body[end : qend if qend >= 0 else len(body)], qend < 0)
                self._remember(self.statements, name, sql, MAX_STATEMENTS)
                op = _Op(_PARSE, start_ns, sql, name)
        elif t == 0x42:  # Bind: portal, statement
            end = cstring_end(body, 0)
            if end > 0:
                portal = _decode(body[: end - 1])
                send = body.find(b"\0", end)
                name = _decode(body[end : send if send >= 0 else len(body)])
                sql = self.statements.get(name, "")
                self._remember(self.portals, portal, (name, sql), MAX_PORTALS)
                op = _Op(_BIND, start_ns, sql, name)
        elif t == 0x45:  # Execute: portal
            portal = _decode(body[: max(0, body.find(b"\0"))])
            name, sql = self.portals.get(portal, ("", ""))
            op = _Op(_EXECUTE, start_ns, sql, name)
        elif t == 0x44:  # Describe
            op = _Op(_DESCRIBE, start_ns)
        elif t == 0x43:  # Close: forget the statement or portal
            name = _decode(body[1 : max(1, body.find(b"\0"))])
            if body[:1] == b"S":
                self.statements.pop(name, None)
            else:
                self.portals.pop(name, None)
            op = _Op(_CLOSE, start_ns)
        elif t == 0x53:  # Sync
            op = _Op(_SYNC, start_ns)
        elif t == 0x46:  # FunctionCall
            op = _Op(_FUNCTION, start_ns)
        # Flush, Terminate, CopyData/Done/Fail and password messages are answered by nothing
        # of their own: their bytes belong to the batch in progress.
        if op is None:
            batch = self._batch_op
            if t in b"dcf" and batch is not None and batch in self.ops:
                batch.req_bytes += nbytes  # COPY data: part of the statement copying it in
                return
            self._attach_request(nbytes, start_ns)
            if t == 0x58:  # Terminate
                self._end_batch()
            return
        self._queue(op)
        if op.kind in _RECORDED:
            op.req_bytes = nbytes
            self._take_carry(op)
            self._batch_op = op
        else:
            if self._batch_op is not None and self._batch_op.kind != _EXECUTE:
                self._batch_op = None  # a Query or FunctionCall is a batch of its own
            self._attach_request(nbytes, start_ns)
            if op.kind == _SYNC:
                self._end_batch()

    @staticmethod
    def _remember(table: dict[str, _V], key: str, value: _V, limit: int) -> None:
        table.pop(key, None)
        table[key] = value
        if len(table) > limit:
            del table[next(iter(table))]

    def _queue(self, op: _Op) -> None:
        self.ops.append(op)
        if len(self.ops) > MAX_PENDING:
            dropped = self.ops.popleft()
            if dropped.kind in _RECORDED:
                self.counters["unanswered_requests"] += 1

    def _attach_request(self, nbytes: int, start_ns: int) -> None:
        """Bytes of a message that makes no record: the next Execute/Query of the batch takes
        them (Parse, Bind, Describe come before it), or, at the batch's end, the last one."""
        if self._req_carry_ns < 0:
            self._req_carry_ns = start_ns
        self._req_carry += nbytes

    def _end_batch(self) -> None:
        """Sync (or Terminate): trailing bytes go to the batch's record if it is still
        waiting for its answer, else to the next one; the next batch starts its own clock."""
        op = self._batch_op
        if op is not None and op in self.ops:
            op.req_bytes += self._req_carry
            self._req_carry = 0
        self._req_carry_ns = -1
        self._batch_op = None

    def _take_carry(self, op: _Op) -> None:
        if self._req_carry_ns >= 0:
            op.start_ns = min(op.start_ns, self._req_carry_ns)
        op.req_bytes += self._req_carry
        self._req_carry = 0
        self._req_carry_ns = -1

    def _answers_over(self, ts: int) -> None:
        """A client sends its next request only after ReadyForQuery (unless it pipelines): while
        the answers are lost, a new request ends every batch queued before it."""
        last_end = max((i for i, op in enumerate(self.ops) if op.kind in _BATCH_END), default=-1)
        for _ in range(last_end + 1):
            self._abandon(self.ops.popleft(), ts)

    # -- server messages --------------------------------------------------------------------
    def server_message(self, t: int, body: bytes, nbytes: int, ts: int) -> None:
        if t in _ASYNC:
            if self.ops:
                self.ops[0].resp_bytes += nbytes
            else:
                self._resp_carry += nbytes
            return
        head = self._head_for(t, ts)
        if head is None:
            self.counters["orphan_responses"] += t in b"CEZIs"
            self.counters["unparsed_bytes"] += nbytes
            return
        head.resp_bytes += nbytes
        kind = head.kind
        if t == 0x45:  # ErrorResponse
            self._error(head, sqlstate(body) or "ERROR", ts)
        elif t in _DONE:
            empty = t == 0x49  # EmptyQueryResponse: the text was blank or only comments
            if kind == _EXECUTE:
                self.ops.popleft()
                self._record(head, "OK", False, ts, sql="" if empty else None, empty=empty)
            elif kind in (_QUERY, _LOST):  # stays queued until ReadyForQuery
                self._statement_done(head, "OK", False, ts, empty)
        elif t == 0x5A:  # ReadyForQuery
            self.ops.popleft()
            if kind == _STARTUP:
                return  # authenticated: start-up bytes belong to no record
            if kind in (_QUERY, _FUNCTION) and head.lost and not head.done:
                self._statement_done(head, "", False, ts)  # its completion was in lost bytes
            self._give_response(head.resp_bytes)
            if body == b"I":  # no transaction: every portal is gone
                self.portals.clear()
        elif t == 0x56 and kind == _FUNCTION:  # FunctionCallResponse (Z follows)
            self._record(head, "OK", False, ts)
            head.done = 1
        elif (
            (t == 0x31 and kind == _PARSE) or (t == 0x32 and kind == _BIND)
            or (t == 0x33 and kind == _CLOSE) or (t in b"Tn" and kind == _DESCRIBE)
        ):
            self.ops.popleft()  # answered; its bytes go to the batch's record
            self._resp_carry += head.resp_bytes
        # else: rows, row descriptions, copy messages of the op at the head

    def _head_for(self, t: int, ts: int) -> _Op | None:
        """The queued op this server message answers. Answers come in order, so ops before
        the first that accepts it were answered in bytes we could not frame."""
        ops = self.ops
        for i, op in enumerate(ops):
            if i >= 64:
                break
            if t in _FITS[op.kind]:
                for _ in range(i):
                    self._abandon(ops.popleft(), ts)
                return op
        return None

    def _abandon(self, op: _Op, ts: int) -> None:
        """An op whose answer will not be seen: a record (incomplete, status unknown) if part
        of its answer was seen or lost, else counted unanswered."""
        kind = op.kind
        if kind not in _RECORDED:
            if kind != _STARTUP:
                self._resp_carry += op.resp_bytes
            return
        if op.failed or (op.done and (kind != _QUERY or op.done >= len(op.statements))):
            self._give_response(op.resp_bytes)  # answered, only its ReadyForQuery is missing
        elif kind == _LOST and not op.executes:
            self._resp_carry += op.resp_bytes  # a Parse and a Sync, most likely
        elif op.lost or op.resp_bytes:
            op.lost = True  # its answer ended in bytes we could not frame: by the last answer
            self._statement_done(op, "", False, max(self._answered_ns, op.start_ns))
        else:
            self.counters["unanswered_requests"] += 1

    def _error(self, head: _Op, status: str, ts: int) -> None:
        kind = head.kind
        if kind == _STARTUP:
            self.ops.popleft()
            self.counters["startup_errors"] += 1
            self.counters["unparsed_bytes"] += head.resp_bytes
            return
        if kind == _QUERY:
            self._statement_done(head, status, True, ts)
            head.failed = True
            return
        if kind in (_SYNC, _FUNCTION):  # Z follows
            self._record(head, status, True, ts)
            head.done = 1
            return
        if kind == _LOST:
            self._statement_done(head, status, True, ts)
            head.failed = True
            return
        # Extended protocol: the server skips the rest of the batch, up to Sync.
        failed: list[_Op] = []
        while self.ops and self.ops[0].kind != _SYNC:
            failed.append(self.ops.popleft())
        if not self.ops:
            self._skipping = True  # the Sync is still to be written
        executes = [op for op in failed if op.kind == _EXECUTE]
        target = executes[0] if executes else head
        self.counters["skipped_requests"] += max(0, len(executes) - 1)
        target.req_bytes = sum(op.req_bytes for op in failed)
        target.resp_bytes = sum(op.resp_bytes for op in failed)
        target.lost = any(op.lost for op in failed)
        if target.kind != _EXECUTE:
            self._take_carry(target)
            target.sql = target.sql or failed[0].sql
        self._record(target, status, True, ts)

    def _statement_done(self, op: _Op, status: str, error: bool, ts: int,
                        empty: bool = False) -> None:
        """One statement of a simple Query (or of a lost batch, or a FunctionCall) was answered:
        CommandComplete, EmptyQueryResponse or ErrorResponse. Ops stay queued until Z."""
        if op.failed:
            return
        i = op.done
        sql = op.sql
        if op.kind == _QUERY:
            # More answers than statements found (a body with ';' inside): the whole text.
            sql = op.statements[i] if i < len(op.statements) else op.sql
        record = self._record(op, status, error, ts, sql="" if empty else sql, empty=empty)
        op.done = i + 1
        op.start_ns = record.end_ns  # the next statement starts where this one ended

    def _give_response(self, nbytes: int) -> None:
        """Bytes answering a Sync/Query (ReadyForQuery): to the record just made, if any."""
        if self._last_record is not None:
            self._last_record.response_bytes += nbytes
        else:
            self._resp_carry += nbytes

    def _record(self, op: _Op, status: str, error: bool, ts: int, sql: str | None = None,
                empty: bool = False) -> Request:
        text = op.sql if sql is None else sql
        if text:
            query, endpoint = _describe(text, self._mask, self._limit)
        else:  # text never seen (prepared before the probe started, or lost)
            query, endpoint = "", "UNKNOWN"
        if empty:
            endpoint = "EMPTY"
        elif op.kind == _FUNCTION:
            endpoint = "FUNCTION"
        elif not endpoint:
            endpoint = "UNKNOWN"
        resp = op.resp_bytes + self._resp_carry
        self._resp_carry = 0
        record = Request(
            protocol=PROTOCOL,
            side=self.role,
            method=_METHOD.get(op.kind, "Execute"),
            endpoint=endpoint,
            raw_path=op.name[:MAX_NAME],
            status=status,
            error=error,
            start_ns=op.start_ns,
            end_ns=ts,
            request_bytes=op.req_bytes,
            response_bytes=resp,
            complete=not op.lost,
            query=query,
        )
        op.req_bytes = op.resp_bytes = 0
        self._completed.append(record)
        self._last_record = record
        return record
