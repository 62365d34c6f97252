"""RESP, the Redis wire format (RESP2 and RESP3): strict checks of whole values, and an
incremental framer for one direction of a connection.

Requests are arrays of bulk strings (``*3\\r\\n$3\\r\\nSET\\r\\n...``) or inline commands
(``PING\\r\\n``); replies are any RESP value: ``+`` ``-`` ``:`` ``$`` ``*`` and RESP3's ``_``
``#`` ``,`` ``(`` ``!`` ``=`` ``%`` ``~`` ``>`` ``|`` (plus the streamed ``$?``/``*?`` forms).
Every length is explicit, so a ``Reader`` frames values from their header lines and skips bulk
payloads by length, carrying its state across events::

    line ─► header ─┬─► scalar (+ - : _ # , () ───────────────────────► value done
                    ├─► bulk ($ ! = ;): skip length + CRLF, across gaps ─► value done
                    └─► aggregate (* ~ > % |): push a frame ─────────────► children …
    value done: pop finished frames; the stack empty ─► message done (to the Listener)
    any ─► LOST (garbage, a header line in a gap): bytes are counted, not parsed, until an
           event starts with a message header and the Listener agrees to resume there.

A whole command or scalar reply inside one payload (what most events carry) takes a fast
path. The probe's ``size > len(payload)`` gaps are crossed wherever they fall inside a bulk
string. Of each message only its first few scalar children are kept, bounded (``WORD``).
"""

from __future__ import annotations

import re
from typing import Protocol

from .redis_commands import COMMANDS, Argv

MAX_DEPTH = 64  # nested aggregates
MAX_LINE = 1 << 16  # an inline command or simple string line (Redis: 64 KiB inline)
KEEP_LINE = 512  # bytes of a line kept for parsing; the rest is counted
MAX_HEADER = 24  # "$<length>" and "*<count>" lines are short; longer is garbage
MAX_LENGTH = 1 << 40  # bulk length / element count accepted
WORD = 128  # bytes kept of each captured argument
ARGS = 4  # arguments kept per request: name, subcommand or key, numkeys, key

ARRAY, BULK, SIMPLE, ERROR, INTEGER = b"*$+-:"
NULL, BOOLEAN, DOUBLE, BIG_NUMBER, BLOB_ERROR, VERBATIM = b"_#,(!="
MAP, SET, PUSH, ATTRIBUTE, CHUNK, END = b"%~>|;."
INLINE = 0  # kind of an inline request
UNREAD = -1  # kind of a message whose header has not been read
RESP3_KINDS = frozenset(b"_#,(!=%~>|")
_LINE_KINDS = frozenset(b"+-:_#,(")
_BULK_KINDS = frozenset(b"$!=")
_AGGREGATE_KINDS = frozenset(b"*~>%|")
_LONG_LINES = frozenset(b"+-,(")  # header lines that may be long (text, big numbers)
# The start of a command cut before its name ends: "*3\r\n$3\r\nSE".
COMMAND_PREFIX = re.compile(
    rb"\*[0-9]*(?:\r(?:\n(?:\$[0-9]*(?:\r(?:\n[A-Za-z0-9_.|-]*\r?)?)?)?)?)?")

# Frame flags: an ordinary aggregate, an attribute (the value it annotates follows), a streamed
# aggregate (ends at "."), a streamed string (chunks ";n" until ";0").
_PLAIN, _ATTR, _STREAMED, _STREAMED_STRING = range(4)

_PRINTABLE = re.compile(rb"[\x20-\x7e]*")
_BIG_NUMBER_TEXT = re.compile(rb"[-+]?[0-9]{1,1000}")
_DOUBLE_TEXT = re.compile(rb"[-+]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|inf|nan)")
ERROR_CODE = re.compile(rb"[A-Z][A-Z0-9_-]{0,31}")
_INLINE_ARG = re.compile(rb'"(?:[^"\\]|\\.)*"?|\'[^\']*\'?|\S+')
_NAME = re.compile(rb"[A-Za-z][A-Za-z0-9_.|-]{0,63}")
_COMMAND_HEAD = re.compile(rb"\*([1-9][0-9]{0,9})\r\n\$([0-9]{1,10})\r\n")


def _number(raw: bytes) -> int | None:
    if 0 < len(raw) <= 19:
        if raw.isdigit():
            return int(raw)
        if len(raw) > 1 and raw[0] == 45 and raw[1:].isdigit():  # "-1"
            return -int(raw[1:])
    return None


def _line_end(buf: bytes, pos: int, limit: int) -> int:
    """Index of the "\\r\\n" ending the line at ``pos`` (within ``limit`` bytes), or -1."""
    return buf.find(b"\r\n", pos, pos + limit + 2)


# --- whole values, checked strictly (detection, resync, role) -------------------------------------


def is_command(buf: bytes, known: bool) -> bool:
    """Whether ``buf`` starts with ``*N\\r\\n$len\\r\\nNAME\\r\\n``: a command Redis knows
    (``known``), or any plausible command name."""
    m = _COMMAND_HEAD.match(buf)
    if m is None:
        return False
    start, length = m.end(), int(m.group(2))
    name = buf[start : start + length]
    if len(name) != length or buf[start + length : start + length + 2] != b"\r\n":
        return False
    if known:
        return name.lower().decode("latin-1") in COMMANDS
    return _NAME.fullmatch(name) is not None


def is_inline_command(buf: bytes) -> bool:
    """A whole inline command line whose first word is a known command ("PING\\r\\n")."""
    end = buf.find(b"\n", 0, KEEP_LINE)
    if end < 0:
        return False
    first = buf[:end].split(None, 1)
    return bool(first) and first[0].lower().decode("latin-1") in COMMANDS


def complete_replies(buf: bytes) -> bool:
    """Whether ``buf`` is one or more complete, well-formed replies, and nothing else."""
    if not buf or buf[0] not in b"+-:$*_#,(!=%~>|":
        return False
    pos = 0
    while pos < len(buf):
        pos = _skip_value(buf, pos, 0, pos == 0)
        if pos < 0:
            return False
    return True


def _skip_value(buf: bytes, pos: int, depth: int, first: bool) -> int:
    """End of the complete RESP value at ``pos``, or -1 (strict: detection only)."""
    if depth > 8 or pos >= len(buf):
        return -1
    kind = buf[pos]
    end = _line_end(buf, pos, KEEP_LINE)
    if end < 0:
        return -1
    text = buf[pos + 1 : end]
    nxt = end + 2
    if kind == SIMPLE:
        # POP3 greets with "+OK text"; Redis status replies are single words ("+OK", "+PONG").
        ok = _PRINTABLE.fullmatch(text) is not None and not (first and b" " in text)
        return nxt if ok and text else -1
    if kind in (ERROR, BLOB_ERROR):
        if kind == BLOB_ERROR:
            length = _number(text)
            if length is None or length < 0 or buf[nxt + length : nxt + length + 2] != b"\r\n":
                return -1
            text, nxt = buf[nxt : nxt + length], nxt + length + 2
        code = ERROR_CODE.match(text)
        return nxt if code and len(code.group()) > 1 and text[code.end() : code.end() + 1] in (
            b"", b" ") else -1  # fmt: skip
    if kind == INTEGER:
        return nxt if _number(text) is not None else -1
    if kind == BIG_NUMBER:
        return nxt if _BIG_NUMBER_TEXT.fullmatch(text) else -1
    if kind == NULL:
        return nxt if not text else -1
    if kind == BOOLEAN:
        return nxt if text in (b"t", b"f") else -1
    if kind == DOUBLE:
        return nxt if _DOUBLE_TEXT.fullmatch(text) else -1
    length = _number(text)
    if length is None or length < -1:
        return -1
    if kind in _BULK_KINDS:
        if length < 0:
            return nxt if kind == BULK else -1
        if buf[nxt + length : nxt + length + 2] != b"\r\n" or len(buf) < nxt + length + 2:
            return -1
        if kind == VERBATIM and buf[nxt + 3 : nxt + 4] != b":":
            return -1
        return nxt + length + 2
    if kind not in _AGGREGATE_KINDS:
        return -1
    if length < 0:
        return nxt if kind == ARRAY else -1
    for _ in range(length * 2 if kind in (MAP, ATTRIBUTE) else length):
        nxt = _skip_value(buf, nxt, depth + 1, False)
        if nxt < 0:
            return -1
    if kind == ATTRIBUTE:  # the value it annotates follows
        return _skip_value(buf, nxt, depth + 1, False)
    return nxt


def could_start(buf: bytes) -> bool:
    """Whether ``buf`` may be the first bytes of a command or reply whose first line (or a
    command's name) is still to come."""
    if not buf:
        return False
    if buf[0] == ARRAY:
        return COMMAND_PREFIX.fullmatch(buf) is not None
    return b"\n" not in buf and (buf[0] in b"+-:$_#,(!=%~>|" or buf[:1].isalpha())


def reply_header(buf: bytes) -> bool:
    """Whether ``buf`` starts with a well-formed reply header line (resync, role decision)."""
    if not buf or buf[0] not in b"+-:$*_#,(!=%~>|":
        return False
    kind = buf[0]
    long_line = kind in _LONG_LINES
    end = _line_end(buf, 0, KEEP_LINE if long_line else MAX_HEADER)
    if end < 0:
        return False
    text = buf[1:end]
    if kind == SIMPLE:
        return _PRINTABLE.fullmatch(text) is not None
    if kind == ERROR:
        return ERROR_CODE.match(text) is not None
    if kind == NULL:
        return not text
    if kind == BOOLEAN:
        return text in (b"t", b"f")
    if kind == DOUBLE:
        return bool(text) and _PRINTABLE.fullmatch(text) is not None
    if kind == BIG_NUMBER:
        return _BIG_NUMBER_TEXT.fullmatch(text) is not None
    if text == b"?" and kind in b"$*~%>":
        return True
    number = _number(text)
    return number is not None and number >= (-1 if kind in b"$*" else 0)


# --- framing ------------------------------------------------------------------------------------


class Message:
    """A request or reply being read; a request waits in the FIFO until it is answered."""

    __slots__ = ("kind", "words", "argc", "start_ns", "last_ns", "nbytes", "complete", "done",
                 "name", "reply_bytes", "confirmations")  # fmt: skip

    def __init__(self, start_ns: int, kind: int = UNREAD) -> None:
        self.kind = kind  # type byte of the value (request: ARRAY or INLINE)
        self.words: Argv = []  # first arguments (request) or first scalar children (reply)
        self.argc = 0
        self.start_ns = start_ns
        self.last_ns = start_ns
        self.nbytes = 0
        self.complete = True
        self.done = False
        self.name = ""  # request: command(words), set when the request is read
        self.reply_bytes = 0  # request: pub/sub confirmations received so far
        self.confirmations = 0  # request: (UN)SUBSCRIBE confirmations still expected


class Listener(Protocol):
    """What a Reader reports to: the connection that pairs requests with replies."""

    counters: dict[str, int]
    tunneled: bool  # from here on, bytes are counted, not parsed

    def resumes(self, reader: Reader, payload: bytes) -> bool: ...

    def request_started(self, msg: Message) -> None: ...

    def request_done(self, msg: Message) -> None: ...

    def reply_done(self, msg: Message) -> None: ...

    def requests_lost(self, ts: int) -> None: ...

    def replies_resumed(self, lost: Message | None, last_ts: int) -> None: ...


class Reader:
    """Frames the RESP values of one direction of a connection."""

    __slots__ = ("conn", "requests", "lost", "line", "line_len", "bulk_left", "chunk",
                 "capturing", "word", "word_left", "word_ok", "stack", "msg",
                 "last_ts")  # fmt: skip

    def __init__(self, conn: Listener, requests: bool) -> None:
        self.conn = conn
        self.requests = requests
        self.lost = False
        self.line = bytearray()  # a header line split across events (its first KEEP_LINE bytes)
        self.line_len = 0
        self.bulk_left = 0  # bulk payload bytes + CRLF still to come
        self.chunk = False  # the bulk is a streamed-string chunk, not a value
        self.capturing = False
        self.word = bytearray()
        self.word_left = 0
        self.word_ok = True
        self.stack: list[list[int]] = []  # open aggregates: [children left, flag]
        self.msg: Message | None = None
        self.last_ts = 0

    def feed(self, ts: int, size: int, payload: bytes) -> None:
        n = len(payload)
        if size < n:  # the syscall moved fewer bytes than were captured: trust the syscall
            payload = payload[: max(size, 0)]
            n = size = len(payload)
        if self.lost:
            if not self.conn.resumes(self, payload):
                self.swallow(size)
                self._touch(ts)
                return
            self.resync()  # before last_ts moves on: it is the lost stretch's last event
        self.last_ts = ts
        pos = 0
        conn = self.conn
        while pos < n:
            if self.lost or conn.tunneled:
                self.swallow(n - pos)
                break
            if self.bulk_left:
                pos = self._bulk(ts, payload, pos)
                continue
            if self.msg is None and not self.stack:
                end = self._whole_message(ts, payload, pos)
                if end > 0:
                    pos = end
                    continue
            pos = self._line(ts, payload, pos)
        if size > n:
            self._gap(ts, size - n)
        self._touch(ts)

    def _touch(self, ts: int) -> None:
        if self.msg is not None:
            self.msg.last_ns = ts
        self.last_ts = ts

    def _count(self, nbytes: int) -> None:
        if self.msg is not None:
            self.msg.nbytes += nbytes
        else:
            self.conn.counters["unparsed_bytes"] += nbytes

    def swallow(self, nbytes: int) -> None:
        if self.conn.tunneled:
            self.conn.counters["tunneled_bytes"] += nbytes
        else:
            self._count(nbytes)

    def lose(self) -> None:
        if self.lost:
            return
        self.lost = True
        self.line.clear()
        self.line_len = self.bulk_left = 0
        self.capturing = self.chunk = False
        self.stack.clear()
        self.conn.counters["sync_losses"] += 1
        msg = self.msg
        if msg is not None:
            msg.complete = False
            if msg.kind == UNREAD:  # not even its header was read: not a message
                self.conn.counters["unparsed_bytes"] += msg.nbytes
                self.msg = None
        if self.requests:
            self.conn.requests_lost(self.last_ts)

    def resync(self) -> None:
        self.lost = False
        self.conn.counters["resyncs"] += 1
        msg, self.msg = self.msg, None
        if not self.requests:
            self.conn.replies_resumed(msg, self.last_ts)
        # A request cut short is already waiting in the FIFO, marked incomplete.

    def reset(self) -> None:
        self.lost = False
        self.line.clear()
        self.line_len = self.bulk_left = 0
        self.capturing = self.chunk = False
        self.stack.clear()
        self.msg = None

    # -- lines and headers --------------------------------------------------------------------

    def _whole_message(self, ts: int, payload: bytes, pos: int) -> int:
        """The fast path for what most events carry: a whole command of bulk strings, or a
        whole scalar reply, at ``pos``. Returns its end, or -1 to read it line by line."""
        kind = payload[pos]
        if self.requests:
            if kind != ARRAY:
                return -1
            nl = payload.find(b"\r\n", pos, pos + MAX_HEADER)
            count = _number(payload[pos + 1 : nl]) if nl > 0 else None
            if count is None or not 0 < count <= 1024:
                return -1
            words: Argv = []
            end = nl + 2
            for i in range(count):
                nl = payload.find(b"\r\n", end, end + MAX_HEADER)
                if nl < 0 or payload[end] != BULK:
                    return -1
                length = _number(payload[end + 1 : nl])
                if length is None or length < 0:
                    return -1
                start, end = nl + 2, nl + 2 + length
                if payload[end : end + 2] != b"\r\n":
                    return -1
                if i < ARGS:
                    words.append(payload[start : min(end, start + WORD)])
                end += 2
            msg = Message(ts, ARRAY)
            msg.argc, msg.words, msg.nbytes, msg.done = count, words, end - pos, True
            self.conn.request_started(msg)
            self.conn.request_done(msg)
            return end
        if kind == BULK:
            nl = payload.find(b"\r\n", pos, pos + MAX_HEADER)
            length = _number(payload[pos + 1 : nl]) if nl > 0 else None
            if length is None or length < -1:
                return -1
            start = end = nl + 2
            if length >= 0:
                end = start + length
                if payload[end : end + 2] != b"\r\n":
                    return -1
                end += 2
            word = payload[start : start + min(max(length, 0), WORD)]
        elif kind in (SIMPLE, ERROR, INTEGER, NULL):
            nl = payload.find(b"\r\n", pos, pos + KEEP_LINE)
            if nl < 0 or (kind == INTEGER and _number(payload[pos + 1 : nl]) is None):
                return -1
            word, end = payload[pos + 1 : min(nl, pos + 1 + WORD)], nl + 2
        else:
            return -1
        msg = Message(ts, kind)
        msg.words, msg.nbytes, msg.done = [word], end - pos, True
        self.conn.reply_done(msg)
        return end

    def _line(self, ts: int, payload: bytes, pos: int) -> int:
        n = len(payload)
        if self.msg is None and not self.line_len:
            if self.requests:  # Redis skips empty lines between inline commands
                start = pos
                while pos < n and payload[pos] in b"\r\n":
                    pos += 1
                self.conn.counters["unparsed_bytes"] += pos - start
                if pos == n:
                    return n
            self.msg = Message(ts)
        nl = payload.find(b"\n", pos)
        end = n if nl < 0 else nl + 1
        self._count(end - pos)
        if self.line_len or nl < 0:
            room = KEEP_LINE - len(self.line)
            if room > 0:
                self.line += payload[pos : min(end, pos + room)]
            self.line_len += end - pos
            if nl < 0:
                long_line = (self.requests and not self.stack) or self.line[0] in _LONG_LINES
                limit = MAX_LINE if long_line else MAX_HEADER
                if self.line_len > limit:
                    self.lose()
                return n
            line = bytes(self.line)
            total = self.line_len
            self.line.clear()
            self.line_len = 0
        else:
            line = payload[pos : min(end, pos + KEEP_LINE)]
            total = end - pos
        if total > MAX_LINE:
            self.lose()
            return end
        if line.endswith(b"\n"):
            line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        if not line:
            self.lose()
        elif self.requests:
            self._request_header(ts, line)
        else:
            self.reply_header(ts, line)
        return end

    def _request_header(self, ts: int, line: bytes) -> None:
        msg = self.msg
        assert msg is not None
        kind, rest = line[0], line[1:]
        if not self.stack:
            if kind == ARRAY:
                count = _number(rest)
                if count is None or count > MAX_LENGTH:
                    self.lose()
                elif count <= 0:  # "*0", "*-1": Redis reads no command, sends no reply
                    self.conn.counters["unparsed_bytes"] += msg.nbytes
                    self.msg = None
                else:
                    msg.kind, msg.argc = ARRAY, count
                    self.stack.append([count, _PLAIN])
                    self.conn.request_started(msg)
                return
            args = _INLINE_ARG.findall(line)
            if not args or _NAME.fullmatch(args[0]) is None:
                self.lose()
                return
            msg.kind, msg.argc = INLINE, len(args)
            words: Argv = [a.strip(b"\"'") for a in args[:ARGS]]
            msg.words = words
            self.conn.request_started(msg)
            self._message_done(ts)
            return
        length = _number(rest) if kind == BULK else None
        if length is None or not 0 <= length <= MAX_LENGTH:
            self.lose()  # Redis: "Protocol error: expected '$'"; it closes the connection
            return
        self._start_bulk(length, len(msg.words) < ARGS)

    def reply_header(self, ts: int, line: bytes) -> None:
        msg = self.msg
        assert msg is not None
        kind, rest = line[0], line[1:]
        stack = self.stack
        depth = len(stack)
        capture = len(msg.words) < ARGS and (depth == 0 or (depth == 1 and stack[0][1] != _ATTR))
        if depth == 0:
            msg.kind = kind
        if kind in _LINE_KINDS:
            if (kind == INTEGER and _number(rest) is None) or (
                    kind == BIG_NUMBER and _BIG_NUMBER_TEXT.fullmatch(rest) is None):
                self.lose()
                return
            if capture:
                msg.words.append(rest[:WORD])
            self._value_done(ts)
            return
        if kind in _BULK_KINDS:
            if rest == b"?" and kind == BULK and depth < MAX_DEPTH:
                stack.append([0, _STREAMED_STRING])
                return
            length = _number(rest)
            if length is None or not -1 <= length <= MAX_LENGTH or (length < 0 and kind != BULK):
                self.lose()
            elif length < 0:  # null bulk string
                if capture:
                    msg.words.append(b"")
                self._value_done(ts)
            else:
                self._start_bulk(length, capture)
            return
        if kind == CHUNK:
            length = _number(rest)
            if not stack or stack[-1][1] != _STREAMED_STRING or length is None or length < 0:
                self.lose()
            elif length == 0:
                stack.pop()
                self._value_done(ts)
            else:
                self._start_bulk(length, False, chunk=True)
            return
        if kind in _AGGREGATE_KINDS:
            if depth >= MAX_DEPTH:
                self.lose()
                return
            if rest == b"?" and kind != ATTRIBUTE:
                stack.append([0, _STREAMED])
                return
            count = _number(rest)
            if count is None or not -1 <= count <= MAX_LENGTH or (count < 0 and kind != ARRAY):
                self.lose()
            elif count <= 0:  # empty, or a null array; an empty attribute annotates nothing
                if kind != ATTRIBUTE:
                    self._value_done(ts)
            else:
                flag = _ATTR if kind == ATTRIBUTE else _PLAIN
                stack.append([count * 2 if kind in (MAP, ATTRIBUTE) else count, flag])
            return
        if kind == END and stack and stack[-1][1] == _STREAMED:
            stack.pop()
            self._value_done(ts)
            return
        self.lose()

    # -- bulk payloads --------------------------------------------------------------------------

    def _start_bulk(self, length: int, capture: bool, chunk: bool = False) -> None:
        self.bulk_left = length + 2
        self.chunk = chunk
        self.capturing = capture
        if capture:
            self.word.clear()
            self.word_left = min(length, WORD)
            self.word_ok = True

    def _bulk(self, ts: int, payload: bytes, pos: int) -> int:
        n = len(payload)
        content = self.bulk_left - 2
        if content > 0:
            take = min(content, n - pos)
            if self.capturing and self.word_left > 0:
                grab = payload[pos : pos + min(take, self.word_left)]
                self.word += grab
                self.word_left -= len(grab)
            pos += take
            self.bulk_left -= take
            self._count(take)
            if pos == n:
                return n
        # The CRLF after the payload: check it where it is visible.
        need = self.bulk_left
        got = payload[pos : pos + need]
        if got != b"\r\n"[2 - need :][: len(got)]:
            self.lose()
            return pos
        pos += len(got)
        self.bulk_left -= len(got)
        self._count(len(got))
        if not self.bulk_left:
            self._bulk_done(ts)
        return pos

    def _gap(self, ts: int, gap: int) -> None:
        """``gap`` bytes were moved but not captured: frame them by the bulk length if they
        fall inside one; a header line in the gap loses sync."""
        if not self.lost and not self.conn.tunneled and self.bulk_left:
            take = min(gap, self.bulk_left)
            if self.capturing and self.word_left > 0 and self.bulk_left > 2:
                self.word_ok = False
            self.bulk_left -= take
            self._count(take)
            gap -= take
            if not self.bulk_left:
                self._bulk_done(ts)
        if gap:
            if not self.conn.tunneled:
                self.lose()
            self.swallow(gap)

    def _bulk_done(self, ts: int) -> None:
        if self.capturing:
            self.capturing = False
            assert self.msg is not None
            self.msg.words.append(bytes(self.word) if self.word_ok else None)
        if self.chunk:
            self.chunk = False
        else:
            self._value_done(ts)

    def _value_done(self, ts: int) -> None:
        stack = self.stack
        while stack:
            frame = stack[-1]
            if frame[1] == _STREAMED:  # ends at "."
                return
            frame[0] -= 1
            if frame[0] > 0:
                return
            stack.pop()
            if frame[1] == _ATTR:  # the annotated value is still to come
                return
        self._message_done(ts)

    def _message_done(self, ts: int) -> None:
        msg = self.msg
        assert msg is not None
        self.msg = None
        msg.done = True
        msg.last_ns = ts
        if self.requests:
            self.conn.request_done(msg)
        else:
            self.conn.reply_done(msg)
