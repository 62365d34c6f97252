"""Notice when the worker stops reading although messages wait for it, say why, and heal it.

Faust over aiokafka has been seen, rarely, to stop consuming after the only broker was killed
and came back (issue 2's broker-restart test, 1 run in 4 in CI: the worker stayed up, its
timers ran, its consumer lag stayed at 5,809 messages for 240 s). The same family of hang is
reported upstream (aio-libs/aiokafka#703: a consumer that silently stops after every broker
came back; robinhood/faust#596: an app that hangs across a Kafka restart). Nothing in the
worker's own log says which layer stopped, and nothing restarts it.

``StallWatch`` is the decision, kept free of Kafka so that it can be tested on its own: an input
partition is *stalled* when it has messages waiting (highwater > position) and its position has
not moved for ``stall_after_s``. The first time, the worker logs a diagnosis (``diagnose``: every
layer that can stop reading: Faust's fetcher service, a rebalance in progress, flow control,
aiokafka's fetch and coordination tasks, its group coordinator, each partition's position,
highwater, pause and last fetch) and *kicks* the consumer (``kick``: restart Faust's fetcher
if it is down while no rebalance runs, force a metadata refresh, seek each stalled partition to
its own position, which drops aiokafka's fetch state for it). If that does not help within
``restart_after_s``, the worker exits non-zero so that its supervisor (``kubesight up``, or the
Deployment) starts a fresh one, which resumes from the committed offsets and the changelog.
Both steps are counted (``consumer_stalls``, ``consumer_kicks``) in the worker's health record.

Lag is measured against each partition's end offset as the broker reports it to a client of
the watch's own (``EndOffsets``, librdkafka): aiokafka's highwater comes with its fetch
responses, so a consumer whose fetches hang reports no lag at all (seen: a worker whose broker
connections were black-holed showed lag 0 for 90 s). A broker outage is not a stall: while no
broker answers that client, positions cannot move and kicking would only add noise, so the
watch holds off. Nor, for a while, is a rebalance or a
table restore, during which Faust holds its streams on purpose: the watch waits up to
``busy_grace_s`` (10 min) before it treats one as a hang.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from kubesight.logs import RdkafkaLog

log = logging.getLogger("kubesight.streams.watchdog")

Partition = tuple[str, int]


@dataclasses.dataclass
class Offsets:
    position: int | None  # the next offset the consumer will read
    highwater: int | None  # the partition's end, as last fetched

    @property
    def lag(self) -> int:
        if self.position is None or self.highwater is None:
            return 0
        return max(0, self.highwater - self.position)


@dataclasses.dataclass
class Verdict:
    action: str  # "ok" | "kick" | "restart" | "wait" (stalled, kicked, not yet time to restart)
    stalled: dict[Partition, tuple[int, float]]  # partition → (lag, seconds without progress)

    def describe(self) -> str:
        return ", ".join(f"{topic}/{part} lag {lag} for {secs:.0f}s"
                         for (topic, part), (lag, secs) in sorted(self.stalled.items()))


class StallWatch:
    """Tracks each partition's position over time; says when to kick and when to give up."""

    def __init__(self, stall_after_s: float = 30.0, restart_after_s: float = 60.0,
                 busy_grace_s: float = 600.0) -> None:
        if min(stall_after_s, restart_after_s, busy_grace_s) <= 0:
            raise ValueError("stall_after_s, restart_after_s and busy_grace_s must be > 0")
        self.stall_after_s = stall_after_s
        self.restart_after_s = restart_after_s
        self.busy_grace_s = busy_grace_s
        self._last: dict[Partition, tuple[int | None, float]] = {}  # position, since when
        self._kicked_at: float | None = None

    def stalled(self, now: float, offsets: Mapping[Partition, Offsets]
                ) -> dict[Partition, tuple[int, float]]:
        """Record this look at the partitions; return those stalled: lag, seconds still."""
        out: dict[Partition, tuple[int, float]] = {}
        for tp in list(self._last):
            if tp not in offsets:  # revoked
                del self._last[tp]
        for tp, off in offsets.items():
            prev = self._last.get(tp)
            if prev is None or prev[0] != off.position or off.lag == 0:
                self._last[tp] = (off.position, now)
                continue
            still = now - prev[1]
            if still >= self.stall_after_s:
                out[tp] = (off.lag, still)
        if not out:
            self._kicked_at = None
        return out

    def decide(self, now: float, stalled: Mapping[Partition, tuple[int, float]],
               broker_up: bool, busy: bool = False) -> Verdict:
        """What to do about ``stalled`` (from ``stalled()``), given whether a broker answers
        and whether Faust is busy rebalancing or restoring tables (when positions stand still
        by design: held off for ``busy_grace_s``, in case that is what hangs)."""
        if not stalled:
            return Verdict("ok", {})
        if not broker_up or (busy and max(s for _, s in stalled.values()) < self.busy_grace_s):
            return Verdict("wait", dict(stalled))
        if self._kicked_at is None:
            self._kicked_at = now
            return Verdict("kick", dict(stalled))
        if now - self._kicked_at >= self.restart_after_s:
            return Verdict("restart", dict(stalled))
        return Verdict("wait", dict(stalled))


# -- reading and nudging Faust's aiokafka consumer (private attributes: every read is guarded) --

def _aiokafka(app: Any) -> Any:
    thread = getattr(app.consumer, "_thread", None)
    return getattr(thread, "_consumer", None)


def _assignment(aio: Any) -> Any:
    try:
        return aio._fetcher._subscriptions.subscription.assignment
    except AttributeError:
        return None


def offsets(app: Any, topics: set[str]) -> dict[Partition, Offsets]:
    """Position and highwater of each assigned partition of ``topics`` (empty when unknown)."""
    aio = _aiokafka(app)
    assignment = _assignment(aio) if aio is not None else None
    if assignment is None or not assignment.active:
        return {}
    out: dict[Partition, Offsets] = {}
    for tp in assignment.tps:
        if tp.topic not in topics:
            continue
        state = assignment.state_value(tp)
        if state is None:
            continue
        position = state.position if state.has_valid_position else None
        out[(tp.topic, tp.partition)] = Offsets(position, state.highwater)
    return out


def _task_state(task: Any) -> str:
    if task is None:
        return "none"
    if not task.done():
        return "running"
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    return f"exited ({type(exc).__name__}: {exc})" if exc else "exited"


def diagnose(app: Any, stalled: Mapping[Partition, tuple[int, float]], now_ms: float) -> str:
    """One paragraph per layer that can stop a worker from reading, for the log."""
    lines = [f"faust: fetcher {app._fetcher.state}, rebalancing {app.rebalancing}, "
             f"flow {'active' if app.consumer.can_resume_flow.is_set() else 'stopped'}, "
             f"consumer {app.consumer.state}"]
    aio = _aiokafka(app)
    if aio is None:
        return "\n".join([*lines, "aiokafka: no consumer"])
    coordinator = getattr(aio, "_coordinator", None)
    fetcher = getattr(aio, "_fetcher", None)
    lines.append(
        f"aiokafka: fetch task {_task_state(getattr(fetcher, '_fetch_task', None))}, "
        f"coordination task {_task_state(getattr(coordinator, '_coordination_task', None))}, "
        f"coordinator {getattr(coordinator, 'coordinator_id', '?')}, "
        f"generation {getattr(coordinator, 'generation', '?')}")
    assignment = _assignment(aio)
    if assignment is None:
        lines.append("aiokafka: no assignment")
        return "\n".join(lines)
    for tp in sorted(assignment.tps):
        if (tp.topic, tp.partition) not in stalled:
            continue
        st = assignment.state_value(tp)
        polled = f"{(now_ms - st.timestamp) / 1000:.0f}s ago" if st.timestamp else "never"
        lines.append(f"  {tp.topic}/{tp.partition}: position "
                     f"{st.position if st.has_valid_position else 'none'} "
                     f"({getattr(st, '_status', '?')}), highwater {st.highwater}, "
                     f"paused {st.paused}, last fetch {polled}")
    return "\n".join(lines)


async def kick(app: Any, stalled: Mapping[Partition, tuple[int, float]],
               timeout: float = 10.0) -> list[str]:
    """Nudge every layer that may have stopped; returns what was done, for the log."""
    done: list[str] = []
    if app._fetcher.state in ("shutdown", "crashed", "init") and not app.rebalancing:
        app._fetcher.service_reset()
        await app._fetcher.maybe_start()
        done.append("restarted Faust's fetcher")
    aio = _aiokafka(app)
    if aio is None:
        return done
    thread = app.consumer._thread

    async def in_consumer_thread() -> int:  # aiokafka runs on the consumer thread's loop
        aio._client.force_metadata_update()
        assignment = _assignment(aio)
        n = 0
        for tp in assignment.tps if assignment is not None else ():
            state = assignment.state_value(tp)
            if (tp.topic, tp.partition) in stalled and state and state.has_valid_position:
                aio.seek(tp, state.position)
                n += 1
        return n

    try:  # the consumer thread itself may be what hangs
        n = await asyncio.wait_for(thread.call_thread(in_consumer_thread), timeout)
    except TimeoutError:
        done.append(f"the consumer thread did not run the kick within {timeout:.0f}s")
    else:
        done.append(f"refreshed metadata, re-seeked {n} partition(s) to their positions")
    return done


class EndOffsets:
    """Each partition's end offset, asked of the broker by a client of its own (librdkafka):
    aiokafka's ``highwater`` comes with its fetch responses, so a consumer whose fetches hang
    would report no lag at all. None when no broker answers within ``timeout``. Blocking: call
    it in a thread."""

    def __init__(self, librdkafka: Mapping[str, Any], group: str) -> None:
        self._conf = {**librdkafka, "group.id": group, "enable.auto.commit": False,
                      "logger": RdkafkaLog("kubesight.streams.watchdog.kafka")}
        self._consumer: Any = None

    def fetch(self, partitions: list[Partition], timeout: float = 5.0
              ) -> dict[Partition, int] | None:
        from confluent_kafka import Consumer, KafkaException, TopicPartition

        if self._consumer is None:
            self._consumer = Consumer(self._conf)
        out: dict[Partition, int] = {}
        try:
            for topic, part in partitions:
                _low, high = self._consumer.get_watermark_offsets(
                    TopicPartition(topic, part), timeout=timeout, cached=False)
                out[(topic, part)] = high
        except KafkaException:
            return None
        finally:
            self._consumer.poll(0)  # never consumes: its log lines come out when polled
        return out

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
