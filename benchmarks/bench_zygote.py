"""A lab's tests process forked from the pre-imported pytest (labrunner.zygote) against one
started the usual way (``python -m pytest``), side by side in one run, pair by pair.

For each check (a lab and a variant: its reference, starter or a wrong solution, run as
``dev check`` runs it), the two ways alternate ``--repeat`` times; printed: the median wall
time of each, their ratio, and the CPU-seconds each costs (a started process's own, read
when it is reaped; a fork's, read from the zygote's reaped children when it ends, less
what the zygote's own start-up cost, which is printed apart and paid once per runner).

Usage: python benchmarks/bench_zygote.py [--repeat 5] [LAB:VARIANT ...]
(default: a starter with no services, a Postgres lab's wrong solution, a Redis lab's
reference).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

from labrunner import zygote
from labrunner.catalog import load_catalog
from labrunner.devcheck import Expectation, complete_source, expectations
from labrunner.runner import Sandbox, run_lab
from labrunner.services.manager import ServiceSet

DEFAULT = ["ph4.6:starter", "ph2.11:wrong/floor_not_ceil", "ph2.8:solution"]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_check(expectation: Expectation, state: Path | None, forked: bool) -> float:
    source, cleanup = complete_source(expectation.lab, expectation.source, None)
    try:
        start = time.perf_counter()
        stop_early = () if expectation.must_pass else ("-x",)
        result = run_lab(expectation.lab, source, state, "bench-zygote",
                         Sandbox(pytest_args=stop_early, forked=forked))
        took = time.perf_counter() - start
    finally:
        cleanup()
    met = (result.outcome == "passed") == expectation.must_pass
    assert met, f"{expectation.lab.id} {expectation.variant}: {result.first_line}"
    return took


def zygote_start_cpu() -> float:
    """CPU-seconds of the zygote's own start-up (its imports), with no fork."""
    zygote.stop()
    before = children_cpu()
    started = zygote._Zygote()
    started.control.send(b"")   # an empty request: it ends once it has imported
    started.proc.wait(timeout=120)
    started.control.close()
    return children_cpu() - before


def measure(expectation: Expectation, state: Path | None, repeat: int) -> None:
    one_check(expectation, state, forked=False)   # the lab's own first-run costs, paid
    zygote.stop()
    walls: dict[bool, list[float]] = {False: [], True: []}
    spawned_cpu = 0.0
    total_before = children_cpu()
    for _ in range(repeat):
        before = children_cpu()
        walls[False].append(one_check(expectation, state, forked=False))
        spawned_cpu += children_cpu() - before
        walls[True].append(one_check(expectation, state, forked=True))
    zygote.stop()   # its reaped forks' CPU is counted once it is reaped
    # Everything reaped in the loop: the started processes, one zygote start-up, the forks.
    forked_cpu = children_cpu() - total_before - spawned_cpu - START_CPU
    spawn, fork = statistics.median(walls[False]), statistics.median(walls[True])
    print(f"{expectation.lab.id + ' ' + expectation.variant:<34} started {spawn:5.2f}s "
          f"{spawned_cpu / repeat:4.2f} cpu-s   forked {fork:5.2f}s "
          f"{forked_cpu / repeat:4.2f} cpu-s   wall started/forked {spawn / fork:4.2f}")


START_CPU = 0.0


def main() -> None:
    global START_CPU
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("checks", nargs="*", default=DEFAULT)
    args = parser.parse_args()
    labs = load_catalog()
    chosen = []
    for spec in args.checks:
        lab_id, variant = spec.split(":", 1)
        chosen.append(next(e for e in expectations([labs.lab(lab_id)])
                           if e.variant == variant))
    service_set = ServiceSet.ephemeral("local")
    try:
        service_set.ensure(sorted({n for e in chosen for n in e.lab.services}))
        START_CPU = statistics.median(zygote_start_cpu() for _ in range(3))
        print(f"zygote start-up (paid once per runner): {START_CPU:.2f} cpu-s; "
              f"{args.repeat} pairs per check, alternating\n")
        for expectation in chosen:
            state = service_set.state_file if expectation.lab.services else None
            measure(expectation, state, args.repeat)
    finally:
        service_set.stop()


if __name__ == "__main__":
    main()
