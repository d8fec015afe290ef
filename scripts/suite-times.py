#!/usr/bin/env python3
"""Where the test suite's time goes, from the JUnit XML a CI run writes (scripts/test.sh:
out/pytest-junit.xml): the total per test file, per lab (its reference, starter and wrong
solutions' checks together) and the slowest tests. ``--write-slow-tests`` refreshes
tests/slow_tests.txt, the order tests/conftest.py deals the known-slow tests out in.

Usage: python3 scripts/suite-times.py [out/pytest-junit.xml] [--top 25] [--write-slow-tests]
"""

from __future__ import annotations

import argparse
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLOW_TESTS = REPO / "tests" / "slow_tests.txt"
SLOW_TESTS_KEPT = 60
# test_labs.py's checks are named "<lab id>-<variant>" ("ph2.5-wrong/never_retries").
LAB_CHECK = re.compile(r"\[(ph\d+\.\w+)-")


def test_times(junit: Path) -> dict[str, float]:
    """Each test's node id and its time (setup, call and teardown, as written with
    ``junit_duration_report=total``)."""
    times = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        times[f"{module}.py::{case.get('name')}"] = float(case.get("time") or 0)
    return times


def totals(times: dict[str, float], key: re.Pattern[str] | None) -> list[tuple[float, int, str]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for nodeid, took in times.items():
        if key is None:
            groups[nodeid.split("::")[0]].append(took)
        elif found := key.search(nodeid):
            groups[found.group(1)].append(took)
    return sorted(((sum(v), len(v), k) for k, v in groups.items()), reverse=True)


HEADER = """\
# Known-slow tests, slowest first: "seconds node-id" (setup, call and teardown). Under xdist
# (CI: -n 4 --dist loadgroup) tests/conftest.py hands these out first, so that the workers
# finish together instead of one of them running a long test alone at the end. A test
# missing here only runs later; a stale entry costs nothing.
# Refresh from a CI run: python3 scripts/suite-times.py out/pytest-junit.xml --write-slow-tests"""


def write_slow_tests(times: dict[str, float], source: Path) -> None:
    slowest = sorted(times.items(), key=lambda item: -item[1])[:SLOW_TESTS_KEPT]
    lines = [HEADER, f"# This list: the {SLOW_TESTS_KEPT} slowest of {source.name}."]
    lines += [f"{took:.0f} {nodeid}" for nodeid, took in slowest]
    SLOW_TESTS.write_text("\n".join(lines) + "\n")
    print(f"wrote {SLOW_TESTS.relative_to(REPO)} ({len(slowest)} tests)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("junit", nargs="?", type=Path, default=REPO / "out" / "pytest-junit.xml")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--write-slow-tests", action="store_true")
    args = parser.parse_args()
    if not args.junit.is_file():
        sys.exit(f"{args.junit}: no such file; a CI run (scripts/test.sh) writes it")
    times = test_times(args.junit)
    whole = sum(times.values())
    print(f"{len(times)} tests, {whole / 60:.1f} test-minutes in all")
    for title, key in (("per test file", None), ("per lab (test_labs.py)", LAB_CHECK)):
        print(f"\n{title}: seconds, tests, share")
        for took, count, name in totals(times, key)[:args.top]:
            print(f"{took:8.0f} {count:5d} {100 * took / whole:5.1f}%  {name}")
    print("\nslowest tests:")
    for nodeid, took in sorted(times.items(), key=lambda item: -item[1])[:args.top]:
        print(f"{took:8.1f}  {nodeid}")
    if args.write_slow_tests:
        write_slow_tests(times, args.junit)


if __name__ == "__main__":
    main()
