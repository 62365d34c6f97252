"""User side of bpf/l7.bpf.c: load, attach, drain TCP connection, DNS-over-UDP and payload events.

Lifecycle, a straight line::

    with L7Probe(capture_bytes=4096) as probe:   # start(): open → configure → load → attach
        while running:
            for ev in probe.poll(10):              # everything available, as RawEvent tuples
                ...
        probe.counters()                           # kernel-side counters, summed over CPUs

The event layout lives only in bpf/l7.h; the ctypes structure below mirrors it and
tests/probe/test_layout.py checks every offset, size and enum value against the BTF of the
built object. Events are submitted without a ring-buffer wakeup, so ``poll`` drains on a timer.
The calling process is always excluded (the probe must not trace its own Kafka traffic).
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import struct
import time
from enum import IntEnum
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import msgpack

from .libbpf import (
    BpfObject,
    ProbeAttachError,
    ProbeError,
    ProbeLoadError,
    RingReader,
    kernel_has_kfunc,
    kernel_has_uprobe_multi,
    num_possible_cpus,
)
from .node import tgids_named
from .tls import TlsProbes

log = logging.getLogger("kubesight.probe.l7")

__all__ = [
    "CAPTURE_MAX",
    "COUNTER_NAMES",
    "L7EventHeader",
    "L7Kind",
    "L7Probe",
    "L7Flag",
    "L7Role",
    "L7Transport",
    "RawEvent",
    "L7_ACCEPT",
    "L7_CLOSE",
    "L7_CONNECT",
    "L7_FLAG_TLS",
    "L7_DATA_IN",
    "L7_DATA_OUT",
    "L7_ROLE_CLIENT",
    "L7_ROLE_SERVER",
    "L7_ROLE_UNKNOWN",
    "L7_TCP",
    "L7_UDP",
]

CAPTURE_MAX = 8192  # L7_CAPTURE_MAX in l7.h (tested)
# The same programs built twice (bpf/Makefile), tried in this order.
BUILDS = ("l7.bpf.o", "l7_compat.bpf.o")
# With this kfunc (Linux >= 6.16) the fast build writes each event straight into its ring-buffer
# record; without it, and in the compat build, events are built in per-CPU scratch and copied.
DIRECT_RECORDS_KFUNC = "bpf_probe_read_user_dynptr"
POLL_INTERVAL_S = 0.005  # events come without wakeup: how often poll() looks again
TRACEFS = Path("/sys/kernel/tracing")


class L7Kind(IntEnum):
    """enum l7_kind."""

    CONNECT = 1
    ACCEPT = 2
    DATA_OUT = 3
    DATA_IN = 4
    CLOSE = 5


class L7Transport(IntEnum):
    """enum l7_transport (IPPROTO_* numbers)."""

    TCP = 6
    UDP = 17


L7_TCP, L7_UDP = int(L7Transport.TCP), int(L7Transport.UDP)


class L7Flag(IntEnum):
    """enum l7_flag (bits of l7_event.flags)."""

    TLS = 1


L7_FLAG_TLS = int(L7Flag.TLS)
TRANSPORT_NAMES = {int(t): t.name.lower() for t in L7Transport}


class L7Role(IntEnum):
    """enum l7_role."""

    UNKNOWN = 0
    CLIENT = 1
    SERVER = 2


L7_CONNECT, L7_ACCEPT, L7_DATA_OUT, L7_DATA_IN, L7_CLOSE = (int(k) for k in L7Kind)
L7_ROLE_UNKNOWN, L7_ROLE_CLIENT, L7_ROLE_SERVER = (int(r) for r in L7Role)

# enum l7_counter, in order, without the L7_CNT_ prefix (tested against the BTF).
COUNTER_NAMES = (
    "events",
    "ringbuf_drops",
    "truncated",
    "skipped_not_socket",
    "skipped_not_inet",
    "inflight_full",
    "conn_table_full",
    "payload_read_failed",
    "skipped_udp_not_dns",
    "flow_table_full",
    "tls_ciphertext",
    "tls_no_socket",
    "excluded_at_start",
)

# Always excluded by name, from fork or exec on: kubesight's console script (every component
# the supervisor or a container starts as `kubesight <component>`).
OWN_COMM = "kubesight"
COMM_LEN = 16  # TASK_COMM_LEN
_EXCLUDED, _TREE = 1, 2  # own_update's bits: excluded_tgids, excluded_trees


class L7EventHeader(ctypes.Structure):
    """struct l7_event up to payload[] (the payload follows, cap_len bytes)."""

    _fields_ = [
        ("kind", ctypes.c_uint8),
        ("role", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("transport", ctypes.c_uint8),
        ("lport", ctypes.c_uint16),
        ("rport", ctypes.c_uint16),
        ("tgid", ctypes.c_uint32),
        ("fd", ctypes.c_int32),
        ("conn_id", ctypes.c_uint64),
        ("ts_ns", ctypes.c_uint64),
        ("size", ctypes.c_int64),
        ("cap_len", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("srtt_us", ctypes.c_uint32),
        ("retrans", ctypes.c_uint32),
        ("laddr", ctypes.c_uint8 * 16),
        ("raddr", ctypes.c_uint8 * 16),
        ("comm", ctypes.c_char * 16),
    ]


_STRUCT_CODES: dict[Any, str] = {ctypes.c_uint8: "B", ctypes.c_uint16: "H", ctypes.c_uint32: "I",
                 ctypes.c_int32: "i", ctypes.c_uint64: "Q", ctypes.c_int64: "q"}


def struct_format(cls: type[ctypes.Structure], *, skip: frozenset[str] = frozenset(),
                  join: tuple[str, ...] = (), nested: dict[str, str] | None = None) -> str:
    """A little-endian struct format with the same offsets as a ctypes Structure.

    Fields in ``skip`` become pad bytes; the adjacent byte-array fields in ``join`` become
    one ``s`` field (one bytes object and one cache lookup per event instead of three);
    structure fields in ``nested`` are decoded with the format given (without its ``<``).
    """
    nested = nested or {}
    fields: list[tuple[str, Any]] = [(f[0], f[1]) for f in cls._fields_]
    names = [name for name, _ in fields]
    if join:
        first = names.index(join[0])
        start = getattr(cls, join[0]).offset
        end = getattr(cls, join[-1]).offset + getattr(cls, join[-1]).size
        if names[first:first + len(join)] != list(join) or end - start != sum(
                getattr(cls, j).size for j in join):
            raise ValueError(f"{cls.__name__}: {join} are not adjacent fields without gaps")
    fmt, pos = "<", 0
    for name, ctype in fields:
        off, size = getattr(cls, name).offset, getattr(cls, name).size
        if off > pos:
            fmt += f"{off - pos}x"
        if name in join[1:]:
            pass  # inside the field opened by join[0]
        elif join and name == join[0]:
            fmt += f"{end - start}s"
        elif name in skip:
            fmt += f"{size}x"
        elif name in nested:
            if struct.calcsize("<" + nested[name]) != size:
                raise ValueError(f"{cls.__name__}.{name}: format is not {size} bytes")
            fmt += nested[name]
        else:
            fmt += _STRUCT_CODES.get(ctype) or f"{size}s"  # byte arrays
        pos = off + size
    return fmt + (f"{ctypes.sizeof(cls) - pos}x" if ctypes.sizeof(cls) > pos else "")


HEADER = struct.Struct(struct_format(L7EventHeader))
# What the drain hands over per record: u32 record length, then the header, decoded with the
# pads and fd skipped and laddr + raddr + comm as one 48-byte field.
_RECORD = struct.Struct("<I" + struct_format(
    L7EventHeader, skip=frozenset({"fd"}), join=("laddr", "raddr", "comm")
)[1:])

GROUPS_MAX = 8192  # batches opened per ks_ring_group_batches call (it stops early at more)
GROUP_DATA_BYTES = 4 << 20  # bytes of events encoded per ks_ring_group_batches call


class KsGroup(ctypes.Structure):
    """struct ks_group (bpf/drain.c, layout tested): one connection's run of encoded events,
    with copies of the headers of its first record (identity) and latest record (health)."""

    _fields_ = [
        ("conn_id", ctypes.c_uint64),
        ("nevents", ctypes.c_uint32),
        ("data_off", ctypes.c_uint32),
        ("data_len", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("first", L7EventHeader),
        ("last", L7EventHeader),
    ]


_HEADER_FIELDS = frozenset(f[0] for f in L7EventHeader._fields_)
_NAMES = ("laddr", "raddr", "comm")
# One unpack per group: its run, the identity from its first record (as _RECORD decodes it),
# srtt_us and retrans from its latest.
_GROUP = struct.Struct(struct_format(KsGroup, nested={
    "first": struct_format(L7EventHeader, join=_NAMES, skip=_HEADER_FIELDS - {
        "role", "family", "transport", "lport", "rport", "tgid", *_NAMES})[1:],
    "last": struct_format(L7EventHeader, skip=_HEADER_FIELDS - {"srtt_us", "retrans"})[1:],
}))
_NAMES_CACHE_MAX = 8192  # distinct (laddr, raddr, comm) combinations kept decoded


class RawEvent(NamedTuple):
    """One kernel event, decoded but not interpreted (the probe does not parse protocols)."""

    kind: int  # L7Kind
    conn_id: int  # unique per probe instance
    role: int  # L7Role
    tgid: int
    comm: str
    family: int  # socket.AF_INET or AF_INET6
    transport: int  # L7Transport
    laddr: str
    lport: int
    raddr: str
    rport: int
    ts_ns: int  # CLOCK_MONOTONIC
    size: int  # syscall return: bytes transferred; connect 0/-EINPROGRESS; accept new fd
    payload: bytes  # first min(size, capture_bytes) bytes
    flags: int = 0  # L7Flag bits
    srtt_us: int = 0  # TCP data: the connection's smoothed RTT at this event
    retrans: int = 0  # TCP data: its retransmitted segments so far


def _decode_names(family: int, raw: bytes) -> tuple[str, str, str]:
    """laddr[16] raddr[16] comm[16] → (laddr, raddr, comm) strings."""
    width = 4 if family == socket.AF_INET else 16
    return (socket.inet_ntop(family, raw[:width]), socket.inet_ntop(family, raw[16:16 + width]),
            raw[32:].split(b"\0", 1)[0].decode(errors="replace"))


def decode_records(view: memoryview | bytes, used: int, out: list[RawEvent],
                   names: dict[bytes, tuple[str, str, str]]) -> None:
    """Append one RawEvent per ``[u32 length][struct l7_event]`` record in view[:used].

    The hot path (~500-600k events/s here): one copy of the batch, one unpack per record,
    address and process-name strings decoded once per distinct (laddr, raddr, comm) in `names`.
    """
    unpack, rec_size, append, new = _RECORD.unpack_from, _RECORD.size, out.append, tuple.__new__
    data = bytes(view[:used])
    off = 0
    while off < used:
        (length, kind, role, family, transport, lport, rport, tgid, conn_id, ts_ns, size,
         cap_len, flags, srtt_us, retrans, raw) = unpack(data, off)
        decoded = names.get(raw)
        if decoded is None:
            decoded = names[raw] = _decode_names(family, raw)
        start = off + rec_size
        append(new(RawEvent, (kind, conn_id, role, tgid, decoded[2], family, transport,
                              decoded[0], lport,
                              decoded[1], rport, ts_ns, size, data[start:start + cap_len],
                              flags, srtt_us, retrans)))
        off += 4 + length


class ConnectionBatch:
    """One connection's events on their way to one Kafka message: the connection's identity
    once (``meta``), then its ``n`` events as msgpack-encoded ``[kind, unix ts_ns, size,
    payload]`` arrays (the raw.v1 wire form). Filled by the drain (or Publisher.add); made into
    a message, then released, by Publisher.flush. Two kinds: ``EncodedBatch`` holds runs of
    events encoded in Python, ``HeldBatch`` events libksdrain encoded into a buffer of its own.
    """

    __slots__ = ("conn_id",)

    def __init__(self, conn_id: int) -> None:
        self.conn_id = conn_id

    @property
    def meta(self) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def n(self) -> int:
        """Events."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of the encoded events."""
        raise NotImplementedError

    @property
    def encoded(self) -> list[bytes]:
        """The encoded events, in runs: to look at (``value`` makes the message)."""
        raise NotImplementedError

    def value(self, head: bytes) -> bytes:
        """The Kafka message value: ``head`` (the raw.v1 map up to and with the events array
        header), then the events."""
        raise NotImplementedError

    def release(self) -> None:
        """Done with the batch: give back what holds its events (nothing, unless held)."""


class EncodedBatch(ConnectionBatch):
    """Events encoded in Python (decode_grouped, Publisher.add), in runs as they came."""

    __slots__ = ("meta", "encoded", "n", "nbytes")
    meta: dict[str, Any]
    encoded: list[bytes]
    n: int
    nbytes: int

    def __init__(self, conn_id: int, meta: dict[str, Any]) -> None:
        super().__init__(conn_id)
        self.meta = meta
        self.encoded = []
        self.n = 0
        self.nbytes = 0

    def add_encoded(self, run: bytes, events: int) -> None:
        self.encoded.append(run)
        self.n += events
        self.nbytes += len(run)

    def value(self, head: bytes) -> bytes:
        return b"".join((head, *self.encoded))


def connection_meta(conn_id: int, role: int, family: int, transport: int, lport: int, rport: int,
          tgid: int, decoded: tuple[str, str, str]) -> dict[str, Any]:
    """A connection's identity as raw.v1 carries it once per batch."""
    return {"id": conn_id, "tgid": tgid, "comm": decoded[2], "role": role, "family": family,
            "transport": TRANSPORT_NAMES.get(transport, str(transport)),
            "laddr": decoded[0], "lport": lport, "raddr": decoded[1], "rport": rport}


def decode_grouped(view: memoryview | bytes, used: int, offset_ns: int,
                   open_batches: dict[int, ConnectionBatch], sealed: list[ConnectionBatch],
                   names: dict[bytes, tuple[str, str, str]], max_events: int,
                   max_bytes: int) -> int:
    """Decode records straight into per-connection batches (the probe's hot path).

    Unlike ``decode_records`` no per-event object is built: each event becomes the list that
    is msgpack-encoded as is, with the monotonic timestamp already moved to wall-clock time.
    A batch that reaches ``max_events`` or ``max_bytes`` is sealed and a new one opened, so
    no Kafka message outgrows what a broker accepts. Returns the number of events decoded.
    """
    unpack, rec_size, pack = _RECORD.unpack_from, _RECORD.size, msgpack.packb
    data = bytes(view[:used])
    off = count = 0
    while off < used:
        (length, kind, role, family, transport, lport, rport, tgid, conn_id, ts_ns, size,
         cap_len, flags, srtt_us, retrans, raw) = unpack(data, off)
        start = off + rec_size
        off += 4 + length
        count += 1
        run = pack([kind, ts_ns + offset_ns, size, data[start:start + cap_len]])
        batch = open_batches.get(conn_id)
        if (batch is None or not isinstance(batch, EncodedBatch) or batch.n >= max_events
                or batch.nbytes + len(run) > max_bytes):
            if batch is not None:
                sealed.append(batch)
            batch = open_batches[conn_id] = EncodedBatch(
                conn_id, connection_meta(conn_id, role, family, transport, lport, rport, tgid,
                                         _names(names, family, raw)))
        if flags & L7_FLAG_TLS:
            batch.meta["tls"] = True
        if srtt_us:
            batch.meta["srtt_us"], batch.meta["retrans"] = srtt_us, retrans
        batch.add_encoded(run, 1)
    return count


def _names(cache: dict[bytes, tuple[str, str, str]], family: int,
           raw: bytes) -> tuple[str, str, str]:
    decoded = cache.get(raw)
    if decoded is None:
        decoded = cache[raw] = _decode_names(family, raw)
    return decoded


class KsBatchInfo(ctypes.Structure):
    """struct ks_batch_info (bpf/drain.c, layout tested): what Python reads of a batch that
    ks_ring_group_batches holds."""

    _fields_ = [
        ("conn_id", ctypes.c_uint64),
        ("nevents", ctypes.c_uint32),
        ("len", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("srtt_us", ctypes.c_uint32),
        ("retrans", ctypes.c_uint32),
        ("tls_first", ctypes.c_uint32),
        ("data", ctypes.c_uint64),
        ("room", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("first", L7EventHeader),
    ]


_BATCH_COUNTS = ("nevents", "len", "flags", "srtt_us", "retrans", "tls_first", "data", "room",
                 "_pad")
# A new batch's connection and its identity (decoded as _RECORD does), and a batch's counts.
_BATCH_IDENTITY = struct.Struct(struct_format(
    KsBatchInfo, skip=frozenset(_BATCH_COUNTS), nested={"first": struct_format(
        L7EventHeader, join=_NAMES, skip=_HEADER_FIELDS - {
            "role", "family", "transport", "lport", "rport", "tgid", *_NAMES})[1:]}))
_BATCH_STATE = struct.Struct(struct_format(KsBatchInfo,
                                           skip=frozenset({"conn_id", "_pad", "first"})))


class _BatchLib:
    """The batch calls of libksdrain.so. Bound through PyDLL, which keeps the GIL during a
    call: Python reads the batches' table without a call, never while a drain writes it."""

    def __init__(self, path: bytes) -> None:
        # RTLD_NOLOAD: the copy already loaded, whose struct ks_ring the reader holds.
        lib = ctypes.PyDLL(path.decode(), mode=os.RTLD_NOW | os.RTLD_NOLOAD, use_errno=True)
        self.new = lib.ks_batches_new
        self.new.restype = ctypes.c_void_p
        self.new.argtypes = []
        self.free = lib.ks_batches_free
        self.free.restype = None
        self.free.argtypes = [ctypes.c_void_p]
        self.info = lib.ks_batches_info
        self.info.restype = ctypes.c_void_p
        self.info.argtypes = [ctypes.c_void_p]
        self.max = ctypes.c_uint32.in_dll(lib, "ks_batches_max").value
        self.group = lib.ks_ring_group_batches
        self.group.restype = ctypes.c_long
        self.group.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_size_t, ctypes.c_int64, ctypes.c_uint32,
                               ctypes.c_uint32, ctypes.c_size_t, ctypes.c_void_p,
                               ctypes.c_size_t, ctypes.POINTER(ctypes.c_uint64)]
        self.message = lib.ks_batch_message
        self.message.restype = ctypes.c_void_p
        self.message.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_char_p,
                                 ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]


_BATCH_LIBS: dict[bytes, _BatchLib] = {}


def _batch_lib(reader: RingReader) -> tuple[_BatchLib, int]:
    """The batch calls of the libksdrain.so ``reader`` opened its ring with, and that ring."""
    opened = reader.drain_library
    if opened is None:
        raise ProbeError("GroupedDrain: the ring is not open through libksdrain.so")
    path, ring = opened
    key = str(path).encode()
    if key not in _BATCH_LIBS:
        _BATCH_LIBS[key] = _BatchLib(key)
    return _BATCH_LIBS[key], ring


def _oserror(call: str) -> ProbeError:
    err = ctypes.get_errno()
    return ProbeError(f"{call}: {os.strerror(err)}")


class _HeldBatches:
    """A struct ks_batches (bpf/drain.c): the buffers of the batches ks_ring_group_batches
    opened and Python has not released yet, and their table (struct ks_batch_info), read in
    place. Its drain and each of its batches refer to it, so it is freed after the last of
    them."""

    def __init__(self, lib: _BatchLib) -> None:
        self.lib = lib
        self.ptr: int | None = lib.new()
        if not self.ptr:
            raise ProbeError("ks_batches_new: out of memory")
        self._table = memoryview(
            (ctypes.c_char * (lib.max * ctypes.sizeof(KsBatchInfo))).from_address(
                lib.info(self.ptr))).cast("B")
        self._len = ctypes.c_size_t()
        # Done with, for the next drain call to release (a list append is safe from any
        # thread, and from __del__ while a drain call runs).
        self.released: list[int] = []

    def identity(self, batch_id: int) -> tuple[Any, ...]:
        """(conn_id, role, family, transport, lport, rport, tgid, laddr + raddr + comm)."""
        return _BATCH_IDENTITY.unpack_from(self._table, batch_id * _BATCH_IDENTITY.size)

    def state(self, batch_id: int) -> tuple[int, ...]:
        """(nevents, len, flags, srtt_us, retrans, tls_first, data, room), as of the latest
        drain."""
        return _BATCH_STATE.unpack_from(self._table, batch_id * _BATCH_STATE.size)

    def message(self, batch_id: int, head: bytes) -> bytes:
        """head + the batch's events: the one copy out of the buffer. Two calls that take
        no converted arguments where the head fits in the room in front of the events (half
        the cost of a bound call; it shows on connections with a few events a flush)."""
        _, length, _, _, _, _, data, room = self.state(batch_id)
        if len(head) <= room:
            ctypes.memmove(data - len(head), head, len(head))
            return ctypes.string_at(data - len(head), len(head) + length)
        assert self.ptr is not None
        ptr = self.lib.message(self.ptr, batch_id, head, len(head), ctypes.byref(self._len))
        if not ptr:
            raise _oserror("ks_batch_message")
        return ctypes.string_at(ptr, self._len.value)

    def __del__(self) -> None:
        ptr, self.ptr = self.ptr, None
        if ptr:
            self._table.release()
            self.lib.free(ptr)


class HeldBatch(ConnectionBatch):
    """A batch whose events libksdrain encoded into a buffer of its own, where they stay until
    the message is made (``value``, one copy). Its counts and TCP health are read from there:
    they are those of the latest drain call."""

    __slots__ = ("_meta", "_held", "_id", "_final")

    def __init__(self, conn_id: int, meta: dict[str, Any], held: _HeldBatches,
                 batch_id: int) -> None:
        super().__init__(conn_id)
        self._meta = meta
        self._held = held
        self._id = batch_id  # -1 once released
        self._final: tuple[int, ...] = ()  # state() at release

    def _state(self) -> tuple[int, ...]:
        return self._held.state(self._id) if self._id >= 0 else self._final

    @property
    def meta(self) -> dict[str, Any]:
        _, _, flags, srtt_us, retrans, tls_first, _, _ = self._state()
        meta = self._meta
        # The keys in the order the Python fallback adds them: as their first events came.
        if flags & L7_FLAG_TLS and tls_first:
            meta["tls"] = True
        if srtt_us:
            meta["srtt_us"], meta["retrans"] = srtt_us, retrans
        if flags & L7_FLAG_TLS:
            meta["tls"] = True
        return meta

    @property
    def n(self) -> int:
        return self._state()[0]

    @property
    def nbytes(self) -> int:
        return self._state()[1]

    @property
    def encoded(self) -> list[bytes]:
        if self._id < 0:
            raise ValueError("batch released: its events are gone")
        return [self._held.message(self._id, b"")]

    def value(self, head: bytes) -> bytes:
        if self._id < 0:
            raise ValueError("batch released: its events are gone")
        return self._held.message(self._id, head)

    def release(self) -> None:
        if self._id >= 0:
            self._final = self._held.state(self._id)
            self._held.released.append(self._id)
            self._id = -1

    def __del__(self) -> None:
        # A batch dropped without flush (tests, a failed flush) gives its buffer back too.
        if getattr(self, "_id", -1) >= 0:
            self._held.released.append(self._id)


class GroupedDrain:
    """The hot path with libksdrain.so: ks_ring_group_batches (bpf/drain.c) encodes each
    event into the buffer of its connection's open batch, across calls, until Publisher.flush
    makes the message from it or max_events/max_bytes seal it. Python sees a batch when it
    is opened, not per event or per call. Each call encodes at most ``data_bytes`` and opens at
    most ``groups_max`` batches; what does not fit waits in the ring for the next call of the
    same loop."""

    def __init__(self, reader: RingReader, *, groups_max: int = GROUPS_MAX,
                 data_bytes: int = GROUP_DATA_BYTES) -> None:
        self._lib, self._ring = _batch_lib(reader)
        self._held = _HeldBatches(self._lib)
        self._opened = (ctypes.c_uint32 * groups_max)()
        self._data_bytes = data_bytes
        self._nrec = ctypes.c_uint64()

    def drain_into(self, open_batches: dict[int, ConnectionBatch],
                   sealed: list[ConnectionBatch], names: dict[bytes, tuple[str, str, str]], *,
                   offset_ns: int, max_events: int, max_bytes: int) -> int:
        """Everything committed now, into the batches; returns the number of events."""
        held, group, nrec = self._held, self._lib.group, self._nrec
        total = 0
        while True:
            released: Any = None
            if held.released:  # taken whole: a __del__ may append meanwhile
                held.released, ids = [], held.released
                released = (ctypes.c_uint32 * len(ids))(*ids)
            nopened = group(self._ring, held.ptr, released, len(released) if released else 0,
                            offset_ns, max_events, max_bytes, self._data_bytes, self._opened,
                            len(self._opened), ctypes.byref(nrec))
            if nopened < 0:
                raise _oserror("ks_ring_group_batches")
            if not nrec.value:
                return total
            total += nrec.value
            # In the order of their first events, as the fallback opens them: a connection
            # that already has a batch here had it sealed.
            for batch_id in self._opened[:nopened]:
                (conn_id, role, family, transport, lport, rport, tgid,
                 raw) = held.identity(batch_id)
                batch = open_batches.get(conn_id)
                if batch is not None:
                    sealed.append(batch)
                open_batches[conn_id] = HeldBatch(conn_id, connection_meta(
                    conn_id, role, family, transport, lport, rport, tgid,
                    _names(names, family, raw)), held, batch_id)


def pid_max() -> int:
    """The kernel's largest process id + 1 (the per-tgid bitmaps are sized to it)."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return 1 << 22  # PID_MAX_LIMIT on 64-bit


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _default_bpf_dir() -> Path:
    env = os.environ.get("KUBESIGHT_BPF_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "bpf" / "build"


def _ensure_tracefs() -> None:
    """libbpf finds tracepoint ids in tracefs; it is not always mounted."""
    if (TRACEFS / "events").is_dir():
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"nodev", bytes(TRACEFS), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise ProbeAttachError(f"mount tracefs at {TRACEFS}: {os.strerror(err)}") from OSError(
            err, os.strerror(err)
        )
    log.info("mounted tracefs at %s", TRACEFS)


class L7Probe:
    """TCP connect/accept/close and socket payload events for every process but excluded ones.

    ``filter_all=True`` attaches everything but drops every event at the first check: the cost
    floor of the tracepoints, for benchmarks.
    """

    def __init__(
        self,
        *,
        capture_bytes: int = 4096,
        ringbuf_bytes: int = 16 << 20,
        exclude_tgids: tuple[int, ...] | list[int] = (),
        exclude_comms: tuple[str, ...] | list[str] = (),
        filter_all: bool = False,
        tls: bool = True,
        uprobe_multi: bool | None = None,
        build: str | None = None,
        bpf_dir: Path | str | None = None,
    ) -> None:
        if not 0 <= capture_bytes <= CAPTURE_MAX:
            raise ValueError(f"capture_bytes must be within 0..{CAPTURE_MAX}: {capture_bytes}")
        page = os.sysconf("SC_PAGESIZE")
        if ringbuf_bytes < page or ringbuf_bytes & (ringbuf_bytes - 1):
            raise ValueError(f"ringbuf_bytes must be a power of two ≥ {page}: {ringbuf_bytes}")
        self.capture_bytes = capture_bytes
        self.ringbuf_bytes = ringbuf_bytes
        self.filter_all = filter_all
        self.tls = tls
        # TLS uprobes as uprobe_multi links (CAP_BPF + CAP_PERFMON) rather than perf events
        # (CAP_SYS_ADMIN); None: wherever the kernel has them.
        self.uprobe_multi = uprobe_multi
        self.build = build  # which object file; None: the fastest this kernel loads
        self.hooks: list[str] = []  # the sections attached, once started
        self.events_in_place = False  # see DIRECT_RECORDS_KFUNC; known after start()
        self._tls: TlsProbes | None = None
        self.bpf_dir = Path(bpf_dir) if bpf_dir is not None else _default_bpf_dir()
        self._excluded = {os.getpid(), *exclude_tgids}
        self.exclude_comms = frozenset({OWN_COMM, *exclude_comms})
        for comm in self.exclude_comms:
            if not 0 < len(comm.encode()) < COMM_LEN:
                raise ValueError(f"exclude_comms: {comm!r} is not a process name (1..15 bytes)")
        self._obj: BpfObject | None = None
        self._atomic_bits = True  # own_update runs (BPF_PROG_TEST_RUN of a raw_tp program)
        self._reader: RingReader | None = None
        self._grouped: GroupedDrain | None = None  # drain_into's buffers, on its first call
        self._ncpu = num_possible_cpus()
        self._out: list[RawEvent] = []
        self._names: dict[bytes, tuple[str, str, str]] = {}

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """open → configure → load → attach. Raises ProbeLoadError / ProbeAttachError."""
        _ensure_tracefs()
        obj, hooks = self._load_and_attach()
        self.hooks = hooks
        try:
            if self.tls:
                self._tls = TlsProbes(obj, exclude=self._excluded)
                self._tls.scan()
            self._reader = RingReader(obj.map_fd("events"), self.ringbuf_bytes,
                                      self.bpf_dir / "libksdrain.so")
        except BaseException:
            self._obj = None
            obj.close()
            raise
        self.events_in_place = self.build != "l7_compat.bpf.o" and kernel_has_kfunc(
            DIRECT_RECORDS_KFUNC)
        log.info("l7 probe attached %d hooks (%s) from %s; events built %s; capture %d bytes, "
                 "ring %d MiB, drain %s, TLS libraries %s (%s)%s",
                 len(hooks), ", ".join(h.rsplit("/", 1)[-1] for h in hooks), self.build,
                 f"in place ({DIRECT_RECORDS_KFUNC})" if self.events_in_place
                 else "in per-CPU scratch",
                 self.capture_bytes, self.ringbuf_bytes >> 20, self._reader.mode,
                 ", ".join(self.tls_libraries) or "none yet",
                 "uprobe_multi links" if self.uprobe_multi else "uprobes by perf event",
                 ", filtering everything" if self.filter_all else "")

    def _load_and_attach(self) -> tuple[BpfObject, list[str]]:
        """The fast build if this kernel loads and attaches it (its BTF tracepoints on
        sock:sock_{send,recv}_length are tracing programs, which some kernels refuse), else
        the compat build (see bpf/Makefile)."""
        objects = [self.build] if self.build else list(BUILDS)
        for i, name in enumerate(objects):
            obj = self._load(name, last=i + 1 == len(objects))
            if obj is None:
                continue
            try:
                self._obj = obj
                # Exclusions go in before attach: not one event from an excluded process.
                # Those by name cover what runs now; the fork and exec hooks what starts.
                for comm in sorted(self.exclude_comms):
                    obj.map_update("excluded_comms", comm.encode().ljust(COMM_LEN, b"\0"),
                                   b"\x01")
                for tgid in sorted(self._excluded):
                    self.exclude_tgid(tgid)
                hooks = obj.attach_all()
                for tgid in sorted(tgids_named(self.exclude_comms)):
                    self.exclude_tree(tgid)
                self.build = name
                self.uprobe_multi = obj.uprobe_multi
                return obj, hooks
            except ProbeAttachError as exc:
                self._obj = None
                obj.close()
                if i + 1 == len(objects):
                    raise
                log.warning("%s does not attach on this kernel (%s); trying %s", name, exc,
                            objects[i + 1])
            except BaseException:
                self._obj = None
                obj.close()
                raise
        raise ProbeLoadError("no BPF object to load")  # unreachable: BUILDS is not empty

    def _load(self, name: str, *, last: bool) -> BpfObject | None:
        """Open and load one build; None if the kernel refuses it and another build is left
        to try (the last one's refusal is raised, verifier log and all). A build that loads
        only with perf-event uprobes for TLS gets them (said in the log)."""
        multi = self.tls and (self.uprobe_multi if self.uprobe_multi is not None
                              else kernel_has_uprobe_multi())
        path = self.bpf_dir / name
        obj = BpfObject.open(path)  # a missing or unreadable file is not a kernel's refusal
        try:
            try:
                return self._configure_and_load(obj, uprobe_multi=multi)
            except ProbeLoadError as exc:
                if not multi or self.uprobe_multi:  # nothing to fall back to, or asked for
                    raise
                log.warning("%s does not load with uprobe_multi TLS programs (%s); loading it "
                            "with uprobes by perf event", name, _first_line(exc))
                return self._configure_and_load(BpfObject.open(path), uprobe_multi=False)
        except ProbeLoadError as exc:
            if last:
                raise
            log.warning("%s does not load on this kernel (%s); trying the next build", name,
                        _first_line(exc))
            return None

    def _configure_and_load(self, obj: BpfObject, *, uprobe_multi: bool) -> BpfObject:
        """Closes ``obj`` if it does not load."""
        try:
            obj.set_rodata({
                "capture_bytes": self.capture_bytes.to_bytes(4, "little"),
                "filter_all": bytes([self.filter_all]),
            })
            obj.resize_map("events", max_entries=self.ringbuf_bytes)
            for bits in ("excluded_tgids", "excluded_trees", "tls_tgids"):  # a bit per tgid
                obj.resize_map(bits, max_entries=-(-pid_max() // 64))
            if uprobe_multi:
                obj.use_uprobe_multi()
            obj.load()
        except BaseException:
            obj.close()
            raise
        return obj

    def scan_tls(self) -> list[str]:
        """Probe the TLS libraries of processes started since the last scan (new paths)."""
        return self._tls.scan() if self._tls is not None else []

    @property
    def tls_libraries(self) -> list[str]:
        return sorted(self._tls.libraries.values()) if self._tls is not None else []

    @property
    def tls_not_probed(self) -> list[str]:
        """Why each TLS library found could not be probed ("<why>"), one per library."""
        return sorted(self._tls.failed.values()) if self._tls is not None else []

    def exclude_tgid(self, tgid: int) -> None:
        """Drop every event of this process in the kernel, from now on."""
        self._excluded.add(tgid)
        self._update_bits(tgid, set_=_EXCLUDED)

    def exclude_tree(self, tgid: int) -> None:
        """exclude_tgid, and every process it forks from now on is excluded as it is born
        (kubesight's supervisor: a component it restarts is never traced)."""
        self._excluded.add(tgid)
        self._update_bits(tgid, set_=_EXCLUDED | _TREE)

    def include_tgid(self, tgid: int) -> None:
        """Undo exclude_tgid and exclude_tree: for a process that exited, so that the next
        one given its pid is traced. (The kernel also does this as a process exits.)"""
        self._excluded.discard(tgid)
        self._update_bits(tgid, clear=_EXCLUDED | _TREE)

    @property
    def exclusions_fd(self) -> int:
        """The excluded_tgids map, for TcpProbe.share_exclusions."""
        if self._obj is None:
            raise ProbeError("exclusions_fd before start()")
        return self._obj.map_fd("excluded_tgids")

    def is_excluded(self, tgid: int) -> bool:
        """Whether the kernel drops this process's events, whoever set its bit."""
        if self._obj is None:
            return False
        return self._obj.bit("excluded_tgids", tgid)

    def _update_bits(self, tgid: int, *, set_: int = 0, clear: int = 0) -> None:
        # In the kernel (own_update), atomic against the fork, exec and exit hooks.
        if self._obj is None:
            return
        if self._atomic_bits:
            try:
                self._obj.run("own_update", tgid, set_, clear)
                return
            except OSError as exc:  # raw_tp test runs came with Linux 5.10
                log.warning("cannot run own_update on this kernel (%s): exclusion bits are "
                            "written from user space, not atomically against the fork, exec "
                            "and exit hooks", exc)
                self._atomic_bits = False
        for bit, bits in ((_EXCLUDED, "excluded_tgids"), (_TREE, "excluded_trees")):
            if (set_ | clear) & bit:
                self._obj.set_bit(bits, tgid, bool(set_ & bit))

    def close(self) -> None:
        """Detach all programs and free maps; safe to call twice."""
        self._grouped = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._obj is not None:
            self._obj.close()
            self._obj = None
        self._tls = None

    def __enter__(self) -> L7Probe:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- draining --------------------------------------------------------------------------

    def poll(self, timeout_ms: int = 0) -> list[RawEvent]:
        """Every event available now; if none, look again every few ms until timeout_ms."""
        if self._reader is None:
            raise ProbeError("poll() before start()")
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            self._reader.drain(self._decode)
            if self._out or time.monotonic() >= deadline:
                out, self._out = self._out, []
                return out
            time.sleep(min(POLL_INTERVAL_S, max(0.0, deadline - time.monotonic())))

    def drain_into(self, open_batches: dict[int, ConnectionBatch], sealed: list[ConnectionBatch],
                   *, offset_ns: int, max_events: int, max_bytes: int) -> int:
        """Drain everything available now straight into per-connection batches: grouped and
        encoded in C from the ring (``GroupedDrain``), or without libksdrain.so in Python
        (``decode_grouped``). Returns the number of events."""
        if self._reader is None:
            raise ProbeError("drain_into() before start()")
        if len(self._names) > _NAMES_CACHE_MAX:
            self._names.clear()
        if self._reader.can_group:
            if self._grouped is None:
                self._grouped = GroupedDrain(self._reader)
            return self._grouped.drain_into(open_batches, sealed, self._names,
                                            offset_ns=offset_ns, max_events=max_events,
                                            max_bytes=max_bytes)
        total = 0

        def decode(view: memoryview, used: int) -> None:  # no libksdrain.so: group in Python
            nonlocal total
            total += decode_grouped(view, used, offset_ns, open_batches, sealed, self._names,
                                    max_events, max_bytes)

        self._reader.drain(decode)
        return total

    def pending_bytes(self) -> int | None:
        """Bytes waiting in the ring now (None if the reader cannot tell)."""
        return self._reader.pending() if self._reader is not None else None

    def discard(self) -> int:
        """Drain every available event and drop it; returns how many. The least a reader can
        do (bench/probe_overhead.py mode ``bare``)."""
        if self._reader is None:
            raise ProbeError("discard() before start()")
        return self._reader.drain(lambda _view, _used: None)

    def _decode(self, view: memoryview, used: int) -> None:
        if len(self._names) > _NAMES_CACHE_MAX:
            self._names.clear()
        decode_records(view, used, self._out, self._names)

    # --- health ----------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Kernel counters (enum l7_counter) summed over CPUs."""
        if self._obj is None:
            raise ProbeError("counters() before start()")
        out = {}
        for idx, name in enumerate(COUNTER_NAMES):
            raw = self._obj.map_lookup("counters", idx.to_bytes(4, "little"), 8 * self._ncpu)
            out[name] = sum(struct.unpack(f"<{self._ncpu}Q", raw)) if raw else 0
        return out

    @property
    def drain_mode(self) -> str:
        """'c-batch' (libksdrain.so) or 'ctypes-callback' (fallback)."""
        return self._reader.mode if self._reader else "stopped"
