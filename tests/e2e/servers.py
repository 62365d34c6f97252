"""Small real HTTP servers for the cases nginx does not cover, run as their own processes.

Each sets its process name (comm) so kubesight names it as a workload, and prints
``listening <port>`` once it accepts connections.
"""

from __future__ import annotations

import ctypes
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer


def _set_comm(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_NAME = 15
    libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


class Slow(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    delay = 0.6

    def do_GET(self) -> None:
        time.sleep(self.delay)
        body = b"slow\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class Chunked(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        for i in range(20):  # each chunk its own write, some larger than a capture
            data = (b"%02d" % i) * (50 if i % 5 else 3000)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def log_message(self, *args: object) -> None:
        pass


HANDLERS = {"slow": Slow, "chunked": Chunked}


def main() -> None:
    """``servers KIND COMM [DELAY [HOST]]``: HOST 127.0.0.1 unless given (a pod's 0.0.0.0)."""
    kind, comm = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3:
        Slow.delay = float(sys.argv[3])
    host = sys.argv[4] if len(sys.argv) > 4 else "127.0.0.1"
    _set_comm(comm)
    server = HTTPServer((host, 0), HANDLERS[kind])
    print(f"listening {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
