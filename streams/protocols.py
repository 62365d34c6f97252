"""Which protocol a connection speaks, decided from its bytes, and the parser that follows it.

Every protocol is one module (``http1``, ``http2``, ``postgres``, ``mysql``, ``redis``,
``kafka``, ``dns``) exposing a cheap ``detect(buf)`` and a per-connection parser with
``feed(direction, ts_ns, size, payload) -> list[Request]``, ``flush(ts_ns)`` and a ``counters``
dict. ``Sniffer`` holds a connection until one detector accepts one of its payloads, then hands
that payload and everything after it to the chosen parser. Ports are never consulted.

Order of ``PARSERS``, most certain signature first, so a weaker detector never claims bytes a
stronger one would have recognised:
1. HTTP/2: the 24-byte client preface is unmistakable (frames mid-connection are checked last).
2. HTTP/1.x: a known method and a space, or ``HTTP/1.``; text that no binary protocol starts
   with.
3. PostgreSQL: a startup packet (length + protocol 3.0 / SSLRequest) or a typed message whose
   length agrees with the bytes.
4. MySQL: the server greeting (protocol 10) or a command packet whose 3-byte length agrees.
5. Redis: RESP arrays of bulk strings (``*N\\r\\n$``) or RESP3/RESP2 replies.
6. Kafka: a size-prefixed request header whose API key and version are known.
7. DNS: one question, and records that parse to exactly the datagram's end (UDP) or the
   2-byte length (TCP); late because 12 arbitrary bytes can look like a header.
8. HTTP/2 frames without the preface (connections open before the probe started).
Each later detector checks lengths that must agree exactly, which text protocols rarely do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

from .record import Request

MAX_SNIFF_EVENTS = 32  # data events with payload tried before a connection is left unknown


class ProtocolConnection(Protocol):
    """One connection's parser for one protocol."""

    counters: dict[str, int]

    def feed(self, direction: str, ts_ns: int, size: int, payload: bytes) -> list[Request]: ...

    def flush(self, ts_ns: int) -> list[Request]: ...

    # Optional: ``expire(now_ns) -> list[Request]`` for protocols with deadlines (DNS); the
    # worker calls it about once a second with the wall clock.


@dataclasses.dataclass(frozen=True)
class ParserOptions:
    """What the worker's configuration tells every parser."""

    mask_sql_literals: bool = True
    max_query_chars: int = 1024


@dataclasses.dataclass(frozen=True)
class Parser:
    protocol: str  # the name counters are kept under; records carry their own protocol
    detect: Callable[[bytes], bool]
    new: Callable[[str, ParserOptions], ProtocolConnection]  # (role, options) → parser


def _http1() -> Parser:
    from . import http1

    return Parser("http", http1.detect, lambda role, _opts: http1.Http1Connection(role))


def _redis() -> Parser:
    from . import redis

    return Parser("redis", redis.detect, lambda role, _opts: redis.RedisConnection(role))


def _http2(mid_connection: bool = False) -> Parser:
    from . import http2

    detect = http2.detect_frames if mid_connection else http2.detect
    return Parser("http2", detect, lambda role, _opts: http2.Http2Connection(role))


def _dns() -> Parser:
    from . import dns

    return Parser("dns", dns.detect, lambda role, _opts: dns.DnsConnection(role))


def _mysql() -> Parser:
    from . import mysql

    return Parser("mysql", mysql.detect, mysql.MysqlConnection)


def _postgres() -> Parser:
    from . import postgres

    return Parser("postgresql", postgres.detect, postgres.PostgresConnection)


def _kafka() -> Parser:
    from . import kafka

    return Parser("kafka", kafka.detect, lambda role, _opts: kafka.KafkaConnection(role))


def _registry() -> list[Parser]:
    """The parsers in detection order (see the module docstring for why this order)."""
    return [_http2(), _http1(), _postgres(), _mysql(), _redis(), _kafka(), _dns(),
            _http2(mid_connection=True)]


PARSERS: list[Parser] = _registry()


class Sniffer:
    """A connection whose protocol is not known yet; becomes a parser's front once it is."""

    __slots__ = ("role", "options", "parser", "protocol", "counters", "_tries", "_parsers")

    def __init__(self, role: str = "unknown", options: ParserOptions | None = None,
                 parsers: list[Parser] | None = None) -> None:
        self.role = role
        self.options = options or ParserOptions()
        self.parser: ProtocolConnection | None = None
        self.protocol = ""  # set once detected
        self.counters: dict[str, int] = {"unidentified_bytes": 0}
        self._tries = 0
        self._parsers = PARSERS if parsers is None else parsers

    def feed(self, direction: str, ts_ns: int, size: int, payload: bytes) -> list[Request]:
        parser = self.parser
        if parser is not None:
            return parser.feed(direction, ts_ns, size, payload)
        if payload and self._tries < MAX_SNIFF_EVENTS:
            self._tries += 1
            for candidate in self._parsers:
                try:
                    hit = candidate.detect(payload)
                except Exception:  # a detector bug must not take the worker down
                    hit = False
                if hit:
                    self.protocol = candidate.protocol
                    self.parser = parser = candidate.new(self.role, self.options)
                    return parser.feed(direction, ts_ns, size, payload)
        self.counters["unidentified_bytes"] += max(size, len(payload))
        return []

    def flush(self, ts_ns: int) -> list[Request]:
        return self.parser.flush(ts_ns) if self.parser is not None else []

    def expire(self, now_ns: int) -> list[Request]:
        """Requests that will never be answered (a parser's optional ``expire(now_ns)``, e.g.
        DNS queries past their deadline, reported as timeouts)."""
        expire = getattr(self.parser, "expire", None)
        return expire(now_ns) if expire is not None else []

    def parser_counters(self) -> dict[str, int]:
        """Counters prefixed by protocol: ``http_unparsed_bytes``, ``unidentified_bytes``."""
        out = {k: v for k, v in self.counters.items() if v}
        if self.parser is not None:
            for name, value in self.parser.counters.items():
                out[f"{self.protocol}_{name}"] = int(value)
        return out
