"""Reassembler: raw batches in, request records and per-series window partials out."""

from __future__ import annotations

from typing import Any

import pytest
from kubesight.streams.reassembly import (
    KIND_ACCEPT,
    KIND_CLOSE,
    KIND_CONNECT,
    KIND_DATA_IN,
    KIND_DATA_OUT,
    MalformedBatch,
    Reassembler,
)
from kubesight.streams.sketch import LatencySketch

REQ = b"GET /items/12345?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
ERR = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n"
S = 1_000_000_000


def batch(role: int, comm: str, laddr: tuple[str, int], raddr: tuple[str, int],
          events: list[list[Any]]) -> dict[str, Any]:
    return {"v": 1, "node": "n1", "probe": "p", "seq": 0,
            "conn": {"id": 1, "tgid": 7, "comm": comm, "role": role, "family": 2,
                     "laddr": laddr[0], "lport": laddr[1], "raddr": raddr[0],
                     "rport": raddr[1]},
            "events": events}


def reassembler() -> Reassembler:
    return Reassembler(window_seconds=10, slow_threshold_ns=lambda _p: 500_000_000)


def test_client_and_server_sides_are_named_and_aggregated() -> None:
    r = reassembler()
    r.on_listener({"node": "n1", "addr": "0.0.0.0", "port": 80, "comm": "nginx",
                   "workload": "nginx"})
    t = 1000 * S
    client = r.on_batch("c", batch(1, "curl", ("127.0.0.1", 5000), ("127.0.0.1", 80), [
        [KIND_CONNECT, t, 0, b""], [KIND_DATA_OUT, t, len(REQ), REQ],
        [KIND_DATA_IN, t + S // 10, len(RESP), RESP],
        [KIND_DATA_OUT, t + S, len(REQ), REQ], [KIND_DATA_IN, t + 2 * S, len(ERR), ERR],
        [KIND_CLOSE, t + 2 * S, 0, b""]]))
    server = r.on_batch("s", batch(2, "nginx", ("127.0.0.1", 80), ("127.0.0.1", 5000), [
        [KIND_ACCEPT, t, 0, b""], [KIND_DATA_IN, t, len(REQ), REQ],
        [KIND_DATA_OUT, t + S // 20, len(RESP), RESP]]))
    assert [(c["side"], c["src_workload"], c["dst_workload"], c["endpoint"], c["status"],
             c["error"], c["slow"]) for c in client] == [
        ("client", "curl", "nginx", "/items/{id}", "200", False, False),
        ("client", "curl", "nginx", "/items/{id}", "502", True, True)]
    assert [(s["side"], s["src_workload"], s["dst_workload"]) for s in server] == [
        ("server", "curl", "nginx")]
    assert "c" not in r.connections and "s" in r.connections

    partials = dict(r.take_partials())
    assert len(partials) == 3  # client 200, client 502, server 200
    counts = sorted((m["series"]["side"], m["series"]["status"], w["count"], w["errors"],
                     w["slow"]) for m in partials.values() for w in m["windows"])
    assert counts == [("client", "200", 1, 0, 0), ("client", "502", 1, 1, 1),
                      ("server", "200", 1, 0, 0)]
    server_msg = next(m for m in partials.values() if m["series"]["side"] == "server")
    p50 = LatencySketch.from_wire(server_msg["windows"][0]["sketch"]).quantile(0.5)
    assert abs(p50 - 0.05) <= 0.05 * 0.01
    assert r.take_partials() == []


def test_unknown_peer_falls_back_to_its_address() -> None:
    r = reassembler()
    [rec] = r.on_batch("c", batch(1, "curl", ("10.0.0.1", 5000), ("10.9.9.9", 8080), [
        [KIND_DATA_OUT, S, len(REQ), REQ], [KIND_DATA_IN, 2 * S, len(RESP), RESP]]))
    assert rec["dst_workload"] == "10.9.9.9"


@pytest.mark.parametrize(("value", "reason"), [
    ({"v": 1}, "missing field"),
    ({"v": 1, "node": "n", "conn": {}, "events": []}, "bad conn metadata"),
    ({"v": 1, "node": "n", "conn": [], "events": []}, "conn must be a map"),
    (batch(1, "x", ("a", 1), ("b", 2), [[KIND_DATA_OUT, 1]]), "event is not"),
    (batch(1, "x", ("a", 1), ("b", 2), [[99, 1, 1, b""]]), "unknown event kind"),
])
def test_malformed_batches_are_rejected_with_a_reason(value: dict[str, Any],
                                                       reason: str) -> None:
    with pytest.raises(MalformedBatch, match=reason):
        reassembler().on_batch("k", value)


def test_idle_connections_expire_and_flush() -> None:
    now = [0.0]
    r = Reassembler(window_seconds=10, slow_threshold_ns=lambda _p: S, clock=lambda: now[0])
    r.on_batch("c", batch(1, "curl", ("a", 1), ("b", 2), [[KIND_DATA_OUT, S, len(REQ), REQ]]))
    now[0] = 10_000.0
    assert r.expire_idle(600) == []  # an unanswered request is not a request record
    assert r.connections == {}
    assert r.parser_counters()["connections_expired"] == 1


def test_same_node_call_waits_for_the_callee_name() -> None:
    now = [0.0]
    r = Reassembler(window_seconds=10, slow_threshold_ns=lambda _p: S, clock=lambda: now[0])
    events = [[KIND_CONNECT, S, 0, b""], [KIND_DATA_OUT, S, len(REQ), REQ],
              [KIND_DATA_IN, 2 * S, len(RESP), RESP]]
    # The caller's batch comes first; nobody is known to listen on 127.0.0.1:9000 yet.
    assert r.on_batch("c", batch(1, "curl", ("127.0.0.1", 5000), ("127.0.0.1", 9000),
                                 events)) == []
    assert r.release_deferred() == []
    r.on_batch("s", batch(2, "api", ("127.0.0.1", 9000), ("127.0.0.1", 5000),
                          [[KIND_ACCEPT, S, 0, b""]]))
    [(key, rec)] = r.release_deferred()
    assert (key, rec["src_workload"], rec["dst_workload"]) == ("c", "curl", "api")


def test_unnamed_same_node_peer_falls_back_to_address_after_the_wait() -> None:
    now = [0.0]
    r = Reassembler(window_seconds=10, slow_threshold_ns=lambda _p: S, clock=lambda: now[0])
    r.on_batch("c", batch(1, "curl", ("127.0.0.1", 5000), ("127.0.0.1", 9000), [
        [KIND_DATA_OUT, S, len(REQ), REQ], [KIND_DATA_IN, 2 * S, len(RESP), RESP]]))
    now[0] = 10.0
    [(_key, rec)] = r.release_deferred()
    assert rec["dst_workload"] == "127.0.0.1"
    assert len(r.take_partials()) == 1


def test_a_stopping_worker_releases_every_deferred_record() -> None:
    now = [0.0]
    r = Reassembler(window_seconds=10, slow_threshold_ns=lambda _p: S, clock=lambda: now[0])
    for port in (5000, 5001):
        r.on_batch(f"c{port}", batch(1, "curl", ("127.0.0.1", port), ("127.0.0.1", 9000), [
            [KIND_DATA_OUT, S, len(REQ), REQ], [KIND_DATA_IN, 2 * S, len(RESP), RESP]]))
    now[0] = 1.0  # well inside the wait
    assert r.release_deferred() == []
    released = r.release_deferred(stopping=True)
    assert sorted(key for key, _ in released) == ["c5000", "c5001"]
    assert {rec["dst_workload"] for _, rec in released} == {"127.0.0.1"}
    assert r.release_deferred(stopping=True) == []


@pytest.mark.parametrize(("addr", "name"), [
    ("10.1.2.3", "10.1.2.3"), ("192.168.0.7", "192.168.0.7"), ("127.0.0.1", "127.0.0.1"),
    ("fd00::1", "fd00::1"), ("8.8.8.8", "external"), ("2001:4860::8888", "external"),
    ("not-an-ip", "external"),
])
def test_unnamed_peers_keep_cardinality_bounded(addr: str, name: str) -> None:
    from kubesight.streams.reassembly import peer_name

    assert peer_name(addr) == name


def test_a_send_that_failed_on_a_dead_connection_still_answers_the_request() -> None:
    r = reassembler()
    [rec] = r.on_batch("s", batch(2, "nginx", ("127.0.0.1", 80), ("10.0.0.9", 5000), [
        [KIND_ACCEPT, S, 0, b""], [KIND_DATA_IN, S, len(REQ), REQ],
        [KIND_DATA_OUT, 2 * S, -32, RESP], [KIND_CLOSE, 2 * S, 0, b""]]))
    assert (rec["side"], rec["status"], rec["response_bytes"]) == ("server", "200", len(RESP))
    assert r.parser_counters()["failed_sends"] == 1


def test_requests_carry_their_connections_rtt_and_retransmits() -> None:
    r = reassembler()
    first = batch(1, "curl", ("10.0.0.1", 5000), ("10.9.9.9", 8080),
                  [[KIND_DATA_OUT, S, len(REQ), REQ], [KIND_DATA_IN, 2 * S, len(RESP), RESP]])
    first["conn"] |= {"srtt_us": 180, "retrans": 0}
    later = batch(1, "curl", ("10.0.0.1", 5000), ("10.9.9.9", 8080),
                  [[KIND_DATA_OUT, 3 * S, len(REQ), REQ], [KIND_DATA_IN, 4 * S, len(RESP), RESP]])
    later["conn"] |= {"srtt_us": 41000, "retrans": 7}  # the path got lossy and slow
    [a] = r.on_batch("c", first)
    [b] = r.on_batch("c", later)
    assert (a["rtt_us"], a["retransmits"]) == (180, 0)
    assert (b["rtt_us"], b["retransmits"]) == (41000, 7)
