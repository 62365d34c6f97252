"""User side of bpf/tcp.bpf.c: per-connection TCP health aggregated in the kernel.

Lifecycle, a straight line::

    with TcpProbe(exclude_tgids=[...]) as probe:   # start(): open → configure → load → attach
        probe.learn_listener(port, tgid, comm)     # listeners older than the probe (/proc)
        closed = probe.drain()                     # connections destroyed since the last call
        live = probe.connections()                 # every connection tracked now (the map)
        probe.counters()                           # kernel-side counters, summed over CPUs

The kernel keeps one entry per connection (counters, RTT histogram, names); a connection's
final record comes through a ring buffer when its socket is destroyed, and long-lived
connections are read by iterating the map. The layout lives only in bpf/tcp.h; the ctypes
structures below mirror it and tests/probe/test_tcp.py checks every offset, size and enum
value against the BTF of the built object. Errors come as the ``ProbeError`` tree of
``probe/libbpf.py``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import os
import socket
import struct
from enum import IntEnum
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

from .l7 import _default_bpf_dir, _ensure_tracefs, pid_max, struct_format
from .libbpf import BpfObject, ProbeError, ProbeMapError, RingReader, num_possible_cpus

log = logging.getLogger("kubesight.probe.tcp")

__all__ = [
    "COUNTER_NAMES",
    "RTT_SLOTS",
    "KsTcpConn",
    "TcpConnection",
    "TcpFlag",
    "TcpKind",
    "TcpProbe",
    "TcpRole",
    "decode_connection",
    "host_netns",
]

OBJECT = "tcp.bpf.o"
RTT_SLOTS = 32  # KS_TCP_RTT_SLOTS (tested)
COMM_LEN = 16
DEFAULT_RINGBUF_BYTES = 4 << 20
DEFAULT_MAX_CONNECTIONS = 32768
BPF_EXIST = 2  # map update flag: only replace an existing entry


class TcpKind(IntEnum):
    """enum ks_tcp_kind."""

    CLOSE = 1


class TcpRole(IntEnum):
    """enum ks_tcp_role."""

    UNKNOWN = 0
    ACTIVE = 1
    PASSIVE = 2


class TcpFlag(IntEnum):
    """enum ks_tcp_flag (bits of ks_tcp_conn.flags)."""

    ESTABLISHED = 1
    RST_SYN_SENT = 2
    EXCLUDED = 4
    CLOSED = 8
    FIN_SENT = 16


# enum ks_tcp_counter, in order, without the KS_TCP_CNT_ prefix (tested against the BTF).
COUNTER_NAMES = (
    "events",
    "ringbuf_drops",
    "conn_table_full",
    "adopted",
    "excluded",
    "rst_sent_no_socket",
)


class KsTcpConn(ctypes.Structure):
    """struct ks_tcp_conn: the map value and the ring-buffer record."""

    _fields_ = [
        ("kind", ctypes.c_uint8),
        ("role", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("lport", ctypes.c_uint16),
        ("rport", ctypes.c_uint16),
        ("tgid", ctypes.c_uint32),
        ("peer_tgid", ctypes.c_uint32),
        ("sk_err", ctypes.c_int32),
        ("netns", ctypes.c_uint32),
        ("conn_id", ctypes.c_uint64),
        ("opened_ns", ctypes.c_uint64),
        ("established_ns", ctypes.c_uint64),
        ("closed_ns", ctypes.c_uint64),
        ("bytes_acked", ctypes.c_uint64),
        ("bytes_received", ctypes.c_uint64),
        ("acked_base", ctypes.c_uint64),
        ("received_base", ctypes.c_uint64),
        ("srtt_sum_us", ctypes.c_uint64),
        ("retransmits", ctypes.c_uint32),
        ("resets_sent", ctypes.c_uint32),
        ("resets_received", ctypes.c_uint32),
        ("srtt_last_us", ctypes.c_uint32),
        ("srtt_min_us", ctypes.c_uint32),
        ("srtt_max_us", ctypes.c_uint32),
        ("rtt_hist", ctypes.c_uint32 * RTT_SLOTS),
        ("laddr", ctypes.c_uint8 * 16),
        ("raddr", ctypes.c_uint8 * 16),
        ("comm", ctypes.c_char * COMM_LEN),
        ("peer_comm", ctypes.c_char * COMM_LEN),
    ]


class KsTcpProc(ctypes.Structure):
    """struct ks_tcp_proc: a listener's (or an active end's) process."""

    _fields_ = [("tgid", ctypes.c_uint32), ("excluded", ctypes.c_uint8),
                ("_pad", ctypes.c_uint8 * 3), ("comm", ctypes.c_char * COMM_LEN)]


class KsTcpListenKey(ctypes.Structure):
    """struct ks_tcp_listen_key."""

    _fields_ = [("netns", ctypes.c_uint32), ("port", ctypes.c_uint16),
                ("_pad", ctypes.c_uint16)]


# The record with the byte bases skipped and the histogram as raw bytes (unpacked apart).
_CONN = struct.Struct(struct_format(KsTcpConn, skip=frozenset({"acked_base", "received_base"})))
_HIST = struct.Struct(f"<{RTT_SLOTS}I")


class TcpConnection(NamedTuple):
    """One connection as the kernel reports it: counters are cumulative since first seen."""

    kind: int  # TcpKind; 0 for a live map entry
    conn_id: int
    role: int  # TcpRole
    flags: int  # TcpFlag bits
    family: int
    laddr: str
    lport: int
    raddr: str
    rport: int
    netns: int
    tgid: int  # 0: unknown
    comm: str
    peer_tgid: int
    peer_comm: str
    sk_err: int
    opened_ns: int  # CLOCK_MONOTONIC; 0 when opened before the probe
    established_ns: int
    closed_ns: int
    bytes_sent: int  # acknowledged by the peer
    bytes_received: int
    retransmits: int
    resets_sent: int
    resets_received: int
    srtt_sum_us: int
    srtt_last_us: int
    srtt_min_us: int
    srtt_max_us: int
    rtt_hist: tuple[int, ...]  # srtt samples per log2(µs) slot


def _addr(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    addr = ipaddress.IPv6Address(raw[:16])
    return str(addr.ipv4_mapped or addr)  # v4-mapped as /proc/net and listeners show it


def _comm(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def decode_connection(raw: bytes | memoryview, offset: int = 0) -> TcpConnection:
    """struct ks_tcp_conn at ``offset`` → TcpConnection."""
    (kind, role, family, flags, lport, rport, tgid, peer_tgid, sk_err, netns, conn_id,
     opened_ns, established_ns, closed_ns, bytes_acked, bytes_received, srtt_sum_us,
     retransmits, resets_sent, resets_received, srtt_last_us, srtt_min_us, srtt_max_us,
     hist, laddr, raddr, comm, peer_comm) = _CONN.unpack_from(raw, offset)
    return TcpConnection(
        kind, conn_id, role, flags, family, _addr(family, laddr), lport, _addr(family, raddr),
        rport, netns, tgid, _comm(comm), peer_tgid, _comm(peer_comm), sk_err, opened_ns,
        established_ns, closed_ns, bytes_acked, bytes_received, retransmits, resets_sent,
        resets_received, srtt_sum_us, srtt_last_us, srtt_min_us, srtt_max_us,
        _HIST.unpack(hist))


def host_netns() -> int:
    """The inode number of this process's network namespace (the kernel's ns.inum)."""
    return os.stat("/proc/self/ns/net").st_ino


class TcpProbe:
    """Per-connection TCP health for every process but excluded ones."""

    def __init__(self, *, exclude_tgids: tuple[int, ...] | list[int] | set[int] = (),
                 ringbuf_bytes: int = DEFAULT_RINGBUF_BYTES,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 bpf_dir: Path | str | None = None) -> None:
        page = os.sysconf("SC_PAGESIZE")
        if ringbuf_bytes < page or ringbuf_bytes & (ringbuf_bytes - 1):
            raise ValueError(f"ringbuf_bytes must be a power of two ≥ {page}: {ringbuf_bytes}")
        self.ringbuf_bytes = ringbuf_bytes
        self.max_connections = max_connections
        self.bpf_dir = Path(bpf_dir) if bpf_dir is not None else _default_bpf_dir()
        self._excluded = {os.getpid(), *exclude_tgids}
        # An l7 probe's excluded_tgids map (share_exclusions): its hooks and its owner set
        # the bits; this object only reads them.
        self._shared_exclusions: int | None = None
        self._obj: BpfObject | None = None
        self._reader: RingReader | None = None
        self._ncpu = num_possible_cpus()
        self._out: list[TcpConnection] = []
        self._netns = host_netns()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """open → configure → load → attach. Raises ProbeLoadError / ProbeAttachError."""
        obj = BpfObject.open(self.bpf_dir / OBJECT)
        try:
            obj.resize_map("events", max_entries=self.ringbuf_bytes)
            obj.resize_map("conns", max_entries=self.max_connections)
            obj.resize_map("excluded_tgids", max_entries=-(-pid_max() // 64))
            if self._shared_exclusions is not None:
                obj.reuse_map("excluded_tgids", self._shared_exclusions)
            obj.load()
            self._obj = obj
            # Exclusions go in before attach: no connection of an excluded process is tracked.
            for tgid in sorted(self._excluded):
                self.exclude_tgid(tgid)
            _ensure_tracefs()
            hooks = obj.attach_all()
            self._reader = RingReader(obj.map_fd("events"), self.ringbuf_bytes,
                                      self.bpf_dir / "libksdrain.so")
        except BaseException:
            self._obj = None
            obj.close()
            raise
        log.info("tcp probe attached %d hooks (%s); %d connections max, ring %d KiB, drain %s",
                 len(hooks), ", ".join(h.rsplit("/", 1)[-1] for h in hooks),
                 self.max_connections, self.ringbuf_bytes >> 10, self._reader.mode)

    def close(self) -> None:
        """Detach all programs and free maps; safe to call twice."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    def __enter__(self) -> TcpProbe:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _loaded(self, what: str) -> BpfObject:
        if self._obj is None:
            raise ProbeError(f"{what} before start()")
        return self._obj

    # --- configuration while running -------------------------------------------------------

    def share_exclusions(self, map_fd: int) -> None:
        """Before start(): read kubesight's own processes from an l7 probe's excluded_tgids
        (L7Probe.exclusions_fd), which its fork, exec and exit hooks keep from a process's
        first instruction. exclude_tgid and include_tgid then change only this side's
        bookkeeping: the l7 probe's owner sets the bits."""
        if self._obj is not None:
            raise ProbeError("share_exclusions() after start()")
        self._shared_exclusions = map_fd

    def exclude_tgid(self, tgid: int) -> None:
        """Connections this process opens from now on are not tracked."""
        self._excluded.add(tgid)
        self._set_bit(tgid, True)

    def include_tgid(self, tgid: int) -> None:
        """Undo exclude_tgid (the process exited; its pid may be given to another)."""
        self._excluded.discard(tgid)
        self._set_bit(tgid, False)

    def _set_bit(self, tgid: int, on: bool) -> None:
        if self._obj is None or self._shared_exclusions is not None:
            return
        self._obj.set_bit("excluded_tgids", tgid, on)  # no program here writes it: no race

    def learn_listener(self, port: int, tgid: int, comm: str, *, netns: int | None = None
                       ) -> None:
        """Who listens on ``port`` (of this network namespace unless ``netns`` says): for
        listeners older than the probe, which the kernel never saw call listen()."""
        key = KsTcpListenKey(netns=self._netns if netns is None else netns, port=port)
        value = KsTcpProc(tgid=tgid, excluded=tgid in self._excluded,
                          comm=comm.encode()[:COMM_LEN - 1])
        self._loaded("learn_listener()").map_update("listeners", bytes(key), bytes(value))

    def mark_excluded(self, key: bytes, conn: bytes) -> None:
        """Flag one tracked connection (map key and value as ``connections(raw=True)``
        returned them) as kubesight's own: the kernel ignores its events from now on."""
        value = KsTcpConn.from_buffer_copy(conn)
        value.flags |= TcpFlag.EXCLUDED
        # Only over the live entry: a connection destroyed since it was read must not come
        # back (ENOENT, ignored).
        with contextlib.suppress(ProbeMapError):
            self._loaded("mark_excluded()").map_update("conns", key, bytes(value), BPF_EXIST)

    # --- reading ---------------------------------------------------------------------------

    def drain(self) -> list[TcpConnection]:
        """Final records of the connections destroyed since the last call."""
        if self._reader is None:
            raise ProbeError("drain() before start()")
        self._reader.drain(self._decode)
        out, self._out = self._out, []
        return out

    def _decode(self, view: memoryview, used: int) -> None:
        data = bytes(view[:used])
        off = 0
        while off < used:
            (length,) = struct.unpack_from("<I", data, off)
            self._out.append(decode_connection(data, off + 4))
            off += 4 + length

    def connections(self) -> list[tuple[bytes, bytes, TcpConnection]]:
        """(map key, raw value, decoded) of every tracked connection, excluded ones skipped."""
        obj = self._loaded("connections()")
        size = ctypes.sizeof(KsTcpConn)
        out = []
        for key, raw in obj.map_items("conns", 8, size):
            conn = decode_connection(raw)
            if not conn.flags & TcpFlag.EXCLUDED:
                out.append((key, raw, conn))
        return out

    def counters(self) -> dict[str, int]:
        """Kernel counters (enum ks_tcp_counter) summed over CPUs."""
        obj = self._loaded("counters()")
        out = {}
        for idx, name in enumerate(COUNTER_NAMES):
            raw = obj.map_lookup("counters", idx.to_bytes(4, "little"), 8 * self._ncpu)
            out[name] = sum(struct.unpack(f"<{self._ncpu}Q", raw)) if raw else 0
        return out

