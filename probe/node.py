"""What the probe learns about its node from /proc: listening sockets and their processes.

Stream workers name the destination of a client's call by the process that listens on the
address it connected to. Listeners are few and long-lived, so the probe scans them every few
seconds and publishes only changes to the compacted metadata topic.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

_LISTEN = "0A"
_UDP_UNCONNECTED = "07"  # TCP_CLOSE: how /proc/net/udp shows a socket without a peer


class Listener(NamedTuple):
    addr: str
    port: int
    tgid: int
    comm: str


def _decode_addr(hexaddr: str) -> str:
    raw = bytes.fromhex(hexaddr)
    # /proc/net/tcp prints each 32-bit word in host (little-endian) order.
    words = [raw[i:i + 4][::-1] for i in range(0, len(raw), 4)]
    packed = b"".join(words)
    addr = ipaddress.ip_address(packed)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _ephemeral_ports(proc: Path) -> range:
    try:
        low, high = (proc / "sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def _listening_inodes(proc: Path) -> dict[int, tuple[str, int]]:
    """Inodes of TCP sockets in LISTEN, and of UDP sockets bound to a fixed port with no
    peer (a DNS server's; unconnected clients use ephemeral ports, which are left out)."""
    inodes: dict[int, tuple[str, int]] = {}
    ephemeral = _ephemeral_ports(proc)
    for name in ("tcp", "tcp6", "udp", "udp6"):
        udp = name.startswith("udp")
        try:
            lines = (proc / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            addr_hex, port_hex = fields[1].split(":")
            port = int(port_hex, 16)
            if udp:
                if fields[3] != _UDP_UNCONNECTED or not fields[2].endswith(":0000") or (
                        port in ephemeral):
                    continue
            elif fields[3] != _LISTEN:
                continue
            inodes[int(fields[9])] = (_decode_addr(addr_hex), port)
    return inodes


def _socket_owners(proc: Path, wanted: set[int]) -> Iterator[tuple[int, int]]:
    """Yield (inode, tgid) for sockets in ``wanted``, scanning /proc/<pid>/fd."""
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        fd_dir = os.path.join(entry.path, "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in wanted:
                    yield inode, int(entry.name)


def _comm(proc: Path, tgid: int) -> str:
    try:
        return (proc / str(tgid) / "comm").read_text().strip()
    except OSError:
        return ""


def listeners(proc: Path = Path("/proc")) -> list[Listener]:
    """Every listening TCP socket and bound UDP server socket of this network namespace, with
    its owning process."""
    inodes = _listening_inodes(proc)
    found: dict[tuple[str, int], Listener] = {}
    for inode, tgid in _socket_owners(proc, set(inodes)):
        addr, port = inodes[inode]
        key = (addr, port)
        # Several processes share one listener (nginx master and workers): keep the lowest
        # tgid, which is stable across scans.
        if key not in found or tgid < found[key].tgid:
            found[key] = Listener(addr, port, tgid, _comm(proc, tgid))
    return sorted(found.values())


def tgids_named(names: set[str] | frozenset[str], proc: Path = Path("/proc")) -> set[int]:
    """Processes whose name (/proc/<tgid>/comm, the thread group leader's) is one of ``names``."""
    found: set[int] = set()
    if not names:
        return found
    try:
        entries = [e for e in os.listdir(proc) if e.isdigit()]
    except OSError:
        return found
    for entry in entries:
        try:
            comm = (proc / entry / "comm").read_text().rstrip("\n")
        except OSError:
            continue  # exited since the listing
        if comm in names:
            found.add(int(entry))
    return found


def read_pidfiles(run_dir: Path, names: tuple[str, ...] = ()) -> set[int]:
    """tgids of kubesight's own components, from <state>/run/*.pid (only <name>.pid of
    ``names`` if given), to exclude in the kernel."""
    pids: set[int] = set()
    try:
        files = [run_dir / f"{n}.pid" for n in names] if names else list(run_dir.glob("*.pid"))
    except OSError:
        return pids
    for f in files:
        try:
            pids.add(int(f.read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            continue
    return pids


class Conntrack(NamedTuple):
    """The node's connection-tracking table: entries against the maximum, and why it dropped."""

    entries: int
    max: int
    drop: int  # packets dropped: no entry could be made (table full)
    early_drop: int  # entries evicted early to make room
    insert_failed: int


def conntrack(proc: Path = Path("/proc")) -> Conntrack | None:
    """conntrack usage of this network namespace, or None when the kernel has no conntrack
    (``nf_conntrack`` built in or loaded; the probe does not load modules). The per-CPU
    statistics are summed; a kernel without ``/proc/net/stat/nf_conntrack`` reports 0 drops."""
    try:
        entries = int((proc / "sys/net/netfilter/nf_conntrack_count").read_text())
        limit = int((proc / "sys/net/netfilter/nf_conntrack_max").read_text())
    except (OSError, ValueError):
        return None
    totals: dict[str, int] = {}
    try:
        header, *rows = (proc / "net/stat/nf_conntrack").read_text().splitlines()
    except (OSError, ValueError):
        header, rows = "", []
    names = header.split()
    for row in rows:
        for name, value in zip(names, row.split(), strict=False):
            totals[name] = totals.get(name, 0) + int(value, 16)
    return Conntrack(entries, limit, totals.get("drop", 0), totals.get("early_drop", 0),
                     totals.get("insert_failed", 0))


def sockets_of(tgids: set[int], proc: Path = Path("/proc")) -> set[tuple[str, int, str, int]]:
    """(local addr, local port, remote addr, remote port) of every TCP socket these processes
    hold, in this network namespace: how kubesight recognises its own connections that were
    open before its probe started."""
    inodes: set[int] = set()
    for tgid in tgids:
        fd_dir = proc / str(tgid) / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd_dir / fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    found: set[tuple[str, int, str, int]] = set()
    if not inodes:
        return found
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or int(fields[9]) not in inodes:
                continue
            (laddr, lport), (raddr, rport) = (f.split(":") for f in fields[1:3])
            found.add((_decode_addr(laddr), int(lport, 16), _decode_addr(raddr), int(rport, 16)))
    return found
