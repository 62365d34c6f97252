"""The Python view of struct l7_event and the l7 enums matches bpf/l7.h, via the object's BTF."""

from __future__ import annotations

import ctypes
import json
import socket
import struct
import subprocess
from enum import IntEnum
from pathlib import Path
from typing import Any

import pytest
from kubesight.probe import l7


@pytest.fixture(scope="module")
def btf(bpf_dir: Path) -> dict[str, dict[str, Any]]:
    """Named BTF types of l7.bpf.o (bpftool's JSON dump), by name."""
    out = subprocess.run(["bpftool", "-j", "btf", "dump", "file", str(bpf_dir / "l7.bpf.o")],
                         check=True, capture_output=True, text=True).stdout
    types = json.loads(out)["types"]
    return {t["name"]: t for t in types if t.get("name") and t["kind"] in ("STRUCT", "ENUM")}


def test_header_fields_match_btf(btf: dict[str, dict[str, Any]]) -> None:
    members = btf["l7_event"]["members"]
    header = [m for m in members if m["name"] != "payload"]
    assert [name for name, _ in l7.L7EventHeader._fields_] == [m["name"] for m in header]
    for m in header:
        assert getattr(l7.L7EventHeader, m["name"]).offset * 8 == m["bits_offset"], m["name"]


def test_header_field_sizes_match_btf(btf: dict[str, dict[str, Any]]) -> None:
    members = btf["l7_event"]["members"]
    offsets = [m["bits_offset"] // 8 for m in members]
    # Each field's size in C is the gap to the next member (explicit _pad fields: no holes).
    sizes = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    for (name, ctype), size in zip(l7.L7EventHeader._fields_, sizes, strict=True):
        assert ctypes.sizeof(ctype) == size, name


def test_payload_follows_header_and_is_capture_max(btf: dict[str, dict[str, Any]]) -> None:
    payload = next(m for m in btf["l7_event"]["members"] if m["name"] == "payload")
    assert payload["bits_offset"] // 8 == ctypes.sizeof(l7.L7EventHeader)
    assert btf["l7_event"]["size"] == ctypes.sizeof(l7.L7EventHeader) + l7.CAPTURE_MAX


def test_struct_decoder_matches_ctypes_layout() -> None:
    assert l7.HEADER.size == ctypes.sizeof(l7.L7EventHeader)
    raw = bytes(range(l7.HEADER.size))
    fields = dict(zip((n for n, _ in l7.L7EventHeader._fields_), l7.HEADER.unpack(raw),
                      strict=True))
    ref = l7.L7EventHeader.from_buffer_copy(raw)
    assert fields["conn_id"] == ref.conn_id and fields["size"] == ref.size
    assert fields["lport"] == ref.lport and fields["cap_len"] == ref.cap_len
    comm = l7.L7EventHeader.comm
    assert fields["laddr"] == bytes(ref.laddr)
    assert fields["comm"] == raw[comm.offset:comm.offset + comm.size]
    assert (fields["srtt_us"], fields["retrans"]) == (ref.srtt_us, ref.retrans)


@pytest.mark.parametrize(("enum_name", "prefix", "py_enum"), [
    ("l7_kind", "L7_", l7.L7Kind),
    ("l7_role", "L7_ROLE_", l7.L7Role),
    ("l7_transport", "L7_", l7.L7Transport),
    ("l7_flag", "L7_FLAG_", l7.L7Flag),
])
def test_enums_match_btf(btf: dict[str, dict[str, Any]], enum_name: str, prefix: str,
                         py_enum: type[IntEnum]) -> None:
    c_values = {v["name"]: v["val"] for v in btf[enum_name]["values"]}
    assert c_values == {prefix + member.name: int(member) for member in py_enum}
    for c_name, val in c_values.items():
        assert getattr(l7, c_name) == val  # module-level constants carry the C names


def test_counter_names_match_btf(btf: dict[str, dict[str, Any]]) -> None:
    values = sorted(btf["l7_counter"]["values"], key=lambda v: v["val"])
    names = [v["name"].removeprefix("L7_CNT_").lower() for v in values]
    assert names[-1] == "_max" and values[-1]["val"] == len(l7.COUNTER_NAMES)
    assert tuple(names[:-1]) == l7.COUNTER_NAMES
    assert [v["val"] for v in values[:-1]] == list(range(len(l7.COUNTER_NAMES)))


@pytest.mark.parametrize(("family", "laddr", "raddr"), [
    (socket.AF_INET, "10.1.2.3", "127.0.0.1"),
    (socket.AF_INET6, "fd00::1", "::ffff:10.0.0.7"),
])
def test_decoder_reads_what_the_kernel_layout_writes(family: int, laddr: str, raddr: str) -> None:
    records = b""
    for conn_id, payload in ((7, b"GET / HTTP/1.1\r\n"), (8, b"")):
        hdr = l7.L7EventHeader(kind=l7.L7_DATA_OUT, role=l7.L7_ROLE_CLIENT, family=family,
                               transport=l7.L7_TCP, lport=40000, rport=80, tgid=4242, fd=5,
                               conn_id=conn_id, ts_ns=123, size=1000, cap_len=len(payload),
                               comm=b"curl")
        packed = socket.inet_pton(family, laddr)
        ctypes.memmove(hdr.laddr, packed, len(packed))
        packed = socket.inet_pton(family, raddr)
        ctypes.memmove(hdr.raddr, packed, len(packed))
        body = bytes(hdr) + payload
        records += struct.pack("<I", len(body)) + body
    out: list[l7.RawEvent] = []
    l7.decode_records(memoryview(records), len(records), out, {})
    assert out == [
        l7.RawEvent(l7.L7_DATA_OUT, conn_id, l7.L7_ROLE_CLIENT, 4242, "curl", family,
                    l7.L7_TCP, laddr, 40000, raddr, 80, 123, 1000, payload)
        for conn_id, payload in ((7, b"GET / HTTP/1.1\r\n"), (8, b""))
    ]


def test_transport_numbers_are_ipproto() -> None:
    assert (l7.L7Transport.TCP, l7.L7Transport.UDP) == (socket.IPPROTO_TCP, socket.IPPROTO_UDP)


def test_group_struct_matches_the_drain_library(bpf_dir: Path) -> None:
    """struct ks_group (bpf/drain.c) against its ctypes mirror: size, then every offset."""
    from kubesight.probe.libbpf import _DrainLib

    layout = list(_DrainLib(bpf_dir / "libksdrain.so").group_layout)
    fields = [name for name, _ in l7.KsGroup._fields_]
    assert layout == [ctypes.sizeof(l7.KsGroup)] + [getattr(l7.KsGroup, f).offset for f in fields]
    # The copied headers are the fixed part of struct l7_event, whose layout is tested above.
    assert l7.KsGroup.first.size == l7.KsGroup.last.size == ctypes.sizeof(l7.L7EventHeader)
    assert l7._GROUP.size == ctypes.sizeof(l7.KsGroup)


def test_batch_info_struct_matches_the_drain_library(bpf_dir: Path) -> None:
    """struct ks_batch_info (bpf/drain.c) against its ctypes mirror: size, then every offset."""
    lib = ctypes.CDLL(str(bpf_dir / "libksdrain.so"))
    fields = [name for name, _ in l7.KsBatchInfo._fields_]
    layout = list((ctypes.c_uint32 * (1 + len(fields))).in_dll(lib, "ks_batch_info_layout"))
    assert layout == [ctypes.sizeof(l7.KsBatchInfo)] + [getattr(l7.KsBatchInfo, f).offset
                                                         for f in fields]
    assert l7.KsBatchInfo.first.size == ctypes.sizeof(l7.L7EventHeader)
    assert l7._BATCH_IDENTITY.size == l7._BATCH_STATE.size == ctypes.sizeof(l7.KsBatchInfo)
