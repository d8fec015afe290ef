"""What running the learner's code in a process of its own costs: the reference solutions of
a selection verified in-process and apart (as grading runs them), alternately, in one run,
with warm services; prints the median time of each and the ratio.

Usage: python benchmarks/bench_learner_process.py [--select ph2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from labrunner.learner import ENV_LEARNER_HOST, SPAWN


def timed_run(select: str, apart: bool) -> float:
    env = {k: v for k, v in os.environ.items() if k != ENV_LEARNER_HOST}
    if apart:
        env[ENV_LEARNER_HOST] = SPAWN
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "labrunner.cli", "run", select, "--solutions",
                           "--jobs", "1"], env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-2000:])
        raise SystemExit(f"labrunner run {select} failed ({'apart' if apart else 'in-process'})")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--select", default="ph2")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    up = subprocess.run([sys.executable, "-m", "labrunner.cli", "services", "up"],
                        capture_output=True, text=True)
    if up.returncode != 0:
        raise SystemExit(f"labrunner services up failed: {up.stderr[-1000:]}")
    try:
        timed_run(args.select, apart=False)  # warm-up: imports, page cache
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for apart in (False, True):
                times[apart].append(timed_run(args.select, apart))
        inproc, apart_s = statistics.median(times[False]), statistics.median(times[True])
        print(f"labrunner run {args.select} --solutions -j 1, warm services, "
              f"median of {args.rounds} on {os.cpu_count()} CPUs")
        print(f"  learner code in-process:         {inproc:6.1f} s")
        print(f"  learner code in its own process: {apart_s:6.1f} s")
        print(f"  apart / in-process: {apart_s / inproc:.2f}x")
    finally:
        subprocess.run([sys.executable, "-m", "labrunner.cli", "services", "down"],
                       capture_output=True, text=True)


if __name__ == "__main__":
    main()
