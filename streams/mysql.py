"""MySQL / MariaDB client/server protocol for one TCP connection.

Every message is a packet (``mysql_wire``: a 3-byte length, a sequence id, the payload; a
payload of 0xFFFFFF bytes continues in the next packet, which is never interpreted on its
own). Packets are framed from their lengths alone: payload bytes the probe did not capture
(``size > len(payload)``) are skipped by count; only a packet *header* inside such a gap
loses the framing.

The connection goes through these phases (the server speaks first)::

    START ─ greeting (protocol 10) ─► HANDSHAKE ─ HandshakeResponse ─► AUTH ─ OK ─► COMMAND
                                               └─ SSLRequest ─► OPAQUE (TLS: bytes counted)
    START ─ a command packet (seq 0) ─► COMMAND  (connection open before the probe started)

Auth data (scrambles, passwords, tokens) is never read: only the capability flags of the
HandshakeResponse are. In COMMAND each client packet with sequence id 0 is a command and
becomes one ``Request``; its response is framed by its kind:

    simple      OK / ERR / EOF / a string (COM_PING, COM_INIT_DB, COM_STATISTICS, ...)
    result      OK | ERR | LOCAL INFILE request (0xFB: the client then sends the file) |
                column count, column definitions, [EOF], rows, EOF-or-OK terminator; an OK or
                EOF flagged SERVER_MORE_RESULTS_EXISTS starts the next result (CALL, multi
                statements). Text rows (COM_QUERY) and binary rows (COM_STMT_EXECUTE) alike.
    prepare     PREPARE_OK (statement id, parameter and column counts), their definitions
                (each block followed by EOF unless CLIENT_DEPRECATE_EOF) | ERR. The statement
                text is kept by id, so COM_STMT_EXECUTE records carry it.
    rows        rows until an EOF-or-OK terminator or ERR (COM_STMT_FETCH, COM_FIELD_LIST)
    none        COM_QUIT, COM_STMT_CLOSE, COM_STMT_SEND_LONG_DATA: never answered, recorded
                with status "" and no latency

Records: ``method`` is the command (COM_QUERY, COM_STMT_EXECUTE, ...); ``status`` "OK", or
the ERR packet's error code ("1146", with ``error``); ``query`` the statement text (masked,
bounded; a prepared statement's for EXECUTE/FETCH/RESET/CLOSE; the schema for INIT_DB).
The metric ``endpoint`` is ``VERB table`` for commands that run SQL (COM_QUERY, and
COM_STMT_EXECUTE/FETCH by their PREPARE's text) and the command name for all others.

Capabilities (CLIENT_DEPRECATE_EOF, MariaDB's metadata caching) come from the handshake; on a
connection seen mid-way they are unknown and the packet after a block of column definitions
is told apart by length: an EOF packet is exactly 5 bytes, an OK terminator at least 7.

When a gap hides a packet header, the direction is *lost*: a lost response ends (incomplete)
when the client sends its next command, and the server's next event starts a packet again; a
lost request ends when the server answers. The first header after such a resync must carry
the sequence id the exchange expects, or the event is dropped and the next one tried. Nothing
raises out of ``feed``/``flush``: a last-resort guard counts ``parser_errors`` and
resynchronises.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from .mysql_wire import (
    CLIENT_COMPRESS,
    CLIENT_DEPRECATE_EOF,
    CLIENT_LONG_PASSWORD,
    CLIENT_OPTIONAL_RESULTSET_METADATA,
    CLIENT_PROTOCOL_41,
    CLIENT_SSL,
    COM_CHANGE_USER,
    COM_INIT_DB,
    COM_QUERY,
    COM_RESET_CONNECTION,
    COM_STMT_CLOSE,
    COM_STMT_PREPARE,
    COMMANDS,
    KIND_AUTH,
    KIND_NONE,
    KIND_PREPARE,
    KIND_ROWS,
    KIND_SIMPLE,
    MAX_PAYLOAD,
    PROGRESS_REPORT,
    SERVER_MORE_RESULTS_EXISTS,
    SERVER_STATUS_CURSOR_EXISTS,
    STMT_LAST_PREPARED,
    Framer,
    error_code,
    is_command,
    is_greeting,
    lenenc,
    query_bytes,
    status_flags,
)
from .record import Request
from .sql import MAX_QUERY_CHARS, statement_endpoint, statement_text

if TYPE_CHECKING:  # protocols imports this module to build its registry
    from .protocols import ParserOptions

MAX_PENDING = 64  # commands waiting for their response (pipelining depth)
MAX_STATEMENTS = 512  # prepared statements remembered per connection
RESPONSE_KEEP = 64  # payload bytes kept of a response packet: headers, codes, status flags
HANDSHAKE_KEEP = 32  # of a HandshakeResponse: capability flags, never the auth data after them

# Commands that run a prepared statement: their metric endpoint is the statement's.
_RUNS_STATEMENT = frozenset((0x17, 0x1C, 0xFA))
_NAMES_STATEMENT = frozenset((0x17, 0x18, 0x19, 0x1A, 0x1C, 0xFA))

# Phases.
_START, _HANDSHAKE, _AUTH_PHASE, _COMMAND, _OPAQUE = range(5)

# Response states of a command.
_R_FIRST, _R_COLUMNS, _R_AFTER_COLUMNS, _R_ROWS, _R_INFILE = range(5)
_R_PARAMS, _R_PARAMS_END, _R_PCOLUMNS, _R_PCOLUMNS_END, _R_MAYBE_EOF = range(5, 10)

COUNTERS = (
    "unparsed_bytes",  # bytes that belong to no record
    "sync_losses",  # times framing was lost (a packet header in a gap, a nonsensical packet)
    "resyncs",  # times a lost direction picked up again at an event boundary
    "orphan_responses",  # responses with no command waiting
    "unanswered_requests",  # commands still waiting at close, or dropped from a full FIFO
    "unknown_statements",  # executes of a statement prepared before the probe saw it
    "login_errors",  # handshakes the server refused (ERR during authentication)
    "tls_sessions",  # connections switched to TLS by an SSLRequest: parsing stops
    "compressed_sessions",  # connections using the compressed protocol: parsing stops
    "opaque_bytes",  # bytes after such a switch
    "parser_errors",  # internal errors caught by the guard in feed(); should stay 0
)


def detect(buf: bytes) -> bool:
    """True if ``buf`` is exactly one MySQL packet: a server greeting (protocol 10 and a
    version string) or a client command whose 3-byte length agrees with the bytes."""
    return is_greeting(buf) or is_command(buf, len(buf))


class _Command:
    """One command and what has been seen of its response."""

    __slots__ = ("code", "method", "kind", "query", "endpoint", "start_ns", "last_ns",
                 "request_bytes", "response_bytes", "complete", "state", "remaining",
                 "columns", "status", "statement", "next_seq")  # fmt: skip

    def __init__(self, code: int, start_ns: int, nbytes: int) -> None:
        self.code = code
        self.method, self.kind = COMMANDS.get(code, (f"COM_UNKNOWN_{code:02X}", KIND_SIMPLE))
        self.query = ""
        self.endpoint = self.method
        self.start_ns = start_ns
        self.last_ns = start_ns
        self.request_bytes = nbytes
        self.response_bytes = 0
        self.complete = True
        self.state = _R_FIRST
        self.remaining = 0  # column or parameter definitions still to come
        self.columns = 0  # of a prepared statement, after its parameters
        self.status = ""  # what the response showed so far, for a record ended early
        self.statement: tuple[str, str] | None = None  # (query, endpoint) a PREPARE names
        self.next_seq = 1  # sequence id of the next packet of this exchange, either way


class MysqlConnection:
    """MySQL/MariaDB protocol for one TCP connection: feed its events in order, flush at close.

    ``role`` is "client" (it connected: out = commands), "server" (it accepted: in =
    commands) or "unknown" (decided by the first greeting or command packet seen).
    """

    def __init__(self, role: str = "unknown", options: ParserOptions | None = None) -> None:
        if role not in ("client", "server", "unknown"):
            raise ValueError(f"role must be client, server or unknown, not {role!r}")
        self.role = role
        self.mask_literals = options.mask_sql_literals if options is not None else True
        self.max_query_chars = options.max_query_chars if options is not None else MAX_QUERY_CHARS
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.phase = _START
        self.server_caps: int | None = None
        self.caps: int | None = None  # negotiated capabilities; None: not seen
        self.pending: deque[_Command] = deque()  # commands waiting for their response, FIFO
        self.statements: dict[int, tuple[str, str]] = {}  # statement id → (query, endpoint)
        self._last_prepared: tuple[str, str] | None = None
        self._sending: _Command | None = None  # the command whose packets are being sent
        self._eof_seen: bool | None = None  # EOF after column definitions, when caps unknown
        self._client_out: bool | None = None if role == "unknown" else role == "client"
        self._framers = {True: Framer(self, True), False: Framer(self, False)}
        self._completed: list[Request] = []
        self._text_keep = 4 * self.max_query_chars + 8

    # -- events -----------------------------------------------------------------------------
    def feed(self, direction: str, ts_ns: int, size: int, payload: bytes) -> list[Request]:
        """One syscall's event ("out": this process wrote, "in": it read); returns the
        commands whose responses this event completed."""
        try:
            self._feed(direction == "out", ts_ns, size, payload)
        except Exception:  # never let one connection's bytes take the worker down
            self._reset_after_error(max(size, len(payload)))
        completed, self._completed = self._completed, []
        return completed

    def _feed(self, out: bool, ts: int, size: int, payload: bytes) -> None:
        if size < len(payload):  # the syscall moved fewer bytes than were captured
            payload = payload[: max(size, 0)]
        size = max(size, len(payload))
        if size == 0:
            return
        if self.phase == _OPAQUE:
            self.counters["opaque_bytes"] += size
            return
        if self._client_out is None and not self._decide_role(out, size, payload):
            self.counters["unparsed_bytes"] += size
            return
        from_client = out == self._client_out
        requests = self._framers[True]
        if not from_client and requests.lost and not requests.resync:
            self._request_over()  # the server answers: the lost request is over
            requests.resync = True
        self._framers[from_client].feed(ts, size, payload)

    def flush(self, ts_ns: int) -> list[Request]:
        """The connection closed: commands still waiting are counted, not recorded."""
        if self.pending and self.pending[0].state == _R_MAYBE_EOF:
            self._finish(self.pending[0], self.pending[0].last_ns)
        self.counters["unanswered_requests"] += len(self.pending)
        self.pending.clear()
        self._sending = None
        completed, self._completed = self._completed, []
        return completed

    def _decide_role(self, out: bool, size: int, payload: bytes) -> bool:
        """A connection open before the probe started: who sends commands, who greets?"""
        if is_command(payload, size):
            self._client_out = out
            self.phase = _COMMAND  # past its handshake: capabilities stay unknown
        elif size == len(payload) and is_greeting(payload):
            self._client_out = not out
        else:
            return False
        self.role = "client" if self._client_out else "server"
        return True

    def _reset_after_error(self, nbytes: int) -> None:
        self.counters["parser_errors"] += 1
        self.counters["unparsed_bytes"] += nbytes
        self.counters["unanswered_requests"] += len(self.pending)
        self.pending.clear()
        self._sending = None
        for framer in self._framers.values():
            framer.lose()
            framer.resync = True

    # -- called by the framers ----------------------------------------------------------------
    def keep(self, from_client: bool, seq: int, first: int) -> int:
        """How many payload bytes of a packet to keep: the headers of responses, the SQL text
        of commands, the capability flags of a HandshakeResponse; of credentials (the rest of
        a HandshakeResponse, auth exchanges, COM_CHANGE_USER) nothing."""
        if not from_client:
            return RESPONSE_KEEP
        if seq != 0 or self.phase in (_HANDSHAKE, _AUTH_PHASE):
            return HANDSHAKE_KEEP if seq == 1 and self.phase in (_START, _HANDSHAKE) else 0
        return 1 if first == COM_CHANGE_USER else self._text_keep

    def swallow(self, from_client: bool, ts: int, nbytes: int) -> None:
        """Bytes of a lost direction: they belong to the message in progress, if any."""
        if nbytes <= 0:
            return
        if self.phase == _OPAQUE:
            self.counters["opaque_bytes"] += nbytes
            return
        cmd = self._message_in_progress(from_client)
        if cmd is None:
            self.counters["unparsed_bytes"] += nbytes
        elif from_client:
            cmd.request_bytes += nbytes
        else:
            cmd.response_bytes += nbytes
            cmd.last_ns = ts

    def lost_in_gap(self, from_client: bool, ts: int, nbytes: int) -> None:
        target = self._message_in_progress(from_client)
        if target is not None:
            target.complete = False
        self.swallow(from_client, ts, nbytes)

    def plausible_after_resync(self, from_client: bool, seq: int) -> bool:
        """Whether the first packet framed after a resync can be what it claims: a command
        (sequence id 0) or the next packet of the exchange in progress."""
        if self.phase != _COMMAND:
            return True
        if from_client:
            target = self._request_target()
            return seq == 0 or (target is not None and seq == target.next_seq)
        return bool(self.pending) and seq == self.pending[0].next_seq

    def packet(self, from_client: bool, start_ns: int, ts: int, seq: int, length: int,
               data: bytes, continues: bool) -> None:
        if from_client:
            self._client_packet(start_ns, ts, seq, length, data, continues)
        else:
            self._server_packet(ts, seq, length, data, continues)

    def _message_in_progress(self, from_client: bool) -> _Command | None:
        if from_client:
            return self._request_target()
        return self.pending[0] if self.pending else None

    # -- client → server ----------------------------------------------------------------------
    def _request_target(self) -> _Command | None:
        """The command that client bytes still belong to: a LOCAL INFILE upload or an
        authentication exchange in progress, else the command being sent."""
        if self.pending and self.pending[0].state == _R_INFILE:
            return self.pending[0]
        return self._sending

    def _request_over(self) -> None:
        """The server answers while the client's bytes were lost: the request has ended."""
        if self.pending and self.pending[0].state == _R_INFILE:
            self.pending[0].state = _R_FIRST
        self._sending = None

    def _client_packet(self, start_ns: int, ts: int, seq: int, length: int, data: bytes,
                       continues: bool) -> None:
        wire = length + 4
        phase = self.phase
        if phase == _COMMAND:
            if continues:  # the rest of a command of 16 MiB or more
                target = self._sending
            elif seq != 0 and self.pending and (self.pending[0].state == _R_INFILE
                                                or self.pending[0].kind == KIND_AUTH):
                target = self.pending[0]  # file contents, or an auth-switch reply
                if target.state == _R_INFILE and length == 0:  # the file's end
                    target.state = _R_FIRST
            elif seq == 0 and data:
                self._command(start_ns, ts, wire, data)
                return
            else:
                target = None
            if target is None:
                self.counters["unparsed_bytes"] += wire
            else:
                target.request_bytes += wire
                target.next_seq = (seq + 1) & 0xFF
            return
        if phase == _START:
            if seq == 0 and data:  # a connection already past its handshake
                self.phase = _COMMAND
                self._command(start_ns, ts, wire, data)
                return
            if seq != 1:  # not at a packet boundary: try again at the next event
                self.counters["unparsed_bytes"] += wire
                self._lose_until_next_event(True)
                return
            self.phase = _HANDSHAKE  # the greeting was missed; the response tells the flags
        if self.phase == _HANDSHAKE and seq == 1:
            self._handshake_response(length, data)
        # AUTH: scrambles and auth-switch replies, never read

    def _handshake_response(self, length: int, data: bytes) -> None:
        flags = int.from_bytes(data[:4], "little") if len(data) >= 4 else 0
        if not flags & CLIENT_PROTOCOL_41:
            flags &= 0xFFFF  # protocol 3.20: two bytes of flags
        elif len(data) >= 32 and self.server_caps is not None and not self.server_caps & 1:
            flags |= int.from_bytes(data[28:32], "little") << 32  # MariaDB extended flags
        caps = flags if self.server_caps is None else flags & self.server_caps
        self.caps = caps
        if flags & CLIENT_SSL and length == 32:  # SSLRequest: TLS from the next byte on
            self.counters["tls_sessions"] += 1
            self._go_opaque()
            return
        self.phase = _AUTH_PHASE

    def _go_opaque(self) -> None:
        self.phase = _OPAQUE
        for framer in self._framers.values():
            framer.stop()

    def _lose_until_next_event(self, from_client: bool) -> None:
        framer = self._framers[from_client]
        framer.lose()
        framer.resync = True

    def _command(self, start_ns: int, ts: int, wire: int, data: bytes) -> None:
        responses = self._framers[False]
        if responses.lost:  # the previous response's end was in a gap: it is over now
            while self.pending:
                self._finish(self.pending[0], self.pending[0].last_ns, complete=False)
            responses.resync = True
        elif self.pending and self.pending[0].state == _R_MAYBE_EOF:
            self._finish(self.pending[0], self.pending[0].last_ns)
        code = data[0]
        cmd = _Command(code, start_ns, wire)
        if code in (COM_QUERY, COM_STMT_PREPARE):
            cmd.query = statement_text(query_bytes(data[1:]), mask=self.mask_literals,
                                       limit=self.max_query_chars)
            if code == COM_QUERY:
                cmd.endpoint = statement_endpoint(cmd.query)
            else:
                cmd.statement = self._last_prepared = (cmd.query, statement_endpoint(cmd.query))
        elif code in _NAMES_STATEMENT and len(data) >= 5:
            stmt_id = int.from_bytes(data[1:5], "little")
            if stmt_id == STMT_LAST_PREPARED:
                statement = self._last_prepared
            elif code == COM_STMT_CLOSE:
                statement = self.statements.pop(stmt_id, None)
            else:
                statement = self.statements.get(stmt_id)
            if statement is not None:
                cmd.query = statement[0]
                if code in _RUNS_STATEMENT:
                    cmd.endpoint = statement[1]
            elif code in _RUNS_STATEMENT:
                self.counters["unknown_statements"] += 1
        elif code == COM_INIT_DB:
            cmd.query = data[1:65].decode("utf-8", "replace")
        if cmd.kind == KIND_NONE:
            self._sending = None
            self._record(cmd, ts, "", False)
            return
        self._sending = cmd
        self.pending.append(cmd)
        if len(self.pending) > MAX_PENDING:
            self.pending.popleft()
            self.counters["unanswered_requests"] += 1

    # -- server → client ----------------------------------------------------------------------
    def _server_packet(self, ts: int, seq: int, length: int, data: bytes, continues: bool) -> None:
        phase = self.phase
        if phase == _COMMAND:
            self._response_packet(ts, seq, length, data, continues)
        elif phase in (_START, _HANDSHAKE):
            if seq == 0 and data[:1] == b"\x0a":
                self._greeting(data)
            elif data[:1] == b"\xff":  # ERR instead of a greeting ("too many connections")
                self.counters["unparsed_bytes"] += length + 4
                self.counters["login_errors"] += 1
            else:  # mid-stream bytes: try again at the next event
                self.counters["unparsed_bytes"] += length + 4
                self._lose_until_next_event(False)
        elif phase == _AUTH_PHASE:
            first = data[:1]
            if first == b"\x00":
                if self.caps is not None and self.caps & CLIENT_COMPRESS:
                    self.counters["compressed_sessions"] += 1
                    self._go_opaque()
                else:
                    self.phase = _COMMAND
            elif first == b"\xff":
                self.counters["login_errors"] += 1
            # 0xFE auth switch, 0x01 more auth data: the exchange goes on

    def _greeting(self, data: bytes) -> None:
        nul = data.find(b"\x00", 1)
        pos = nul + 1 + 4 + 8 + 1  # version, connection id, scramble part 1, filler
        if nul < 0 or len(data) < pos + 2:
            return
        caps = int.from_bytes(data[pos : pos + 2], "little")
        if len(data) >= pos + 7:  # charset, status flags, then the upper two bytes
            caps |= int.from_bytes(data[pos + 5 : pos + 7], "little") << 16
        if not caps & CLIENT_LONG_PASSWORD and len(data) >= pos + 18:  # MariaDB
            caps |= int.from_bytes(data[pos + 14 : pos + 18], "little") << 32
        self.server_caps = caps
        self.phase = _HANDSHAKE

    def _response_packet(self, ts: int, seq: int, length: int, data: bytes,
                         continues: bool) -> None:
        if not self.pending:
            self.counters["unparsed_bytes"] += length + 4
            if seq == 1 and not continues:
                self.counters["orphan_responses"] += 1
            return
        cmd = self.pending[0]
        if cmd.state == _R_MAYBE_EOF:  # a PREPARE response that may end with an EOF
            if data[:1] == b"\xfe" and length == 5 and not continues:
                cmd.response_bytes += length + 4
                self._eof_seen = True
                self._finish(cmd, ts)
            else:  # it had ended: this packet answers the next command
                self._finish(cmd, cmd.last_ns)
                self._response_packet(ts, seq, length, data, continues)
            return
        cmd.response_bytes += length + 4
        cmd.last_ns = ts
        cmd.next_seq = (seq + 1) & 0xFF
        if continues:  # the rest of a row of 16 MiB or more
            return
        first = data[0] if data else -1
        if first == 0xFF:
            if error_code(data) == PROGRESS_REPORT:
                return
            self._finish(cmd, ts, status=str(error_code(data)), error=True)
            return
        state = cmd.state
        if state == _R_FIRST:
            self._first_response_packet(cmd, ts, length, data)
        elif state == _R_COLUMNS:
            cmd.remaining -= 1
            if cmd.remaining <= 0:
                cmd.state = _R_AFTER_COLUMNS
        elif state == _R_AFTER_COLUMNS:
            if self.caps is None:
                self._eof_seen = first == 0xFE and length == 5
            if first == 0xFE and length == 5:  # EOF after the column definitions
                if status_flags(data, length) & SERVER_STATUS_CURSOR_EXISTS:
                    self._finish(cmd, ts)  # rows come with COM_STMT_FETCH
                else:
                    cmd.state = _R_ROWS
            else:  # CLIENT_DEPRECATE_EOF: a row or the terminator already
                cmd.state = _R_ROWS
                self._row_packet(cmd, ts, length, data)
        elif state == _R_ROWS:
            self._row_packet(cmd, ts, length, data)
        elif state in (_R_PARAMS, _R_PCOLUMNS):
            cmd.remaining -= 1
            if cmd.remaining <= 0:
                self._definitions_done(cmd, ts, params=state == _R_PARAMS)
        elif state in (_R_PARAMS_END, _R_PCOLUMNS_END):
            params = state == _R_PARAMS_END
            if self.caps is None:
                self._eof_seen = first == 0xFE and length == 5
            if first == 0xFE and length == 5:  # the block's EOF
                if params and cmd.columns:
                    cmd.state, cmd.remaining = _R_PCOLUMNS, cmd.columns
                else:
                    self._finish(cmd, ts)
            elif params and cmd.columns:  # no EOF (CLIENT_DEPRECATE_EOF): a column already
                cmd.state, cmd.remaining = _R_PCOLUMNS, cmd.columns - 1
                if cmd.remaining <= 0:
                    self._definitions_done(cmd, ts, params=False)
            else:
                self._finish(cmd, ts, complete=False)
        # _R_INFILE: nothing but ERR is expected before the client has sent the file

    def _first_response_packet(self, cmd: _Command, ts: int, length: int, data: bytes) -> None:
        kind = cmd.kind
        first = data[0] if data else -1
        if kind == KIND_SIMPLE:  # OK, EOF, or a string (COM_STATISTICS)
            self._finish(cmd, ts)
        elif kind == KIND_AUTH:
            if first == 0x00:
                self.statements.clear()  # a new session: its statements are gone
                self._finish(cmd, ts)
            # 0xFE auth switch, 0x01 more data: the client answers, the exchange goes on
        elif kind == KIND_ROWS:
            cmd.state = _R_ROWS
            self._row_packet(cmd, ts, length, data)
        elif kind == KIND_PREPARE:
            if first != 0x00 or len(data) < 9:
                self._finish(cmd, ts, complete=False)
                return
            stmt_id = int.from_bytes(data[1:5], "little")
            columns = int.from_bytes(data[5:7], "little")
            params = int.from_bytes(data[7:9], "little")
            if cmd.statement is not None:
                self.statements[stmt_id] = cmd.statement
                if len(self.statements) > MAX_STATEMENTS:
                    del self.statements[next(iter(self.statements))]
            cmd.columns = columns
            cmd.status = "OK"
            if params:
                cmd.state, cmd.remaining = _R_PARAMS, params
            elif columns:
                cmd.state, cmd.remaining = _R_PCOLUMNS, columns
            else:
                self._finish(cmd, ts)
        elif first == 0x00 and not self._column_count_with_flag(length, data):
            if status_flags(data, length) & SERVER_MORE_RESULTS_EXISTS:
                cmd.status = "OK"  # the next result follows
            else:
                self._finish(cmd, ts)
        elif first == 0xFB and cmd.code == COM_QUERY:
            cmd.state = _R_INFILE  # LOCAL INFILE: the client sends the file, then OK/ERR
        elif first == 0xFE:
            self._finish(cmd, ts)
        else:
            self._result_set(cmd, length, data)

    def _column_count_with_flag(self, length: int, data: bytes) -> bool:
        """MySQL 8 with optional metadata: ``00 n`` is a column count, not an OK packet."""
        caps = self.caps or 0
        return bool(caps & CLIENT_OPTIONAL_RESULTSET_METADATA) and length < 7

    def _result_set(self, cmd: _Command, length: int, data: bytes) -> None:
        pos = 0
        follows = True
        if (self.caps or 0) & CLIENT_OPTIONAL_RESULTSET_METADATA:
            follows, pos = data[:1] == b"\x01", 1
        count = lenenc(data, pos)
        cmd.status = "OK"
        if count is None or not 0 < count[0] <= 0xFFFF:
            cmd.complete = False  # not a result set we understand: wait for a terminator
            cmd.state = _R_ROWS
            return
        if count[1] < length:  # MariaDB metadata caching: "metadata follows" flag
            follows = follows and data[count[1] : count[1] + 1] != b"\x00"
        if follows:
            cmd.state, cmd.remaining = _R_COLUMNS, count[0]
        else:
            cmd.state = _R_AFTER_COLUMNS

    def _row_packet(self, cmd: _Command, ts: int, length: int, data: bytes) -> None:
        # A text row starts with 0xFE only if its first value is 16 MiB or more, and then the
        # packet is full-size: a shorter packet starting with 0xFE is the terminator.
        if data[:1] == b"\xfe" and length < MAX_PAYLOAD:
            if status_flags(data, length) & SERVER_MORE_RESULTS_EXISTS:
                cmd.state = _R_FIRST
                cmd.status = "OK"
            else:
                self._finish(cmd, ts)

    def _definitions_done(self, cmd: _Command, ts: int, params: bool) -> None:
        """A block of a PREPARE response's definitions ended: an EOF, the next block, or the
        end follow, by CLIENT_DEPRECATE_EOF; when it is not known, by what the result sets on
        this connection showed, or else by the next packet's length."""
        eof = (not self.caps & CLIENT_DEPRECATE_EOF) if self.caps is not None else self._eof_seen
        if eof is None:
            if params and cmd.columns:
                cmd.state = _R_PARAMS_END  # EOF (5 bytes) or the first column definition
            else:
                cmd.state = _R_MAYBE_EOF  # done, unless an EOF follows
        elif eof:
            cmd.state = _R_PARAMS_END if params else _R_PCOLUMNS_END
        elif params and cmd.columns:
            cmd.state, cmd.remaining = _R_PCOLUMNS, cmd.columns
        else:
            self._finish(cmd, ts)

    # -- records ------------------------------------------------------------------------------
    def _finish(self, cmd: _Command, ts: int, status: str = "OK", error: bool = False,
                complete: bool = True) -> None:
        if self.pending and self.pending[0] is cmd:
            self.pending.popleft()
        if self._sending is cmd:
            self._sending = None
        if not complete:
            cmd.complete = False
            status = cmd.status
        elif cmd.code == COM_RESET_CONNECTION and not error:
            self.statements.clear()
        self._record(cmd, ts, status, error)

    def _record(self, cmd: _Command, ts: int, status: str, error: bool) -> None:
        self._completed.append(
            Request(
                protocol="mysql",
                side=self.role,
                method=cmd.method,
                endpoint=cmd.endpoint,
                raw_path="",
                status=status,
                error=error,
                start_ns=cmd.start_ns,
                end_ns=ts,
                request_bytes=cmd.request_bytes,
                response_bytes=cmd.response_bytes,
                complete=cmd.complete,
                query=cmd.query,
            )
        )
