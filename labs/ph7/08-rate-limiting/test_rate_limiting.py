"""Verification for ph7.8 rate-limiting.

The learner's three limiters run against the test's own Redis db. Time is the test's:
every call says ``now``, so refill and window arithmetic are checked to the request
(scripts of requests at given instants, cases as data). Atomicity is checked by 200
requests released at once by a barrier at one instant: exactly the limit may pass.
Shared state is checked with two limiter instances (two app processes) on one key.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import pytest

CONCURRENT = 200
LIMIT = 50


@dataclass
class Step:
    now: float
    requests: int
    allowed: int
    why: str


@dataclass
class Script:
    name: str
    cls: str
    params: dict[str, float]
    steps: list[Step]


SCRIPTS = [
    Script("token-bucket", "TokenBucket", {"capacity": 5, "rate": 2.0}, [
        Step(1000.0, 7, 5, "a new bucket starts full: a burst of `capacity` passes, no more"),
        Step(1000.25, 2, 0, "0.25 s at 2 tokens/s is half a token: not enough for one"),
        Step(1000.5, 2, 1, "0.5 s at 2 tokens/s refills exactly 1 token (0.5 + 0.5: keep "
             "the fraction from the previous call, do not round it away)"),
        Step(1002.0, 4, 3, "1.5 s more refills 3 tokens"),
        Step(5000.0, 9, 5, "after a long idle time the bucket holds `capacity` tokens, not "
             "rate x idle time: refill is capped"),
    ]),
    # A real clock: epoch seconds (10 integer digits) with sub-millisecond steps. State kept
    # with fewer than 17 significant digits (Lua's tostring keeps 14, whole milliseconds
    # keep 13) moves the last refill time by tens of microseconds: at 1000 tokens/s that is
    # a few hundredths of a token, enough to tip 0.98 over 1.
    Script("token-bucket-epoch-clock", "TokenBucket", {"capacity": 1, "rate": 1000.0}, [
        Step(1700000000.00004, 2, 1, "a new bucket of capacity 1: one passes"),
        Step(1700000000.00102, 1, 0, "0.98 ms later at 1000 tokens/s the bucket holds 0.98 "
             "token: refused. Allowing it means the stored refill time lost its last digits "
             "(1700000000.00004 kept as 1700000000): store tokens and time with full "
             "precision - string.format('%.17g', x) or repr() - never tostring() (14 "
             "digits) nor whole milliseconds"),
        Step(1700000000.0011, 1, 1, "0.08 ms more: 1.06 tokens, one passes"),
    ]),
    Script("sliding-log", "SlidingWindowLog", {"limit": 3, "window": 10.0}, [
        Step(100.0, 1, 1, "first request in an empty window"),
        Step(101.0, 1, 1, "second"),
        Step(102.0, 2, 1, "third passes, fourth within 10 s is refused"),
        Step(105.0, 3, 0, "still 3 requests in (95, 105]"),
        Step(110.0, 2, 1, "the entry at t=100 leaves the window (100, 110] exactly at "
             "t=110; one slot, one request; the refused ones at t=102 and t=105 must not "
             "have been logged"),
        Step(111.5, 2, 1, "t=101 left the window (101.5, 111.5]: one slot again"),
    ]),
    Script("sliding-counter", "SlidingWindowCounter", {"limit": 10, "window": 10.0}, [
        Step(1.0, 20, 10, "window [0, 10): the limit, then refused (refusals do not count)"),
        Step(12.5, 9, 3, "window [10, 20) at 25 %: the previous 10, weighted by the 75 % "
             "of it the sliding window still covers, count 7.5; 7.5 + 0, 1, 2 are < 10, "
             "7.5 + 3 is not: 3 pass"),
        Step(15.0, 9, 2, "at 50 %: 10 x 0.5 + 3 = 8 < 10 and 9 < 10 pass, 10 does not"),
        Step(25.0, 10, 8, "window [20, 30) at 50 %: the previous window had 5: 2.5 + 7 = "
             "9.5 < 10 is the last that passes, 8 in all"),
        Step(41.0, 12, 10, "two windows later the previous one is empty: the full limit"),
    ]),
]

HINTS = {
    "TokenBucket": "tokens = min(capacity, tokens + (now - last) * rate); last = now; allow "
                   "if tokens >= 1 (then tokens -= 1). Store the float tokens and last time.",
    "SlidingWindowLog": "ZREMRANGEBYSCORE key -inf (now - window) (an entry at exactly "
                        "now - window has expired), ZCARD < limit -> ZADD now <unique "
                        "member>; a refused request is not added.",
    "SlidingWindowCounter": "counters per window index floor(now / window); estimate = "
                            "previous * (window - (now - start)) / window + current; allow "
                            "if estimate < limit, then INCR current.",
}


def make(learner: Any, redis_db: Any, cls: str, prefix: str, **params: float) -> Any:
    module = learner.load("ratelimit")
    factory = getattr(module, cls, None)
    if factory is None:
        pytest.fail(f"ratelimit.py defines no class {cls}", pytrace=False)
    return factory(redis_db.url, prefix, **params)


def decide(limiter: Any, key: str, now: float, what: str) -> bool:
    try:
        answer = limiter.allow(key, now)
    except NotImplementedError as exc:
        pytest.fail(f"{what}: {type(limiter).__name__}.allow is not written yet ({exc})",
                    pytrace=False)
    assert isinstance(answer, bool), (
        f"{what}: allow() returned {answer!r}, expected True or False")
    return answer


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_exact_limits_on_an_injected_clock(learner: Any, redis_db: Any, script: Script) -> None:
    limiter = make(learner, redis_db, script.cls, "t", **script.params)
    seen = []
    for step in script.steps:
        answers = [decide(limiter, "client-a", step.now, f"{script.cls} at t={step.now}")
                   for _ in range(step.requests)]
        seen.append(f"t={step.now}: {sum(answers)}/{step.requests}")
        assert sum(answers) == step.allowed and answers == sorted(answers, reverse=True), (
            f"{script.cls}({script.params}) at t={step.now}: {sum(answers)} of "
            f"{step.requests} requests allowed ({answers}), expected {step.allowed} then "
            f"refusals: {step.why}\nSo far: {'; '.join(seen)}\n{HINTS[script.cls]}")
    # other keys have budgets of their own
    fresh = decide(limiter, "client-b", script.steps[-1].now, f"{script.cls}, another key")
    assert fresh, f"{script.cls}: a different key was refused: each key has its own budget"


EXPIRY_CASES = [
    # (class, params, how long a key's state still matters after a request at a window's
    #  start, in seconds of the same clock)
    ("TokenBucket", {"capacity": 5, "rate": 0.25}, 20.0,
     "the bucket needs capacity / rate = 20 s to refill; a key that expires sooner hands "
     "out a full bucket early"),
    ("SlidingWindowLog", {"limit": 3, "window": 10.0}, 10.0,
     "an entry counts for one window"),
    ("SlidingWindowCounter", {"limit": 10, "window": 10.0}, 20.0,
     "a window's counter is read for the whole NEXT window too (as the weighted previous "
     "count): it must live about two windows, not one"),
]


@pytest.mark.parametrize("cls,params,needed,why", EXPIRY_CASES,
                         ids=[c[0] for c in EXPIRY_CASES])
def test_keys_do_not_expire_while_their_state_still_counts(
        learner: Any, redis_db: Any, cls: str, params: dict[str, float], needed: float,
        why: str) -> None:
    limiter = make(learner, redis_db, cls, "ttl", **params)
    decide(limiter, "client-a", 1000.0, f"{cls} at t=1000.0")
    client = redis_db.client()
    try:
        keys = sorted(k.decode() for k in client.scan_iter(match="ttl*"))
        assert keys, (
            f"{cls}: after a request, no Redis key starts with the limiter's prefix 'ttl': "
            "the state must live in Redis, under the prefix given, so every app instance "
            "shares one budget - not in the process")
        short = {k: client.pttl(k) / 1000 for k in keys}
    finally:
        client.close()
    short = {k: ttl for k, ttl in short.items() if 0 <= ttl < needed - 1}
    assert not short, (
        f"{cls}({params}): right after a request the key(s) "
        + ", ".join(f"{k} expire in {ttl:.1f} s" for k, ttl in short.items())
        + f", but their state still counts for {needed:g} s: {why}. With a real clock "
        "(now = time.time()) the limiter then forgets requests it must still count and "
        "lets extra ones through. Set the TTL to at least that (plus a margin).")


CONCURRENT_CASES = [
    ("TokenBucket", {"capacity": LIMIT, "rate": 0.001}),
    ("SlidingWindowLog", {"limit": LIMIT, "window": 60.0}),
    ("SlidingWindowCounter", {"limit": LIMIT, "window": 60.0}),
]


@pytest.mark.parametrize("cls,params", CONCURRENT_CASES, ids=[c[0] for c in CONCURRENT_CASES])
def test_exact_under_200_concurrent_requests(learner: Any, redis_db: Any, cls: str,
                                             params: dict[str, float]) -> None:
    # Two instances, as two app processes would have: the budget lives in Redis.
    instances = [make(learner, redis_db, cls, "c", **params) for _ in range(2)]
    decide(instances[0], "warm-up", 5000.0, f"{cls} warm-up")  # scripts loaded, pools made
    barrier = threading.Barrier(CONCURRENT)
    results: list[bool | None] = [None] * CONCURRENT
    errors: list[str] = []

    def one(n: int) -> None:
        barrier.wait()
        try:
            results[n] = bool(instances[n % 2].allow("hot-key", 5000.0))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in range(CONCURRENT)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, f"{cls}: {len(errors)} concurrent allow() calls raised, e.g. {errors[0]}"
    allowed = sum(1 for r in results if r)
    assert allowed == LIMIT, (
        f"{cls} with a limit of {LIMIT}: {allowed} of {CONCURRENT} simultaneous requests "
        f"(same key, same instant, two instances) were allowed, expected exactly {LIMIT}\n"
        + ("Exactly twice the limit: each of the two instances had a budget of its own, so "
           "the state lives in the process, not in Redis." if allowed == 2 * LIMIT else
           "More than the limit: the read-decide-write is not atomic, so concurrent "
           "requests read the same state and each decided it had room (or, in a sorted "
           "set, several requests at the same instant used the same member and counted "
           "once). Run it as one Lua script (EVAL/EVALSHA) or WATCH/MULTI/EXEC with retry; "
           "use a unique member per request." if allowed > LIMIT else
           "Fewer than the limit: the state is not shared correctly, or requests are "
           "refused that fit (check the comparison)."))
