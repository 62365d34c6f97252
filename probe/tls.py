"""TLS plaintext: find the OpenSSL libraries the node's processes load, attach uprobes to them.

A uprobe belongs to a file, not to a process: once ``libssl.so.3`` is probed, every process
that maps that file is covered, including processes started later. New *files* (another
OpenSSL version, a container's own copy) appear with new processes, so ``scan()`` looks at the
memory maps of processes it has not seen before, and is called again on a timer.

Containers: a path in ``/proc/<pid>/maps`` is in the process's mount namespace, so the file is
opened as ``/proc/<pid>/root/<path>``; files are identified by (device, inode) to probe each
once. Statically linked TLS (Go's crypto/tls, BoringSSL inside a binary, Java) is not seen.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from .libbpf import BpfObject, ProbeAttachError

log = logging.getLogger("kubesight.probe.tls")

# (entry program, return program, OpenSSL function), as in bpf/l7.bpf.c.
FUNCTIONS = (
    ("ssl_write_enter", "ssl_write_exit", "SSL_write"),
    ("ssl_read_enter", "ssl_read_exit", "SSL_read"),
    ("ssl_write_ex_enter", "ssl_write_ex_exit", "SSL_write_ex"),  # OpenSSL ≥ 1.1.1
    ("ssl_read_ex_enter", "ssl_read_ex_exit", "SSL_read_ex"),
)
LIBRARY_MARK = "/libssl.so"
MAX_NEW_PIDS_PER_SCAN = 4096  # bounds one scan's work on a busy node; the rest wait a tick


def _mapped_tls_libraries(proc: Path, pid: str) -> Iterator[str]:
    try:
        with open(proc / pid / "maps", "rb") as maps:
            for line in maps:
                if LIBRARY_MARK.encode() in line:
                    path = line.split(None, 5)[-1].strip().decode(errors="replace")
                    if path.startswith("/"):
                        yield path
    except OSError:  # gone, or a kernel thread
        return


class TlsProbes:
    """The TLS libraries probed so far, on one loaded BPF object."""

    def __init__(self, obj: BpfObject, *, proc: Path = Path("/proc"),
                 exclude: set[int] | None = None) -> None:
        self._obj = obj
        self._proc = proc
        self._exclude = exclude if exclude is not None else set()
        self._seen_pids: set[int] = set()
        self.libraries: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) → path probed
        self.failed: dict[tuple[int, int], str] = {}  # → why it could not be probed

    def scan(self) -> list[str]:
        """Probe the TLS libraries mapped by processes not scanned before; returns the paths
        newly probed."""
        try:
            pids = {int(e) for e in os.listdir(self._proc) if e.isdigit()}
        except OSError:
            return []
        self._seen_pids &= pids  # forget the dead, so reused pids are looked at again
        new = sorted(pids - self._seen_pids - self._exclude)[:MAX_NEW_PIDS_PER_SCAN]
        attached = []
        for pid in new:
            self._seen_pids.add(pid)
            for path in _mapped_tls_libraries(self._proc, str(pid)):
                probed = self._probe(pid, path)
                if probed:
                    attached.append(probed)
        return attached

    def _probe(self, pid: int, path: str) -> str | None:
        host_path = str(self._proc / str(pid) / "root") + path
        try:
            st = os.stat(host_path)
        except OSError:
            return None
        key = (st.st_dev, st.st_ino)
        if key in self.libraries or key in self.failed:
            return None
        attached = 0
        denied: ProbeAttachError | None = None
        for enter, leave, function in FUNCTIONS:
            try:
                self._obj.attach_uprobe(enter, host_path, function)
                self._obj.attach_uprobe(leave, host_path, function, retprobe=True)
                attached += 1
            except ProbeAttachError as exc:
                # SSL_read_ex/SSL_write_ex are missing before OpenSSL 1.1.1: the others do.
                log.debug("%s", exc)
                cause = exc.__cause__
                if isinstance(cause, OSError) and cause.errno in (errno.EPERM, errno.EACCES):
                    denied = exc
        if not attached and denied is not None:
            how = ("uprobe_multi links need CAP_BPF and CAP_PERFMON" if self._obj.uprobe_multi
                   else "a uprobe by perf event needs CAP_SYS_ADMIN (Linux >= 6.6 needs only "
                        "CAP_BPF and CAP_PERFMON, with uprobe_multi links)")
            self.failed[key] = f"uprobes not permitted: {how}"
            log.warning("TLS library %s (pid %d): not probed, HTTPS stays ciphertext: %s (%s)",
                        path, pid, self.failed[key], denied)
            return None
        if not attached:
            self.failed[key] = "no SSL_read/SSL_write symbols"
            log.warning("TLS library %s (pid %d): no SSL_read/SSL_write to probe", path, pid)
            return None
        self.libraries[key] = path
        log.info("TLS: probing %s (first seen in pid %d, %d of %d functions)", path, pid,
                 attached, len(FUNCTIONS))
        return path
