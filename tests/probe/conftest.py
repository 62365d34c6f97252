"""Fixtures for the kernel-side tests: the built BPF object, a real nginx, event collection."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubesight.probe.l7 import L7Probe, RawEvent

REPO = Path(__file__).resolve().parents[2]
BIG_BODY = "x" * 2000


@pytest.fixture(scope="session")
def bpf_dir() -> Path:
    """bpf/build with l7.bpf.o, built with `make -C bpf` unless KUBESIGHT_BPF_DIR names one."""
    if env := os.environ.get("KUBESIGHT_BPF_DIR"):
        path = Path(env)
    else:
        if not Path("/sys/kernel/btf/vmlinux").exists():
            pytest.skip("kernel has no BTF (/sys/kernel/btf/vmlinux): cannot build CO-RE objects")
        if shutil.which("clang") is None or shutil.which("bpftool") is None:
            pytest.skip("clang and bpftool are needed to build bpf/ (make apt)")
        proc = subprocess.run(["make", "-s", "-C", str(REPO / "bpf")], capture_output=True,
                              text=True)
        assert proc.returncode == 0, f"make -C bpf failed:\n{proc.stdout}\n{proc.stderr}"
        path = REPO / "bpf" / "build"
    if not (path / "l7.bpf.o").exists():
        pytest.skip(f"{path}/l7.bpf.o not built")
    return path


@pytest.fixture(scope="session")
def bpf_root(bpf_dir: Path) -> Path:
    """Like bpf_dir, for tests that load programs into the kernel: needs root."""
    if os.geteuid() != 0:
        pytest.skip("loading BPF programs needs root")
    return bpf_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out.update(int(c) for c in (task / "children").read_text().split())
    return out


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@dataclass
class Nginx:
    port: int
    master: int
    workers: set[int]
    ipv6: bool  # also listening on [::1]:port

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    """A real nginx on a free loopback port (IPv4, and [::1] where it exists): / says hello,
    /big returns 2000 bytes."""
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.skip("nginx not installed (make apt)")
    port = free_port()
    ipv6 = _ipv6_loopback()
    listen_v6 = f"listen [::1]:{port};" if ipv6 else ""
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
daemon off; master_process on; worker_processes 1;
pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fcgi; uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
    server {{
        listen 127.0.0.1:{port}; {listen_v6}
        location / {{ return 200 "hello\\n"; }}
        location /big {{ return 200 "{BIG_BODY}"; }}
    }}
}}
""")
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    log = tmp_path / "error.log"
    proc = subprocess.Popen([binary, "-p", str(tmp_path), "-e", str(log), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, f"nginx exited: {log.read_text(errors='replace')}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                workers = _children(proc.pid)
                if workers:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "nginx did not answer within 10 s"
            time.sleep(0.02)
        yield Nginx(port=port, master=proc.pid, workers=workers, ipv6=ipv6)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def poll_until(probe: L7Probe, done: Callable[[list[RawEvent]], bool],
               timeout: float = 10.0) -> list[RawEvent]:
    """Accumulate probe.poll() results until done(events) or the deadline; returns them all."""
    events: list[RawEvent] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events.extend(probe.poll(20))
        if done(events):
            return events
    return events


def wrk_while_draining(url: str, wrk_args: list[str],
                       step: Callable[[subprocess.Popen[str]], None]) -> tuple[str, int]:
    """Run wrk against ``url`` while ``step(wrk)`` drains the probe, over and over, in a
    thread (it must wait by itself, ~10 ms, as the probe's own loop does); returns wrk's output
    and pid once wrk has finished and the thread has stopped."""
    stop = threading.Event()
    wrk = subprocess.Popen(["wrk", *wrk_args, url], stdout=subprocess.PIPE, text=True)

    def loop() -> None:
        while not stop.is_set():
            step(wrk)

    drainer = threading.Thread(target=loop)
    drainer.start()
    try:
        out, _ = wrk.communicate(timeout=30)
    finally:
        stop.set()
        drainer.join()
    return out, wrk.pid
