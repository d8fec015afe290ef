"""ph4.6 verification: LRU and LFU caches.

* Behaviour: Hypothesis stateful tests (RuleBasedStateMachine) drive the learner's cache and
  a plain model side by side with random get/put sequences over keys of several types (a
  few small ints, more distinct ints, floats and bools equal to them, strings, tuples) and
  capacities 1-8; after every step the value returned, the size and which keys are still cached
  must agree with the model. Runs are derandomized, so they are the same every time.
* Two caches of one class side by side share nothing (no state in the class body or the
  module); LFU counts every use exactly (600 uses outrank 400: no saturating counter).
* Cost: O(1) per operation is measured by counting, not timing (harness.py): the keys count
  their own __hash__/__eq__ calls and a tracer counts the lines executed in cache.py; the
  work per operation at capacity 2,000 must stay close to the work at capacity 50.
* ... and by timing what counting cannot see, a scan inside a builtin over ints (min() over
  the buckets, the use counts, the timestamps): a step that evicts must take about as long
  with 20,000 entries as with 64, and (LFU) with 1,000 distinct use counts as with one.
  The setups are timed in turn, the best of 15 batches each: a gap of 60x or more against
  the 6x allowed, where the reference shows 1-1.5x.
* Memory: a cache of 8 entries must keep about the same memory (tracemalloc, in the
  learner's process) after 40,000 uses of a hot key and evictions as after 2,000.
* The structures are the learner's: cache.py may not import OrderedDict or lru_cache.
"""

from __future__ import annotations

import ast
from collections.abc import Hashable
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

SETTINGS = settings(max_examples=60, stateful_step_count=30, derandomize=True,
                    database=None, deadline=None, report_multiple_bugs=False,
                    suppress_health_check=list(HealthCheck))
# Keys: half from the few small ints that collide often (hits, updates, ties), half from a
# wider pool - more distinct keys than any capacity below, and keys of other types: floats
# and bools EQUAL to a cached int (True == 1 == 1.0, one hash: a dict holds them as one
# key), a float that is not, strings (also '1' and '' beside 1 and 0), tuples. Hypothesis
# shrinks towards the first branch, so a failing example reads with small ints when it can.
WIDE_KEYS = (st.integers(min_value=5, max_value=15)
             | st.sampled_from([True, False, 1.0, 2.0, 2.5])
             | st.sampled_from(["a", "b", "1", ""])
             | st.tuples(st.integers(min_value=0, max_value=1), st.sampled_from("xy")))
KEYS = st.integers(min_value=0, max_value=4) | WIDE_KEYS
CAPACITIES = st.integers(min_value=1, max_value=8)  # evictions from a big cache too
VALUES = st.integers(min_value=0, max_value=999) | st.none()  # None is a value too
SMALL, LARGE = 50, 2000
GROWTH = 3.0  # work per operation may grow at most this much from SMALL to LARGE entries
# Timed (a scan inside a builtin counts nothing): a step (get a hot key, put a new one that
# evicts) with FEW entries of one use count, against MANY entries, and against DISTINCT
# entries each with a use count of its own. The reference takes about the same time in all
# three; a min() over MANY ints takes ~1000x, over DISTINCT ~60x.
FEW, MANY, DISTINCT = 64, 20_000, 1500
SLOWER = 6.0


@pytest.fixture
def cache(learner: Any) -> ModuleType:
    module: ModuleType = learner.load("cache")
    for name in ("LRUCache", "LFUCache"):
        if not isinstance(getattr(module, name, None), type):
            pytest.fail(f"cache.py: define a class {name} (see the README)", pytrace=False)
    return module


# ---------------------------------------------------------------------------- models


class LRUModel:
    """Recency as a plain list, least recent first: slow and obviously right."""

    data: dict[Hashable, Any]
    order: list[Hashable]

    def __init__(self, capacity: int) -> None:
        self.capacity, self.data, self.order = capacity, {}, []

    def use(self, key: Hashable) -> None:
        self.order.remove(key)
        self.order.append(key)

    def get(self, key: Hashable) -> Any:
        if key not in self.data:
            return None
        self.use(key)
        return self.data[key]

    def put(self, key: Hashable, value: Any) -> Hashable | None:
        """Returns the evicted key, if any."""
        evicted = None
        if self.capacity <= 0:
            return None
        if key in self.data:
            self.use(key)
        else:
            if len(self.data) >= self.capacity:
                evicted = self.order.pop(0)
                del self.data[evicted]
            self.order.append(key)
        self.data[key] = value
        return evicted


class LFUModel:
    """Each key's use count and the tick of its last use; the victim is the key with the
    fewest uses, the least recently used among those."""

    data: dict[Hashable, Any]
    uses: dict[Hashable, int]
    last: dict[Hashable, int]

    def __init__(self, capacity: int) -> None:
        self.capacity, self.data, self.uses, self.last, self.tick = capacity, {}, {}, {}, 0

    def use(self, key: Hashable) -> None:
        self.tick += 1
        self.uses[key] += 1
        self.last[key] = self.tick

    def get(self, key: Hashable) -> Any:
        if key not in self.data:
            return None
        self.use(key)
        return self.data[key]

    def put(self, key: Hashable, value: Any) -> Hashable | None:
        evicted = None
        if self.capacity <= 0:
            return None
        if key not in self.data:
            if len(self.data) >= self.capacity:
                evicted = min(self.data, key=lambda k: (self.uses[k], self.last[k]))
                del self.data[evicted], self.uses[evicted], self.last[evicted]
            self.uses[key] = 0
        self.data[key] = value
        self.use(key)
        return evicted


# ---------------------------------------------------------------------------- machines


def machine_for(module: ModuleType, cls: str, model_cls: type,
                rule_text: str) -> type[RuleBasedStateMachine]:
    class CacheMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.log: list[str] = []
            self.before_put: dict[Hashable, Any] = {}  # the model's entries before the last put
            self.last_put: Hashable = None

        @initialize(capacity=CAPACITIES)
        def create(self, capacity: int) -> None:
            self.cache = getattr(module, cls)(capacity)
            self.model = model_cls(capacity)
            self.log.append(f"{cls}({capacity})")

        def history(self) -> str:
            """The constructor and the operations, all of them when the (shrunk) example
            is short: keys in repr(), so 1, 1.0, True and '1' read apart."""
            steps = self.log[1:]
            if len(steps) > HISTORY:
                steps = [f"... {len(steps) - HISTORY} earlier operations", *steps[-HISTORY:]]
            return "; ".join(self.log[:1] + steps)

        @rule(key=KEYS)
        def get(self, key: Hashable) -> None:
            before = dict(self.model.data)
            want = self.model.get(key)
            got = self.cache.get(key)
            self.log.append(f"get({key!r}) -> {got!r}")
            assert got == want, (
                f"{self.history()}: {cls}.get({key!r}) returned {got!r}, expected {want!r}"
                f"{same_key(before, key) or diagnose(self.model, key, got, want)} "
                f"({rule_text})")

        @rule(key=KEYS, value=VALUES)
        def put(self, key: Hashable, value: Any) -> None:
            self.before_put, self.last_put = dict(self.model.data), key
            evicted = self.model.put(key, value)
            self.cache.put(key, value)
            self.log.append(f"put({key!r}, {value!r})")
            if evicted is not None:
                self.log[-1] += f" [evicts {evicted!r}]"

        @invariant()
        def same_keys(self) -> None:
            if not hasattr(self, "cache"):
                return
            size = len(self.cache)
            assert size == len(self.model.data), (
                f"{cls} holds {size} entries, expected {len(self.model.data)} (capacity "
                f"{self.model.capacity}; {rule_text})"
                f"{same_key(self.before_put, self.last_put) if self.log else ''}"
                f"\noperations: {self.history()}")

    CacheMachine.__name__ = f"{cls}Machine"
    return CacheMachine


HISTORY = 40  # operations shown in a failure; a shrunk example is shorter


def same_key(cached: dict[Hashable, Any], key: Hashable) -> str:
    """A note when the key asked for is equal to a cached key of another type (1, 1.0 and
    True): the dict takes it for that key, a cache keyed otherwise does not."""
    for held in cached:
        if held == key and type(held) is not type(key):
            return (f"; {key!r} == {held!r} (put earlier) and hash({key!r}) == "
                    f"hash({held!r}): for a dict they are ONE key, so the cache must find "
                    f"the entry of {held!r} - key the dict by the key itself, not by repr() "
                    "or (type, key) (lru_cache's default typed=False does the same)")
    return ""


def diagnose(model: Any, key: Hashable, got: Any, want: Any) -> str:
    """What the model knows about the key the learner's cache answered wrongly for."""
    if want is None:
        return (f": key {key!r} is not cached any more (the model evicted it, see [evicts] "
                "above), so your cache kept a key it should have evicted")
    if got is None and not want:
        return (f": key {key!r} is cached with the value {want!r}, which is falsy - a cached "
                "0, '' or None is a hit: test whether the KEY is cached (key in dict), not "
                "whether the value is true")
    if got is None:
        uses = getattr(model, "uses", {}).get(key)
        return (f": key {key!r} is still cached" + (f" with {uses} uses" if uses else "")
                + ", so your cache evicted the wrong key (or lost it) earlier")
    return ""


LRU_RULE = ("the least recently used key goes when a new key arrives in a full cache; "
            "both get and put of a key make it the most recently used, and updating a key "
            "already cached evicts nothing")
LFU_RULE = ("the key with the fewest uses goes when a new key arrives in a full cache, the "
            "least recently used of them on a tie; every get and put counts as a use, a new "
            "key starts at 1, and updating a key already cached evicts nothing")


def run_machine(machine: type[RuleBasedStateMachine]) -> None:
    """Run a state machine; its assertion (with Hypothesis' minimal example) is the
    failure the learner reads."""
    machine.TestCase.settings = SETTINGS
    case = machine.TestCase("runTest")
    case.runTest()


ZERO_RULE = ("a cache of capacity 0 caches nothing (a cache turned off by configuration, "
             "like lru_cache(maxsize=0)): put stores nothing and evicts nothing - there is "
             "nothing to evict - and every get misses")

KEY_TYPES_RULE = ("1, 1.0 and True are equal and hash alike: a dict holds them as ONE key (so "
                  "does lru_cache with its default typed=False), so a get or put of any of "
                  "them is a use of that one entry; key the dict by the key itself, not by "
                  "repr(key) or (type(key), key)")

NONE_KEY_RULE = ("None is a key like any other (lru_cache caches f(None) too): cached, it is "
                 "found, used and evicted in its turn - tell the list's sentinel or an empty "
                 "bucket apart by identity (node is self._head) or by emptiness, never by a "
                 "key of None")

# Named cases first: each is one way these caches are commonly got wrong, so its failure can
# say which rule was broken. (cache class, capacity, steps, the rule the case checks)
# A step is ("put", key, value) or ("get", key); every get is compared with the model.
CASES = [
    ("LRUCache", 2, [("put", 1, 10), ("put", 2, 20), ("get", 1), ("put", 3, 30), ("get", 2),
                     ("get", 1), ("get", 3)],
     "a get makes its key the most recently used, so the next eviction spares it"),
    ("LRUCache", 2, [("put", 1, 10), ("put", 2, 20), ("put", 1, 11), ("put", 3, 30),
                     ("get", 2), ("get", 1)],
     "a put of a cached key updates its value and makes it the most recently used"),
    ("LRUCache", 2, [("put", 1, 10), ("put", 2, 20), ("put", 2, 21), ("get", 1), ("get", 2)],
     "updating a key already cached evicts nothing, even in a full cache"),
    ("LRUCache", 1, [("put", 1, 10), ("put", 2, 20), ("get", 1), ("get", 2)],
     "capacity 1 keeps only the newest key"),
    ("LFUCache", 2, [("put", 1, 10), ("get", 1), ("put", 2, 20), ("put", 3, 30), ("get", 2),
                     ("get", 1), ("get", 3)],
     "the key with the fewest uses is evicted, however recently it was used"),
    ("LFUCache", 2, [("put", 1, 10), ("put", 2, 20), ("put", 3, 30), ("get", 1), ("get", 2)],
     "among keys with equally few uses, the least recently used one is evicted"),
    ("LFUCache", 2, [("put", 1, 10), ("get", 1), ("put", 2, 20), ("get", 2), ("put", 3, 30),
                     ("put", 4, 40), ("get", 2), ("get", 3), ("get", 4)],
     "a new key starts with 1 use, so after an insert the minimum frequency is 1 again: "
     "the next eviction takes the newcomer with 1 use, not an older key with 2"),
    ("LFUCache", 2, [("put", 1, 10), ("put", 2, 20), ("get", 2), ("get", 2), ("put", 3, 30),
                     ("get", 2), ("get", 1), ("get", 3)],
     "min_freq moves up only when a use empties the bucket min_freq itself: key 2 going from "
     "2 to 3 uses leaves key 1 with 1 use, so the next eviction still takes key 1, not the "
     "most used key"),
    ("LFUCache", 2, [("put", 1, 0), ("get", 1), ("put", 2, 20), ("put", 3, 30), ("get", 1),
                     ("get", 2), ("get", 3)],
     "a cached value of 0 is a hit (and a use): check whether the key is cached, not "
     "whether its value is true"),
    ("LRUCache", 2, [("put", 1, 0), ("get", 1), ("put", 2, 20), ("put", 3, 30), ("get", 1),
                     ("get", 2)],
     "a cached value of 0 is a hit (and a use): check whether the key is cached, not "
     "whether its value is true"),
    ("LFUCache", 2, [("put", 1, None), ("get", 1), ("put", 2, 20), ("put", 3, 30),
                     ("get", 2), ("get", 3)],
     "a key cached with the value None is a hit and a use (negative caching: 'no such "
     "user'), so key 1 has 2 uses and key 2 goes: check whether the KEY is cached (key in "
     "dict), not whether dict.get() returned None"),
    ("LRUCache", 2, [("put", 1, None), ("put", 2, 20), ("get", 1), ("put", 3, 30),
                     ("get", 2), ("get", 3)],
     "a key cached with the value None is a hit, so the get makes key 1 the most recently "
     "used and key 2 goes: check whether the KEY is cached (key in dict), not whether "
     "dict.get() returned None"),
    ("LFUCache", 2, [("put", 1, 10), ("put", 1, 11), ("put", 2, 20), ("put", 3, 30),
                     ("get", 1), ("get", 2)],
     "a put of a cached key counts as a use, like a get: its count goes up by one and is "
     "kept (an update is not a new key starting again at 1)"),
    ("LFUCache", 2, [("put", 1, 10), ("put", 2, 20), ("put", 2, 21), ("get", 1), ("get", 2)],
     "updating a key already cached evicts nothing, even in a full cache"),
    ("LRUCache", 0, [("put", 1, 10), ("get", 1), ("put", 2, 20), ("put", 1, 11), ("get", 1),
                     ("get", 2)],
     ZERO_RULE),
    ("LRUCache", 2, [("put", 1, 10), ("get", 1.0), ("put", True, 11), ("put", 2, 20),
                     ("get", 1), ("put", 3, 30), ("get", 2), ("get", 1)],
     KEY_TYPES_RULE),
    ("LFUCache", 2, [("put", 1, 10), ("get", 1.0), ("put", True, 11), ("put", 2, 20),
                     ("get", 1), ("put", 3, 30), ("get", 2), ("get", 1)],
     KEY_TYPES_RULE),
    ("LFUCache", 0, [("put", 1, 10), ("get", 1), ("put", 2, 20), ("put", 1, 11), ("get", 1),
                     ("get", 2)],
     ZERO_RULE),
    ("LRUCache", 2, [("put", None, "n"), ("get", None), ("put", 2, 20), ("put", 3, 30),
                     ("get", None), ("get", 2), ("put", None, "m"), ("get", None),
                     ("get", 3)],
     NONE_KEY_RULE),
    ("LFUCache", 2, [("put", None, "n"), ("get", None), ("put", 2, 20), ("get", 2),
                     ("get", 2), ("put", 3, 30), ("get", None), ("get", 2), ("get", 3)],
     NONE_KEY_RULE),
]


@pytest.mark.parametrize(("cls", "capacity", "steps", "rule_text"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_named_cases(cache: ModuleType, cls: str, capacity: int,
                     steps: list[tuple[Any, ...]], rule_text: str) -> None:
    model = (LRUModel if cls == "LRUCache" else LFUModel)(capacity)
    learner_cache = getattr(cache, cls)(capacity)
    done: list[str] = []
    for step in steps:
        call = f"{step[0]}({', '.join(map(repr, step[1:]))})"
        try:
            if step[0] == "put":
                learner_cache.put(step[1], step[2])
            else:
                got = learner_cache.get(step[1])
        except Exception as exc:  # noqa: BLE001 - a crash is the learner's answer here
            pytest.fail(
                f"{cls}({capacity}): {'; '.join([*done, call])} raised "
                f"{type(exc).__name__}: {exc!r}, expected it to work: {rule_text}.",
                pytrace=False)
        done.append(call)
        if step[0] == "put":
            model.put(step[1], step[2])
            size = len(learner_cache)
            if size > capacity:
                pytest.fail(
                    f"{cls}({capacity}): after {'; '.join(done)} the cache holds {size} "
                    f"entries, more than its capacity {capacity}: "
                    + (f"{rule_text}." if capacity == 0 or rule_text == NONE_KEY_RULE else
                       "a put of a new key into a FULL cache (len == capacity, so test >=, "
                       "not >) evicts one entry first"), pytrace=False)
            continue
        want = model.get(step[1])
        if got != want:
            pytest.fail(
                f"{cls}({capacity}): {'; '.join(done)} returned {got!r}, expected {want!r}: "
                f"{rule_text}.", pytrace=False)
    assert len(learner_cache) == len(model.data), (
        f"{cls}({capacity}) holds {len(learner_cache)} entries after {'; '.join(done)}, "
        f"expected {len(model.data)}")


# Keys as a dict sees them: one key is any object EQUAL to it (==, with an equal hash), and
# two keys with one hash are two keys all the same (the dict tells them apart with ==).
# Every key below is built anew at each call, as a key from a request is: equal to the one
# cached, never the same object (ints 0-4 are, which is why they prove nothing here).
# (what the keys are, key n for n = 0, 1, 2, why it matters)
KEY_CASES: list[tuple[str, Any, str]] = [
    ("strings built at run time", lambda n: "user:" + str(n),
     "a key read from a request is a new string each time, equal to the cached one"),
    ("big ints", lambda n: 10**20 + n,
     "ints past 256 are new objects each time they are computed"),
    ("tuples built at run time", lambda n: ("user", int(n)),
     "a compound key (tenant, id) is a new tuple at each call"),
    ("ints with one hash: -1 and -2", lambda n: -1 - n,
     "hash(-1) == hash(-2) == -2 in CPython (-1 is reserved for errors): two keys, one hash"),
    ("big ints with one hash: 0, 2**61-1, 2**62-2", lambda n: n * (2**61 - 1),
     "CPython hashes an int modulo 2**61-1, so these three keys all hash to 0"),
]
KEY_IDS = ["runtime-strings", "big-ints", "runtime-tuples", "same-hash-ints",
           "same-hash-big-ints"]
KEY_RULE = ("a cache finds a key the way a dict does, by its hash and then ==: a key equal "
            "to a cached one is that key, even when it is another object; two keys with "
            "the same hash are still two keys")


@pytest.mark.parametrize("cls", ["LRUCache", "LFUCache"])
@pytest.mark.parametrize(("what", "make", "why"), KEY_CASES, ids=KEY_IDS)
def test_keys_are_compared_by_equality(cache: ModuleType, cls: str, what: str, make: Any,
                                       why: str) -> None:
    """put two keys, read both back with keys built anew, update one (no eviction), then a
    third key evicts the other one: LRU and LFU agree on every step here."""
    learner_cache = getattr(cache, cls)(2)
    steps: list[tuple[Any, ...]] = [
        ("put", 0, "v0"), ("put", 1, "v1"), ("get", 0, "v0"), ("get", 1, "v1"),
        ("put", 0, "w0"), ("len", 2), ("get", 0, "w0"), ("put", 2, "v2"),
        ("get", 1, None), ("get", 0, "w0"), ("get", 2, "v2"), ("len", 2)]
    done: list[str] = []
    for step in steps:
        if step[0] == "len":
            size = len(learner_cache)
            if size != step[1]:
                pytest.fail(
                    f"{cls}(2) with {what}: after {'; '.join(done)} the cache holds {size} "
                    f"entries, expected {step[1]}: {KEY_RULE} ({why}). "
                    + ("More entries than keys: an update of a key built anew was stored "
                       "as a new key - compared by identity (is, id()) instead of ==?"
                       if size > step[1] else "Fewer entries than keys: two different "
                       "keys were stored as one - entries kept under hash(key)?"),
                    pytrace=False)
            continue
        key = make(step[1])
        call = f"{step[0]}({key!r}{', ' + repr(step[2]) if step[0] == 'put' else ''})"
        try:
            got = (learner_cache.put(key, step[2]) if step[0] == "put"
                   else learner_cache.get(key))
        except Exception as exc:  # noqa: BLE001 - a crash is the learner's answer here
            pytest.fail(f"{cls}(2) with {what}: {'; '.join([*done, call])} raised "
                        f"{type(exc).__name__}: {exc!r}, expected it to work: {KEY_RULE}.",
                        pytrace=False)
        done.append(call)
        if step[0] == "get" and got != step[2]:
            seen = (f"{got!r}: a key that should have been evicted is still cached"
                    if step[2] is None else
                    "None: the cache did not find a key EQUAL to one it holds - it "
                    "compares keys by identity (is, id()), not by == and hash"
                    if got is None else
                    f"{got!r}, another key's value: two different keys were taken for one "
                    "- entries kept under hash(key) mix up keys whose hashes are equal")
            pytest.fail(f"{cls}(2) with {what}: {'; '.join(done)} returned {seen} "
                        f"(expected {step[2]!r}): {KEY_RULE} ({why}). Key the dict by the "
                        "key itself; it hashes and compares for you.", pytrace=False)


# Two caches of one class side by side (a users cache and a sessions cache): B is made
# after A holds entries, fills and evicts with the same keys, then A is used again. Each is
# compared with a model of its own. (cache, operation, key, value)
APART_STEPS: list[tuple[str, str, Any, Any]] = [
    ("A", "put", 1, "a1"), ("A", "put", 2, "a2"), ("A", "get", 1, None),
    ("B", "len", None, None), ("B", "get", 1, None), ("B", "get", 2, None),
    ("B", "put", 1, "b1"), ("B", "put", 2, "b2"), ("B", "get", 2, None),
    ("B", "get", 2, None), ("B", "put", 3, "b3"), ("B", "get", 1, None),
    ("B", "get", 2, None), ("B", "get", 3, None), ("B", "len", None, None),
    ("A", "get", 1, None), ("A", "get", 2, None), ("A", "len", None, None),
    ("A", "put", 3, "a3"), ("A", "get", 1, None), ("A", "get", 2, None),
    ("A", "get", 3, None), ("A", "len", None, None), ("B", "len", None, None),
    ("B", "get", 2, None), ("B", "get", 3, None)]
APART_RULE = ("two caches are two caches: each one's entries, recency list, sentinel, use "
              "counts and buckets are its own. A mutable object in the class body (`_head "
              "= _Node()`, `_map = {}`), a module-level dict or a mutable default argument "
              "is ONE object shared by every cache: make them in __init__")


@pytest.mark.parametrize("cls", ["LRUCache", "LFUCache"])
def test_two_caches_share_nothing(cache: ModuleType, cls: str) -> None:
    model_cls = LRUModel if cls == "LRUCache" else LFUModel
    caches: dict[str, Any] = {}
    models: dict[str, Any] = {}
    done: list[str] = []
    for name, op, key, value in APART_STEPS:
        if name not in caches:
            caches[name], models[name] = getattr(cache, cls)(2), model_cls(2)
            done.append(f"{name} = {cls}(2)")
        call = (f"len({name})" if op == "len" else f"{name}.{op}({key!r}"
                + (f", {value!r})" if op == "put" else ")"))
        try:
            got = (len(caches[name]) if op == "len" else caches[name].get(key)
                   if op == "get" else caches[name].put(key, value))
        except Exception as exc:  # noqa: BLE001 - a crash is the learner's answer here
            pytest.fail(f"two {cls}s side by side: {'; '.join([*done, call])} raised "
                        f"{type(exc).__name__}: {exc!r}, expected it to work: {APART_RULE}.",
                        pytrace=False)
        done.append(call)
        model = models[name]
        want = (len(model.data) if op == "len" else model.get(key) if op == "get"
                else model.put(key, value))
        if op != "put" and got != want:
            pytest.fail(f"two {cls}s side by side: {'; '.join(done)} returned {got!r}, "
                        f"expected {want!r} (what {name} alone would answer): the other "
                        f"cache's operations changed this one - {APART_RULE}.",
                        pytrace=False)


# Use counts past what a small counter holds (Redis keeps 8 bits, logarithmic): key 1 gets
# HOT uses, then key 2 WARM uses; a new key must evict key 2, the less used, although key 1
# was used longer ago. A count capped (or wrapped) at 255 or 100 makes them a tie, and the
# tie goes to the least recently used: key 1.
HOT, WARM_USES = 600, 400


def test_lfu_counts_every_use(cache: ModuleType) -> None:
    lfu = cache.LFUCache(2)
    for key, value, uses in ((1, "hot", HOT), (2, "warm", WARM_USES)):
        lfu.put(key, value)
        for _ in range(uses - 1):
            lfu.get(key)
    lfu.put(3, "new")
    got = {key: lfu.get(key) for key in (1, 2, 3)}
    want = {1: "hot", 2: None, 3: "new"}
    assert got == want, (
        f"LFUCache(2): put(1, 'hot') and {HOT - 1} gets of key 1 ({HOT} uses), then "
        f"put(2, 'warm') and {WARM_USES - 1} gets of key 2 ({WARM_USES} uses), then "
        f"put(3, 'new'): get(1), get(2), get(3) returned {got[1]!r}, {got[2]!r}, "
        f"{got[3]!r}, expected 'hot', None, 'new': the key with fewer uses goes - "
        f"{WARM_USES} < {HOT} - but the cache took them for equally used and evicted the "
        "least recently used. Count every use exactly: a use count capped (or wrapped) at a "
        "small maximum, as Redis' 8-bit counter is, ranks a key used 400 times with one "
        "used 600 times (a Python int does not overflow).")


def test_lru_matches_the_model(cache: ModuleType) -> None:
    run_machine(machine_for(cache, "LRUCache", LRUModel, LRU_RULE))


def test_lfu_matches_the_model(cache: ModuleType) -> None:
    run_machine(machine_for(cache, "LFUCache", LFUModel, LFU_RULE))


# ---------------------------------------------------------------------------- structure


FORBIDDEN = {"OrderedDict": "collections.OrderedDict", "lru_cache": "functools.lru_cache",
             "cache": "functools.cache", "cachetools": "cachetools"}


def test_builds_its_own_structures(learner: Any) -> None:
    tree = ast.parse(learner.path("cache.py").read_text())
    seen = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            seen |= {a.name for a in node.names if a.name in FORBIDDEN}
            if node.module and node.module.split(".")[0] == "cachetools":
                seen.add("cachetools")
        elif isinstance(node, ast.Import):
            seen |= {"cachetools" for a in node.names if a.name.split(".")[0] == "cachetools"}
        elif isinstance(node, ast.Attribute) and node.attr in ("OrderedDict", "lru_cache"):
            seen.add(node.attr)
    assert not seen, (
        f"cache.py uses {', '.join(sorted(FORBIDDEN[s] for s in seen))}: the point of the "
        "lab is the structure underneath\nBuild LRU from a dict that maps each key to a node "
        "of a doubly linked list you write (move a node to the front on use, unlink the "
        "tail on eviction), and LFU from frequency buckets.")


# A hot key used twice per step while new keys come and go: after WARM steps and after
# LONG steps, the cache must keep about the same memory (KEPT_MORE bytes of slack, for the
# allocator's own bookkeeping). An empty dict per LFU use count passed keeps ~6 MB more.
MEMORY_CAPACITY, WARM, LONG, KEPT_MORE = 8, 2_000, 40_000, 256 * 1024
# Misses: a key kept per miss costs ~90 bytes, 1.6 MB over the 18,000 misses between the two.
LONG_MISSES = 20_000


@pytest.mark.parametrize("cls", ["LRUCache", "LFUCache"])
def test_memory_is_bounded_by_capacity(learner: Any, cache: ModuleType, cls: str) -> None:
    warm, long = learner.harness().memory_kept_by_uses(cache, cls, MEMORY_CAPACITY,
                                                       (WARM, LONG))
    grown = long - warm
    assert grown <= KEPT_MORE, (
        f"{cls}({MEMORY_CAPACITY}): after {LONG:,} steps (a get and an update of one hot "
        f"key, a put of a new key that evicts) it kept {long / 1024:,.0f} KiB, after "
        f"{WARM:,} steps {warm / 1024:,.0f} KiB: {grown / 1024:,.0f} KiB more for the same "
        f"{MEMORY_CAPACITY} entries, expected about the same - the cache keeps something "
        "per use or per evicted key, so its memory grows with traffic, not with capacity\n"
        + ("A recency list or a history of keys that is appended to and never trimmed grows "
           "forever: unlink nodes when they move or leave." if cls == "LRUCache" else
           "A frequency bucket left behind empty when its last key moves up (a use) or "
           "leaves (an eviction) costs a dict per use count ever passed: delete buckets[f] "
           "when it becomes empty."))


@pytest.mark.parametrize("cls", ["LRUCache", "LFUCache"])
def test_a_miss_keeps_nothing(learner: Any, cache: ModuleType, cls: str) -> None:
    """A get of a key the cache does not hold is a miss: it returns None and leaves the cache
    as it was - no entry, no use count, nothing kept for that key. Caches in front of a
    database are asked for many keys they never hold (ids that do not exist, a scan)."""
    warm, long = learner.harness().memory_kept_by_uses(cache, cls, MEMORY_CAPACITY,
                                                       (WARM, LONG_MISSES), misses=True)
    grown = long - warm
    assert grown <= KEPT_MORE, (
        f"{cls}({MEMORY_CAPACITY}): after {LONG_MISSES:,} steps (a get of one hot key, a get "
        f"of a key never cached - a new one each step -, a put of a new key that evicts) it kept "
        f"{long / 1024:,.0f} KiB, after {WARM:,} steps {warm / 1024:,.0f} KiB: "
        f"{grown / 1024:,.0f} KiB more for the same {MEMORY_CAPACITY} entries, expected about "
        "the same - a get that MISSES leaves something behind for the key it did not find, "
        "so the cache grows with every key it is asked for, cached or not (a bounded cache "
        "that is not bounded)\nLooking a key up must not insert it: `d[key]` on a "
        "defaultdict and `d.setdefault(key, ...)` both add the key. Test `key in d` (or "
        "d.get(key)) and return None before touching any structure.")


@pytest.mark.parametrize("cls", ["LRUCache", "LFUCache"])
def test_operations_are_constant_work(learner: Any, cache: ModuleType, cls: str) -> None:
    harness = learner.harness()
    small = dict(harness.work_per_operation(cache, cls, SMALL))
    # The large run stops as soon as its counts make its average too much, whatever follows.
    most = {what: GROWTH * max(small[what], 1.0) for what in ("hash_eq", "lines")}
    large = dict(harness.work_per_operation(cache, cls, LARGE, most))
    over = (f" over its first {large['ops']:.0f} operations"
            if large["ops"] < 4 * LARGE else "")
    for what, meaning in (("hash_eq", "key hashes and comparisons"),
                          ("lines", "lines of cache.py executed")):
        ratio = large[what] / max(small[what], 1.0)
        assert ratio <= GROWTH, (
            f"{cls}: {meaning} per operation grew {ratio:.0f}x from {SMALL} to {LARGE} "
            f"entries ({small[what]:.1f} -> {large[what]:.1f}{over}), expected about the same: "
            "get/put are O(n), not O(1)\n"
            + ("A list of keys costs a comparison per entry on remove()/index(); a scan for "
               "the oldest or least used key looks at every entry. " if what == "hash_eq"
               else "A loop over the entries runs once per entry. ")
            + ("Keep recency in a doubly linked list whose nodes the dict finds: moving or "
               "unlinking a node is O(1)." if cls == "LRUCache" else
               "Keep a bucket of keys per frequency and the minimum frequency: the victim is "
               "the first key of the minimum bucket, and min_freq becomes 1 on every insert."))


@pytest.mark.parametrize("cls", ["LRUCache", "LFUCache"])
def test_eviction_hides_no_scan(learner: Any, cache: ModuleType, cls: str) -> None:
    setups = {"entries": (MANY, 1)}
    if cls == "LFUCache":
        setups["distinct use counts"] = (DISTINCT, DISTINCT)
    base, *costs = learner.harness().eviction_costs(cache, cls, [(FEW, 1), *setups.values()])
    few = " of one use count" if cls == "LFUCache" else ""
    for (what, (size, distinct)), cost in zip(setups.items(), costs, strict=True):
        ratio = cost / max(base, 1.0)
        many = f"{size:,} entries" + (f" with {distinct:,} distinct use counts"
                                      if distinct > 1 else "")
        assert ratio <= SLOWER, (
            f"{cls}: a get and a put that evicts take {ratio:.0f}x as long with {many} as "
            f"with {FEW} entries{few} ({cost / 1000:.1f} vs {base / 1000:.2f} "
            f"us, the best of 15 batches each, timed in turn), expected about the same: "
            f"something scans the {what} on every eviction, inside a builtin (it runs no "
            "line of cache.py and hashes no key, so the counts above miss it)\n"
            + ("min()/max()/sorted() over the timestamps, keys or values is O(n): keep "
               "recency in a doubly linked list whose nodes the dict finds; the victim is "
               "its tail." if cls == "LRUCache" else
               "min() over the buckets is O(distinct use counts), over the use counts O(n): "
               "keep min_freq instead - 1 on every insert, f + 1 when a use empties bucket "
               "f (the minimum one) - and evict the first key of buckets[min_freq]."))
