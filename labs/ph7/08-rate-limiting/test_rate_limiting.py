"""Verification for ph7.8 rate-limiting.

The learner's three limiters run against the test's own Redis db. Time is the test's:
every call says ``now``, so refill and window arithmetic are checked to the request
(scripts of requests at given instants, cases as data). Atomicity is checked by 200
requests released at once by a barrier at one instant: exactly the limit may pass.
Shared state is checked with two limiter instances (two app processes) on one key. State
stays bounded: every key expires, and the log holds no entry that left the window.
A refused request must never count, not even for a moment: its Redis commands go through a
gate that holds it before each of its commands in turn while another client's request,
which fits the budget, is decided. The same holds after Redis lost its scripts (NOSCRIPT):
a fallback to separate commands is held between them just the same.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import pytest

from labrunner.testing import CONNECTION_SETUP, redis_commands, redis_gate, wait_until

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
    # Two app instances' clocks differ a little: a request may come stamped before the
    # bucket's last refill. Elapsed time is then 0, never negative, and the stored time of
    # the last refill never moves back.
    Script("token-bucket-clock-behind", "TokenBucket", {"capacity": 2, "rate": 1.0}, [
        Step(10.0, 1, 1, "a new bucket of 2: one taken, one left"),
        Step(9.0, 1, 1, "a request stamped 1 s before the last refill (another app "
             "instance's clock is behind): the token left is still there and it takes it. "
             "Refused means the refill went negative: (now - last) * rate with now < last "
             "took a token away. Refill only for time that went forward: "
             "elapsed = max(0, now - last)"),
        Step(10.5, 1, 0, "0.5 s after t=10 at 1 token/s is half a token: refused. Allowed "
             "means the request from behind moved the stored refill time back to t=9, and "
             "the second from 9 to 10 was refilled twice: keep the latest time"),
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
    # One thread, one instant, several requests that all fit: an async server answers every
    # request on one thread, and a coarse clock gives a burst one `now`. Each needs a log
    # entry of its own: a member unique per REQUEST, not per instant, thread or fingerprint.
    Script("sliding-log-one-thread-burst", "SlidingWindowLog", {"limit": 3, "window": 10.0}, [
        Step(100.0, 4, 3, "three requests at one instant from one thread all fit, the fourth "
             "does not: each allowed request is one entry in the log. More than 3 passing "
             "means requests shared a member (the instant plus the thread, a hash of the "
             "request): ZADD of an existing member adds nothing, so the log counted the "
             "burst once. Use a member unique per request (uuid4)"),
        Step(105.0, 1, 0, "the three at t=100 are still in (95, 105]"),
    ]),
    # Windows shorter than a second: EXPIRE takes whole seconds, and EXPIRE 0 deletes.
    Script("sliding-log-subsecond", "SlidingWindowLog", {"limit": 2, "window": 0.5}, [
        Step(100.0, 3, 2, "a half-second window: two pass, the third is refused. All three "
             "passing means the log was gone by the next request: a TTL of the window "
             "truncated to whole seconds (int(0.5) == 0, and EXPIRE 0 deletes the key). "
             "Round the TTL up (math.ceil) and add a margin"),
        Step(100.25, 2, 0, "(99.75, 100.25] still holds both"),
        Step(100.5, 3, 2, "both left (100, 100.5]: two slots again"),
    ]),
    Script("sliding-counter-subsecond", "SlidingWindowCounter", {"limit": 4, "window": 0.5}, [
        Step(100.0, 6, 4, "a half-second window [100, 100.5): the limit, then refused. All "
             "six passing means the counter was gone by the next request: a TTL of whole "
             "seconds rounded down (int(0.5) == 0, and EXPIRE 0 deletes the key). Round the "
             "TTL up (math.ceil) and add a margin"),
        Step(100.25, 2, 0, "still window [100, 100.5), which holds 4"),
        Step(100.625, 3, 1, "window [100.5, 101) at 25 %: the previous 4 weighted by 75 % "
             "count 3; 3 + 0 < 4 passes, 3 + 1 does not"),
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


def make(learner: Any, redis_db: Any, cls: str, prefix: str, url: str | None = None, /,
         **params: float) -> Any:
    """An instance of the learner's ``cls`` (``url``: Redis's, by default); positional-only
    arguments, so no key of ``params`` can stand for one of them."""
    return construct(learner.load("ratelimit"), redis_db, cls, prefix, url, params)


def make_in_another_app(learner: Any, redis_db: Any, cls: str, prefix: str, /,
                        **params: float) -> Any:
    """:func:`make`, from a copy of ratelimit.py of its own, as in a second app process:
    nothing shared with the other instances but Redis (a module-level lock or dict too)."""
    module = learner.load("ratelimit", fresh=True)
    return construct(module, redis_db, cls, prefix, None, params)


def construct(module: Any, redis_db: Any, cls: str, prefix: str, url: str | None,
              params: dict[str, float]) -> Any:
    factory = getattr(module, cls, None)
    if factory is None:
        pytest.fail(f"ratelimit.py defines no class {cls}", pytrace=False)
    return factory(url or redis_db.url, prefix, **params)


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
    # One request took one token, back after 1 / rate = 4 s: a TTL of exactly the time to
    # a full bucket is right, and capacity / rate (20 s) is a bound that is never short.
    ("TokenBucket", {"capacity": 5, "rate": 0.25}, 4.0,
     "the request took one of 5 tokens, and at 0.25 tokens/s it takes 1 / rate = 4 s to "
     "come back; a key that expires sooner hands out a full bucket early"),
    # A slow refill, as for an expensive call a client may make twice a day: a TTL fixed
    # at a minute (or computed from capacity * rate) forgets the taken token long before
    # it is back.
    ("TokenBucket", {"capacity": 2, "rate": 0.005}, 200.0,
     "the request took one of 2 tokens, and at 0.005 tokens/s it takes 1 / rate = 200 s to "
     "refill; a key that expires sooner hands out a full bucket early - compute the TTL "
     "from capacity / rate, never a fixed figure"),
    ("SlidingWindowLog", {"limit": 3, "window": 10.0}, 10.0,
     "an entry counts for one window"),
    ("SlidingWindowCounter", {"limit": 10, "window": 10.0}, 20.0,
     "a window's counter is read for the whole NEXT window too (as the weighted previous "
     "count): it must live about two windows, not one"),
]


@pytest.mark.parametrize("cls,params,needed,why", EXPIRY_CASES,
                         ids=[c[0] if c[2] < 60 else f"{c[0]}-slow" for c in EXPIRY_CASES])
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
    forever = sorted(k for k, ttl in short.items() if ttl < 0)
    assert not forever, (
        f"{cls}({params}): after a request the key(s) {forever} have no expiry (TTL -1): "
        "once their client stops coming they stay in Redis forever, one more for every "
        "client (and every window) ever seen - a slow leak of the shared Redis. EXPIRE "
        f"each key you write, in the same atomic step, for as long as its state counts "
        f"({needed:g} s here: {why}) plus a margin.")
    short = {k: ttl for k, ttl in short.items() if 0 <= ttl < needed - 1}
    assert not short, (
        f"{cls}({params}): right after a request the key(s) "
        + ", ".join(f"{k} expire in {ttl:.1f} s" for k, ttl in short.items())
        + f", but their state still counts for {needed:g} s: {why}. With a real clock "
        "(now = time.time()) the limiter then forgets requests it must still count and "
        "lets extra ones through. Set the TTL to at least that (plus a margin).")


def held(redis_db: Any, prefix: str) -> dict[str, int]:
    """Each key under ``prefix`` and how many entries it holds (members, fields, items)."""
    sizes = {b"zset": "zcard", b"hash": "hlen", b"list": "llen", b"set": "scard",
             b"stream": "xlen"}
    client = redis_db.client()
    try:
        return {k.decode(): (getattr(client, sizes[kind])(k) if kind in sizes else 1)
                for k in client.scan_iter(match=f"{prefix}*")
                if (kind := client.type(k)) != b"none"}
    finally:
        client.close()


def test_the_log_holds_no_more_than_the_window(learner: Any, redis_db: Any) -> None:
    limit, window, seconds = 3, 10.0, 60
    limiter = make(learner, redis_db, "SlidingWindowLog", "mem", limit=limit, window=window)
    allowed = sum(decide(limiter, "client-a", 1000.0 + n, f"SlidingWindowLog at t={1000 + n}")
                  for n in range(seconds))
    entries = held(redis_db, "mem")
    assert sum(entries.values()) <= limit, (
        f"SlidingWindowLog(limit={limit}, window={window:g}): one client, one request a "
        f"second for {seconds} s ({allowed} allowed, at most {limit} in any window), and "
        f"Redis holds {entries} entries for it, expected at most {limit}: entries that "
        "left the window are never removed. Counting only the window (ZCOUNT key "
        "(now-window +inf) decides right but keeps the client's whole history, and with a "
        "key refreshed by every request it never expires: memory grows without bound (a "
        "slow OOM of the shared Redis). Remove what left the window in the same atomic "
        "step (ZREMRANGEBYSCORE key -inf now-window), then ZCARD.")



# A client that keeps coming, for many windows: what the keys its latest request reads and
# writes hold must not grow with the client's history (those keys' TTL is refreshed by every
# request, so they never expire while it keeps coming). (class, params, seconds between
# requests, requests, most entries those keys may hold, what the state is)
STEADY_CASES = [
    ("SlidingWindowCounter", {"limit": 3, "window": 1.0}, 0.5, 200, 4,
     "the counters of the current and the previous window"),
    ("TokenBucket", {"capacity": 3, "rate": 1.0}, 0.5, 200, 4,
     "the tokens and the time of the last refill"),
]


def keys_written_by(limiter: Any, redis_db: Any, prefix: str, now: float,
                    what: str) -> dict[str, int]:
    """The keys under ``prefix`` that one request at ``now`` names in its Redis commands (in
    a script or not), with the entries each holds afterwards."""
    with redis_commands(redis_db) as sent:
        decide(limiter, "client-a", now, what)
    named = {c[1] for c in sent if len(c) > 1 and c[1].startswith(prefix)}
    return {k: n for k, n in held(redis_db, prefix).items() if k in named}


@pytest.mark.parametrize("cls,params,every,count,most,state", STEADY_CASES,
                         ids=[c[0] for c in STEADY_CASES])
def test_a_steady_client_keeps_bounded_state(
        learner: Any, redis_db: Any, cls: str, params: dict[str, float], every: float,
        count: int, most: int, state: str) -> None:
    limiter = make(learner, redis_db, cls, "steady", **params)
    for n in range(count):
        decide(limiter, "client-a", 1000.0 + n * every, f"{cls} at t={1000.0 + n * every}")
    now = 1000.0 + count * every
    live = keys_written_by(limiter, redis_db, "steady", now, f"{cls} at t={now}")
    assert sum(live.values()) <= most, (
        f"{cls}({params}): one client, a request every {every:g} s for {count * every:g} s; "
        f"the keys its latest request reads and writes hold {sum(live.values())} entries "
        f"({live}), expected at most {most} ({state}): state that no longer counts (the "
        "counts of windows long past) is kept in a key every request refreshes, so it never "
        "expires while the client keeps coming and grows with its history - a slow leak of "
        "the shared Redis. Keep only what still counts: a key per window with a TTL of its "
        "own (INCR, EXPIRE), or delete (HDEL) what left.")


def test_each_instance_uses_the_redis_it_was_given(learner: Any, redis_db: Any) -> None:
    """Two instances of each class in one process, one given Redis's URL and one a gate's in
    front of the same server: each request must go to the URL its own instance was given,
    whichever instance was made first."""
    seen: list[str] = []

    def note(command: list[bytes]) -> None:
        name = command[0].decode(errors="replace").upper()
        if name not in CONNECTION_SETUP:
            seen.append(name)

    params = {"TokenBucket": {"capacity": 2, "rate": 1.0},
              "SlidingWindowLog": {"limit": 2, "window": 10.0},
              "SlidingWindowCounter": {"limit": 2, "window": 10.0}}
    with redis_gate(redis_db.url, note) as gated:
        for order, module in (("direct first", learner.load("ratelimit")),
                              ("gate first", learner.load("ratelimit", fresh=True))):
            for cls, kw in params.items():
                urls = [redis_db.url, gated] if order == "direct first" else [gated, redis_db.url]
                first, second = (construct(module, redis_db, cls, "url", u, dict(kw))
                                 for u in urls)
                for limiter, url in ((first, urls[0]), (second, urls[1])):
                    seen.clear()
                    decide(limiter, f"{order}-{url == gated}", 0.0, f"{cls} ({order})")
                    went = bool(seen) == (url == gated)
                    assert went, (
                        f"{cls}: two instances in one process, made one after the other "
                        f"({order}) with two Redis URLs; the one given "
                        f"{'the gate' if url == gated else 'Redis itself'} sent "
                        f"{'none of its' if url == gated else 'its'} commands "
                        f"{'there' if url == gated else f'through the other one ({seen})'}: "
                        "its requests went to the connection of the instance made first. "
                        "A client, pool or registered script kept in a module global (or a "
                        "class attribute) is shared by every instance, so an app with "
                        "limiters on two Redis servers decides them all on one. Keep the "
                        "client and the script on the instance: self.redis = "
                        "redis.Redis.from_url(redis_url); self.script = "
                        "self.redis.register_script(...).")


CONCURRENT_CASES = [
    ("TokenBucket", {"capacity": LIMIT, "rate": 0.001}),
    ("SlidingWindowLog", {"limit": LIMIT, "window": 60.0}),
    ("SlidingWindowCounter", {"limit": LIMIT, "window": 60.0}),
]


@pytest.mark.parametrize("cls,params", CONCURRENT_CASES, ids=[c[0] for c in CONCURRENT_CASES])
def test_exact_under_200_concurrent_requests(learner: Any, redis_db: Any, cls: str,
                                             params: dict[str, float]) -> None:
    # Two instances, as two app processes would have: the budget lives in Redis.
    instances = [make(learner, redis_db, cls, "c", **params),
                 make_in_another_app(learner, redis_db, cls, "c", **params)]
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
           "once). A lock in the process (threading.Lock) orders only that process's "
           "requests: the other instance here is a copy of ratelimit.py of its own, as "
           "another app process is. Run it as one Lua script (EVAL/EVALSHA) or "
           "WATCH/MULTI/EXEC with retry; use a unique member per request." if allowed > LIMIT
           else
           "Fewer than the limit: the state is not shared correctly, or requests are "
           "refused that fit (check the comparison)."))


@dataclass
class InFlight:
    """A refused request A and a later request B that fits once A is not counted."""
    cls: str
    params: dict[str, float]
    setup: list[float]      # instants of the requests made first (allowed or not)
    a_now: float
    b_now: float
    why: str


IN_FLIGHT_CASES = [
    InFlight("TokenBucket", {"capacity": 1, "rate": 1.0}, [0.0], 0.5, 1.0,
             "at t=0.5 the bucket holds 0.5 token (A is refused); at t=1.0 it holds 1 "
             "(B passes) - unless A's refusal took a token it gives back later"),
    InFlight("SlidingWindowLog", {"limit": 1, "window": 10.0}, [0.0], 5.0, 10.0,
             "at t=5 the request at t=0 is in the window (A is refused); at t=10 it has "
             "left (0, 10] (B passes) - unless A's refused request sits in the log"),
    InFlight("SlidingWindowCounter", {"limit": 2, "window": 10.0}, [1.0, 1.0, 11.0], 12.0,
             16.0, "previous window 2, current 1: at t=12 the estimate is 2 x 0.8 + 1 = 2.6 "
             "(A is refused); at t=16 it is 2 x 0.4 + 1 = 1.8 < 2 (B passes) - unless A's "
             "refusal is counted in the current window"),
]


class HoldAt:
    """``before`` of a :func:`redis_gate`: holds the command after the first ``after``
    commands of a request (a new connection's set-up chatter not counted) until released.
    With ``flush``, the request's first EVALSHA also meets a script cache Redis lost
    (NOSCRIPT, as :class:`FlushScripts`), so what the request does then is held in turn."""

    def __init__(self, flush: bool = False) -> None:
        self.after = 0
        self.sent: list[str] = []
        self.held = threading.Event()
        self.release = threading.Event()
        self.flush = flush
        self.to_flush = False

    def arm(self, after: int) -> None:
        self.after, self.sent, self.to_flush = after, [], self.flush
        self.held.clear()
        self.release.clear()

    def __call__(self, command: list[bytes]) -> list[bytes] | None:
        name = command[0].decode(errors="replace").upper()
        if not self.after or name in CONNECTION_SETUP:
            return None
        if len(self.sent) == self.after and not self.held.is_set():
            self.held.set()
            self.release.wait(60)
        self.sent.append(name + " (NOSCRIPT)" * (self.to_flush and name == "EVALSHA"))
        if self.to_flush and name == "EVALSHA":
            self.to_flush = False
            return [command[0], UNLOADED, *command[2:]]
        return None


# How long B may take while A is held before the test lets A go: B blocked behind A (a
# lock A holds) is atomic, not wrong; the reference's B answers in milliseconds.
ALONE = 5.0


def in_background(call: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["answer"] = call()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def answer_of(thread: threading.Thread, out: dict[str, Any], what: str) -> bool:
    thread.join(60)
    if "error" in out:
        raise out["error"]
    assert "answer" in out, f"{what}: allow() did not answer within 60 s"
    return bool(out["answer"])


@dataclass
class HeldPass:
    """One pass of :func:`held_at_each_command`: A held before its command #after + 1
    (``held``: it sent that many and more; else it had ended, after sending ``sent``)."""
    after: int
    key: str
    held: bool
    sent: list[str]
    a_allowed: bool
    b_allowed: bool | None   # None when A was not held: B was not asked


def held_at_each_command(gate: HoldAt, a: Any, b: Any, setup: list[float], a_now: float,
                         b_now: float, what: str) -> Iterator[HeldPass]:
    """Drive request A (limiter ``a``, behind ``gate``) and request B (limiter ``b``) on a
    fresh key per pass, after B's ``setup`` requests: pass k holds A before its Redis
    command k + 1 and decides B meanwhile (B blocked behind A - a lock A holds in Redis -
    gets ALONE seconds, then A goes on). Yields each pass, the last being the one where A
    sent no more than k commands; fails past 20 commands."""
    for after in range(1, 20):
        key = f"held-{after}"
        for earlier in setup:
            decide(b, key, earlier, f"{what} at t={earlier}")
        gate.arm(after)
        request, a_out = in_background(lambda key=key: decide(a, key, a_now, f"{what} A"))
        try:
            # r=request: this pass's thread (a lambda with a default gets no type from the
            # parameter it is passed to)
            wait_until(cast(Callable[[], bool],
                            lambda r=request: gate.held.is_set() or not r.is_alive()),
                       f"{what} request A to send its Redis commands", timeout=60)
            held, sent = gate.held.is_set(), list(gate.sent)
            if held:
                other, b_out = in_background(lambda key=key: decide(b, key, b_now,
                                                                    f"{what} B"))
                other.join(ALONE)
        finally:
            gate.release.set()
        a_allowed = answer_of(request, a_out, f"{what} request A")
        b_allowed = answer_of(other, b_out, f"{what} request B") if held else None
        yield HeldPass(after, key, held, sent, a_allowed, b_allowed)
        if not held:
            return
    pytest.fail(f"{what}: allow sent more than 20 Redis commands for one request")


@pytest.mark.parametrize("case", IN_FLIGHT_CASES, ids=[c.cls for c in IN_FLIGHT_CASES])
def test_a_refused_request_never_counts_even_in_flight(learner: Any, redis_db: Any,
                                                       case: InFlight) -> None:
    """A refused request A is held before each of its Redis commands in turn (the first
    pass holds its second command, the next its third, ... until A sends no more); at each
    hold, request B - later, and within budget once A is not counted - is decided by
    another instance. B must pass at every point: a limiter that counts first and gives the
    slot back after deciding (INCR then DECR, ZADD then ZREM, take a token then refund it),
    or decides in Python between round trips, shows A's refusal to B. (Whichever order A
    and B really run in, B passes: A is refused when it runs first.)"""
    refused_never_counts(learner, redis_db, case, HoldAt())


def refused_never_counts(learner: Any, redis_db: Any, case: InFlight, gate: HoldAt) -> None:
    """The body of :func:`test_a_refused_request_never_counts_even_in_flight`, A behind
    ``gate``; with ``gate.flush`` each A first meets a flushed script cache."""
    with redis_gate(redis_db.url, gate) as gated:
        a = make(learner, redis_db, case.cls, "f", gated, **case.params)
        b = make_in_another_app(learner, redis_db, case.cls, "f", **case.params)
        for step in held_at_each_command(gate, a, b, case.setup, case.a_now, case.b_now,
                                         case.cls):
            if step.held:
                b_allowed = step.b_allowed
                when = (f"while A was held before its Redis command #{step.after + 1} (it "
                        f"had sent {' '.join(step.sent)})")
            else:
                assert not step.a_allowed, (
                    f"{case.cls}({case.params}) after requests at t={case.setup}: the request "
                    f"at t={case.a_now} was allowed, expected refused: {case.why}")
                b_allowed = decide(b, step.key, case.b_now, f"{case.cls} at t={case.b_now}")
                when = f"after A ({' '.join(step.sent)}) had ended"
            assert b_allowed, (
                f"{case.cls}({case.params}): a refused request was counted, at least for a "
                f"moment{FLUSHED_A * gate.flush} - after requests at t={case.setup}, request "
                f"A at t={case.a_now} was "
                f"refused, and request B at t={case.b_now} from another instance was refused "
                f"{when}; expected B allowed: {case.why}.\nConcurrent clients are then "
                "refused on requests that never happened (and for good when the give-back "
                "never lands). Read, decide and write as one atomic step (one Lua script) and "
                "write nothing for a refusal." + FALLBACK * gate.flush)


# One slot left, and two requests for it at one instant, from two app instances: exactly one
# may pass, whatever point of its Redis commands one of them is held at. (class, params,
# instants of the requests made first, the instant of the two, why one slot is left)
LAST_SLOT_CASES = [
    ("TokenBucket", {"capacity": 2, "rate": 0.001}, [0.0], 0.0,
     "capacity 2, one token taken, next to nothing refilled"),
    ("SlidingWindowLog", {"limit": 2, "window": 10.0}, [0.0], 1.0,
     "limit 2 per 10 s, one request in the window"),
    ("SlidingWindowCounter", {"limit": 2, "window": 10.0}, [1.0], 2.0,
     "limit 2 per window, one counted in this window, none in the previous"),
]


@pytest.mark.parametrize("cls,params,setup,now,why", LAST_SLOT_CASES,
                         ids=[c[0] for c in LAST_SLOT_CASES])
def test_two_instances_never_both_take_the_last_slot(
        learner: Any, redis_db: Any, cls: str, params: dict[str, float], setup: list[float],
        now: float, why: str) -> None:
    """Request A (app instance 1) is held before each of its Redis commands in turn, and at
    each hold request B (instance 2: a copy of ratelimit.py of its own, as another process)
    asks for the same last slot. Exactly one of them may pass: a decision split over round
    trips (read, decide in Python, write; a pipeline to count and another to add) lets both
    read "one left" - and a lock in the process orders nothing across instances. B blocked
    behind A (a lock A holds in Redis) is atomic: the test lets A go after ALONE seconds."""
    only_one_takes_the_last_slot(learner, redis_db, cls, params, setup, now, why, HoldAt())


def only_one_takes_the_last_slot(learner: Any, redis_db: Any, cls: str,
                                 params: dict[str, float], setup: list[float], now: float,
                                 why: str, gate: HoldAt) -> None:
    """The body of :func:`test_two_instances_never_both_take_the_last_slot`, A behind
    ``gate``; with ``gate.flush`` each A first meets a flushed script cache."""
    with redis_gate(redis_db.url, gate) as gated:
        a = make(learner, redis_db, cls, "last", gated, **params)
        b = make_in_another_app(learner, redis_db, cls, "last", **params)
        for step in held_at_each_command(gate, a, b, setup, now, now, cls):
            if not step.held:
                break   # A sent fewer than `after` + 1 commands: every point was tried
            assert step.a_allowed != step.b_allowed, (
                f"{cls}({params}){FLUSHED_A * gate.flush} after requests at t={setup} "
                f"({why}): two requests for the "
                f"last slot at t={now}, A from one app instance and B from another, were "
                f"{'both allowed' if step.a_allowed else 'both refused'} when A was held "
                f"before its Redis command #{step.after + 1} (it had sent "
                f"{' '.join(step.sent)}) while B was decided; expected exactly one allowed.\n"
                + ("Both read one slot left: the read, the decision and the write are separate "
                   "round trips. A lock in the process (threading.Lock) orders only that "
                   "process's requests - the other instance is another process. Decide in "
                   "one atomic step in Redis: one Lua script, or WATCH/MULTI/EXEC with retry."
                   + FALLBACK * gate.flush
                   if step.a_allowed else
                   "A slot that was there went to neither: check the comparison, and that a "
                   "request refused or in flight is not counted."))


# Requests at given instants, each decided after Redis lost its scripts: (now, allowed).
# Both answers come after a flush, so neither failing open nor failing closed passes.
FLUSH_CASES = [
    ("TokenBucket", {"capacity": 1, "rate": 1.0}, [(0.0, True), (0.5, False), (1.5, True)]),
    ("SlidingWindowLog", {"limit": 1, "window": 10.0}, [(0.0, True), (5.0, False),
                                                         (10.0, True)]),
    ("SlidingWindowCounter", {"limit": 1, "window": 10.0}, [(0.0, True), (5.0, False),
                                                             (25.0, True)]),
]
# A digest no script has: what EVALSHA meets once Redis lost its scripts.
UNLOADED = b"0" * 40


class FlushScripts:
    """``before`` of a :func:`redis_gate`: while armed, the next EVALSHA is sent with a
    digest Redis never loaded, so Redis answers NOSCRIPT - what a client meets after
    SCRIPT FLUSH, a restart, or a failover to a replica that never saw SCRIPT LOAD. Only
    this client's command changes: the scripts of everyone else on the server stay."""

    def __init__(self) -> None:
        self.armed = False
        self.flushed = 0

    def __call__(self, command: list[bytes]) -> list[bytes] | None:
        if not self.armed or command[0].upper() != b"EVALSHA":
            return None
        self.armed = False
        self.flushed += 1
        return [command[0], UNLOADED, *command[2:]]


@pytest.mark.parametrize("cls,params,steps", FLUSH_CASES, ids=[c[0] for c in FLUSH_CASES])
def test_a_flushed_script_cache_changes_no_decision(
        learner: Any, redis_db: Any, cls: str, params: dict[str, float],
        steps: list[tuple[float, bool]]) -> None:
    """Redis keeps loaded scripts in memory only: SCRIPT FLUSH, a restart or a failover
    empties the cache under a running app, and EVALSHA then answers NOSCRIPT. A limiter that
    runs its script by digest must load it again (redis-py's register_script does: EVALSHA,
    and on NOSCRIPT, EVAL) and decide as if nothing happened. (A limiter that never sends
    EVALSHA meets no flush here.)"""
    flush = FlushScripts()
    with redis_gate(redis_db.url, flush) as gated:
        limiter = make(learner, redis_db, cls, "fl", gated, **params)
        decide(limiter, "warm-up", 0.0, f"{cls} warm-up")   # scripts loaded, if ever
        for now, expected in steps:
            flush.armed, before = True, flush.flushed
            what = f"{cls}({params}) at t={now}"
            try:
                allowed = decide(limiter, "client-a", now, what)
            except Exception as exc:  # noqa: BLE001 - it is the finding
                pytest.fail(
                    f"{what}, right after Redis lost its loaded scripts (EVALSHA answered "
                    f"NOSCRIPT): allow() raised {type(exc).__name__}: "
                    f"{str(exc).rstrip('.')}. A script loaded once is not there for ever "
                    "- SCRIPT FLUSH, a restart or a failover to a replica empties the "
                    "cache under a running app, and every request then errors. On NOSCRIPT "
                    "load the script again (SCRIPT LOAD, or EVAL it) and retry: redis-py's "
                    "register_script() does that.",
                    pytrace=False)
            flushed = " right after Redis lost its loaded scripts" * (flush.flushed > before)
            assert allowed == expected, (
                f"{what}{flushed}: {'allowed' if allowed else 'refused'}, expected "
                f"{'allowed' if expected else 'refused'} (steps {steps}). NOSCRIPT is not "
                "Redis being down, and not a decision: failing open lets a client past its "
                "limit whenever the cache is empty, failing closed refuses everyone. Load "
                "the script again (SCRIPT LOAD, or EVAL it) and run it: redis-py's "
                "register_script() does that.")


FLUSHED_A = (" with Redis's scripts lost under A (its EVALSHA answered NOSCRIPT) and A "
             "held between the separate commands of its fallback")
FALLBACK = ("\nHere A met NOSCRIPT first (SCRIPT FLUSH, a restart or a failover emptied the "
            "script cache) and then decided in separate commands (HMGET/HSET, ZCARD/ZADD, "
            "GET/INCR, with or without a lock in the process): that fallback is the same "
            "non-atomic read-decide-write, run exactly when every app instance meets the "
            "empty cache at once. On NOSCRIPT load the script again and run it (EVAL, or "
            "SCRIPT LOAD then EVALSHA: redis-py's register_script() does that).")


@pytest.mark.parametrize("cls,params,setup,now,why", LAST_SLOT_CASES,
                         ids=[c[0] for c in LAST_SLOT_CASES])
def test_a_flushed_script_cache_keeps_the_last_slot_atomic(
        learner: Any, redis_db: Any, cls: str, params: dict[str, float], setup: list[float],
        now: float, why: str) -> None:
    """:func:`test_two_instances_never_both_take_the_last_slot` with Redis's script cache
    lost under request A: its first EVALSHA is answered NOSCRIPT, then A is held before each
    of its later commands in turn (what it does about the NOSCRIPT) while B asks for the
    same last slot. A limiter that falls back to separate commands on NOSCRIPT races
    exactly when a flush hits every instance at once. (One that never sends EVALSHA meets
    no flush, and is the plain test again.)"""
    only_one_takes_the_last_slot(learner, redis_db, cls, params, setup, now, why,
                                 HoldAt(flush=True))


@pytest.mark.parametrize("case", IN_FLIGHT_CASES, ids=[c.cls for c in IN_FLIGHT_CASES])
def test_a_flushed_script_cache_never_counts_a_refusal(learner: Any, redis_db: Any,
                                                       case: InFlight) -> None:
    """:func:`test_a_refused_request_never_counts_even_in_flight` with Redis's script cache
    lost under the refused request A (its first EVALSHA answered NOSCRIPT): a fallback that
    counts first and gives the slot back shows the refusal to B."""
    refused_never_counts(learner, redis_db, case, HoldAt(flush=True))
