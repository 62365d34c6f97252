"""MySQL packets: framing by length across events and capture gaps, and the fields read.

A packet is a 3-byte little-endian payload length, a 1-byte sequence id and the payload; a
payload of 0xFFFFFF bytes continues in the next packet. ``Framer`` cuts one direction of a
connection into packets, skipping payload bytes the probe did not capture by count, and
hands each packet (with as much of its payload as its owner keeps) to a ``PacketSink``: the
connection parser in ``mysql.py``, which decides what the packets mean.
"""

from __future__ import annotations

from typing import Protocol

MAX_PAYLOAD = 0xFFFFFF  # a packet this long continues in the next one

CLIENT_LONG_PASSWORD = 1
CLIENT_COMPRESS = 1 << 5
CLIENT_PROTOCOL_41 = 1 << 9
CLIENT_SSL = 1 << 11
CLIENT_DEPRECATE_EOF = 1 << 24
CLIENT_OPTIONAL_RESULTSET_METADATA = 1 << 25  # MySQL 8: a flag byte before the column count
SERVER_MORE_RESULTS_EXISTS = 0x0008
SERVER_STATUS_CURSOR_EXISTS = 0x0040
PROGRESS_REPORT = 0xFFFF  # MariaDB: an ERR packet with this code is a progress report
STMT_LAST_PREPARED = 0xFFFFFFFF  # MariaDB: "the statement prepared last" (pipelined prepare)

# Response kinds.
KIND_NONE, KIND_SIMPLE, KIND_RESULT, KIND_PREPARE, KIND_ROWS, KIND_AUTH = range(6)

COMMANDS: dict[int, tuple[str, int]] = {
    0x00: ("COM_SLEEP", KIND_SIMPLE), 0x01: ("COM_QUIT", KIND_NONE),
    0x02: ("COM_INIT_DB", KIND_SIMPLE),
    0x03: ("COM_QUERY", KIND_RESULT), 0x04: ("COM_FIELD_LIST", KIND_ROWS),
    0x05: ("COM_CREATE_DB", KIND_SIMPLE), 0x06: ("COM_DROP_DB", KIND_SIMPLE),
    0x07: ("COM_REFRESH", KIND_SIMPLE), 0x08: ("COM_SHUTDOWN", KIND_SIMPLE),
    0x09: ("COM_STATISTICS", KIND_SIMPLE), 0x0A: ("COM_PROCESS_INFO", KIND_RESULT),
    0x0B: ("COM_CONNECT", KIND_SIMPLE), 0x0C: ("COM_PROCESS_KILL", KIND_SIMPLE),
    0x0D: ("COM_DEBUG", KIND_SIMPLE), 0x0E: ("COM_PING", KIND_SIMPLE),
    0x0F: ("COM_TIME", KIND_SIMPLE),
    0x10: ("COM_DELAYED_INSERT", KIND_SIMPLE), 0x11: ("COM_CHANGE_USER", KIND_AUTH),
    0x12: ("COM_BINLOG_DUMP", KIND_ROWS), 0x13: ("COM_TABLE_DUMP", KIND_ROWS),
    0x14: ("COM_CONNECT_OUT", KIND_SIMPLE), 0x15: ("COM_REGISTER_SLAVE", KIND_SIMPLE),
    0x16: ("COM_STMT_PREPARE", KIND_PREPARE), 0x17: ("COM_STMT_EXECUTE", KIND_RESULT),
    0x18: ("COM_STMT_SEND_LONG_DATA", KIND_NONE), 0x19: ("COM_STMT_CLOSE", KIND_NONE),
    0x1A: ("COM_STMT_RESET", KIND_SIMPLE), 0x1B: ("COM_SET_OPTION", KIND_SIMPLE),
    0x1C: ("COM_STMT_FETCH", KIND_ROWS), 0x1D: ("COM_DAEMON", KIND_SIMPLE),
    0x1E: ("COM_BINLOG_DUMP_GTID", KIND_ROWS), 0x1F: ("COM_RESET_CONNECTION", KIND_SIMPLE),
    0xFA: ("COM_STMT_BULK_EXECUTE", KIND_RESULT),
}  # fmt: skip
COM_QUERY, COM_INIT_DB, COM_STMT_PREPARE, COM_CHANGE_USER = 0x03, 0x02, 0x16, 0x11
COM_STMT_CLOSE, COM_RESET_CONNECTION = 0x19, 0x1F
# Commands whose whole payload is the command byte, and those followed by a statement id.
_BARE = frozenset((0x01, 0x09, 0x0A, 0x0D, 0x0E, 0x1F))
_STMT_ID_ONLY = frozenset((0x19, 0x1A))


def _packet_length(buf: bytes) -> int:
    return buf[0] | buf[1] << 8 | buf[2] << 16


def is_greeting(buf: bytes) -> bool:
    """Whether ``buf`` is exactly a server greeting: protocol 10, a version string."""
    if len(buf) < 40 or buf[3] != 0 or buf[4] != 0x0A or _packet_length(buf) + 4 != len(buf):
        return False
    nul = buf.find(b"\x00", 5, 5 + 64)
    version = buf[5:nul]
    # "8.0.36", "5.5.5-10.11.6-MariaDB": printable, starting with a digit; then at least
    # connection id, scramble, filler and capabilities.
    return (nul > 5 and version[:1].isdigit() and all(32 < b < 127 for b in version)
            and len(buf) >= nul + 1 + 4 + 9 + 2)


def is_command(buf: bytes, size: int) -> bool:
    """Whether ``buf`` starts with a client command packet (sequence id 0) that is the whole
    ``size`` bytes, with a payload that fits its command."""
    if len(buf) < 5 or buf[3] != 0:
        return False
    length = _packet_length(buf)
    if length + 4 != size:
        return False
    cmd = buf[4]
    if cmd in (COM_QUERY, COM_STMT_PREPARE):
        return _is_sql_text(query_bytes(buf[5:133]))
    if cmd in _BARE:
        return length == 1
    if cmd in _STMT_ID_ONLY:
        return length == 5
    if cmd == 0x1C:  # COM_STMT_FETCH: statement id, row count
        return length == 9
    if cmd == 0x17:  # COM_STMT_EXECUTE: statement id, cursor flags, iteration count 1
        return length >= 10 and buf[9] < 0x10 and buf[10:14] == b"\x01\x00\x00\x00"[: len(buf) - 10]
    if cmd == COM_INIT_DB:
        name = buf[5:]
        return 0 < len(name) <= 256 and all(32 < b < 127 or b >= 0x80 for b in name)
    return False


def query_bytes(payload: bytes) -> bytes:
    """A COM_QUERY's text. With CLIENT_QUERY_ATTRIBUTES (MySQL 8) the text follows a
    parameter count and a parameter set count; with no attributes that is ``00 01``."""
    return payload[2:] if payload[:2] == b"\x00\x01" else payload


def _is_sql_text(text: bytes) -> bool:
    stripped = text.lstrip(b" \t\r\n")
    if not stripped or not (stripped[:1].isalpha() or stripped[:1] in b"(/-#{"):
        return False
    if any(b < 32 and b not in (9, 10, 13) for b in text):
        return False
    for cut in range(4):  # the capture may end inside a multi-byte character
        try:
            text[: len(text) - cut].decode("utf-8")
            return True
        except UnicodeDecodeError:
            continue
    return False


def lenenc(data: bytes, pos: int) -> tuple[int, int] | None:
    """A length-encoded integer at ``pos``: (value, position after it), or None if cut off."""
    if pos >= len(data):
        return None
    first = data[pos]
    if first < 0xFB:
        return first, pos + 1
    width = {0xFC: 2, 0xFD: 3, 0xFE: 8}.get(first)
    if width is None or pos + 1 + width > len(data):
        return None
    return int.from_bytes(data[pos + 1 : pos + 1 + width], "little"), pos + 1 + width


def status_flags(data: bytes, length: int) -> int:
    """Server status flags of an EOF packet (``fe`` warnings status) or an OK packet (header,
    affected rows, last insert id, status); 0 if they were not captured."""
    if data[:1] == b"\xfe" and length <= 5:
        return int.from_bytes(data[3:5], "little") if len(data) >= 5 else 0
    affected = lenenc(data, 1)
    insert_id = lenenc(data, affected[1]) if affected else None
    if insert_id is None or insert_id[1] + 2 > len(data):
        return 0
    return int.from_bytes(data[insert_id[1] : insert_id[1] + 2], "little")


def error_code(data: bytes) -> int:
    return int.from_bytes(data[1:3], "little") if len(data) >= 3 else -1


class PacketSink(Protocol):
    """What a ``Framer`` reports to: the connection's parser."""

    counters: dict[str, int]

    def keep(self, from_client: bool, seq: int, first: int) -> int: ...

    def swallow(self, from_client: bool, ts: int, nbytes: int) -> None: ...

    def lost_in_gap(self, from_client: bool, ts: int, nbytes: int) -> None: ...

    def plausible_after_resync(self, from_client: bool, seq: int) -> bool: ...

    def packet(self, from_client: bool, start_ns: int, ts: int, seq: int, length: int,
               data: bytes, continues: bool) -> None: ...


class Framer:
    """Cuts one direction's bytes into packets by their lengths, across events and gaps."""

    __slots__ = ("conn", "from_client", "header", "in_body", "length", "seq", "remaining",
                 "data", "start_ns", "continues", "lost", "resync", "resumed")  # fmt: skip

    def __init__(self, conn: PacketSink, from_client: bool) -> None:
        self.conn = conn
        self.from_client = from_client
        self.header = bytearray()
        self.in_body = False
        self.length = 0
        self.seq = 0
        self.remaining = 0
        self.data = bytearray()  # the payload's first bytes, as many as the connection keeps
        self.start_ns = 0
        self.continues = False  # the previous packet was full-size: this one continues it
        self.lost = False
        self.resync = False  # a lost framer may start again at the next event
        self.resumed = False  # it just did: its first packet must prove it (sequence id)

    def reset(self) -> None:
        self.header.clear()
        self.data.clear()
        self.in_body = False
        self.remaining = 0
        self.continues = False
        self.lost = False
        self.resync = False

    def lose(self) -> None:
        if not self.lost:
            self.conn.counters["sync_losses"] += 1
        self.stop()

    def stop(self) -> None:
        """Frame nothing more (until resynchronised)."""
        self.header.clear()
        self.data.clear()
        self.in_body = False
        self.lost = True
        self.resync = False

    def feed(self, ts: int, size: int, payload: bytes) -> None:
        conn = self.conn
        if self.lost:
            if not self.resync:
                conn.swallow(self.from_client, ts, size)
                return
            self.reset()
            self.resumed = True
        n = len(payload)
        pos = 0
        while pos < n and not self.lost:
            if self.in_body:
                take = min(self.remaining, n - pos)
                first = self.data[0] if self.data else payload[pos]
                room = conn.keep(self.from_client, self.seq, first) - len(self.data)
                if room > 0:
                    self.data += payload[pos : pos + min(take, room)]
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self._emit(ts, bytes(self.data))
                continue
            if not self.header and pos + 4 <= n:  # usual case: a header, maybe the packet
                self.start_ns = ts
                length = payload[pos] | payload[pos + 1] << 8 | payload[pos + 2] << 16
                if not self._header(payload[pos + 3], length):
                    break
                body = pos + 4
                pos = body + length
                if pos <= n:  # the whole packet is in this payload: no copying into buffers
                    keep = conn.keep(self.from_client, self.seq, payload[body] if length else -1)
                    self._emit(ts, payload[body : body + min(length, keep)])
                else:
                    pos = body
                    self.in_body = True
                continue
            if not self.header:
                self.start_ns = ts
            need = 4 - len(self.header)
            self.header += payload[pos : pos + need]
            pos += min(need, n - pos)
            if len(self.header) == 4:
                header = self.header
                if not self._header(header[3], header[0] | header[1] << 8 | header[2] << 16):
                    conn.counters["unparsed_bytes"] += 4  # the header read before the loss
                    break
                self.in_body = True
                if self.length == 0:
                    self._emit(ts, b"")
        gap = size - n
        if self.lost:  # the connection gave up on this direction while reading this event
            if self.resync:  # bytes of an event that failed to resynchronise: nobody's
                conn.counters["unparsed_bytes"] += n - pos + gap
            else:
                conn.swallow(self.from_client, ts, n - pos + gap)
            return
        if gap <= 0:
            return
        if self.in_body:  # the rest of this packet is in the gap: skip it by count
            take = min(gap, self.remaining)
            self.remaining -= take
            gap -= take
            if self.remaining == 0:
                self._emit(ts, bytes(self.data))
        if gap > 0 and not self.lost:  # a packet boundary is in bytes we cannot see
            partial = len(self.header)
            self.lose()
            conn.lost_in_gap(self.from_client, ts, gap + partial)

    def _header(self, seq: int, length: int) -> bool:
        """A packet header was read; False if it cannot be one (after a resync)."""
        self.seq = seq
        self.length = self.remaining = length
        if self.resumed:
            self.resumed = False
            if not self.conn.plausible_after_resync(self.from_client, seq):
                # Not a packet boundary after all: drop this event, try the next.
                self.lose()
                self.resync = True
                return False
            self.conn.counters["resyncs"] += 1
        return True

    def _emit(self, ts: int, data: bytes) -> None:
        self.data.clear()
        self.header.clear()
        self.in_body = False
        self.remaining = 0
        continues = self.continues
        self.continues = self.length == MAX_PAYLOAD
        self.conn.packet(self.from_client, self.start_ns, ts, self.seq, self.length, data,
                         continues)
