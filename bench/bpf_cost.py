"""What each part of a captured event costs in the kernel: BPF time per event (bpf_stats) of
l7_batch.bpf.o variants that leave parts of each staged event out, under nginx + wrk.

A variant is ``SKIP[:CAPTURE]``: SKIP is a sum of bits, each leaving one part out
  1  the header fields a reader could get elsewhere (role, family, ports, fd, tgid,
     addresses, process name): only kind, connection id, time and size are written
  2  the TCP health (srtt_us, total_retrans)
  4  the payload copy
and CAPTURE is the capture size in bytes (default 4096, as kubesight runs). Each variant is
built with ``make -C bpf variant`` into a temporary directory. Rounds alternate the order of
the variants. nginx runs on CPU 0 and wrk on CPU 1, as in bench/probe_overhead.py. The reader
is a thread of this process: it flushes every CPU's stage (flush_stage) and drains and drops,
every 10 ms.

Usage: python -m bench.bpf_cost [--variants 0,1,2,4,7,0:64,0:256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.probe_overhead import _bpf_prog_stats, _pin_nginx, _wrk, flush_stages  # noqa: E402
from tests.e2e.harness import Nginx, wait_for, wrk  # noqa: E402


def build(skip: int, out_dir: Path) -> str:
    name = f"l7_batch_skip{skip}.bpf.o"
    subprocess.run(["make", "-s", "-C", str(REPO / "bpf"), "variant", f"SKIP={skip}",
                    f"OUT={out_dir / name}"], check=True)
    return name


def one_round(build_name: str, bpf_dir: Path, capture: int, url: str, seconds: float,
              wrk_cpu: int) -> tuple[float, float, float]:
    """(requests/s, BPF ns per event, events) of one round of one variant."""
    from kubesight.probe.l7 import L7Probe

    probe = L7Probe(bpf_dir=bpf_dir, build=build_name, tls=False, capture_bytes=capture)
    probe.start()
    obj = probe._obj  # noqa: SLF001 (bench only: the flush is not part of L7Probe)
    assert obj is not None
    cpus = sorted(os.sched_getaffinity(0))
    done = threading.Event()

    def reader() -> None:
        while not done.wait(0.01):
            flush_stages(obj, cpus)
            probe.discard()

    thread = threading.Thread(target=reader, name="bench-reader")
    thread.start()
    try:
        subprocess.run(["sysctl", "-q", "kernel.bpf_stats_enabled=1"], check=True)
        res = _wrk(url, seconds, wrk_cpu)
        stats = _bpf_prog_stats()
    finally:
        subprocess.run(["sysctl", "-q", "kernel.bpf_stats_enabled=0"], check=True)
        done.set()
        thread.join()
        events = probe.counters()["events"]
        probe.close()
    return res.requests / seconds, sum(ns for ns, _ in stats.values()) / max(events, 1), events


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="0,1,2,4,7,0:64,0:256,0:1024",
                    help="comma-separated SKIP[:CAPTURE] (see above)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bpf_cost needs root (BPF)", file=sys.stderr)
        return 2
    if len(os.sched_getaffinity(0)) < 2:
        print("bpf_cost needs two CPUs (nginx on one, wrk on the other)", file=sys.stderr)
        return 2
    variants: list[tuple[str, int, int]] = []
    for spec in args.variants.split(","):
        skip, _, cap = spec.partition(":")
        if not skip.isdigit() or int(skip) > 7 or (cap and not cap.isdigit()):
            print(f"--variants: {spec!r} is not SKIP[:CAPTURE] with SKIP in 0..7",
                  file=sys.stderr)
            return 2
        variants.append((spec, int(skip), int(cap or 4096)))
    work = Path(tempfile.mkdtemp(prefix="ks-bpf-cost-"))
    shutil.copy(REPO / "bpf" / "build" / "libksdrain.so", work / "libksdrain.so")
    builds = {skip: build(skip, work) for skip in {s for _, s, _ in variants}}
    cpus = sorted(os.sched_getaffinity(0))
    nginx = Nginx(work)
    nginx.start()
    assert nginx.proc is not None
    _pin_nginx(nginx.proc.pid, cpus[0])
    results: dict[str, list[tuple[float, float, float]]] = {spec: [] for spec, _, _ in variants}
    try:
        wait_for("nginx", lambda: nginx.served() >= 0)
        wrk(nginx.url + "/", seconds=1)  # warm up
        for r in range(args.rounds):
            for spec, skip, cap in variants if r % 2 == 0 else variants[::-1]:
                res = one_round(builds[skip], work, cap, nginx.url + "/", args.seconds, cpus[1])
                results[spec].append(res)
                print(f"round {r + 1} {spec:<8} {res[0]:>10,.0f} req/s  "
                      f"{res[1]:>5,.0f} ns BPF per event", flush=True)
    finally:
        nginx.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("\nvariant   median req/s   BPF ns per event (median)   events per round")
    for spec, _, _ in variants:
        rps, ns, events = (statistics.median(x[i] for x in results[spec]) for i in range(3))
        print(f"{spec:<8} {rps:>13,.0f}   {ns:>26,.0f}   {events:>16,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
