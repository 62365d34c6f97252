"""kubesight's own processes are excluded where they begin, not seconds later when the user
side reads a pid file: a process named in exclude_comms from its exec, a child of an excluded
root from its fork, and one already running under such a name from the probe's start. Real
curl against a real nginx; the server side sees every request, so the client's silence is
the exclusion, not a request that never happened."""

from __future__ import annotations

import errno
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from kubesight.probe.l7 import L7_DATA_IN, L7_DATA_OUT, L7Probe, RawEvent
from kubesight.probe.tcp import TcpConnection, TcpProbe

from .conftest import Nginx, poll_until

pytestmark = pytest.mark.bpf

NAMED_CURL = "ks-excl-curl"  # comm: the copy's file name
NAMED_SH = "ks-excl-sh"


def _curl_argv(curl: str, url: str) -> list[str]:
    # Prints the client's local port: the server side's events name the client by it.
    return [curl, "-sS", "-o", "/dev/null", "--http1.1", "-w", "%{local_port}", url]


def _requests_from(events: list[RawEvent], nginx: Nginx, port: int) -> list[RawEvent]:
    """The server's receives of a request sent from client port ``port``."""
    return [e for e in events if e.kind == L7_DATA_IN and e.tgid in nginx.workers
            and e.rport == port and e.payload.startswith(b"GET ")]


def _client_events(events: list[RawEvent], port: int) -> list[RawEvent]:
    return [e for e in events if e.kind in (L7_DATA_IN, L7_DATA_OUT) and e.lport == port]


@pytest.mark.parametrize("build", ["l7.bpf.o", "l7_compat.bpf.o"])
def test_own_processes_send_nothing_from_their_first_instruction(
        bpf_root: Path, nginx: Nginx, tmp_path: Path, build: str) -> None:
    curl_bin, sh_bin = shutil.which("curl"), shutil.which("sh")
    assert curl_bin and sh_bin
    named_curl = tmp_path / NAMED_CURL
    named_sh = tmp_path / NAMED_SH
    shutil.copy(curl_bin, named_curl)
    shutil.copy(sh_bin, named_sh)
    # Running before the probe starts, under an excluded name; it starts curl once told to.
    root = subprocess.Popen([str(named_sh), "-c", f'read go; {curl_bin} "$@"; exit $?', "sh",
                             *_curl_argv(curl_bin, nginx.url())[1:]],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        with L7Probe(exclude_comms=(NAMED_CURL, NAMED_SH), build=build, tls=False,
                     bpf_dir=bpf_root) as probe:
            assert probe.is_excluded(root.pid), "a process older than the probe, by name"
            tcp = TcpProbe(bpf_dir=bpf_root)  # reads the same bits, as the probe runner's does
            tcp.share_exclusions(probe.exclusions_fd)
            tcp.start()
            out, _ = root.communicate("go\n", timeout=20)
            tree_port = int(out)

            named = subprocess.run(_curl_argv(str(named_curl), nginx.url()),
                                   capture_output=True, text=True, timeout=20, check=True)
            named_port = int(named.stdout)

            plain = subprocess.run(_curl_argv(curl_bin, nginx.url()), capture_output=True,
                                   text=True, timeout=20, check=True)
            plain_port = int(plain.stdout)

            events = poll_until(probe, lambda evs: all(
                _requests_from(evs, nginx, p) for p in (tree_port, named_port, plain_port))
                and bool(_client_events(evs, plain_port)))
            closed: list[TcpConnection] = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and plain_port not in {c.lport for c in closed}:
                closed += tcp.drain()
                time.sleep(0.05)
            tcp.close()
            at_start = probe.counters()["excluded_at_start"]
            # The kernel forgets a process as it exits: its pid may go to one not ours.
            still = [pid for pid in (root.pid,) if probe.is_excluded(pid)]
    finally:
        if root.poll() is None:
            root.kill()
        root.wait(timeout=10)

    assert _client_events(events, plain_port), "the control: a plain curl is traced"
    assert _client_events(events, tree_port) == [], "started by an excluded root"
    assert _client_events(events, named_port) == [], "exec'd under an excluded name"
    tracked = {c.lport for c in closed if c.rport == nginx.port}
    assert plain_port in tracked, "the control, in the TCP probe"
    assert not {tree_port, named_port} & tracked, "the TCP probe shares the exclusions"
    assert at_start >= 2, at_start  # the root's child at fork, the named curl at exec
    assert still == []


def test_a_kernel_that_cannot_run_own_update_still_gets_its_exclusions(
        bpf_root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before Linux 5.10 a raw_tp program cannot be test-run: the bits are then written from
    user space (not atomic against the hooks), and the log says so. Stood in for here by a
    BPF_PROG_TEST_RUN that fails as such a kernel's does."""
    with L7Probe(tls=False, bpf_dir=bpf_root) as probe:
        obj = probe._obj
        assert obj is not None

        def refused(program: str, *args: int) -> int:
            raise OSError(errno.EINVAL, f"test run {program}: Invalid argument")

        monkeypatch.setattr(obj, "run", refused)

        def tree_bit(tgid: int) -> bool:
            word = obj.map_lookup("excluded_trees", (tgid // 64).to_bytes(4, "little"), 8)
            return bool(int.from_bytes(word or bytes(8), "little") >> tgid % 64 & 1)

        sleeper = subprocess.Popen(["sleep", "30"])
        try:
            probe.exclude_tree(sleeper.pid)
            assert probe.is_excluded(sleeper.pid) and tree_bit(sleeper.pid)
            other = subprocess.Popen(["sleep", "30"])  # another process: untouched
            assert not probe.is_excluded(other.pid)
            other.kill()
            other.wait(timeout=10)
            probe.include_tgid(sleeper.pid)
            assert not probe.is_excluded(sleeper.pid) and not tree_bit(sleeper.pid)
        finally:
            sleeper.kill()
            sleeper.wait(timeout=10)
    assert "cannot run own_update on this kernel" in caplog.text
