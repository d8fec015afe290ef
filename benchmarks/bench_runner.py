"""Measure, in one run on this machine:

1. time to ready for each local service, cold (a fresh start, no warm set; the Postgres and
   Kafka templates already made) and warm (a warm set found alive and reused);
2. for one lab, the wall time of ``labrunner run LAB --solutions`` against bare ``pytest`` on
   the same test with the same running services, as a ratio (the runner's overhead).

Side by side and repeated, so that the noisy shared machine affects both sides alike.
Usage: python benchmarks/bench_runner.py [--lab ph2.5] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from labrunner.catalog import load_catalog
from labrunner.services import kinds
from labrunner.services.manager import ServiceSet

REPO = Path(__file__).resolve().parents[1]


def median_time(fn: object, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def service_ready_times(repeat: int) -> None:
    print(f"time to ready, local backend (median of {repeat})")
    print(f"{'service':<10}{'cold':>10}{'warm':>10}{'cold/warm':>12}")
    for service in kinds():
        name = service.name
        if service.missing():
            print(f"{name:<10}  skipped: {service.missing()}")
            continue
        cold_samples = []
        for _ in range(repeat if name in ("postgres", "redis", "prometheus")
                       else max(1, repeat // 2)):
            service_set = ServiceSet.ephemeral("local")
            start = time.perf_counter()
            service_set.ensure([name])
            cold_samples.append(time.perf_counter() - start)
            service_set.stop()
        cold = statistics.median(cold_samples)
        warm_set = ServiceSet.ephemeral("local")
        endpoint = warm_set.ensure([name])[name]
        # Warm: what a run pays to reuse a warm service: find it alive.
        warm = median_time(lambda s=warm_set, e=endpoint: s.backend.alive(e), repeat)
        warm_set.stop()
        print(f"{name:<10}{cold:>9.2f}s{warm:>9.3f}s{cold / warm:>11.0f}x")


def runner_overhead(lab_id: str, repeat: int) -> None:
    lab = load_catalog().lab(lab_id)
    service_set = ServiceSet.warm_set("local")
    service_set.ensure(lab.services)
    env = {**os.environ, "LABRUNNER_SERVICES": str(service_set.state_file)}
    bare = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            *map(str, lab.test_files), "--lab-target", "solution"]
    # The same pytest invocation the runner makes (no plugin autoload), run by hand: the
    # difference to `labrunner run` is the runner's own cost (CLI, catalog, services check,
    # signed report channel, results table).
    lean = [*bare, "-p", "labrunner.plugin", "-p", "pytest_timeout"]
    lean_env = {**env, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    runner = [sys.executable, "-m", "labrunner.cli", "run", lab_id, "--solutions"]
    sides = [("bare pytest", bare, env), ("pytest as the runner calls it", lean, lean_env),
             ("labrunner run", runner, env)]
    for _, cmd, cmd_env in sides:  # warm the OS caches for every side before measuring
        subprocess.run(cmd, env=cmd_env, capture_output=True, check=False)
    times: dict[str, list[float]] = {name: [] for name, _, _ in sides}
    for _ in range(repeat):  # interleaved: each round sees the same machine load
        for name, cmd, cmd_env in sides:
            start = time.perf_counter()
            done = subprocess.run(cmd, env=cmd_env, capture_output=True, text=True)
            times[name].append(time.perf_counter() - start)
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-2000:])
                raise SystemExit(f"{name} failed")
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"\nlab {lab_id}, warm services, median of {repeat}:")
    for name, value in med.items():
        print(f"  {name:<32}{value:6.2f}s")
    r = med["labrunner run"]
    for base in ("bare pytest", "pytest as the runner calls it"):
        print(f"labrunner run / {base}: {r / med[base]:.2f} "
              f"(overhead {100 * (r - med[base]) / med[base]:+.0f}%)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lab", default="ph2.5")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    service_ready_times(args.repeat)
    runner_overhead(args.lab, args.repeat)


if __name__ == "__main__":
    main()
