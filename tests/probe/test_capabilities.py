"""The probe works with exactly the capabilities the DaemonSet grants, and no more: real BPF
loaded and attached (the L7 probe with uprobes on a real libssl, the TCP probe), a real curl
request captured, the exclusion program run, the /proc walks and the drain's real-time policy,
against a server running as another user (nobody), as applications do. The capability list is
read from the manifest, so the test follows it. TLS needs uprobe_multi links for that: a uprobe
made by perf event needs CAP_SYS_ADMIN, which the DaemonSet does not grant (the probe then says
so). Without CAP_SYS_PTRACE another user's listener and libssl go unseen; without CAP_BPF
nothing loads: the restriction is real."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_ports
from tests.e2e.harness import wait_for
from tests.test_deploy import containers

pytestmark = pytest.mark.bpf

# Runs under setpriv with the capability set under test; prints what worked as JSON.
SCRIPT = r"""
import json, os, subprocess, sys, time
from kubesight.probe import node
from kubesight.probe.l7 import L7_DATA_OUT, L7Probe
from kubesight.probe.tcp import TcpProbe

port, server_pid = int(sys.argv[1]), int(sys.argv[2])
out = {"caps": open("/proc/self/status").read().split("CapEff:")[1].split()[0]}
try:
    with L7Probe(tls=True) as l7, TcpProbe() as tcp:
        out["loaded"] = True
        out["tls_libraries"] = l7.tls_libraries
        curl = subprocess.Popen(["curl", "-sS", "-o", "/dev/null",
                                 f"http://127.0.0.1:{port}/"])
        curl.wait(timeout=20)
        got, deadline = False, time.monotonic() + 20
        while not got and time.monotonic() < deadline:
            got = any(e.kind == L7_DATA_OUT and e.tgid == curl.pid
                      and e.payload.startswith(b"GET ") for e in l7.poll(50))
        out["captured"] = got
        l7.exclude_tree(os.getpid())
        out["excluded"] = l7.is_excluded(os.getpid())
        out["listener"] = any(x.port == port and x.tgid == server_pid
                              for x in node.listeners())
        seen, deadline = False, time.monotonic() + 20
        while not seen and time.monotonic() < deadline:  # curl's, closed by now
            seen = any(c.tgid == curl.pid and c.rport == port for c in tcp.drain())
            time.sleep(0.05)
        out["tcp_closed"] = seen
    with L7Probe(tls=True, uprobe_multi=False) as old_way:  # uprobes by perf event
        out["perf_event_tls"] = old_way.tls_libraries
        out["perf_event_refused"] = old_way.tls_not_probed
except Exception as exc:
    out["loaded"] = False
    out["error"] = f"{type(exc).__name__}: {exc}"[:500]
try:
    os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))
    out["realtime"] = True
except PermissionError:
    out["realtime"] = False
print(json.dumps(out))
"""


def daemonset_capabilities() -> list[str]:
    probe = containers("DaemonSet")["probe"]
    return [c.lower() for c in probe["securityContext"]["capabilities"]["add"]]


def run_with(caps: list[str], tmp_path: Path) -> dict[str, object]:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop capabilities")
    if shutil.which("curl") is None:
        pytest.skip("curl not installed (make apt)")
    script = tmp_path / "caps.py"
    script.write_text(SCRIPT)
    only = ",".join(["-all", *(f"+{c}" for c in caps)])
    (port,) = free_ports(1)
    # The server runs as nobody, as an application would: reading its sockets and its memory
    # maps takes the probe's capabilities, not its uid. It loads libssl, so that the probe
    # has a TLS library to put uprobes on.
    serve = ("import ssl, runpy, sys; sys.argv = ['http.server', '--bind', '127.0.0.1', "
             "sys.argv[1]]; runpy.run_module('http.server', run_name='__main__')")
    server = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               sys.executable, "-c", serve, str(port)], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for("the server to listen", lambda: _listening(port), timeout=20)
        proc = subprocess.run(["setpriv", f"--inh-caps={only}", f"--bounding-set={only}",
                               sys.executable, str(script), str(port), str(server.pid)],
                              capture_output=True, text=True, timeout=120)
    finally:
        server.kill()
        server.wait(timeout=10)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def cap_mask(names: list[str]) -> int:
    numbers = {"dac_read_search": 2, "net_admin": 12, "sys_ptrace": 19, "sys_nice": 23,
               "perfmon": 38, "bpf": 39}
    return sum(1 << numbers[n] for n in names)


def test_the_probe_works_with_only_the_daemonsets_capabilities(bpf_root: Path,
                                                               tmp_path: Path) -> None:
    caps = daemonset_capabilities()
    got = run_with(caps, tmp_path)
    assert int(str(got["caps"]), 16) == cap_mask(caps), got  # exactly these, nothing else
    assert got.get("loaded") is True, got
    assert got["tls_libraries"], got  # uprobes attached
    assert got["captured"] is True, got
    assert got["excluded"] is True, got
    assert got["listener"] is True, got
    assert got["tcp_closed"] is True, got
    assert got["realtime"] is True, got
    # What the same capabilities give without uprobe_multi links: no TLS, and a reason.
    assert got["perf_event_tls"] == [], got
    assert any("CAP_SYS_ADMIN" in why for why in got["perf_event_refused"]), got


def test_without_cap_sys_ptrace_other_users_processes_are_not_seen(bpf_root: Path,
                                                                  tmp_path: Path) -> None:
    """Why the DaemonSet asks for SYS_PTRACE: an application running as another user has
    its sockets and memory maps behind a ptrace check, so its listener (which names the
    callee of every same-node call) and its libssl go unseen without it."""
    got = run_with([c for c in daemonset_capabilities() if c != "sys_ptrace"], tmp_path)
    assert got.get("loaded") is True, got
    assert got["listener"] is False, got
    assert got["tls_libraries"] == [], got


def test_without_cap_bpf_the_probe_does_not_load(bpf_root: Path, tmp_path: Path) -> None:
    got = run_with([c for c in daemonset_capabilities() if c != "bpf"], tmp_path)
    assert got["loaded"] is False, got
    assert "Operation not permitted" in str(got["error"]), got
