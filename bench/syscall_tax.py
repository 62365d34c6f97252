"""What the probe costs a process that does no networking at all.

A node runs far more than HTTP servers: databases doing file I/O, log shippers, build jobs.
Their syscalls should cost what they cost without kubesight. This runs `dd` copying
/dev/zero to /dev/null in 64-byte blocks (two syscalls per block, none on a socket) with no
probe, with the probe attached but filtering everything (filtered), and with full capture
(the child of bench.probe_overhead: drain, group and encode, producer stubbed out), rounds
alternating, and reports each mode's dd throughput as a ratio to no probe.

`--compare CHECKOUT` adds full capture by another checkout's probe (set up with make setup).
Usage: python -m bench.syscall_tax [--rounds 3] [--blocks 2000000]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _dd_seconds(blocks: int) -> float:
    start = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", "of=/dev/null", "bs=64", f"count={blocks}"],
                   capture_output=True, check=True, timeout=600)
    return time.perf_counter() - start


def run_mode(mode: str, blocks: int, repo: Path = REPO) -> float:
    """dd's seconds with the probe of ``repo`` in ``mode`` (or none for 'baseline')."""
    if mode == "baseline":
        return _dd_seconds(blocks)
    python = sys.executable if repo == REPO else str(repo / ".venv" / "bin" / "python")
    child = subprocess.Popen([python, "-m", "bench.probe_overhead", "--child", mode],
                             stdout=subprocess.PIPE, text=True, cwd=repo)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"probe child failed to start ({mode}): {line!r}")
        return _dd_seconds(blocks)
    finally:
        child.send_signal(signal.SIGTERM)
        child.communicate(timeout=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=2_000_000, help="dd blocks of 64 bytes")
    ap.add_argument("--compare", type=Path, metavar="CHECKOUT",
                    help="add full capture by the probe of another checkout")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("the probe needs root (BPF)", file=sys.stderr)
        return 2
    modes = ["baseline", "filtered", "capture"] + (["compare"] if args.compare else [])
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes if r % 2 == 0 else modes[:1] + modes[:0:-1]:
            repo = args.compare.resolve() if mode == "compare" else REPO
            s = run_mode("capture" if mode == "compare" else mode, args.blocks, repo)
            seconds[mode].append(s)
            print(f"round {r + 1} {mode:<9} {s:6.2f} s", flush=True)
    print("\nmode       dd 64-byte blocks/s (median)   paired ratio to no probe (geomean)")
    for mode in modes:
        ratios = [b / s for s, b in zip(seconds[mode], seconds["baseline"], strict=True)]
        rate = args.blocks / statistics.median(seconds[mode])
        print(f"{mode:<10} {rate:>18,.0f}   {statistics.geometric_mean(ratios):>22.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
