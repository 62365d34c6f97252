"""Probe overhead: nginx + wrk throughput with and without kubesight, side by side in one run.

Modes, alternated round by round so drift in the machine hits all of them alike:
  baseline   no BPF at all
  filtered   every program attached, every event dropped at the first check (filter_all):
             the floor cost of syscall tracepoints on this kernel
  capture    full capture: kernel copies payloads, the probe drains, decodes, batches per
             connection and msgpack-encodes; batches are handed to a producer that counts and
             discards them (the broker's own cost is left out: in production it is remote)
  kafka      full capture produced for real to a local broker on the same two cores
             (only with --kafka; the broker then competes with nginx and wrk for CPU)
  bare       (only with --modes ...,bare) the least any capture does: a benchmark-only build
             (bpf/build/l7_bare.bpf.o) whose exit program, once it has found the socket, puts
             a record of kind, size and payload prefix in the ring and nothing else (no
             connection identity, addresses, process name, TCP health); the reader drains and
             drops them. What full capture costs beyond it is what its features cost.
  bare-batch (only with --modes ...,bare-batch) bare's records appended to a per-CPU buffer
             in the kernel and put in the ring 16 KiB at a time (l7_bare_batch.bpf.o): what
             batching in the kernel would save. Not a design (a quiet CPU's buffer is never
             flushed), a measurement.
  capture-drop  (only with --modes) full capture's kernel side, drained and dropped
  capture-batch (only with --modes) full capture with data events batched per CPU in the
             kernel (l7_batch.bpf.o), each CPU flushed by the reader before each drain
             (flush_stage, BPF_PROG_TEST_RUN on that CPU); drained and dropped like
             capture-drop, so the two differ only in the kernel
  filtered-syscalls, capture-syscalls  (only with --modes) filtered and capture with the
             compat build (l7_compat.bpf.o): the syscalls:* tracepoints of DESIGN.md's
             kernel hooks, which the issue's floor of 0.78-0.87 was measured with
  A mode may name a ring size and a capture size of its own: capture@4m, capture#256,
  capture-batch@8m#512.

nginx (one worker) runs on the first CPU and wrk (one thread, 16 connections) on the second;
the probe is not pinned. Unpinned (--unpinned), where the scheduler puts them moves throughput
by 20% from round to round, more than what is measured.

Two measures per mode, both as ratios to the baseline: throughput (requests/s), and CPU per
request of nginx, wrk and the probe together (BPF programs run in the syscalls of nginx and
wrk, so their time is in those processes' system time).

BPF run time per event comes from the kernel's own accounting (kernel.bpf_stats_enabled) read
with bpftool after an extra capture round, not counted in the ratios (the accounting itself
slows every program). Usage: python -m bench.probe_overhead [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.harness import Nginx, WrkResult, wait_for, wrk  # noqa: E402

MODES = ("filtered", "capture", "bare", "bare-batch", "capture-drop", "capture-batch",
         "filtered-syscalls", "capture-syscalls")
CAPTURE_MODES = ("capture", "capture-syscalls")  # full capture, with the real user side
# each gets a bpf_stats round
STATS_MODES = ("capture", "capture-drop", "capture-batch", "capture-syscalls")
DRAIN_AND_DROP = {"bare": "l7_bare.bpf.o", "bare-batch": "l7_bare_batch.bpf.o",
                  "capture-drop": "l7.bpf.o", "capture-batch": "l7_batch.bpf.o"}


def _parse_mode(mode: str) -> tuple[str, int, int]:
    """``capture@4m#256`` -> ("capture", 4 MiB, 256): the mode, and the ring size and capture
    size it names (0: kubesight's default)."""
    rest, _, cap = mode.partition("#")
    name, _, size = rest.partition("@")
    ring = 0
    if size:
        units = {"k": 1 << 10, "m": 1 << 20}
        unit = units.get(size[-1].lower())
        ring = int(size[:-1]) * unit if unit else int(size)
        if ring < 4096 or ring & (ring - 1):
            raise ValueError(f"{mode}: the ring size must be a power of two >= 4k")
    if cap and (not cap.isdigit() or not 64 <= int(cap) <= 8192 or int(cap) & (int(cap) - 1)):
        raise ValueError(f"{mode}: the capture size must be a power of two in 64..8192")
    return name, ring, int(cap or 0)


def flush_stages(obj: Any, cpus: list[int], tries: int = 100) -> int:
    """Run flush_stage (l7_batch.bpf.o) on every CPU, again while that CPU answers 1 (the
    IPI found it mid-append); returns those retries. RuntimeError if one stays busy."""
    retries = 0
    for cpu in cpus:
        for _ in range(tries):
            if obj.run_on_cpu("flush_stage", cpu) == 0:
                break
            retries += 1
        else:
            raise RuntimeError(f"CPU {cpu} stayed mid-append for {tries} flushes")
    return retries


def _probe_child(mode: str, bootstrap: str) -> None:
    """Run inside the child process: attach, drain until SIGTERM, print stats as JSON."""
    from kubesight.probe.l7 import L7Probe
    from kubesight.probe.publisher import Publisher, producer_config

    class CountingProducer:
        """Stands in for Kafka in the `capture` mode only: counts what it is handed."""

        def __init__(self) -> None:
            self.messages = 0
            self.bytes = 0

        def produce(self, _topic: str, value: bytes, key: bytes, on_delivery: Any) -> None:
            self.messages += 1
            self.bytes += len(value)

        def poll(self, _timeout: float) -> int:
            return 0

        def __len__(self) -> int:
            return 0

        def flush(self, _timeout: float) -> int:
            return 0

    stop = False

    def on_term(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    from kubesight.config import ProbeConfig

    defaults = ProbeConfig()  # measure what kubesight runs with
    mode, ring, cap = _parse_mode(mode)
    ringbuf = ring or int(os.environ.get("KS_BENCH_RINGBUF", defaults.ringbuf_bytes))
    capture_bytes = cap or defaults.capture_bytes
    if mode in DRAIN_AND_DROP:
        _bare_child(capture_bytes, ringbuf, lambda: stop, build=DRAIN_AND_DROP[mode],
                    flush=mode == "capture-batch")
        return
    probe = L7Probe(capture_bytes=capture_bytes, ringbuf_bytes=ringbuf,
                    filter_all=mode.startswith("filtered"),
                    build="l7_compat.bpf.o" if mode.endswith("-syscalls") else None)
    producer: Any
    if mode == "kafka":
        from confluent_kafka import Producer

        producer = Producer(producer_config({"bootstrap.servers": bootstrap}))
    else:
        producer = CountingProducer()
    publisher = Publisher(producer=producer, topic="bench.raw.v1", node="bench",
                          probe_id="bench")
    probe.start()
    print("ready", flush=True)
    cpu0 = time.process_time()
    next_flush = time.monotonic()
    def drain() -> None:  # what kubesight.probe.main.ProbeRunner does
        publisher.count_in(probe.drain_into(
            publisher.open, publisher.sealed, offset_ns=publisher.clock_offset_ns(),
            max_events=publisher.batch_max_events, max_bytes=publisher.batch_max_bytes))

    while not stop:
        drain()
        time.sleep(defaults.poll_interval_ms / 1000)
        if time.monotonic() >= next_flush:
            publisher.flush()
            next_flush = time.monotonic() + defaults.flush_interval_ms / 1000
    drain()
    publisher.flush()
    if mode == "kafka":
        producer.flush(60)
    stats = {"kernel": probe.counters(), "publisher": publisher.stats(),
             "cpu_s": time.process_time() - cpu0}
    probe.close()
    print(json.dumps(stats), flush=True)


def _bare_child(capture_bytes: int, ringbuf: int, stopped: Any, *, build: str,
                flush: bool = False) -> None:
    """Modes ``bare``, ``bare-batch``, ``capture-drop`` and ``capture-batch``: a build drained
    and dropped on the same timer; with ``flush``, each CPU's staged events are flushed to the
    ring first (flush_stage run on every CPU, again while that CPU is mid-append)."""
    from kubesight.probe.l7 import DIRECT_RECORDS_KFUNC, L7Probe
    from kubesight.probe.libbpf import kernel_has_kfunc

    from kubesight.config import ProbeConfig

    if not kernel_has_kfunc(DIRECT_RECORDS_KFUNC):
        print(f"mode bare needs {DIRECT_RECORDS_KFUNC} (Linux >= 6.16)", flush=True)
        return
    probe = L7Probe(capture_bytes=capture_bytes, ringbuf_bytes=ringbuf, tls=False,
                    build=build)
    probe.start()
    print("ready", flush=True)
    cpus = sorted(os.sched_getaffinity(0))
    retries = 0

    def drain() -> int:
        nonlocal retries
        if flush:
            retries += flush_stages(probe._obj, cpus)  # noqa: SLF001 (bench only)
        return int(probe.discard())

    cpu0 = time.process_time()
    records = 0
    while not stopped():
        records += drain()
        time.sleep(ProbeConfig().poll_interval_ms / 1000)
    records += drain()
    counters = probe.counters()
    stats = {"kernel": {"events": counters["events"], "ring_records": records,
                        "ringbuf_drops": counters["ringbuf_drops"], "flush_retries": retries},
             "cpu_s": time.process_time() - cpu0}
    probe.close()
    print(json.dumps(stats), flush=True)


def _bpf_prog_stats() -> dict[str, tuple[int, int]]:
    out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True,
                         check=True)
    stats = {}
    for prog in json.loads(out.stdout):
        if prog.get("type") in ("tracepoint", "tracing") and "run_cnt" in prog:
            stats[prog.get("name", str(prog["id"]))] = (prog["run_time_ns"], prog["run_cnt"])
    return stats


def _clock_ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks (BPF programs count in the stime of the
    process whose syscall ran them)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _children_ticks(ppid: int) -> int:
    total = 0
    for pid in _children(ppid):
        try:
            total += _clock_ticks(pid)
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
    return total


def _pin_nginx(master: int, cpu: int) -> None:
    """nginx's master and workers on one CPU (workers are forked: they keep the mask)."""
    for pid in [master, *_children(master)]:
        os.sched_setaffinity(pid, {cpu})


def _children(ppid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == ppid:
                out.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
    return out


def _wrk(url: str, seconds: float, cpu: int | None) -> WrkResult:
    if cpu is None:
        return wrk(url, connections=16, threads=2, seconds=seconds)
    out = subprocess.run(["taskset", "-c", str(cpu), "wrk", "-t1", "-c16", f"-d{seconds:g}s",
                          "--latency", url], capture_output=True, text=True, check=True,
                         timeout=seconds + 60)
    return WrkResult(out.stdout)


def run_mode(mode: str, url: str, seconds: float, bootstrap: str, nginx_pid: int,
             bpf_stats: bool = False, wrk_cpu: int | None = None,
             repo: Path = REPO) -> dict[str, Any]:
    """One round of one mode. ``repo``: the checkout whose probe runs (its own .venv)."""
    child = None
    if mode != "baseline":
        python = sys.executable if repo == REPO else str(repo / ".venv" / "bin" / "python")
        child = subprocess.Popen([python, "-m", "bench.probe_overhead", "--child", mode,
                                  "--bootstrap", bootstrap], stdout=subprocess.PIPE, text=True,
                                 cwd=repo)
        assert child.stdout is not None
        line = child.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"probe child failed to start ({mode}): {line!r}")
    result: dict[str, Any] = {"mode": mode}
    try:
        if bpf_stats:
            subprocess.run(["sysctl", "-q", "kernel.bpf_stats_enabled=1"], check=True)
        nginx0, wrk0 = _children_ticks(nginx_pid), os.times()
        res = _wrk(url, seconds, wrk_cpu)
        nginx1, wrk1 = _children_ticks(nginx_pid), os.times()
        result["rps"] = res.requests / seconds
        result["requests"] = res.requests
        # CPU of nginx's workers and of wrk (a child of ours: reaped into our children times)
        result["cpu_s"] = ((nginx1 - nginx0) / os.sysconf("SC_CLK_TCK")
                           + (wrk1.children_user - wrk0.children_user)
                           + (wrk1.children_system - wrk0.children_system))
        if bpf_stats:
            result["bpf"] = _bpf_prog_stats()
            subprocess.run(["sysctl", "-q", "kernel.bpf_stats_enabled=0"], check=True)
    finally:
        if child is not None:
            child.send_signal(signal.SIGTERM)
            out, _ = child.communicate(timeout=120)
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            if lines:
                result["probe"] = json.loads(lines[-1])
                result["cpu_s"] += result["probe"]["cpu_s"]
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--kafka", action="store_true", help="add the produce-to-local-broker mode")
    ap.add_argument("--modes", default="baseline,filtered,capture",
                    help="comma-separated: baseline plus any of " + ",".join(MODES)
                         + ", each optionally with a ring "
                         "size (capture@4m) and capture size (capture#256) of its own "
                         "(default: baseline,filtered,capture)")
    ap.add_argument("--unpinned", action="store_true",
                    help="let the scheduler place nginx and wrk (default: nginx on CPU 0, wrk "
                         "on CPU 1; unpinned, where they land moves throughput by +-20%%)")
    ap.add_argument("--compare", type=Path, metavar="CHECKOUT",
                    help="add a 'compare' mode: full capture by the probe of another checkout "
                         "(set up with make setup), e.g. a clone of an older commit")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _probe_child(args.child, args.bootstrap)
        return 0
    if os.geteuid() != 0:
        print("probe overhead needs root (BPF)", file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m]
    try:
        bad = [m for m in modes if m != "baseline" and _parse_mode(m)[0] not in MODES]
    except ValueError as exc:
        print(f"--modes: {exc}", file=sys.stderr)
        return 2
    if not modes or "baseline" not in modes or bad:
        print(f"--modes: baseline plus any of {','.join(MODES)} (each may add "
              "@<ring size> and #<capture bytes>, e.g. capture@4m#256)", file=sys.stderr)
        return 2
    modes = ["baseline", *dict.fromkeys(m for m in modes if m != "baseline")]  # ratios to [0]
    broker = None
    bootstrap = ""
    workdir = Path(tempfile.mkdtemp(prefix="ks-bench-"))
    if args.kafka:
        from kubesight.broker import LocalBroker
        from kubesight.config import Config, KafkaConfig, LocalBrokerConfig
        from kubesight.topics import ensure_topics
        from tests.conftest import free_ports

        port, cport = free_ports(2)
        cfg = Config(state_dir=str(workdir / "state"), kafka=KafkaConfig(
            local=LocalBrokerConfig(port=port, controller_port=cport, heap="512m"),
            topic_prefix="bench."))
        broker = LocalBroker(cfg).start(timeout=120)
        ensure_topics(cfg)
        bootstrap = broker.bootstrap
        modes.append("kafka")
    if args.compare is not None:
        modes.append("compare")
    nginx = Nginx(workdir)
    nginx.start()
    assert nginx.proc is not None
    # The probe's own process is never pinned: it takes its CPU from nginx's or wrk's.
    wrk_cpu = None
    if not args.unpinned and len(os.sched_getaffinity(0)) >= 2:
        cpus = sorted(os.sched_getaffinity(0))
        _pin_nginx(nginx.proc.pid, cpus[0])
        wrk_cpu = cpus[1]
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    stats_rounds: dict[str, dict[str, Any]] = {}
    try:
        wait_for("nginx", lambda: nginx.served() >= 0)
        wrk(nginx.url + "/", seconds=1)  # warm up
        for r in range(args.rounds):
            # Each round in another order: whatever drifts within a round hits every mode.
            for mode in modes[:1] + (modes[1:] if r % 2 == 0 else modes[:0:-1]):
                repo = args.compare.resolve() if mode == "compare" else REPO
                res = run_mode("capture" if mode == "compare" else mode, nginx.url + "/",
                               args.seconds, bootstrap, nginx.proc.pid, wrk_cpu=wrk_cpu,
                               repo=repo)
                res["mode"] = mode
                results[mode].append(res)
                print(f"round {r + 1} {mode:<18} {res['rps']:>10,.0f} req/s", flush=True)
        # Their own rounds: the kernel's accounting slows every program.
        for mode in (m for m in modes if _parse_mode(m)[0] in STATS_MODES):
            stats_rounds[mode] = run_mode(mode, nginx.url + "/", args.seconds, bootstrap,
                                          nginx.proc.pid, bpf_stats=True, wrk_cpu=wrk_cpu)
            print(f"bpf_stats round of {mode} (not in the ratios): "
                  f"{stats_rounds[mode]['rps']:,.0f} req/s")
    finally:
        nginx.stop()
        if broker is not None:
            broker.stop()
    base = statistics.median(x["rps"] for x in results["baseline"])
    # Paired: each round's ratio to the baseline of the same round, then their geometric
    # mean; steadier than a ratio of medians when the machine drifts between rounds.
    print(f"\n{'mode':<18} median req/s   ratio to baseline   paired (geomean)   "
          "per-round ratios")
    for mode in modes:
        rps = [x["rps"] for x in results[mode]]
        med = statistics.median(rps)
        per_round = [x["rps"] / b["rps"] for x, b in zip(results[mode], results["baseline"],
                                                         strict=True)]
        print(f"{mode:<18} {med:>12,.0f}   {med / base:>17.3f}   "
              f"{statistics.geometric_mean(per_round):>16.3f}   "
              + " ".join(f"{p:.3f}" for p in per_round))
    # Throughput moves with everything else on the machine; CPU per request counts only
    # nginx, wrk and the probe, so it is the steadier measure of the same cost.
    base_cpu = statistics.median(x["cpu_s"] / x["requests"] for x in results["baseline"])
    print("\nmode               CPU us per request (nginx + wrk + probe)   ratio to baseline")
    for mode in modes:
        per_req = statistics.median(x["cpu_s"] / x["requests"] for x in results[mode])
        print(f"{mode:<18} {per_req * 1e6:>12.2f}   {base_cpu / per_req:>17.3f}")
    for mode in modes:
        if _parse_mode(mode)[0] not in CAPTURE_MODES and mode != "compare":
            continue
        cpu = [(x["probe"]["cpu_s"], x["probe"]["kernel"]["events"]) for x in results[mode]
               if x.get("probe", {}).get("kernel", {}).get("events")]
        if cpu:
            print(f"{mode}: probe user side (drain, group, encode): "
                  f"{sum(c for c, _ in cpu) / sum(n for _, n in cpu) * 1e9:,.0f} ns CPU per "
                  f"event over {sum(n for _, n in cpu):,} events")
    for mode, last in stats_rounds.items():
        if "bpf" not in last:
            continue
        print(f"{mode}, bpf_stats round:")
        for name, (ns, cnt) in sorted(last["bpf"].items(), key=lambda kv: -kv[1][0]):
            if cnt:
                print(f"  program {name}: {ns / cnt:,.0f} ns per run over {cnt:,} runs")
        kernel = last.get("probe", {}).get("kernel", {})
        allns = sum(v[0] for v in last["bpf"].values())
        if kernel.get("events"):
            print(f"  BPF time per captured event (all programs / events sent): "
                  f"{allns / kernel['events']:,.0f} ns over {kernel['events']:,} events")
    for mode in modes[1:]:
        k = results[mode][-1].get("probe", {}).get("kernel", {})
        print(f"{mode}: kernel counters {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
