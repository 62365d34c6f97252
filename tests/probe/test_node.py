"""Listeners from /proc: TCP sockets in LISTEN and UDP server sockets, with their owners."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from kubesight.probe import node


def _below_ephemeral() -> int:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in range(low - 1, 1024, -1):  # a free port outside the ephemeral range
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


def test_tcp_listeners_and_udp_servers_are_found_but_not_udp_clients() -> None:
    server_port = _below_ephemeral()
    with (socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
          socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp_server,
          socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp_client):
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp_server.bind(("127.0.0.1", server_port))
        udp_client.bind(("127.0.0.1", 0))  # an ephemeral port: a client's, not a service
        mine = {(lst.addr, lst.port) for lst in node.listeners() if lst.tgid == os.getpid()}
        assert ("127.0.0.1", tcp.getsockname()[1]) in mine
        assert ("127.0.0.1", server_port) in mine
        assert ("127.0.0.1", udp_client.getsockname()[1]) not in mine
