from __future__ import annotations

from collections import deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubesight.streams.hpack import (
    EOS,
    HUFFMAN_CODE_LENGTHS,
    STATIC_TABLE,
    Decoder,
    HpackError,
    huffman_codes,
    huffman_decode,
)


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def table(decoder: Decoder) -> list[tuple[bytes | None, bytes, int]]:
    return list(decoder.entries)


# --- RFC 7541 Appendix C ------------------------------------------------------------------------

# C.2: one block each, on an empty table; (hex, fields, dynamic table after)
C2 = [
    ("C.2.1", "400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572",
     [(b"custom-key", b"custom-header")], [(b"custom-key", b"custom-header", 55)]),
    ("C.2.2", "040c 2f73 616d 706c 652f 7061 7468", [(b":path", b"/sample/path")], []),
    ("C.2.3", "1008 7061 7373 776f 7264 0673 6563 7265 74", [(b"password", b"secret")], []),
    ("C.2.4", "82", [(b":method", b"GET")], []),
]  # fmt: skip


@pytest.mark.parametrize("name, block, fields, entries", C2, ids=[c[0] for c in C2])
def test_c2_literal_and_indexed_fields(name: str, block: str, fields: list, entries: list):
    decoder = Decoder()
    assert decoder.decode(h(block)) == (fields, True)
    assert table(decoder) == entries


REQUESTS = [
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
     (b":authority", b"www.example.com")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
     (b":authority", b"www.example.com"), (b"cache-control", b"no-cache")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"),
     (b":authority", b"www.example.com"), (b"custom-key", b"custom-value")],
]  # fmt: skip
REQUEST_TABLES = [
    [(b":authority", b"www.example.com", 57)],
    [(b"cache-control", b"no-cache", 53), (b":authority", b"www.example.com", 57)],
    [(b"custom-key", b"custom-value", 54), (b"cache-control", b"no-cache", 53),
     (b":authority", b"www.example.com", 57)],
]  # fmt: skip
DATE1, DATE2 = b"Mon, 21 Oct 2013 20:13:21 GMT", b"Mon, 21 Oct 2013 20:13:22 GMT"
LOCATION = b"https://www.example.com"
COOKIE = b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
RESPONSES = [
    [(b":status", b"302"), (b"cache-control", b"private"), (b"date", DATE1),
     (b"location", LOCATION)],
    [(b":status", b"307"), (b"cache-control", b"private"), (b"date", DATE1),
     (b"location", LOCATION)],
    [(b":status", b"200"), (b"cache-control", b"private"), (b"date", DATE2),
     (b"location", LOCATION), (b"content-encoding", b"gzip"), (b"set-cookie", COOKIE)],
]  # fmt: skip
RESPONSE_TABLES = [  # a 256-byte table: entries are evicted
    [(b"location", LOCATION, 63), (b"date", DATE1, 65), (b"cache-control", b"private", 52),
     (b":status", b"302", 42)],
    [(b":status", b"307", 42), (b"location", LOCATION, 63), (b"date", DATE1, 65),
     (b"cache-control", b"private", 52)],
    [(b"set-cookie", COOKIE, 98), (b"content-encoding", b"gzip", 52), (b"date", DATE2, 65)],
]  # fmt: skip

SEQUENCES = [
    ("C.3 requests", 4096, REQUESTS, REQUEST_TABLES, [
        "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
        "8286 84be 5808 6e6f 2d63 6163 6865",
        "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65"]),
    ("C.4 requests, Huffman", 4096, REQUESTS, REQUEST_TABLES, [
        "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
        "8286 84be 5886 a8eb 1064 9cbf",
        "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"]),
    ("C.5 responses", 256, RESPONSES, RESPONSE_TABLES, [
        "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133"
        "2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70"
        "6c65 2e63 6f6d",
        "4803 3330 37c1 c0bf",
        "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d"
        "54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049"
        "5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e"
        "3d31"]),
    ("C.6 responses, Huffman", 256, RESPONSES, RESPONSE_TABLES, [
        "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6"
        "2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
        "4883 640e ffc1 c0bf",
        "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab"
        "77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f"
        "9587 3160 65c0 03ed 4ee5 b106 3d50 07"]),
]  # fmt: skip


@pytest.mark.parametrize("name, max_size, fields, tables, blocks", SEQUENCES,
                         ids=[s[0] for s in SEQUENCES])
def test_c3_to_c6_sequences_share_the_dynamic_table(
    name: str, max_size: int, fields: list, tables: list, blocks: list[str]
):
    decoder = Decoder(max_size)
    for block, want_fields, want_table in zip(blocks, fields, tables, strict=True):
        assert decoder.decode(h(block)) == (want_fields, True)
        assert table(decoder) == want_table
        assert decoder.size == sum(size for _, _, size in want_table)
        assert decoder.complete


@pytest.mark.parametrize(
    "encoded, prefix, value",
    [("0a", 5, 10), ("1f9a0a", 5, 1337), ("2a", 8, 42)],  # C.1.1 - C.1.3
)
def test_c1_integers(encoded: str, prefix: int, value: int):
    from kubesight.streams.hpack import _integer

    assert _integer(h(encoded), 0, prefix) == (value, len(h(encoded)))


# --- Huffman ------------------------------------------------------------------------------------


def test_huffman_code_is_the_canonical_code_of_appendix_b():
    codes = huffman_codes()
    assert sum(2.0 ** -n for n in HUFFMAN_CODE_LENGTHS) == 1.0  # a complete prefix code
    spot = {0: (0x1FF8, 13), ord(" "): (0x14, 6), ord("0"): (0x0, 5), ord(":"): (0x5C, 7),
            ord("&"): (0xF8, 8), ord("z"): (0x7B, 7), 255: (0x3FFFFEE, 26),
            EOS: (0x3FFFFFFF, 30)}  # fmt: skip
    for sym, (code, length) in spot.items():
        assert (codes[sym], HUFFMAN_CODE_LENGTHS[sym]) == (code, length), sym


def huffman_encode(data: bytes) -> bytes:
    codes = huffman_codes()
    acc = bits = 0
    for byte in data:
        acc = (acc << HUFFMAN_CODE_LENGTHS[byte]) | codes[byte]
        bits += HUFFMAN_CODE_LENGTHS[byte]
    pad = -bits % 8
    acc = (acc << pad) | ((1 << pad) - 1)  # padded with the most significant bits of EOS
    return (acc.to_bytes((bits + pad) // 8, "big")) if bits else b""


@given(st.binary(max_size=200))
def test_huffman_decodes_what_the_code_encodes(data: bytes):
    assert huffman_decode(huffman_encode(data)) == data


@pytest.mark.parametrize(
    "encoded",
    [
        "ff",  # 8 bits of padding: more than 7
        "00",  # '0' (00000) then 000 padding that is not a prefix of EOS
        "ffff ffff",  # EOS itself (30 ones) is an error in a string
        "fe",  # 7 ones, a 0: an incomplete code, not padding
    ],
)
def test_huffman_rejects_bad_padding_and_eos(encoded: str):
    with pytest.raises(HpackError):
        huffman_decode(h(encoded))


# --- an observer's context: blocks it did not see ----------------------------------------------


def test_unknown_context_reports_unknown_fields_and_learns_new_entries():
    decoder = Decoder(complete=False)  # joined mid-connection
    # Static :method GET; a dynamic reference (62) we never saw; a new literal "x: 1" with
    # incremental indexing, then a reference to it (62 is now that entry).
    fields, whole = decoder.decode(h("82 be 40 0178 0131 be"))
    assert whole
    assert fields == [(b":method", b"GET"), (None, None), (b"x", b"1"), (b"x", b"1")]
    assert not decoder.complete


def test_literal_with_an_unknown_name_is_inserted_with_its_known_value():
    decoder = Decoder(complete=False)
    fields, _ = decoder.decode(h("7f00 0176 be"))  # name = dynamic 62 (unknown), value "v"
    assert fields == [(None, b"v"), (None, b"v")]


def test_known_entries_exceeding_the_table_size_prove_the_context_complete():
    decoder = Decoder(complete=False)
    decoder.decode(h("3f45 40 0161 0a" + "61" * 10))  # size update to 100; a: 10 × a (43 bytes)
    assert not decoder.complete and decoder.max_size == 100
    decoder.decode(h("40 0162 1e" + "62" * 30))  # b: 30 × b (63 bytes): a is evicted
    assert decoder.complete and [e[0] for e in decoder.entries] == [b"b"]
    # In a complete context an out-of-range index is impossible: it makes the context
    # unknown again rather than being believed.
    fields, _ = decoder.decode(h("bf"))
    assert fields == [(None, None)] and not decoder.complete


def test_size_update_to_zero_empties_and_completes_the_table():
    decoder = Decoder(complete=False)
    fields, whole = decoder.decode(h("20 3fe11f 40 0161 0162 be"))  # size 0, size 4096, a: b
    assert whole and fields == [(b"a", b"b"), (b"a", b"b")]
    assert decoder.complete and decoder.max_size == 4096


def test_settings_limit_shrinks_the_table():
    decoder = Decoder()
    decoder.decode(h("40 0161 0162"))
    decoder.limit(0)
    assert decoder.entries == deque() and decoder.max_size == 0
    decoder.limit(4096)  # raising the limit changes nothing until the encoder says so
    assert decoder.max_size == 0


def test_a_missed_block_loses_the_context():
    decoder = Decoder()
    decoder.decode(h("40 0161 0162"))
    decoder.lose()
    assert decoder.decode(h("be")) == ([(None, None)], True)
    # The missed block may have changed the table size: filling the table we assume proves
    # nothing until a size update says what the size is.
    fields, whole = decoder.decode(h("40 0161 7fdd 1e" + "61" * 4060))  # 4093 bytes of 4096
    assert whole and fields == [(b"a", b"a" * 4060)]
    fields, whole = decoder.decode(h("40 0162 0162"))  # a and b exceed 4096 together
    assert whole and not decoder.complete and [e[0] for e in decoder.entries] == [b"b"]


def test_a_cut_block_gives_its_whole_fields_then_loses_the_context():
    block = h("82 40 0161 0162 40 0163 0a" + "64" * 10)
    decoder = Decoder()
    fields, whole = decoder.decode(block[:-4], cut=True)
    assert fields == [(b":method", b"GET"), (b"a", b"b")] and not whole
    assert decoder.decode(h("be")) == ([(None, None)], True)


@pytest.mark.parametrize(
    "block",
    ["80", "3f", "41 7f", "40 0261", "ff ffff ffff ff", "00 8f ff"],  # index 0, truncations
)
def test_malformed_blocks_are_reported_not_raised(block: str):
    decoder = Decoder()
    fields, whole = decoder.decode(h(block))
    assert not whole and not decoder.complete


# --- properties: a test-side encoder with a dynamic table --------------------------------------


class Encoder:
    """Enough of an HPACK encoder to produce every representation the decoder must read."""

    def __init__(self, max_size: int = 4096) -> None:
        self.entries: deque[tuple[bytes, bytes]] = deque()
        self.max_size = max_size

    def size(self) -> int:
        return sum(32 + len(n) + len(v) for n, v in self.entries)

    def _evict(self) -> None:
        while self.entries and self.size() > self.max_size:
            self.entries.pop()

    def _index(self, name: bytes, value: bytes | None) -> int:
        everything = list(STATIC_TABLE) + list(self.entries)
        for i, (n, v) in enumerate(everything):
            if n == name and (value is None or v == value):
                return i + 1
        return 0

    @staticmethod
    def _int(value: int, prefix: int, flags: int) -> bytes:
        limit = (1 << prefix) - 1
        if value < limit:
            return bytes([flags | value])
        out, value = [flags | limit], value - limit
        while value >= 128:
            out.append((value & 127) | 128)
            value >>= 7
        return bytes(out + [value])

    def _str(self, data: bytes, huffman: bool) -> bytes:
        if huffman:
            coded = huffman_encode(data)
            return self._int(len(coded), 7, 0x80) + coded
        return self._int(len(data), 7, 0) + data

    def encode(self, fields: list[tuple[bytes, bytes]], draw: st.DrawFn) -> bytes:
        out = b""
        if draw(st.integers(0, 9)) == 0:  # a size update now and then
            self.max_size = draw(st.sampled_from([0, 64, 256, 4096]))
            out += self._int(self.max_size, 5, 0x20)
            self._evict()
        for name, value in fields:
            full = self._index(name, value)
            kind = draw(st.sampled_from(["indexed", "incremental", "without", "never"]))
            if kind == "indexed" and full:
                out += self._int(full, 7, 0x80)
                continue
            kind = "incremental" if kind == "indexed" else kind
            name_index = self._index(name, None) if draw(st.booleans()) else 0
            prefix, flags = {"incremental": (6, 0x40), "without": (4, 0), "never": (4, 0x10)}[kind]
            out += self._int(name_index, prefix, flags)
            if not name_index:
                out += self._str(name, draw(st.booleans()))
            out += self._str(value, draw(st.booleans()))
            if kind == "incremental":
                self.entries.appendleft((name, value))
                self._evict()
        return out


NAMES = st.sampled_from([b":path", b":status", b"content-type", b"grpc-status", b"x-a", b"x-b"])
VALUES = st.sampled_from([b"", b"/", b"200", b"application/grpc", b"0", b"a" * 40, b"\x00\xff"])
BLOCKS = st.lists(st.lists(st.tuples(NAMES, VALUES), max_size=8), min_size=1, max_size=12)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(BLOCKS, st.data())
def test_decoder_reads_back_any_encoding(blocks: list[list[tuple[bytes, bytes]]],
                                         data: st.DataObject):
    encoder, decoder = Encoder(), Decoder()
    for fields in blocks:
        assert decoder.decode(encoder.encode(fields, data.draw)) == (fields, True)
        assert [(n, v) for n, v, _ in decoder.entries] == list(encoder.entries)


@PROPERTY
@given(BLOCKS, st.data())
def test_after_missed_blocks_fields_are_right_or_unknown_never_wrong(
    blocks: list[list[tuple[bytes, bytes]]], data: st.DataObject
):
    encoder, decoder = Encoder(), Decoder()
    missed = data.draw(st.sets(st.integers(0, len(blocks) - 1)))
    for i, fields in enumerate(blocks):
        block = encoder.encode(fields, data.draw)
        if i in missed:
            decoder.lose()
            continue
        got, whole = decoder.decode(block)
        assert whole and len(got) == len(fields)
        for (name, value), (true_name, true_value) in zip(got, fields, strict=True):
            assert name in (None, true_name) and value in (None, true_value)
            assert value is not None or name is None
        if decoder.complete:  # every entry the encoder can use is known, by value at least
            known = list(decoder.entries)[: len(encoder.entries)]
            for (name, value, _), (true_name, true_value) in zip(known, encoder.entries,
                                                                  strict=True):
                assert name in (None, true_name) and value == true_value


@PROPERTY
@given(st.binary(max_size=300), st.booleans())
def test_random_bytes_never_raise(block: bytes, complete: bool):
    decoder = Decoder(complete=complete)
    fields, _ = decoder.decode(block)
    assert isinstance(fields, list)
    assert decoder.size == sum(size for _, _, size in decoder.entries)
