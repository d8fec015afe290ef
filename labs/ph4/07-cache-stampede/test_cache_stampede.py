"""ph4.7 verification, on a real Redis (a database of the test's own):

* 50 callers miss the same key at once (harness.py runs them where the learner's code runs,
  holding the one loader until all the others are waiting): the loader runs exactly once,
  everyone gets its value; Redis' MONITOR shows the lock taken with SET NX PX and a random
  token, and released by a Lua script that compares before deleting;
* the lock is released only by its owner: when A's lock has expired and B holds it, A's
  release must leave B's lock alone;
* each key has a lock of its own: a miss on one key never waits for another key's load.

Probabilistic early expiry (XFetch) is checked in test_xfetch.py.
"""

from __future__ import annotations

import threading
import time
from types import ModuleType
from typing import Any

import pytest

from labrunner.testing import came_true, redis_commands, redis_gate

CALLERS = 50


@pytest.fixture
def stampede(learner: Any) -> ModuleType:
    module: ModuleType = learner.load("stampede")
    for name in ("get_or_load", "acquire_lock", "release_lock", "xfetch"):
        if not callable(getattr(module, name, None)):
            pytest.fail(f"stampede.py: define {name}() (see the README)", pytrace=False)
    return module


@pytest.mark.parametrize("filled", ["filled-by-another", ""], ids=["value", "empty-value"])
def test_the_lock_winner_reads_the_key_again(stampede: ModuleType, redis_db: Any,
                                             filled: str) -> None:
    """Another caller fills the key and releases its lock between this caller's miss (GET)
    and its SET NX: the lock is free, but the value is there now (even an empty one)."""
    r = redis_db.client(decode_responses=True)
    done = threading.Event()
    loads: list[int] = []

    def before(command: list[bytes]) -> None:
        if (not done.is_set() and command[0].upper() == b"SET"
                and any(a.upper() == b"NX" for a in command[3:])):
            r.set("product:7", filled, px=60_000)
            done.set()

    def loader() -> str:
        loads.append(1)
        return "loaded-again"

    with redis_gate(redis_db.url, before) as url:
        got = stampede.get_or_load(url, "product:7", loader, 60_000, sleep=lambda s: None)
    if not done.is_set():
        return  # no SET NX went through the proxy: the other tests judge the lock
    assert not loads, (
        "between get_or_load's miss (GET) and its lock (SET NX), another caller filled the "
        "key and released its lock; get_or_load then won the free lock and called loader() "
        f"AGAIN (it returned {got!r}, the cache held {filled!r})\nAfter winning the "
        "lock, read the key once more before loading: the previous holder may have filled it "
        "just before you locked - otherwise every caller that missed at the moment of a fill "
        "loads once more." + ("" if filled else " An empty value is a value: test `value is "
                               "not None`, not its truthiness."))
    assert got == filled, f"get_or_load returned {got!r}, the cache held {filled!r}"
    left = sorted(k for k in r.keys("*") if k != "product:7")
    assert not left, f"keys left behind: {left}: the lock was not released"


FILLS = {b"SET", b"SETEX", b"PSETEX"}


def test_the_lock_is_held_until_the_key_is_filled(stampede: ModuleType,
                                                  redis_db: Any) -> None:
    """Driven through the gate, one command at a time: when get_or_load's fill (SET of the
    key) arrives at Redis, its lock must still hold its token. A lock released first (after
    the load, before the SET) leaves a window in which another caller that missed takes the
    free lock, reads the key - still empty - and loads again; the gate steps into that window
    as that caller would (SET NX on the lock) instead of hoping a thread lands there."""
    r = redis_db.client(decode_responses=True)
    key = "product:11"
    lock: dict[str, str] = {}
    at_fill: dict[str, Any] = {}

    def before(command: list[bytes]) -> None:
        name, args = command[0].upper(), [a.decode(errors="replace") for a in command[1:]]
        if name == b"SET" and len(args) >= 2 and "NX" in (a.upper() for a in args[2:]):
            lock.update(name=args[0], token=args[1])
        elif name in FILLS and args and args[0] == key and lock and not at_fill:
            at_fill["holder"] = r.get(lock["name"])
            if at_fill["holder"] != lock["token"]:
                at_fill["another"] = r.set(lock["name"], "another-caller", nx=True,
                                           px=60_000)
                at_fill["cached"] = r.get(key)
                if at_fill["another"]:
                    r.delete(lock["name"])

    with redis_gate(redis_db.url, before) as url:
        got = stampede.get_or_load(url, key, lambda: "loaded", 60_000, lock_ttl_ms=60_000,
                                   sleep=lambda s: None)
    if not at_fill or at_fill["holder"] == lock["token"]:
        return  # no lock or no fill seen through the gate: the other tests judge those
    was = "gone" if at_fill["holder"] is None else f"held by {at_fill['holder']!r}"
    pytest.fail(
        f"get_or_load released its lock before it filled the cache: when its SET {key} "
        f"reached Redis, the lock {lock['name']} was {was}, expected still held by its token "
        f"{lock['token']!r}; another caller then took the free lock "
        f"({'SET NX succeeded' if at_fill['another'] else 'SET NX'}) and read {key}: "
        f"{at_fill['cached']!r} - it loads again (get_or_load returned {got!r})\nThe lock "
        "must cover the fill: load, SET the value, and only then release (one finally "
        "around both). A waiter that wakes between your release and your SET finds the lock "
        "free and the key empty: the stampede leaks through that window.", pytrace=False)


def test_a_failing_loader_releases_the_lock(stampede: ModuleType, redis_db: Any) -> None:
    r = redis_db.client(decode_responses=True)

    def failing() -> str:
        raise RuntimeError("the database is down")

    try:
        stampede.get_or_load(redis_db.url, "product:9", failing, 60_000, lock_ttl_ms=60_000,
                             sleep=lambda s: None)
    except RuntimeError:
        pass
    except Exception as exc:  # noqa: BLE001 - the learner's code changed the error
        pytest.fail(f"loader() raised RuntimeError and get_or_load raised "
                    f"{type(exc).__name__}: {exc}: let the loader's error through",
                    pytrace=False)
    else:
        pytest.fail("loader() raised RuntimeError, and get_or_load returned instead of "
                    "raising it", pytrace=False)
    held = {k: r.pttl(k) for k in r.keys("*")}
    assert not held, (
        f"loader() raised, and afterwards {sorted(held)} still exist (PTTL ms: {held}): the "
        "lock stays held until its TTL, and every other caller sleeps that long for a value "
        "nobody is loading\nRelease the lock in a finally block, so a failing loader gives "
        "it back too.")


def test_an_empty_value_is_a_hit(stampede: ModuleType, redis_db: Any) -> None:
    """A cached value is a hit whatever it holds: an empty result ("" for "no orders") that
    counts as a miss sends every request to the database, the stampede the cache is for."""
    r = redis_db.client(decode_responses=True)
    loads: list[str] = []

    def loader() -> str:
        loads.append("load")
        return ""

    def get(key: str) -> str:
        return str(stampede.get_or_load(redis_db.url, key, loader, 60_000, lock_ttl_ms=60_000,
                                        sleep=lambda s: None))

    r.set("orders:of:7", "", px=60_000)
    cases = [("a key the cache already holds as ''", "orders:of:7", 0),
             ("a key filled with '' by the first call", "orders:of:8", 1)]
    for what, key, loads_expected in cases:
        loads.clear()
        got = [get(key) for _ in range(3)]
        assert got == ["", "", ""], f"get_or_load of {what}: expected '' 3 times, saw {got}"
        assert len(loads) == loads_expected, (
            f"get_or_load x3 of {what}: the loader ran {len(loads)} times, expected "
            f"{loads_expected}: an empty value was taken for a miss (a truthiness test such "
            "as `if value:`); a hit is GET returning a value, even an empty one - test "
            "`value is not None`")


class Stuck(Exception):
    """Raised from a waiter's sleep() once it is seen waiting for a value nobody loads."""


def test_a_waiter_takes_over_when_the_winners_load_fails(stampede: ModuleType,
                                                         redis_db: Any) -> None:
    """A wins the lock; its loader waits until B has found the lock taken (B called the
    sleep() it was given), then raises: A's error goes to A, A's lock is released, and the
    key is still empty. B must then do what a first caller does - take the lock and load -
    not wait for a value nobody is loading any more (until its request times out), nor fail
    with A's error. B's sleep() tells the test where B is: once A has failed and nothing is
    held or cached, 50 more sleeps without taking the lock end B (raise) at once."""
    r = redis_db.client(decode_responses=True)
    key = "product:13"
    a_loading, b_waiting, a_failed = threading.Event(), threading.Event(), threading.Event()
    after_failure = [0]
    outcome: dict[str, Any] = {}

    def a_loader() -> str:
        a_loading.set()
        b_waiting.wait(30)
        raise RuntimeError("the database is down (for A)")

    def b_loader() -> str:
        outcome["b loaded"] = True
        return "loaded-by-b"

    def b_sleep(_seconds: float) -> None:
        b_waiting.set()
        if a_failed.is_set() and r.dbsize() == 0:
            after_failure[0] += 1
            if after_failure[0] > 50:
                raise Stuck()
        time.sleep(0.01)

    def run(name: str, loader: Any, sleep: Any) -> None:
        try:
            outcome[name] = stampede.get_or_load(redis_db.url, key, loader, 60_000,
                                                 lock_ttl_ms=60_000, sleep=sleep)
        except Exception as exc:  # noqa: BLE001 - judged by the test
            outcome[name] = exc
        finally:
            if name == "A":
                a_failed.set()

    a = threading.Thread(target=run, args=("A", a_loader, lambda s: time.sleep(0.01)),
                         daemon=True)
    a.start()
    came_true(lambda: a_loading.is_set() or not a.is_alive(), 30)
    if not a_loading.is_set() or r.dbsize() == 0:
        b_waiting.set()
        a.join(40)
        return  # A loaded without a lock (or not at all): the other tests judge that
    b = threading.Thread(target=run, args=("B", b_loader, b_sleep), daemon=True)
    b.start()
    a.join(40)
    b.join(40)
    if not b_waiting.is_set():
        return  # B never waited (A was done first): the 50-caller test judges waiting
    got = outcome.get("B")
    assert type(got).__name__ != Stuck.__name__, (  # it may cross a process boundary
        "A won the lock and its loader raised; A's lock was released and the key is still "
        f"empty, yet B, which was waiting, called sleep() {after_failure[0]} more times "
        "without taking the lock: a waiter that only polls the key waits for a value nobody "
        "is loading any more (until its request times out)\nA waiter must go back to the "
        "start after each sleep: read the key, and on a miss try the lock again - if the "
        "winner failed or died (its lock expired), the next waiter takes over.")
    assert got == "loaded-by-b" and outcome.get("b loaded"), (
        f"A won the lock and its loader raised; B, which was waiting, then got {got!r}, "
        "expected B to take the free lock, call its own loader and return 'loaded-by-b': "
        "A's failure is A's (its caller sees it); a waiter whose winner failed takes the "
        "lock and loads, as a first caller would")
    assert r.get(key) == "loaded-by-b", (
        f"B loaded after A's failure but the key holds {r.get(key)!r}: fill it")


def test_each_key_has_its_own_lock(learner: Any, stampede: ModuleType, redis_db: Any) -> None:
    """While A loads product:a, B misses product:b, a key nobody is loading: B must take
    product:b's own lock and load at once, not sleep behind A's load of another key."""
    r = redis_db.client(decode_responses=True)
    out = dict(learner.harness().other_key_while_loading(
        stampede, redis_db.url, lambda: sorted(r.keys("*"))))
    if not out["a_loading"]:
        return  # A never reached its loader: the other tests judge that
    assert out["b"] != "waited", (
        "while A's loader ran for product:a, B missed product:b - a key nobody was loading - "
        f"and waited (called sleep()) instead of loading it: the keys share one lock (held "
        f"while A loaded: {out['held']})\nLock each key with a lock of its own "
        "(f'{key}:lock'): a shared lock makes every miss wait for every other key's load.")
    assert out["b"] == "value-b", (
        f"B missed product:b while A loaded product:a, and got {out['b']!r}, expected "
        "'value-b' from its own loader")

def test_the_lock_ttl_is_the_one_given(stampede: ModuleType, redis_db: Any) -> None:
    """The lock's TTL is how long the others wait for a winner that died: lock_ttl_ms, not
    the value's TTL, a constant, or seconds taken for milliseconds. Measured as the lock's
    PTTL while the loader runs, whatever command set it."""
    r = redis_db.client(decode_responses=True)
    key, lock_ttl_ms, ttl_ms = "product:17", 7_300, 45_000
    seen: dict[str, int] = {}

    def loader() -> str:
        seen.update({k: r.pttl(k) for k in r.keys("*") if k != key})
        return "loaded"

    stampede.get_or_load(redis_db.url, key, loader, ttl_ms, lock_ttl_ms=lock_ttl_ms,
                         sleep=lambda s: None)
    if not seen:
        return  # no lock at all: the 50-caller test says so
    wrong = {k: v for k, v in seen.items() if not 0 < v <= lock_ttl_ms or v < lock_ttl_ms - 5_000}
    assert not wrong, (
        f"get_or_load(..., ttl_ms={ttl_ms}, lock_ttl_ms={lock_ttl_ms}): while the loader ran, "
        f"its lock had PTTL {wrong} ms, expected about {lock_ttl_ms} ms (at most that): the "
        "lock's TTL decides how long every other caller waits when the winner dies - "
        "pass lock_ttl_ms to SET ... NX PX (milliseconds: px=, not ex=), not the value's "
        "ttl_ms or a constant")


def test_fifty_callers_on_a_missing_key_load_once(learner: Any, stampede: ModuleType,
                                                  redis_db: Any) -> None:
    harness = learner.harness()
    with redis_commands(redis_db, with_source=True) as seen:
        out = dict(harness.stampede(stampede, redis_db.url, "product:42", CALLERS, 60_000))
    assert not out["errors"], f"get_or_load raised: {out['errors'][0]}"
    assert out["alive"] == 0, (
        f"{out['alive']} of {CALLERS} callers had not returned 40 s after the value was "
        "loaded\nWaiters must re-read the key between sleeps and return once it is there.")
    client_cmds = [c for src, c in seen if src != "lua"]
    wins = [c for c in client_cmds if c[0] == "SET" and "NX" in (a.upper() for a in c[3:])
            and c[1].endswith(":lock")]
    fills = [c for c in client_cmds if c[0] == "SET" and c[1] == "product:42"]
    assert not (out["loads"] > 1 and len(fills) > 1 and wins), (
        f"the loader ran {out['loads']} times for {CALLERS} concurrent callers of one "
        f"missing key, and the key was filled {len(fills)} times, expected once: a caller "
        "that missed before the first fill took the lock after its release and loaded again"
        "\nAfter winning the lock, read the key once more before calling loader().")
    assert out["loads"] == 1, (
        f"the loader ran {out['loads']} times for {CALLERS} concurrent callers of one "
        "missing key, expected exactly once: a cache stampede\nOn a miss, take a lock "
        "(SET lock token NX PX ttl): only its winner loads and fills the cache; the others "
        "sleep() and read the key again.")
    if not out["held"]:
        pytest.fail(f"only {out['slept']} of the {CALLERS - 1} other callers called the "
                    "sleep() passed to get_or_load while the loader ran\nA caller that "
                    "finds the lock taken must wait with the sleep function it was given "
                    "(the verification watches it), then read the key again.", pytrace=False)
    bad = [r for r in out["results"] if r != "fresh-value"]
    assert not bad, f"{len(bad)} callers got {bad[0]!r} instead of the loaded value"

    lua_cmds = [c for src, c in seen if src == "lua"]
    locks = [c for c in client_cmds if c[0] == "SET" and "NX" in (a.upper() for a in c[3:])]
    assert locks, ("no SET ... NX was sent: the lock must be taken atomically with SET key "
                   "token NX PX ttl (SETNX then EXPIRE is two steps; a crash between them "
                   "leaves a lock that never expires)")
    args = [a.upper() for a in locks[0][3:]]
    assert "PX" in args or "EX" in args, (
        f"the lock was taken with {' '.join(locks[0])} - no expiry\nGive the lock a TTL "
        "(PX): if its holder crashes, the lock must go away by itself.")
    tokens = {c[2] for c in locks}
    assert all(len(t) >= 16 for t in tokens), (
        f"the lock's value was {locks[0][2]!r}: use a random owner token (secrets.token_hex)"
        " so that only the owner can release it")
    dels = [c for c in client_cmds if c[0] in ("DEL", "UNLINK") and c[1] == locks[0][1]]
    assert not dels, (
        f"the lock was released with a plain {dels[0][0]} from the client\nRelease it with "
        "a Lua script that deletes the key only if it still holds your token (GET == token "
        "then DEL, atomically): a lock that expired and was taken by someone else must not "
        "be deleted by you.")
    assert any(c[0] == "DEL" for c in lua_cmds), (
        "the lock was never deleted by a Lua script (EVAL/EVALSHA running GET then DEL): "
        "release it with a compare-and-delete script")
    r = redis_db.client(decode_responses=True)
    ttl = r.pttl("product:42")
    assert 0 < ttl <= 60_000, f"the cached value has PTTL {ttl}, expected the 60 s TTL given"
    left = sorted(k for k in r.keys("*") if k != "product:42")
    assert not left, f"keys left behind after the load: {left}: the lock was not released"


def test_the_lock_is_released_only_by_its_owner(learner: Any, stampede: ModuleType,
                                                redis_db: Any) -> None:
    r = redis_db.client(decode_responses=True)
    a = stampede.acquire_lock(redis_db.url, "lock:report", 30_000)
    assert a, "acquire_lock on a free lock returned no token"
    assert stampede.acquire_lock(redis_db.url, "lock:report", 30_000) is None, (
        "acquire_lock succeeded while the lock was held: use SET ... NX")
    r.delete("lock:report")  # A's lock expires while A is still working
    b = stampede.acquire_lock(redis_db.url, "lock:report", 30_000)
    assert b, "acquire_lock on an expired (deleted) lock returned no token"
    assert a != b, (
        f"two acquisitions of the lock (the first deleted, as an expiry would) got the same "
        f"token {a!r}, expected two different ones: a token made once - a constant, or per "
        "process or thread (host, pid, thread id, a random value kept) - is the same for "
        "every lock its maker takes, so a late release of an expired lock deletes the next "
        "owner's. Tokens must be random per acquisition (secrets.token_hex(16)).")
    tokens = learner.harness().tokens_of_one_thread(
        stampede, redis_db.url, "lock:tokens", 30_000, 3, lambda: r.delete("lock:tokens"))
    assert None not in tokens and len(set(tokens)) == len(tokens), (
        f"three acquire_lock() calls from one thread, the lock expiring (deleted) between "
        f"them, got the tokens {tokens}, expected three different ones: a token made once "
        "per thread or per process (host, pid, thread id, or a random value kept for the "
        "thread) is the same for every lock that thread takes - an event loop runs many "
        "requests on one thread, and a request whose lock expired then releases, with that "
        "same token, the lock the next request took. Make a new random token for each "
        "acquisition (secrets.token_hex(16)).")
    with redis_commands(redis_db, with_source=True) as seen:
        released = stampede.release_lock(redis_db.url, "lock:report", a)
    holder = r.get("lock:report")
    assert holder == b, (
        "A released its lock after it had expired and B had taken it: B's lock is "
        f"{'gone' if holder is None else 'now ' + repr(holder)}\nCompare the token before "
        "deleting, in one atomic step (a Lua script: if GET == token then DEL): otherwise "
        "A's late release lets a third caller in beside B.")
    assert not released, "release_lock with a token that no longer owns the lock returned True"
    client_side = [c[0] for src, c in seen if src != "lua"]
    assert not {"GET", "DEL"} & set(client_side), (
        f"release_lock sent {' and '.join(sorted({'GET', 'DEL'} & set(client_side)))} from "
        "the client: between your GET and your DEL the lock can expire and be taken by "
        "another owner. Do the comparison and the delete in one Lua script (EVAL).")
    assert stampede.release_lock(redis_db.url, "lock:report", b), (
        "the owner's release_lock returned False")
    assert r.get("lock:report") is None, "the owner's release_lock did not delete the lock"
