"""The one request record every protocol parser produces.

Plain data: parsers fill it, the worker enriches its wire form (workload, pid, slow) and
produces it on ``requests.v1``. ``to_wire()`` uses the field names of
``schemas/requests.v1.json`` (``raw_path`` is ``path`` there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Request:
    protocol: str  # "http", "http2", "grpc", "mysql", "postgresql", "redis", "dns", "kafka"
    side: str  # "client" (this process sent the request) | "server" (it received it)
    method: str
    endpoint: str  # normalised path, bounded cardinality
    raw_path: str  # request path without query string, at most 256 chars
    status: str  # "200"; "" when the response's status line was never seen
    error: bool  # status >= 500
    start_ns: int  # timestamp of the event carrying the request's first byte
    end_ns: int  # timestamp of the event that completed the response
    request_bytes: int  # counted from syscall sizes, including bytes not captured
    response_bytes: int
    complete: bool  # False if a header was truncated, framing was lost or guessed
    # Protocol detail an on-call engineer reads: SQL statement text (bounded, literals masked
    # by default), Redis command line without arguments, DNS "qtype name". Empty for HTTP.
    query: str = ""

    @property
    def latency_ns(self) -> int:
        return self.end_ns - self.start_ns

    def to_wire(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "side": self.side,
            "method": self.method,
            "endpoint": self.endpoint,
            "path": self.raw_path,
            "status": self.status,
            "error": self.error,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "request_bytes": self.request_bytes,
            "response_bytes": self.response_bytes,
            "complete": self.complete,
            "query": self.query,
        }
