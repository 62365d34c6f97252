"""TLS plaintext from uprobes, for a TLS library that only appears after the probe started.

A copy of the system's libssl.so.3 is a different file (another inode): the uprobes attached
at start do not cover it. A client started afterwards with that copy on LD_LIBRARY_PATH must
be found by the probe's rescan, and its HTTPS request and response seen as plaintext, flagged
TLS, with no ciphertext event at all.
"""

from __future__ import annotations

import ctypes.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubesight.probe.l7 import L7_DATA_IN, L7_DATA_OUT, L7_FLAG_TLS, L7Probe
from kubesight.probe.libbpf import BpfObject, ProbeLoadError, kernel_has_uprobe_multi

from tests.e2e.harness import Nginx, wait_for

from .conftest import poll_until

CLIENT = r"""
import socket, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
print("ready", flush=True)
sys.stdin.readline()
with socket.create_connection(("127.0.0.1", int(sys.argv[1]))) as raw:
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"GET /small HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := tls.recv(4096):
            reply += chunk
print(reply.split(b"\r\n", 1)[0].decode(), flush=True)
"""


def _system_libssl() -> Path:
    for candidate in ("/lib/x86_64-linux-gnu/libssl.so.3", "/usr/lib/x86_64-linux-gnu/libssl.so.3"):
        if Path(candidate).exists():
            return Path(candidate)
    name = ctypes.util.find_library("ssl")
    if name is None:
        pytest.skip("no libssl on this machine")
    return Path("/lib") / name


def _tls_bit(probe: L7Probe, tgid: int) -> bool:
    """The kernel's "this process makes TLS calls" bit (tls_tgids, set at its first SSL call)."""
    obj = probe._obj
    assert obj is not None
    word = obj.map_lookup("tls_tgids", (tgid // 64).to_bytes(4, "little"), 8)
    return bool(int.from_bytes(word or bytes(8), "little") >> tgid % 64 & 1)


@pytest.fixture
def nginx_tls(tmp_path: Path) -> Iterator[Nginx]:
    server = Nginx(tmp_path, tls=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("multi", [True, False], ids=["uprobe_multi", "perf_event"])
def test_a_libssl_copy_loaded_after_start_is_probed_and_read_as_plaintext(
        bpf_dir: Path, nginx_tls: Nginx, tmp_path: Path, multi: bool) -> None:
    """Both ways of attaching a uprobe: a uprobe_multi link (Linux >= 6.6; only CAP_BPF
    and CAP_PERFMON, offsets from probe/elf.py) and a perf event (libbpf's own)."""
    if multi and not kernel_has_uprobe_multi():
        pytest.skip("this kernel has no uprobe_multi links (Linux < 6.6)")
    libdir = tmp_path / "lib"
    libdir.mkdir()
    copy = libdir / "libssl.so.3"
    shutil.copy(_system_libssl(), copy)
    with L7Probe(bpf_dir=bpf_dir, uprobe_multi=multi) as probe:
        assert probe.uprobe_multi is multi
        assert str(copy) not in probe.tls_libraries
        client = subprocess.Popen([sys.executable, "-c", CLIENT, str(nginx_tls.port)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "LD_LIBRARY_PATH": str(libdir)})
        assert client.stdin is not None and client.stdout is not None
        try:
            assert client.stdout.readline().strip() == "ready"
            assert str(copy) in Path(f"/proc/{client.pid}/maps").read_text()
            wait_for("the probe's rescan to find the libssl copy", lambda: (
                probe.scan_tls() or True) and str(copy) in probe.tls_libraries, timeout=30)
            client.stdin.write("go\n")
            client.stdin.flush()
            assert client.stdout.readline().strip() == "HTTP/1.1 200 OK"
            mine = poll_until(probe, lambda evs: any(
                e.tgid == client.pid and e.kind == L7_DATA_IN for e in evs))
            tls_bit_while_alive = _tls_bit(probe, client.pid)
        finally:
            client.kill()
            client.wait()
            client.stdin.close()
            client.stdout.close()
        # Its pid may go to a process without TLS: the exit hook clears the bit.
        tls_bit_after_exit = _tls_bit(probe, client.pid)
    assert (tls_bit_while_alive, tls_bit_after_exit) == (True, False)
    data = [e for e in mine if e.tgid == client.pid and e.kind in (L7_DATA_OUT, L7_DATA_IN)]
    assert data and all(e.flags & L7_FLAG_TLS for e in data)  # never the ciphertext
    assert [e.payload[:10] for e in data if e.kind == L7_DATA_OUT] == [b"GET /small"]
    assert data[-1].payload.startswith(b"HTTP/1.1 200 OK")


def test_a_build_refusing_uprobe_multi_programs_loads_with_perf_event_uprobes(
        bpf_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A kernel that knows uprobe_multi links but refuses to load the TLS programs as such
    still gets the fast build, with uprobes by perf event, not the compat build or no probe.
    The refusal is a stand-in (this kernel loads them): BpfObject.load raises for an object
    set up for uprobe_multi, as the verifier would."""
    if not kernel_has_uprobe_multi():
        pytest.skip("this kernel has no uprobe_multi links (Linux < 6.6)")
    real_load = BpfObject.load

    def load(self: BpfObject) -> None:
        if self.uprobe_multi:
            raise ProbeLoadError("Invalid argument\n(stand-in: uprobe_multi programs refused)")
        real_load(self)

    monkeypatch.setattr(BpfObject, "load", load)
    with L7Probe(bpf_dir=bpf_dir) as probe:
        assert (probe.build, probe.uprobe_multi) == ("l7.bpf.o", False)
    assert "does not load with uprobe_multi TLS programs (Invalid argument)" in caplog.text
