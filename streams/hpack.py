"""HPACK (RFC 7541) header block decoding for an observer that may have missed blocks.

An HTTP/2 endpoint decodes every header block its peer sends, so its dynamic table is always
exact. An observer can miss blocks: the probe started after the connection did, or a block
fell in a capture gap. What is known then is narrower, and it is still exact:

- the dynamic table is a list of insertions, newest first; an entry's index is its rank in
  that list, whatever the table's size limit. So every entry inserted since the last missed
  block is known *with its index*, and an encoder never references an entry it evicted;
- anything older is unknown. A reference to it is an *unknown field*, reported as ``None``,
  never as a guess. The context heals by itself when the known entries alone exceed the
  table size (everything older must have been evicted) or at a size update to 0.

``Decoder.decode(block)`` returns the fields with ``None`` for what cannot be known, and tells
whether the block was read to its end; a block that was not (malformed, or a reference that
is impossible in a fully known context) leaves the context lost, exactly like a missed block.
Huffman decoding uses a 4-bit state machine built from the code lengths of Appendix B at
import (the code is canonical, so lengths determine it).
"""

from __future__ import annotations

from collections import deque

STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = tuple(
    (name.encode(), value.encode())
    for name, value in (
        (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"),
        (":path", "/index.html"), (":scheme", "http"), (":scheme", "https"),
        (":status", "200"), (":status", "204"), (":status", "206"), (":status", "304"),
        (":status", "400"), (":status", "404"), (":status", "500"), ("accept-charset", ""),
        ("accept-encoding", "gzip, deflate"), ("accept-language", ""), ("accept-ranges", ""),
        ("accept", ""), ("access-control-allow-origin", ""), ("age", ""), ("allow", ""),
        ("authorization", ""), ("cache-control", ""), ("content-disposition", ""),
        ("content-encoding", ""), ("content-language", ""), ("content-length", ""),
        ("content-location", ""), ("content-range", ""), ("content-type", ""), ("cookie", ""),
        ("date", ""), ("etag", ""), ("expect", ""), ("expires", ""), ("from", ""), ("host", ""),
        ("if-match", ""), ("if-modified-since", ""), ("if-none-match", ""), ("if-range", ""),
        ("if-unmodified-since", ""), ("last-modified", ""), ("link", ""), ("location", ""),
        ("max-forwards", ""), ("proxy-authenticate", ""), ("proxy-authorization", ""),
        ("range", ""), ("referer", ""), ("refresh", ""), ("retry-after", ""), ("server", ""),
        ("set-cookie", ""), ("strict-transport-security", ""), ("transfer-encoding", ""),
        ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""),
    )
)  # fmt: skip

DEFAULT_TABLE_SIZE = 4096  # SETTINGS_HEADER_TABLE_SIZE's initial value
MAX_TABLE_BYTES = 65536  # entries kept per decoder; a larger table keeps its oldest unknown
MAX_FIELDS = 512  # fields per block; more is not a header block we want to believe
ENTRY_OVERHEAD = 32

# Bit length of the Huffman code of every symbol 0..255 and EOS (256), RFC 7541 Appendix B.
HUFFMAN_CODE_LENGTHS = (
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28,
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28,
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10,
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5,
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28,
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24,
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23,
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25,
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27,
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23,
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
    30,
)  # fmt: skip
EOS = 256


class HpackError(ValueError):
    """A header block that does not decode (truncated, bad Huffman, impossible index)."""


def huffman_codes() -> list[int]:
    """The canonical code of every symbol: assigned in order of (length, symbol)."""
    codes = [0] * len(HUFFMAN_CODE_LENGTHS)
    code, prev = 0, 0
    for sym in sorted(range(len(codes)), key=lambda s: (HUFFMAN_CODE_LENGTHS[s], s)):
        code <<= HUFFMAN_CODE_LENGTHS[sym] - prev
        prev = HUFFMAN_CODE_LENGTHS[sym]
        codes[sym] = code
        code += 1
    return codes


def _huffman_machine() -> tuple[list[int], list[int], list[bool]]:
    """(next state, emitted symbol or -1) per (state, nibble), and which states may end a string.

    States are the inner nodes of the code tree (0 = root). A nibble that reaches EOS, or a
    path no code takes, leads to state -1. A string may end at the root, or on the all-ones
    path less than 8 bits deep (the padding is a prefix of EOS, RFC 7541 §5.2).
    """
    # inner node → [child for bit 0, child for bit 1]: an inner node's index, -2 - symbol for
    # a leaf, -1 for no code
    children: list[list[int]] = [[-1, -1]]
    depth, ones = [0], [True]
    for sym, code in enumerate(huffman_codes()):
        node, length = 0, HUFFMAN_CODE_LENGTHS[sym]
        for i in range(length - 1, -1, -1):
            bit = (code >> i) & 1
            if i == 0:
                children[node][bit] = -2 - sym
                break
            nxt = children[node][bit]
            if nxt == -1:
                nxt = len(children)
                children.append([-1, -1])
                depth.append(depth[node] + 1)
                ones.append(ones[node] and bit == 1)
                children[node][bit] = nxt
            node = nxt
    nexts, syms = [], []
    for state in range(len(children)):
        for nibble in range(16):
            node, sym = state, -1
            for i in (3, 2, 1, 0):
                child = children[node][(nibble >> i) & 1]
                if child == -1 or child == -2 - EOS:
                    node = -1
                    break
                if child < 0:  # a leaf: at most one per nibble, codes are 5 bits or longer
                    sym, node = -2 - child, 0
                else:
                    node = child
            nexts.append(node)
            syms.append(sym if node >= 0 else -1)
    accepting = [s == 0 or (ones[s] and depth[s] < 8) for s in range(len(children))]
    return nexts, syms, accepting


_HUFF_NEXT, _HUFF_SYM, _HUFF_ACCEPT = _huffman_machine()


def huffman_decode(data: bytes) -> bytes:
    out = bytearray()
    state = 0
    nexts, syms = _HUFF_NEXT, _HUFF_SYM
    for byte in data:
        i = state * 16 + (byte >> 4)
        state = nexts[i]
        if state < 0:
            raise HpackError("invalid Huffman code")
        if syms[i] >= 0:
            out.append(syms[i])
        i = state * 16 + (byte & 15)
        state = nexts[i]
        if state < 0:
            raise HpackError("invalid Huffman code")
        if syms[i] >= 0:
            out.append(syms[i])
    if not _HUFF_ACCEPT[state]:
        raise HpackError("invalid Huffman padding")
    return bytes(out)


def _integer(buf: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    """(value, next position) of an integer with an N-bit prefix (RFC 7541 §5.1)."""
    mask = (1 << prefix_bits) - 1
    value = buf[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    while pos < len(buf):
        byte = buf[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 28:
            break
    raise HpackError("integer truncated or too large")


def _string(buf: bytes, pos: int) -> tuple[bytes, int]:
    if pos >= len(buf):
        raise HpackError("string missing")
    huffman = buf[pos] & 0x80
    length, pos = _integer(buf, pos, 7)
    end = pos + length
    if end > len(buf):
        raise HpackError("string truncated")
    raw = buf[pos:end]
    return (huffman_decode(raw) if huffman else raw), end


Field = tuple[bytes | None, bytes | None]  # (name, value); None where it cannot be known


class Decoder:
    """The HPACK decoding context of one direction of one connection.

    ``complete`` says whether every entry of the dynamic table is known; a fresh connection
    starts complete, one joined mid-way does not. It only tells unknown fields apart from
    impossible ones: neither is ever given a name.
    """

    __slots__ = ("entries", "size", "max_size", "size_known", "complete")

    def __init__(self, max_size: int = DEFAULT_TABLE_SIZE, complete: bool = True) -> None:
        # Newest first: (name or None, value, size). A name is None when it was taken from
        # an entry we did not know; its size then counts the value only (a lower bound).
        self.entries: deque[tuple[bytes | None, bytes, int]] = deque()
        self.size = 0
        self.max_size = max_size
        self.size_known = complete  # max_size is the encoder's, not a guess
        self.complete = complete

    def lose(self) -> None:
        """A header block was missed: its insertions shifted every index we knew."""
        self.entries.clear()
        self.size = 0
        self.complete = False
        self.size_known = False  # the missed block may have carried a size update

    def limit(self, max_size: int) -> None:
        """SETTINGS_HEADER_TABLE_SIZE from the decoding endpoint: the encoder must shrink
        its table to it (and says so with a size update we will also see)."""
        if max_size < self.max_size:
            self._resize(max_size)

    def decode(self, block: bytes, cut: bool = False) -> tuple[list[Field], bool]:
        """(fields, whole): ``whole`` is False if the block could not be read to its end,
        which leaves the context lost. ``cut``: ``block`` is only the first bytes of a block
        (the rest was not captured): the fields wholly inside them are returned, and the
        context is lost. Never raises."""
        fields: list[Field] = []
        try:
            self._decode(block, fields)
        except (HpackError, IndexError):
            self.lose()
            return fields, False
        if cut:
            self.lose()
        return fields, not cut

    def _decode(self, buf: bytes, fields: list[Field]) -> None:
        pos, n = 0, len(buf)
        while pos < n:
            if len(fields) >= MAX_FIELDS:
                raise HpackError("too many fields")
            byte = buf[pos]
            if byte & 0x80:  # indexed field
                index, pos = _integer(buf, pos, 7)
                fields.append(self._lookup(index))
            elif byte & 0xE0 == 0x20:  # dynamic table size update
                size, pos = _integer(buf, pos, 5)
                self._resize(size)
            else:
                # 01: with incremental indexing (6-bit prefix); 0000/0001: without / never
                indexing = byte & 0x40
                index, pos = _integer(buf, pos, 6 if indexing else 4)
                name: bytes | None
                if index:
                    name = self._lookup(index)[0]
                else:
                    name, pos = _string(buf, pos)
                value, pos = _string(buf, pos)
                fields.append((name, value))
                if indexing:
                    self._insert(name, value)

    def _lookup(self, index: int) -> Field:
        if index == 0:
            raise HpackError("index 0")
        if index <= len(STATIC_TABLE):
            return STATIC_TABLE[index - 1]
        rank = index - len(STATIC_TABLE) - 1
        if rank < len(self.entries):
            name, value, _ = self.entries[rank]
            return name, value
        if self.complete:
            # Impossible if we knew every entry: we did not (a wrong guess of the size
            # limit, or a miss nobody told us about). Unknown, from now on.
            self.complete = False
        return None, None

    def _insert(self, name: bytes | None, value: bytes) -> None:
        size = ENTRY_OVERHEAD + len(value) + (len(name) if name is not None else 0)
        self.entries.appendleft((name, value, size))
        self.size += size
        self._evict()

    def _resize(self, max_size: int) -> None:
        self.max_size = max_size
        self.size_known = True
        if max_size == 0:  # an empty table is a known table
            self.entries.clear()
            self.size = 0
            self.complete = True
        self._evict()

    def _evict(self) -> None:
        limit = min(self.max_size, MAX_TABLE_BYTES)
        if self.size <= limit:
            return
        # The known entries alone exceed the limit: all older, unknown ones are gone too.
        # (Sizes of entries with unknown names are lower bounds, so this never evicts early.)
        if self.size > self.max_size and self.size_known:
            self.complete = True
        while self.size > limit and self.entries:
            self.size -= self.entries.pop()[2]
        if self.max_size > MAX_TABLE_BYTES:
            self.complete = False  # we dropped entries the peer may still use
