"""A network namespace joined to this one by a veth pair, for network-path tests.

Everything it adds (the namespace, the veth pair, iptables rules inside the namespace, a
shaping qdisc on the host side) is removed by ``close()``, which also kills the processes it
started. iptables rules live inside the namespace, so they never touch the host's traffic.
"""

from __future__ import annotations

import ipaddress
import os
import random
import subprocess
import sys
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parents[1]


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=check)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 in 10.199.0.0/16 that no interface of this namespace uses."""
    used = _run("ip", "-4", "-o", "addr", "show").stdout
    for _ in range(100):
        net = ipaddress.IPv4Network((f"10.199.{random.randrange(256)}.{random.randrange(64) * 4}",
                                     30))
        if str(net.network_address)[:-1] not in used:
            return net
    raise RuntimeError("no free /30 in 10.199.0.0/16")


class NetNs:
    """``host_ip`` (this namespace) ←veth→ ``ns_ip`` (the new one)."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 10000:04d}{random.randrange(16 ** 3):03x}"
        self.name = f"kst{tag}"
        self.host_if, self.ns_if = f"kst{tag}h", f"kst{tag}n"
        net = _free_subnet()
        self.host_ip, self.ns_ip = (str(a) for a in list(net.hosts())[:2])
        self._procs: list[subprocess.Popen[str]] = []
        self._rules: list[tuple[str, ...]] = []
        self._shaped = False
        try:
            _run("ip", "netns", "add", self.name)
            _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if,
                 "netns", self.name)
            _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            _run("ip", "link", "set", self.host_if, "up")
            self.exec("ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
            self.exec("ip", "link", "set", self.ns_if, "up")
            self.exec("ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def exec(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", self.name, *argv)

    def spawn(self, *argv: str) -> subprocess.Popen[str]:
        """A process inside the namespace (killed by close()), stdout piped as text."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *argv], cwd=REPO,
                                stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
        self._procs.append(proc)
        return proc

    def python(self, *argv: str) -> subprocess.Popen[str]:
        return self.spawn(sys.executable, *argv)

    def iptables(self, *rule: str) -> None:
        """Append a rule to the namespace's filter table (``-A`` is added; removed later)."""
        self.exec("iptables", "-A", *rule)
        self._rules.append(rule)

    def shape(self, *tbf: str) -> None:
        """A tbf qdisc on the host side of the veth: traffic towards the namespace queues."""
        _run("tc", "qdisc", "add", "dev", self.host_if, "root", "tbf", *tbf)
        self._shaped = True

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            for stream in (proc.stdout, proc.stdin):
                if stream is not None:
                    stream.close()
        self._procs.clear()
        for rule in reversed(self._rules):
            _run("ip", "netns", "exec", self.name, "iptables", "-D", *rule, check=False)
        self._rules.clear()
        if self._shaped:
            _run("tc", "qdisc", "del", "dev", self.host_if, "root", check=False)
            self._shaped = False
        _run("ip", "link", "del", self.host_if, check=False)  # takes its peer with it
        _run("ip", "netns", "del", self.name, check=False)

    def __enter__(self) -> NetNs:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
