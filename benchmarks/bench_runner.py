"""Measure, in one run on this machine, side by side (issue #22):

1. time to ready of each service, local backend (median of ``--repeat``; RabbitMQ and Kafka
   at least 3) and docker where a daemon answers, and what reusing a warm one costs;
2. the Phase 5 service set started one after another against all at once (the run's way);
3. first-result latency of ``labrunner run ph5`` and ``run ph2`` from cold (no warm set),
   and ``labrunner run ph5.1`` cold against a second ``run ph5.1`` right after (no
   ``services up``: the first run left its services warm);
4. the runner's overhead on one lab with warm services: ``labrunner run LAB`` against the
   pytest command the runner builds, run by hand.

Everything runs in $LABRUNNER_RUNTIME_DIR (default: a folder of its own where labrunner keeps
its throwaway state, /dev/shm when it is a tmpfs with room): the
warm sets there are stopped first and at the end. Templates (Postgres, Kafka storage) are
made before measuring. Usage: python benchmarks/bench_runner.py [--lab ph2.5] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if not os.environ.get("LABRUNNER_RUNTIME_DIR"):
    from labrunner.services.local.process import fast_temp_root

    os.environ["LABRUNNER_RUNTIME_DIR"] = str(fast_temp_root() /
                                              f"labrunner-bench-{os.geteuid()}")

from labrunner.catalog import load_catalog  # noqa: E402
from labrunner.services import kinds  # noqa: E402
from labrunner.services.manager import ServiceSet, Startup, clean, docker_answers  # noqa: E402
from labrunner.session import needed_services  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNNER = [sys.executable, "-m", "labrunner.cli"]


def median_time(fn: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def ready_time(backend: str, name: str) -> float:
    service_set = ServiceSet.ephemeral(backend)
    start = time.perf_counter()
    try:
        service_set.ensure([name])
        return time.perf_counter() - start
    finally:
        service_set.stop()


def service_ready_times(repeat: int) -> dict[str, float]:
    docker = docker_answers()
    print(f"1. time to ready (median of {max(3, repeat)} for kafka and rabbitmq, "
          f"{repeat} for the others)")
    print(f"{'service':<11}{'local':>9}{'docker':>9}{'warm reuse':>12}   local samples")
    medians: dict[str, float] = {}
    for service in kinds():
        name = service.name
        if service.missing():
            print(f"{name:<11}  skipped: {service.missing()}")
            continue
        n = max(3, repeat) if name in ("kafka", "rabbitmq") else repeat
        samples = [ready_time("local", name) for _ in range(n)]
        medians[name] = statistics.median(samples)
        dock = f"{statistics.median(ready_time('docker', name) for _ in range(n)):8.2f}s" \
            if docker else "      -  "
        warm_set = ServiceSet.ephemeral("local")
        endpoint = warm_set.ensure([name])[name]
        warm = median_time(lambda: warm_set.backend.alive(endpoint), repeat)  # noqa: B023
        warm_set.stop()
        print(f"{name:<11}{medians[name]:8.2f}s{dock}{warm:11.3f}s   "
              + " ".join(f"{s:.2f}" for s in samples))
    if not docker:
        print("(docker: no daemon answers here)")
    return medians


def sequential_vs_concurrent(medians: dict[str, float], repeat: int) -> None:
    """The Phase 5 set started one service after another, all at once (the run's way), and
    its slowest service alone, in rounds side by side: the machine's noise moves all three
    of a round together, so the ratio is taken per round and its median printed."""
    catalog = load_catalog()
    phase5 = [lab for lab in catalog.labs if lab.id.startswith("ph5.")]
    names = needed_services(phase5)
    slowest_name = max(names, key=lambda n: medians.get(n, 0.0)) if medians else "rabbitmq"
    print(f"\n2. the Phase 5 set ({', '.join(names)}): one after another vs all at once, "
          f"and {slowest_name} alone, {repeat} rounds side by side")
    rounds: list[tuple[float, float, float]] = []
    for _ in range(repeat):
        alone = ready_time("local", slowest_name)
        seq_set = ServiceSet.ephemeral("local")
        start = time.perf_counter()
        try:
            seq_set.ensure(names)
            sequential = time.perf_counter() - start
        finally:
            seq_set.stop()
        conc_set = ServiceSet.ephemeral("local")
        startup = Startup(conc_set, names)
        start = time.perf_counter()
        try:
            startup.begin().wait()
            concurrent = time.perf_counter() - start
            if startup.errors:
                print(f"   failed: {startup.errors}")
        finally:
            conc_set.stop()
            startup.release()
        rounds.append((alone, sequential, concurrent))
        print(f"   round: {slowest_name} alone {alone:5.2f}s   sequential {sequential:5.2f}s   "
              f"concurrent {concurrent:5.2f}s   concurrent / alone {concurrent / alone:.2f}")
    alone, sequential, concurrent = (statistics.median(r[i] for r in rounds) for i in range(3))
    ratio = statistics.median(r[2] / r[0] for r in rounds)
    print(f"   median: {slowest_name} alone {alone:.2f}s, sequential {sequential:.2f}s, "
          f"concurrent {concurrent:.2f}s; concurrent / slowest alone {ratio:.2f} "
          f"(median of the rounds' ratios)")


def first_result(args: list[str], stop: bool = False) -> tuple[float, float, int]:
    """Seconds to the first result line, to the end, and the exit code of a run; with
    ``stop``, the run is interrupted (Ctrl-C) once its first result is in."""
    start = time.perf_counter()
    proc = subprocess.Popen([*RUNNER, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    first = float("nan")
    assert proc.stdout is not None
    for line in proc.stdout:
        if first != first and line.lstrip().startswith(("✓", "✗", "!", "⏱", "-")):
            first = time.perf_counter() - start
            if stop:
                proc.send_signal(signal.SIGINT)
    code = proc.wait()
    return first, time.perf_counter() - start, code


def first_results() -> None:
    print("\n3. first result, cold (no warm set) and a second run right after")
    clean(docker=False)
    for selector in ("ph5", "ph2"):
        first, total, code = first_result(["run", selector, "--solutions"], stop=True)
        print(f"   run {selector:<6} cold: first result after {first:6.2f}s (then "
              f"interrupted; exit {code})")
        clean(docker=False)
    cold = first_result(["run", "ph5.1", "--solutions"])
    warm = first_result(["run", "ph5.1", "--solutions"])
    print(f"   run ph5.1  cold {cold[1]:6.2f}s, second run right after {warm[1]:6.2f}s: "
          f"{cold[1] / warm[1]:.1f}x faster")
    clean(docker=False)


def runner_overhead(lab_id: str, repeat: int) -> None:
    from labrunner.runner import Sandbox, pytest_command

    lab = load_catalog().lab(lab_id)
    service_set = ServiceSet.warm_set("local", REPO)
    service_set.meta["warm"].update(pinned=True, deadline=None)
    service_set.ensure(lab.services)
    env = {**os.environ, "LABRUNNER_SERVICES": str(service_set.state_file)}
    ini = Path(tempfile.mkdtemp()) / "pytest.ini"
    ini.write_text("[pytest]\n", encoding="utf-8")
    # The very command the runner builds (no plugin autoload, the labrunner plugin, its
    # options), run by hand: the difference to `labrunner run` is the runner's own cost
    # (CLI, catalog, warm set, signed report channel, results).
    lean = pytest_command(lab, lab.solution_dir, Sandbox(), ini)
    lean_env = {**env, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    runner = [*RUNNER, "run", lab_id, "--solutions"]
    sides = [("pytest as the runner calls it", lean, lean_env), ("labrunner run", runner, env)]
    for _, cmd, cmd_env in sides:  # warm the OS caches for every side before measuring
        subprocess.run(cmd, env=cmd_env, capture_output=True, check=False, cwd=ini.parent)
    times: dict[str, list[float]] = {name: [] for name, _, _ in sides}
    for _ in range(repeat):  # interleaved: each round sees the same machine load
        for name, cmd, cmd_env in sides:
            start = time.perf_counter()
            done = subprocess.run(cmd, env=cmd_env, capture_output=True, text=True,
                                  cwd=ini.parent)
            times[name].append(time.perf_counter() - start)
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-2000:])
                raise SystemExit(f"{name} failed")
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"\n4. runner overhead, lab {lab_id}, warm services, median of {repeat}:")
    for name, value in med.items():
        print(f"   {name:<32}{value:6.2f}s   "
              + " ".join(f"{s:.2f}" for s in times[name]))
    base = med["pytest as the runner calls it"]
    r = med["labrunner run"]
    print(f"   labrunner run / pytest as the runner calls it: {r / base:.2f} "
          f"(overhead {100 * (r - base) / base:+.0f}%)")
    clean(docker=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lab", default="ph2.5")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="1234", help="which parts, e.g. 14")
    args = parser.parse_args()
    print(f"runtime dir {os.environ['LABRUNNER_RUNTIME_DIR']}; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    clean(docker=False)
    # Templates (Postgres' initdb, Kafka's storage format) are made once per runtime dir:
    # made here, before anything is measured.
    warm_up = ServiceSet.ephemeral("local")
    warm_up.ensure([k.name for k in kinds() if not k.missing()])
    warm_up.stop()
    medians: dict[str, float] = {}
    if "1" in args.only:
        medians = service_ready_times(args.repeat)
    if "2" in args.only:
        sequential_vs_concurrent(medians, args.repeat)
    if "3" in args.only:
        first_results()
    if "4" in args.only:
        runner_overhead(args.lab, args.repeat)
    print(f"load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
