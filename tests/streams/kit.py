"""What the protocol parser tests share: fixtures, replaying them, cutting byte streams, and the
stream properties every parser has.

A fixture is one client's view of a connection as the probe ships it (fixtures/*/README.md):
events of (direction, the size the syscall moved, the payload captured), "out" for what the
client wrote. Each protocol's test module keeps what is its own: its captured truth, its
traffic strategies, the byte sequences its parser must survive, its own assertions; and binds
the shared properties (StreamProperties, random_bytes_never_raise) to its parser.
"""

from __future__ import annotations

import functools
import gzip
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubesight.streams.protocols import ProtocolConnection
from kubesight.streams.record import Request

FIXTURES = Path(__file__).parent / "fixtures"
SCHEMAS = Path(__file__).parents[2] / "schemas"
FULL = 1 << 30  # capture size that keeps every payload whole
ROLES = ["client", "server", "unknown"]
# The settings of the parser properties; a module that needs fewer examples derives its own
# (``settings(PROPERTY, max_examples=150)``).
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Event = tuple[str, int, bytes]  # direction, size, payload
Draw = Callable[[st.SearchStrategy[Any]], Any]  # a composite strategy's draw, or st.data()'s
Exchange = tuple[bytes, bytes, str, str]  # request, response, the method and status they mean
Connection = TypeVar("Connection", bound=ProtocolConnection)
Connection_co = TypeVar("Connection_co", bound=ProtocolConnection, covariant=True)


class Run(Protocol[Connection_co]):
    """A protocol module's ``run``: see runner()."""

    def __call__(self, events: Iterable[Event], role: str = "client", capture: int = FULL, *,
                 close_ns: int = ..., **options: Any) -> tuple[list[Request], Connection_co]: ...


class Conversation(NamedTuple):
    """A connection's events and the truth about them."""

    events: list[Event]
    requests: list[tuple[str, str]]  # the method and status of each request, in order
    pushes: list[bytes]  # messages the server sent between responses, answering no request


# -- fixtures --------------------------------------------------------------------------------------
def read_fixture(protocol: str, name: str) -> dict[str, Any]:
    """fixtures/<protocol>/<name>.json, or its .json.gz (the large ones are compressed)."""
    path = FIXTURES / protocol / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    return json.loads(gzip.decompress(path.with_suffix(".json.gz").read_bytes()))  # type: ignore[no-any-return]


def decode(rows: Iterable[Sequence[Any]]) -> list[Event]:
    """Events as a fixture stores them: [direction, size, payload as latin-1 text]."""
    return [(d, size, payload.encode("latin-1")) for d, size, payload in rows]


def load_events(protocol: str, name: str) -> list[Event]:
    """The events of a one-connection fixture."""
    return decode(read_fixture(protocol, name)["events"])


@functools.cache
def captured_payloads(protocol: str) -> tuple[tuple[str, bytes], ...]:
    """Every payload of a protocol's fixtures, with the file it is from: events alone, per
    connection or inside connection objects, compressed or not."""
    out = []
    for path in sorted((FIXTURES / protocol).glob("*.json*")):
        doc = read_fixture(protocol, path.name.removesuffix(".gz").removesuffix(".json"))
        out += [(f"{protocol}/{path.name}", payload) for payload in _payloads(doc)]
    return tuple(out)


def other_protocols_payloads(protocol: str) -> list[tuple[str, bytes]]:
    """Every payload of every other protocol's captured fixtures, with the file it is from."""
    others = sorted(p.parent.name for p in FIXTURES.glob("*/capture.py"))
    return [c for other in others if other != protocol for c in captured_payloads(other)]


def _payloads(node: object) -> Iterator[bytes]:
    if isinstance(node, dict):
        for value in node.values():
            yield from _payloads(value)
    elif isinstance(node, list):
        if (len(node) == 3 and node[0] in ("in", "out") and isinstance(node[1], int)
                and isinstance(node[2], str)):
            yield node[2].encode("latin-1")
        else:
            for item in node:
                yield from _payloads(item)


# -- replaying -------------------------------------------------------------------------------------
def runner(connection: Callable[..., Connection], close_ns: int) -> Run[Connection]:
    """A protocol module's ``run(events, role="client", capture=FULL, *, close_ns, **options)``:
    ``events`` replayed to a new ``connection(role, **options)``, flushed at ``close_ns``."""

    def run(events: Iterable[Event], role: str = "client", capture: int = FULL, *,
            close_ns: int = close_ns, **options: Any) -> tuple[list[Request], Connection]:
        return replay(connection(role, **options), events, capture, close_ns=close_ns)

    return run


def replay(conn: Connection, events: Iterable[Event], capture: int = FULL, *,
           close_ns: int) -> tuple[list[Request], Connection]:
    """Feed events at 1000, 2000, ... ns, each payload cut to ``capture`` bytes, then flush at
    ``close_ns``; every record made, and the connection for its counters."""
    records: list[Request] = []
    for i, (direction, size, payload) in enumerate(events):
        records += conn.feed(direction, (i + 1) * 1000, size, payload[:capture])
    records += conn.flush(close_ns)
    return records, conn


def as_server(events: Iterable[Event]) -> list[Event]:
    """The same exchange seen from the server's side of the connection."""
    return [("in" if d == "out" else "out", size, payload) for d, size, payload in events]


def seen_from(role: str, events: list[Event]) -> list[Event]:
    """A client's events as a parser with ``role`` is fed them: a server's are the other way
    round; an unknown role sees the client's (and should decide it is the client)."""
    return as_server(events) if role == "server" else events


def decided_side(role: str) -> str:
    """The side of the records a parser with ``role`` makes of a client's events."""
    return "client" if role == "unknown" else role


# -- cutting streams -------------------------------------------------------------------------------
def split(data: bytes, *cuts: int) -> list[bytes]:
    """``data`` cut at the ascending offsets ``cuts``."""
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def events_of(direction: str, parts: Iterable[bytes]) -> list[Event]:
    """One event per (non-empty) part, each moving exactly its bytes."""
    return [(direction, len(part), part) for part in parts if part]


def byte_by_byte(events: Iterable[Event]) -> list[Event]:
    """The same bytes, one event per byte."""
    return [(d, 1, p[i : i + 1]) for d, _, p in events for i in range(len(p))]


def joined(events: Iterable[Event], direction: str) -> bytes:
    """Every payload one way, as one stream."""
    return b"".join(p for d, _, p in events if d == direction)


def total_bytes(events: Iterable[Event]) -> int:
    return sum(size for _, size, _ in events)


def split_randomly(draw: Draw, data: bytes, direction: str, max_cuts: int = 6) -> list[Event]:
    """``data`` as the events of one direction, cut at up to ``max_cuts`` random points."""
    cuts = draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=max_cuts, unique=True))
    return events_of(direction, split(data, *sorted(c for c in cuts if c < len(data))))


@st.composite
def resplit(draw: st.DrawFn, events: list[Event], max_cuts: int = 4) -> list[Event]:
    """The same bytes in other syscall boundaries (direction changes stay where they were)."""
    return [e for d, _, p in events for e in split_randomly(draw, p, d, max_cuts)]


def truncate_randomly(draw: Draw, events: Iterable[Event],
                      capture: int | None = None) -> list[Event]:
    """Each payload cut to a random length: at most ``capture`` bytes, or its own length."""
    return [(d, size, p[: draw(st.integers(0, len(p) if capture is None else capture))])
            for d, size, p in events]


def exchanged(draw: Draw, messages: Sequence[tuple[bytes, bytes]], pipelined: bool,
              capture: int = FULL) -> list[Event]:
    """A client's writes and reads of (request, response) ``messages``, each split at random
    points, each payload cut to ``capture``: pipelined (every request in one write stream, then
    every response) or one exchange at a time."""
    if pipelined:
        streams = [(b"".join(q for q, _ in messages), "out"),
                   (b"".join(r for _, r in messages), "in")]
    else:
        streams = [m for q, r in messages for m in ((q, "out"), (r, "in"))]
    return [(d, size, p[:capture]) for data, direction in streams
            for d, size, p in split_randomly(draw, data, direction)]


@st.composite
def conversations(draw: st.DrawFn, exchanges: st.SearchStrategy[Exchange],
                  push: bytes = b"") -> Conversation:
    """A keep-alive connection of 1 to 6 exchanges, sometimes pipelined, split at random points;
    where ``push`` is given, that message now and then goes just before a response."""
    pairs = draw(st.lists(exchanges, min_size=1, max_size=6))
    pushed = [bool(push) and draw(st.booleans()) for _ in pairs]
    messages = [(q, (push if p else b"") + r)
                for (q, r, _, _), p in zip(pairs, pushed, strict=True)]
    events = exchanged(draw, messages, pipelined=draw(st.booleans()))
    return Conversation(events, [(m, s) for _, _, m, s in pairs], [push] * sum(pushed))


# -- the properties every stream parser has --------------------------------------------------------
class StreamProperties:
    """The properties of a request/response stream parser over its protocol's exchanges, each a
    test for the protocol's module to bind to its own name::

        HTTP1 = StreamProperties(run, exchanges(), PROPERTY, captures=st.integers(16, 5000))
        test_valid_streams_split_anywhere_give_the_true_requests = HTTP1.true_requests

    ``push``, when given, now and then goes just before a response (Redis's pushes)."""

    def __init__(self, run: Run[Any], exchanges: st.SearchStrategy[Exchange], examples: settings,
                 *, captures: st.SearchStrategy[int], push: bytes = b"") -> None:
        traffic = conversations(exchanges, push)
        self.true_requests = examples(_true_requests(run, traffic))
        self.none_invented = examples(_none_invented(run, traffic, captures))
        self.requests_kept_when_cut = examples(_requests_kept_when_cut(run, exchanges))


def _true_requests(run: Run[Any], conversations: st.SearchStrategy[Conversation]
                   ) -> Callable[..., None]:
    """Split anywhere and seen from either side (or an unknown one), a valid conversation gives
    the true requests, complete, with every byte parsed and counted in one (but pushes)."""

    @given(conversations, st.sampled_from(ROLES))
    def test(conversation: Conversation, role: str) -> None:
        events = seen_from(role, conversation.events)
        records, conn = run(events, role=role)
        assert [(r.method, r.status) for r in records] == conversation.requests
        assert all(r.complete for r in records)
        assert conn.counters.get("pushes", 0) == len(conversation.pushes)
        assert conn.counters["unparsed_bytes"] == conn.counters["parser_errors"] == 0
        pushed = sum(len(p) for p in conversation.pushes)
        assert sum(r.request_bytes + r.response_bytes for r in records) == (
            total_bytes(events) - pushed)

    return test


def _none_invented(run: Run[Any], conversations: st.SearchStrategy[Conversation],
                   captures: st.SearchStrategy[int]) -> Callable[..., None]:
    """Every payload cut to a random length (up to a drawn capture size): no parser error, and
    never more requests than were made."""

    @given(conversations, captures, st.data())
    def test(conversation: Conversation, capture: int, data: st.DataObject) -> None:
        records, conn = run(truncate_randomly(data.draw, conversation.events, capture))
        assert len(records) <= len(conversation.requests)
        assert conn.counters["parser_errors"] == 0

    return test


def _requests_kept_when_cut(run: Run[Any], exchanges: st.SearchStrategy[Exchange]
                            ) -> Callable[..., None]:
    """One exchange at a time, each message starting an event, each payload cut to 256 bytes
    or more (what a protocol must see of a message, its head, fits): cutting never changes
    which requests are seen or their status, only whether they are complete."""

    @given(st.lists(exchanges, min_size=1, max_size=5), st.integers(256, 4096), st.data())
    def test(pairs: list[Exchange], capture: int, data: st.DataObject) -> None:
        messages = [(q, r) for q, r, _, _ in pairs]
        records, conn = run(exchanged(data.draw, messages, pipelined=False, capture=capture))
        assert [(r.method, r.status) for r in records] == [(m, s) for _, _, m, s in pairs]
        assert conn.counters["parser_errors"] == 0

    return test


_RANDOM_EVENTS = st.lists(st.tuples(st.sampled_from(["in", "out"]), st.integers(-5, 100_000),
                                    st.binary(max_size=300)), max_size=30)


def random_bytes_never_raise(connection: Callable[[str], Connection], fragments: list[bytes],
                             check: Callable[[list[Request], Connection], None] | None = None
                             ) -> Callable[..., None]:
    """The test that random events, every other payload after some of the protocol's own
    ``fragments``, in any role, give only records, no parser error and no negative counter, and
    that ``check`` holds of the records and the connection; the module applies its settings."""

    @given(_RANDOM_EVENTS, st.sampled_from(ROLES), st.lists(st.sampled_from(fragments),
                                                           max_size=10))
    def test(events: list[Event], role: str, prefixes: list[bytes]) -> None:
        conn = connection(role)
        records: list[Request] = []
        for i, (direction, size, payload) in enumerate(events):
            if prefixes and i % 2:
                payload = prefixes[i % len(prefixes)] + payload
            records += conn.feed(direction, i, size, payload)
        records += conn.flush(len(events))
        assert all(isinstance(record, Request) for record in records)
        assert conn.counters["parser_errors"] == 0
        assert all(v >= 0 for v in conn.counters.values())
        if check is not None:
            check(records, conn)

    return test
