"""Faust agents and timers: the stream workers' side of the data path drawn in ``app.py``.

Each agent is a thin loop around plain-Python logic (``Reassembler``, ``WindowStore``):
decode, hand over, send what comes back. A record that cannot be used goes to the dead-letter
topic with the reason; no input can crash a worker.

Delivery is at least once; duplicates that a rebalance re-delivers are skipped by offset (the
highest offset folded in per input partition), kept in memory for the reassembler and in the
windows table for the golden agent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import threading
import time
from typing import Any

import msgpack

from .app import (
    app,
    config,
    deadletter_topic,
    golden_topic,
    health_topic,
    netseries_topic,
    network_table,
    network_topic,
    raw_topic,
    requests_topic,
    series_topic,
    tcp_topic,
    windows_table,
)
from .follow import CompactedFollower
from .golden import TumblingStore, Window, WindowStore
from .identity import IdentityTable, K8sFollower
from .network import MalformedNetworkBatch, NetworkAggregator, NetworkWindow, NetworkWindowStore
from .protocols import ParserOptions
from .reassembly import MalformedBatch, Reassembler
from .watchdog import EndOffsets, StallWatch, diagnose, kick, offsets

log = logging.getLogger("kubesight.streams")

TICK = b"\x00tick"
OFFSET_PREFIX = b"\x00offset/"
HEALTH_INTERVAL_S = 5.0
INSTANCE = f"{int(time.time())}-{os.getpid()}"

identity = IdentityTable()  # fed by follow_k8s_identity, read by the reassembler
reassembler = Reassembler(
    window_seconds=config.streams.window_seconds,
    slow_threshold_ns=config.streams.slow_threshold_ns,
    options=ParserOptions(mask_sql_literals=config.streams.mask_sql_literals,
                          max_query_chars=config.streams.max_query_chars),
    identity=identity)
store = WindowStore(window_seconds=config.streams.window_seconds,
                    grace_seconds=config.streams.grace_seconds)
network = NetworkAggregator(window_seconds=config.streams.window_seconds, identity=identity)
network_store = NetworkWindowStore(window_seconds=config.streams.window_seconds,
                                   grace_seconds=config.streams.grace_seconds)
counters = collections.Counter[str]()
_raw_seen: dict[int, int] = {}  # partition → highest raw.v1 offset processed


def _unpack(value: Any) -> Any:
    if not isinstance(value, bytes | bytearray):
        raise MalformedBatch(f"value is {type(value).__name__}, not bytes")
    try:
        return msgpack.unpackb(value, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise MalformedBatch(f"not msgpack: {exc}") from exc


async def _dead_letter(event: Any, reason: str) -> None:
    msg = event.message
    counters["dead_lettered"] += 1
    record = {"v": 1, "reason": reason[:1000], "component": "worker", "topic": msg.topic,
              "partition": msg.partition, "offset": msg.offset, "key": msg.key,
              "value": msg.value}
    await deadletter_topic.send(key=f"{msg.topic}/{msg.partition}/{msg.offset}".encode(),
                                value=msgpack.packb(record))


@app.agent(raw_topic, name="reassemble")
async def reassemble(stream: Any) -> None:
    take = config.streams.take_max
    within = config.streams.take_within_s
    async for events in stream.take_events(take, within=within):
        await _wait_for_listeners("reassemble")
        for event in events:
            msg = event.message
            if msg.offset <= _raw_seen.get(msg.partition, -1):
                counters["raw_duplicates_skipped"] += 1
                continue
            _raw_seen[msg.partition] = msg.offset
            counters["raw_batches"] += 1
            try:
                key = msg.key.decode() if msg.key else ""
                batch = _unpack(msg.value)
                if not isinstance(batch, dict) or batch.get("v") != 1:
                    raise MalformedBatch("not a raw.v1 batch (missing v=1)")
                records = reassembler.on_batch(key, batch)
            except MalformedBatch as exc:
                await _dead_letter(event, f"malformed raw batch: {exc}")
                continue
            except Exception as exc:  # a parser bug must not take the worker down
                log.exception("reassembly failed on %s/%s@%s", msg.topic, msg.partition,
                              msg.offset)
                await _dead_letter(event, f"internal error: {type(exc).__name__}: {exc}")
                continue
            if records:
                await requests_topic.send(key=msg.key, value=msgpack.packb(
                    {"v": 1, "node": batch.get("node", ""), "conn": key, "requests": records}))
        await _send_deferred_and_partials()


async def _send_deferred_and_partials(expire: bool = False, stopping: bool = False) -> None:
    late = reassembler.expire_requests(time.time_ns()) if expire else []
    for conn_key, record in [*late, *reassembler.release_deferred(stopping=stopping)]:
        await requests_topic.send(key=conn_key.encode(), value=msgpack.packb(
            {"v": 1, "node": config.node_name, "conn": conn_key, "requests": [record]}))
    for skey, partials in reassembler.take_partials():
        await series_topic.send(key=skey, value=msgpack.packb(partials))


META_WAIT_S = 20.0  # longest a starting worker waits for meta.v1 before reading raw input
_listeners_known = asyncio.Event()


@app.on_before_shutdown.connect
async def _send_what_waits(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
    """Stopping (input paused and drained, the producer not yet flushed): records still waiting
    for a peer's name go out now, named as well as they can be. Their raw input is committed;
    kept, they would be lost with this process."""
    waiting = reassembler.deferred
    await _send_deferred_and_partials(stopping=True)
    if waiting:
        log.info("stopping: sent %d record(s) that were waiting for a peer's name", waiting)


@app.task  # type: ignore[untyped-decorator]
async def follow_listeners() -> None:
    """Feed the listener tables (reassembler, network) from meta.v1, every partition from its
    start, on every worker (``streams/follow.py``). Raw input waits for the first read through
    (``_wait_for_listeners``): a restarted worker that had not yet learnt who listens on this
    node would name every same-node call by address."""
    loop = asyncio.get_running_loop()
    follower = CompactedFollower(config.kafka.librdkafka(), config.topic("meta.v1"),
                                 f"{config.streams.app_id}-meta")
    invalid = 0
    while True:
        for key, record in await loop.run_in_executor(None, follower.fetch, 1.0):
            invalid += not _apply_meta(key, record)
        counters["meta_records"] = follower.read
        counters["meta_malformed"] = follower.malformed + invalid
        if follower.caught_up and not _listeners_known.is_set():
            log.info("listeners known: %d record(s) read from %s", follower.read,
                     follower.topic)
            _listeners_known.set()
        if not follower.reading:
            await asyncio.sleep(2.0)  # no topic yet


def _apply_meta(key: str, record: Any) -> bool:
    """Learn one meta.v1 record; False if it was unusable (logged, left out)."""
    if record is None:
        return True  # a tombstone: the probe sends none; a listener that closed stays named
    try:
        if record.get("kind") == "listener":
            reassembler.on_listener(record)
            network.on_listener(record)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        log.warning("meta.v1 record %r left out: %s: %s", key, type(exc).__name__, exc)
        return False
    return True


async def _wait_for_listeners(reader: str) -> None:
    """Called with the first input in hand, not before the loop: Faust subscribes an agent's
    stream when it starts iterating, and input fetched before that is acked unread."""
    if _listeners_known.is_set():
        return
    try:
        await asyncio.wait_for(_listeners_known.wait(), META_WAIT_S)
    except TimeoutError:
        log.warning("%s: meta.v1 not read through after %.0fs; reading on (same-node peers "
                    "may be named by address until it is)", reader, META_WAIT_S)


@app.task  # type: ignore[untyped-decorator]
async def follow_k8s_identity() -> None:
    """Feed the identity table from k8s.v1, every partition from its start, on every worker
    (``K8sFollower``; not an agent: see there). librdkafka polls in a thread so the event
    loop never blocks on it."""
    loop = asyncio.get_running_loop()
    follower = K8sFollower(config.kafka.librdkafka(), config.topic("k8s.v1"),
                           f"{config.streams.app_id}-k8s", identity)
    # Never closed: a poll may still run in its thread when the worker stops, and the
    # consumer holds no group membership or offsets that closing would hand back.
    while True:
        await loop.run_in_executor(None, follower.poll, 1.0)
        if not follower.reading:
            await asyncio.sleep(2.0)  # no topic yet
        counters["k8s_malformed"] = follower.malformed


class _WindowStage:
    """A windowing agent's state (golden: series.v1 → golden.v1; network: netseries.v1 →
    network.v1): its store of open windows, mirrored into a changelog-backed table together
    with the highest input offset folded in per partition, so a restarted worker resumes and a
    message delivered twice after a rebalance is merged once."""

    def __init__(self, what: str, store: TumblingStore[Any], table: Any, out: Any,
                 window: Any, emitted: str) -> None:
        self.what = what  # names its dead-letter reasons and duplicates counter
        self.emitted = emitted  # its counter of windows emitted
        self.store, self.table, self.out, self.window = store, table, out, window
        self.seen: dict[int, int] = {}  # partition → highest offset folded in
        self.restored = False

    def restore(self) -> None:
        """Rebuild open windows and offsets from the changelog-recovered table, once."""
        if self.restored:
            return
        self.restored = True
        for key, value in list(self.table.items()):
            if value is None:
                continue
            if key.startswith(OFFSET_PREFIX):
                self.seen[int(key[len(OFFSET_PREFIX):])] = int(value)
            else:
                self.store.open[key] = self.window.from_state(msgpack.unpackb(value, raw=False))
        if self.store.open:
            log.info("restored %d open %s windows from the changelog", len(self.store.open),
                     self.what)

    async def on_event(self, event: Any) -> None:
        self.restore()
        msg = event.message
        if msg.key == TICK:  # close what is due on this partition
            for key, win in self.store.due(msg.partition):
                await self.out.send(key=key.rsplit(b"\x1e", 1)[0], value=msgpack.packb(
                    win.to_record(self.store.window_seconds)))
                counters[self.emitted] += 1
                with contextlib.suppress(KeyError):
                    del self.table[key]
            return
        if msg.offset <= self.seen.get(msg.partition, -1):
            counters[f"{self.what}_duplicates_skipped"] += 1
            return
        self.seen[msg.partition] = msg.offset
        try:
            changed = self.store.merge(msg.key, _unpack(msg.value), msg.partition)
        except (MalformedBatch, KeyError, TypeError, ValueError) as exc:
            await _dead_letter(event, f"malformed {self.what} record: {exc}")
            return
        for key in changed:
            self.table[key] = msgpack.packb(self.store.open[key].to_state())
        self.table[OFFSET_PREFIX + str(msg.partition).encode()] = str(msg.offset).encode()


golden_stage = _WindowStage("series", store, windows_table, golden_topic, Window,
                            "windows_emitted")
network_stage = _WindowStage("netseries", network_store, network_table, network_topic,
                             NetworkWindow, "network_windows_emitted")


@app.agent(series_topic, name="golden")
async def golden(stream: Any) -> None:
    async for event in stream.events():
        await golden_stage.on_event(event)


@app.timer(interval=1.0)  # type: ignore[untyped-decorator]
async def tick() -> None:
    """Let every series partition close its due windows, even when no traffic flows."""
    await _send_deferred_and_partials(expire=True)  # also when no raw batch arrives
    for partition in range(config.kafka.partitions):
        await series_topic.send(key=TICK, value=b"", partition=partition)


@app.timer(interval=30.0)  # type: ignore[untyped-decorator]
async def expire_idle_connections() -> None:
    records = reassembler.expire_idle()
    if records:
        await requests_topic.send(key=b"expired", value=msgpack.packb(
            {"v": 1, "node": config.node_name, "conn": "expired", "requests": records}))
    await _send_deferred_and_partials()


# --- network health: tcp.v1 → netseries.v1 → network windows → network.v1 ---------------------

_tcp_seen: dict[int, int] = {}  # partition → highest tcp.v1 offset processed


@app.agent(tcp_topic, name="network")
async def network_intervals(stream: Any) -> None:
    take = config.streams.take_max
    within = config.streams.take_within_s
    async for events in stream.take_events(take, within=within):
        await _wait_for_listeners("network")
        for event in events:
            msg = event.message
            if msg.offset <= _tcp_seen.get(msg.partition, -1):
                counters["tcp_duplicates_skipped"] += 1
                continue
            _tcp_seen[msg.partition] = msg.offset
            try:
                batch = _unpack(msg.value)
                if not isinstance(batch, dict) or batch.get("v") != 1:
                    raise MalformedNetworkBatch("not a tcp.v1 batch (missing v=1)")
                conntrack = network.on_batch(batch)
            except (MalformedBatch, MalformedNetworkBatch) as exc:
                await _dead_letter(event, f"malformed tcp batch: {exc}")
                continue
            if conntrack is not None:
                await network_topic.send(key=f"{conntrack['node']}/conntrack".encode(),
                                         value=msgpack.packb(conntrack))
        for skey, message in network.take_partials():
            await netseries_topic.send(key=skey, value=msgpack.packb(message))


@app.agent(netseries_topic, name="network_windows")
async def network_windows(stream: Any) -> None:
    async for event in stream.events():
        await network_stage.on_event(event)


@app.timer(interval=1.0)  # type: ignore[untyped-decorator]
async def network_tick() -> None:
    """Let every netseries partition close its due windows, even when no traffic flows."""
    for partition in range(config.kafka.partitions):
        await netseries_topic.send(key=TICK, value=b"", partition=partition)


def worker_counters() -> dict[str, int]:
    out = collections.Counter(reassembler.parser_counters())
    out.update(network.counters)
    out["open_network_windows"] = len(network_store.open)
    out.update(counters)
    out["open_connections"] = len(reassembler.connections)
    out["k8s_records"] = identity.applied
    out["k8s_objects"] = len(identity)
    out["open_windows"] = len(store.open)
    out["late_partials"] = store.late_partials
    return {k: max(0, int(v)) for k, v in out.items()}


@app.timer(interval=HEALTH_INTERVAL_S)  # type: ignore[untyped-decorator]
async def publish_health() -> None:
    record = {"v": 1, "component": "worker", "node": config.node_name, "instance": INSTANCE,
              "ts": time.time(), "counters": worker_counters()}
    await health_topic.send(key=f"{config.node_name}/worker/{INSTANCE}".encode(),
                            value=msgpack.packb(record))


# --- the consumer's own health: input waiting but not read (streams/watchdog.py) -------------

WATCH_INTERVAL_S = 5.0
EXIT_STALLED = 70  # the exit status when a stalled worker has to be restarted
exit_status: int | None = None  # set when the worker stops itself (streams/app.py main)
_watch = StallWatch(config.streams.stall_after_s, config.streams.stall_restart_after_s)
_ends = EndOffsets(config.kafka.librdkafka(), f"{config.streams.app_id}-watch")  # never joins
_inputs = {t.get_topic_name() for t in (raw_topic, series_topic, tcp_topic,
                                        netseries_topic)}


@app.timer(interval=WATCH_INTERVAL_S)  # type: ignore[untyped-decorator]
async def watch_consumer() -> None:
    try:
        await _watch_once()
    except Exception:  # the watch must never be what takes the worker down
        log.exception("the stall watch failed")


async def _watch_once() -> None:
    if exit_status is not None:  # already stopping for a restart
        return
    now = time.monotonic()
    watched = offsets(app, _inputs)
    if not watched:
        return
    loop = asyncio.get_running_loop()
    ends = await loop.run_in_executor(None, _ends.fetch, list(watched))
    for tp, end in (ends or {}).items():
        watched[tp].highwater = end
    counters["watched_partitions"] = len(watched)  # 0 with partitions assigned: a blind watch
    counters["watched_lag"] = sum(off.lag for off in watched.values())
    stalled = _watch.stalled(now, watched)
    if not stalled:
        return
    up = ends is not None
    verdict = _watch.decide(now, stalled, up,
                            busy=bool(app.rebalancing or getattr(app, "in_recovery", False)
                                      or not _listeners_known.is_set()))
    if verdict.action == "kick":
        counters["consumer_stalls"] += 1
        await _diagnose_and_kick(f"consumer stalled with a broker answering: "
                                 f"{verdict.describe()}", stalled)
    elif verdict.action == "restart":
        log.critical("consumer still stalled %.0fs after the kick: %s\n%s\nexiting (status %d) "
                     "for the supervisor to start a fresh worker", _watch.restart_after_s,
                     verdict.describe(), _diagnosis(stalled), EXIT_STALLED)
        _exit_for_restart()


def _diagnosis(parts: dict[tuple[str, int], tuple[int, float]]) -> str:
    try:  # reads Faust's and aiokafka's private state: must never take the worker down
        return diagnose(app, parts, time.time() * 1000)
    except Exception as exc:
        return f"(no diagnosis: {type(exc).__name__}: {exc})"


async def _diagnose_and_kick(why: str, parts: dict[tuple[str, int], tuple[int, float]]) -> None:
    log.warning("%s\n%s", why, _diagnosis(parts))
    try:
        done = await kick(app, parts)
    except Exception:
        log.exception("kicking the consumer failed")
        return
    counters["consumer_kicks"] += 1
    log.warning("kicked the consumer: %s", "; ".join(done) or "nothing to do")


@app.task  # type: ignore[untyped-decorator]
async def kick_on_sigusr2() -> None:
    """``kill -USR2 <worker>``: log the consumer's state and kick it (harmless when healthy:
    every input partition is re-seeked to its own position). Replaces mode's default for
    SIGUSR2, which starts pdb on the worker's terminal."""
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        parts = {tp: (off.lag, 0.0) for tp, off in offsets(app, _inputs).items()}
        loop.create_task(_diagnose_and_kick("SIGUSR2: the consumer's state", parts))

    loop.add_signal_handler(signal.SIGUSR2, on_signal)


def _exit_for_restart() -> None:
    """Stop gracefully (commits what was processed, flushes the producer); if the stop itself
    hangs, leave anyway."""
    global exit_status
    exit_status = EXIT_STALLED
    timer = threading.Timer(30.0, os._exit, args=(EXIT_STALLED,))
    timer.daemon = True
    timer.start()
    os.kill(os.getpid(), signal.SIGTERM)
