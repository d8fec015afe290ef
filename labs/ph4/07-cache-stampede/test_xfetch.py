"""ph4.7 verification, XFetch part, on a real Redis (a database of the test's own):
probabilistic early expiry with an injected clock and random source - recompute exactly when
now - delta * beta * ln(rand) >= expiry, for several beta - and the entry written whole (a
reader between two of the writer's commands never finds half of it). The mutex is checked
in test_cache_stampede.py (test files do not import each other: the fixture is each's own).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import pytest

from labrunner.testing import redis_gate


@pytest.fixture
def stampede(learner: Any) -> ModuleType:
    module: ModuleType = learner.load("stampede")
    if not callable(getattr(module, "xfetch", None)):
        pytest.fail("stampede.py: define xfetch() (see the README)", pytrace=False)
    return module


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# (seconds before the logical expiry, rand(), beta, recompute?) with delta = 2 s:
# recompute when 2 * beta * -ln(rand) >= seconds left.
XFETCH_CASES = [
    (30.0, 0.5, 1.0, False),        # far from expiry: 1.39 s < 30 s
    (1.0, 0.5, 1.0, True),          # 1.39 s >= 1 s: early recompute
    (2.0, 0.5, 1.0, False),         # 1.39 s < 2 s
    (30.0, 1e-9, 1.0, True),        # an unlucky draw: 41 s >= 30 s
    (3.0, 0.2, 1.0, True),          # 3.22 s >= 3 s
    (3.5, 0.2, 1.0, False),         # 3.22 s < 3.5 s
    (-1.0, 0.999999, 1.0, True),    # past the logical expiry: always
    (1.0, 0.5, 2.0, True),          # beta 2 recomputes earlier: 2.77 s >= 1 s
    (2.0, 0.5, 2.0, True),          # ... even here: 2.77 s >= 2 s (beta 1: 1.39 s < 2 s)
    (1.0, 0.5, 0.5, False),         # beta 0.5 later: 0.69 s < 1 s
]


def xfetch_mistake(left: float, draw: float, beta: float, did: bool) -> str:
    """What a decision against XFETCH_CASES shows about how beta was used."""
    if beta != 1.0 and did == (2.0 * -math.log(draw) >= left):
        return f", as if beta were 1 (the beta = {beta:g} given was ignored)"
    if beta != 1.0 and did == (2.0 / beta * -math.log(draw) >= left):
        return f", as if delta were divided by beta = {beta:g}, not multiplied"
    return ""


def test_probabilistic_early_expiry(stampede: ModuleType, redis_db: Any) -> None:
    clock = Clock(1_000.0)
    loads = []

    def loader() -> str:
        loads.append(clock.t)
        clock.t += 2.0          # the computation takes 2 s of (fake) time: delta = 2
        return f"v{len(loads)}"

    first = stampede.xfetch(redis_db.url, "xf:report", loader, 100.0, beta=1.0, now=clock,
                            rand=lambda: 0.5)
    assert first == "v1" and len(loads) == 1, "a miss must call the loader once"
    real_ttl = redis_db.client().pttl("xf:report")
    assert real_ttl == -1 or real_ttl > 100_000, (
        f"xfetch stored its entry with a Redis TTL of {real_ttl} ms, the logical ttl is 100 s"
        ": at the logical expiry the key VANISHES, every reader misses at once and all of "
        "them reload - the very stampede XFetch avoids\nLet the expiry stored in the hash "
        "decide; give the Redis key a longer TTL (the logical one plus a margin), so readers "
        "keep finding it and one of them refreshes early.")
    expiry = 1_002.0 + 100.0
    for left, draw, beta, recompute in XFETCH_CASES:
        clock.t = expiry - left
        before = len(loads)
        stampede.xfetch(redis_db.url, "xf:report", loader, 100.0, beta=beta, now=clock,
                        rand=lambda d=draw: d)
        did = len(loads) > before
        if did:  # put the entry back as it was, so every case sees the same entry
            r = redis_db.client(decode_responses=True)
            r.hset("xf:report", mapping={"delta": 2.0, "expiry": expiry})
        if did != recompute:
            gap = 2.0 * beta * -math.log(draw)
            pytest.fail(
                f"with {left:g} s left before the logical expiry, delta = 2 s, beta = {beta:g} "
                f"and rand() = {draw:g}, xfetch "
                f"{'recomputed' if did else 'served the cached value'}"
                f"{xfetch_mistake(left, draw, beta, did)}, expected it to "
                f"{'recompute' if recompute else 'serve the cached value'} "
                f"(delta * beta * -ln(rand) = {gap:.2f} s {'>=' if recompute else '<'} "
                f"{left:g} s)\nRecompute when now() - delta * beta * ln(rand()) >= expiry, with "
                "delta the time the last loader() took (measured with the now() given), and "
                "the injected now() and rand(), never time.time() or random directly. Store "
                "value, delta and expiry together (a hash) so that every reader can decide.",
                pytrace=False)


def test_a_draw_of_zero_recomputes(stampede: ModuleType, redis_db: Any) -> None:
    """random.random() returns a float in [0.0, 1.0): 0.0 itself can be drawn. Then
    -ln(rand()) is +infinity and the rule (recompute when now - delta * beta * ln(rand) >=
    expiry) says recompute, whatever the time left; math.log(0.0) raises ValueError."""
    clock = Clock(1_000.0)
    loads: list[float] = []

    def loader() -> str:
        loads.append(clock.t)
        clock.t += 2.0          # delta = 2 s
        return f"v{len(loads)}"

    stampede.xfetch(redis_db.url, "xf:zero", loader, 100.0, beta=1.0, now=clock,
                    rand=lambda: 0.5)
    assert len(loads) == 1, "a miss must call the loader once"
    clock.t = 1_102.0 - 10.0    # 10 s before the logical expiry
    try:
        got = stampede.xfetch(redis_db.url, "xf:zero", loader, 100.0, beta=1.0, now=clock,
                              rand=lambda: 0.0)
    except Exception as exc:  # noqa: BLE001 - any crash is the mistake reported
        pytest.fail(
            f"xfetch raised {type(exc).__name__}: {exc} when rand() returned 0.0 (10 s before "
            "the logical expiry, delta = 2 s): random.random() returns values in [0.0, 1.0), "
            "0.0 included, and math.log(0.0) raises - a reader would crash on a hit\n"
            "-ln(0) is +infinity: the rule says recompute. Check the draw before taking its "
            "log (a draw of 0.0 recomputes) instead of calling math.log(0.0).", pytrace=False)
    assert len(loads) == 2 and got == "v2", (
        f"with rand() = 0.0, 10 s before the logical expiry (delta = 2 s, beta = 1), xfetch "
        f"served the cached value {got!r} without recomputing, expected it to recompute: "
        "-ln(0) is +infinity, so now - delta * beta * ln(rand()) >= expiry holds - a guard "
        "that takes a draw of 0.0 as 1.0 (-ln(1) = 0) or serves the cached value turns the "
        "draw that must recompute into one that never does")


def test_an_empty_value_is_a_hit(stampede: ModuleType, redis_db: Any) -> None:
    """A computed value can be empty ("" for "no orders today"): the entry holds it, with
    its delta and expiry, and a reader far from the expiry serves it. An entry whose value
    is taken as missing (`if value:` on HMGET's answer) is recomputed by every reader -
    XFetch's own stampede, on the keys whose answer is "nothing"."""
    clock = Clock(1_000.0)
    loads: list[float] = []

    def loader() -> str:
        loads.append(clock.t)
        clock.t += 2.0          # delta = 2 s
        return ""

    got = [stampede.xfetch(redis_db.url, "xf:empty", loader, 100.0, beta=1.0, now=clock,
                           rand=lambda: 0.5)]
    for at in (1_010.0, 1_050.0):   # 92 s and 52 s before the logical expiry (1,102)
        clock.t = at
        got.append(stampede.xfetch(redis_db.url, "xf:empty", loader, 100.0, beta=1.0,
                                   now=clock, rand=lambda: 0.5))
    assert got == ["", "", ""] and len(loads) == 1, (
        f"the loader returned '' (an empty result), and xfetch of that key 3 times, 92 and "
        f"52 s before the logical expiry (delta = 2 s, rand() = 0.5: 1.39 s early at most), "
        f"returned {got} and called the loader {len(loads)} times, expected '' 3 times and "
        "1 load: the cached entry with an empty value was taken for a miss (`if value:`, "
        "`if entry['value']:`), so every reader recomputes it. An empty value is a value: "
        "an entry is there when HGETALL's answer is not empty (or HMGET's value is not "
        "None), whatever the value holds.")


FIELDS = ("value", "delta", "expiry")


def whole(entry: dict[str, str]) -> dict[str, str | None]:
    """The part of a cache entry XFetch decides with ({} when there is none)."""
    return {f: entry.get(f) for f in FIELDS} if entry else {}


def what_a_reader_does(seen: dict[str, str | None], old: dict[str, str | None],
                       new: dict[str, str | None]) -> str:
    if not seen:
        return ("it finds no entry, misses and calls loader() too: every reader arriving "
                "during a refresh recomputes - the stampede XFetch avoids")
    missing = [f for f in FIELDS if seen[f] is None]
    if missing:
        return (f"it finds a hit without {' and '.join(missing)}: it cannot decide (KeyError "
                "on the field) and fails instead of serving or loading")
    if old and seen["value"] == new["value"] and seen["expiry"] == old["expiry"]:
        return ("it finds the new value with the OLD expiry, already due: it recomputes "
                "again")
    if old and seen["value"] == old["value"] and seen["expiry"] == new["expiry"]:
        return ("it finds the OLD value with the new expiry: it serves the stale value as "
                "fresh until the new expiry")
    return "it decides with fields of two different computations"


def test_readers_never_see_a_half_written_entry(stampede: ModuleType, redis_db: Any) -> None:
    """XFetch's readers take no lock: they read the entry while a refresher writes it. So
    the entry (value, delta, expiry) must change in one step: between any two commands the
    writer sends (through the gate, which reads the hash with the test's own client just
    before each one goes on), a reader must find the entry as it was or as it now is - never
    a mix, never nothing while a refresh is under way."""
    r = redis_db.client(decode_responses=True)
    key, clock = "xf:prices", Clock(1_000.0)
    seen: list[dict[str, str | None]] = []

    def loader() -> str:
        clock.t += 2.0
        return f"prices-{clock.t:g}"

    def before(command: list[bytes]) -> None:
        seen.append(whole(r.hgetall(key)))

    with redis_gate(redis_db.url, before) as url:
        for phase in ("first filled", "refreshed"):
            old, seen[:] = whole(r.hgetall(key)), []
            if old:  # the entry is due: the refresh must happen
                clock.t = float(old["expiry"] or 0) + 1.0
            stampede.xfetch(url, key, loader, 100.0, beta=1.0, now=clock, rand=lambda: 0.5)
            new = whole(r.hgetall(key))
            if not new or new["value"] is None or new == old:
                return  # nothing (re)written: test_probabilistic_early_expiry judges that
            torn = next((s for s in seen if s not in (old, new)), None)
            if torn is not None:
                pytest.fail(
                    f"while xfetch {phase} the entry, a reader reading between two of its "
                    f"commands found {torn or 'no entry'}, expected "
                    f"{'the old entry or ' if old else 'no entry or '}the new one whole "
                    f"({new}): {what_a_reader_does(torn, old, new)}\nXFetch readers take no "
                    "lock, so write value, delta and expiry together in ONE command (HSET key "
                    "with mapping={...}) or one MULTI/EXEC - never field by field, and never "
                    "delete the old entry first.", pytrace=False)
