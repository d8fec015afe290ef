"""ph4.9 verification, the rotations' state: each balancer keeps its own (two upstreams in one
process, picked in turn, each give their own sequence from its start), and smooth weighted
round robin's current values are one step under a lock (two picks at once, one held by the
test before each of its lines in turn, never choose the same backend or leave the values
off). The sequences themselves, least connections and the ring are checked in
test_load_balancing.py (test files do not import each other: the fixture is each's own).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest


@pytest.fixture
def balancer(learner: Any) -> ModuleType:
    module: ModuleType = learner.load("balancer")
    for name in ("RoundRobin", "SmoothWeightedRoundRobin"):
        if not isinstance(getattr(module, name, None), type):
            pytest.fail(f"balancer.py: define a class {name} (see the README)", pytrace=False)
    return module


def _in_turn(one: Any, other: Any, n: int) -> tuple[list[str], list[str]]:
    """n picks from each of two balancers, alternately: one, other, one, other, ..."""
    got: tuple[list[str], list[str]] = ([], [])
    for _ in range(n):
        got[0].append(str(one.pick()))
        got[1].append(str(other.pick()))
    return got


SHARED_STATE = (
    "The position of a rotation belongs to its balancer: one process often balances "
    "several upstreams (nginx keeps one rotation per upstream block), and a position kept "
    "at module or class level - an itertools.count() beside the class, a class attribute, "
    "a mutable default argument ({} or [] in the def) - is shared by all of them, so each "
    "pool skips the backends the others' picks moved past. Keep it on self, made in "
    "__init__.")


def test_each_round_robin_keeps_its_own_turn(balancer: ModuleType) -> None:
    """Two upstreams on the same servers, one of three and one of two, picked in turn."""
    web, api = balancer.RoundRobin(["a", "b", "c"]), balancer.RoundRobin(["a", "b"])
    got = _in_turn(web, api, 6)
    want = (list("abcabc"), list("ababab"))
    assert got == want, (
        f"two RoundRobin balancers picked in turn gave {' '.join(got[0])} (over a, b, c) "
        f"and {' '.join(got[1])} (over a, b), expected {' '.join(want[0])} and "
        f"{' '.join(want[1])}: one balancer's picks moved the other's rotation.\n"
        + SHARED_STATE)


def test_each_smooth_weighted_balancer_keeps_its_own_values(balancer: ModuleType) -> None:
    """Two upstreams on the same servers with different weights, picked in turn: each gives
    nginx's sequence for its own weights (the current values are each balancer's)."""
    web = balancer.SmoothWeightedRoundRobin({"a": 5, "b": 1, "c": 1})
    api = balancer.SmoothWeightedRoundRobin({"a": 1, "b": 1, "c": 1})
    got = _in_turn(web, api, 7)
    want = (list("aabacaa"), list("abcabca"))
    assert got == want, (
        f"two SmoothWeightedRoundRobin balancers picked in turn gave {' '.join(got[0])} "
        f"(a=5, b=1, c=1) and {' '.join(got[1])} (a=1, b=1, c=1), expected "
        f"{' '.join(want[0])} and {' '.join(want[1])}: one balancer's picks changed the "
        "other's current values.\n" + SHARED_STATE)


def test_smooth_weighted_two_picks_at_once_get_different_backends(learner: Any,
                                                                 balancer: ModuleType) -> None:
    weights = {"a": 1, "b": 1, "c": 1}
    out = dict(learner.harness().stepped_weighted_picks(balancer, weights))
    if out.get("errors"):
        pytest.fail(f"SmoothWeightedRoundRobin.pick() raised {list(out['errors'])[0]}",
                    pytrace=False)
    got, after = dict(out.get("got") or {}), list(out.get("after") or [])
    assert out.get("line") is None, (
        f"with weights a=1, b=1, c=1, while one pick() was held by the test before line "
        f"{out.get('line')} of your code ({out.get('text')!r}), a second pick() ran to its "
        f"end: the two got {got.get('first')!r} and {got.get('second')!r}, the next pick "
        f"{got.get('third')!r} and the three after {' '.join(after)}, expected a, b and c in "
        "some order, then a b c. The two picks read and changed the current values at "
        "once: both chose the backend with the largest value before either subtracted the "
        "total, so request threads picking together get the same backend and the values "
        "drift off the sequence.\nTake the lock around the whole pick() - the adds, the "
        "choice and the subtraction - as for round robin.")
