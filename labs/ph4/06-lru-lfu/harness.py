"""Runs beside the learner's cache (in its process when grading) and counts the work one
cache operation does, so that O(n) eviction shows up as a count that grows with the
capacity.

Two counts per run: calls of the keys' __hash__/__eq__ (a list.remove(key) or a scan that
looks every key up costs one per entry), and line events the tracer sees inside the
learner's cache.py (a Python loop over the entries costs lines per entry).

What neither count sees, a scan inside a builtin over ints (min() over the buckets), is
timed: eviction_costs() compares setups that differ only in what such a scan would cover."""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc
from types import FrameType, ModuleType
from typing import Any


class CountingKey:
    """A cache key that counts how often it is hashed or compared."""

    hashes = 0
    compares = 0
    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __hash__(self) -> int:
        CountingKey.hashes += 1
        return hash(self.n)

    def __eq__(self, other: object) -> bool:
        CountingKey.compares += 1
        return isinstance(other, CountingKey) and other.n == self.n

    def __repr__(self) -> str:
        return f"K{self.n}"


def work_per_operation(module: ModuleType, cls: str, capacity: int,
                       most: dict[str, float] | None = None) -> dict[str, float]:
    """Fill a cache to `capacity`, then run 2 * capacity operations that each evict (puts
    of new keys, each after a get of a live key), counting the work of that second part.

    ``most``: the most work per operation allowed (by count). The counts only grow, so once
    either has passed that much times the operations of the whole run, the run's average is
    over it whatever the rest does: the run stops there (an O(n) cache at 2,000 entries
    costs seconds under the tracer) and the averages are over the operations done ("ops")."""
    cache = getattr(module, cls)(capacity)
    keys = [CountingKey(i) for i in range(3 * capacity + 1)]
    for key in keys[:capacity]:
        cache.put(key, key.n)
    source = module.__file__
    lines = 0

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal lines
        if frame.f_code.co_filename != source:
            return None
        if event == "line":
            lines += 1
        return tracer

    total = 2 * (2 * capacity)
    budget = {what: limit * total for what, limit in (most or {}).items()}
    CountingKey.hashes = CountingKey.compares = 0
    ops = 0
    sys.settrace(tracer)
    try:
        for i in range(capacity, 3 * capacity):
            cache.get(keys[i - 1])          # a live key: the one put just before
            cache.put(keys[i], i)           # a new key: evicts one
            ops += 2
            if CountingKey.hashes + CountingKey.compares > budget.get("hash_eq", total * 1e9) \
                    or lines > budget.get("lines", total * 1e9):
                break
    finally:
        sys.settrace(None)
    return {"hash_eq": (CountingKey.hashes + CountingKey.compares) / ops,
            "lines": lines / ops, "ops": ops}


def eviction_costs(module: ModuleType, cls: str, setups: list[tuple[int, int]],
                   rounds: int = 15, batch: int = 100) -> list[float]:
    """For each (capacity, distinct use counts) setup, the nanoseconds one step takes (a get
    of a hot key, then a put of a new key that evicts), the best of ``rounds`` batches.

    A scan inside a builtin (min() over the buckets, the use counts or the timestamps, all
    ints) runs no line of cache.py and hashes no key: only its time shows it, growing with
    what it scans. So the setups differ in that alone, are timed in turn (a busy machine
    slows them alike; the best batch is the one nothing interrupted), with plain int keys and
    the garbage collector off. In every setup the victim comes from a bucket of one key (LFU:
    each new key has 1 use, every other key more) and the hot key is alone at its count."""
    caches = []
    for capacity, distinct in setups:
        cache = getattr(module, cls)(capacity)
        for key in range(capacity):
            cache.put(key, key)
        if cls == "LFUCache":
            for key in range(capacity):   # use counts 2 .. distinct + 1
                for _ in range(1 + key * distinct // capacity):
                    cache.get(key)
        caches.append((cache, capacity - 1))
    best = [float("inf")] * len(caches)
    fresh = 1 << 40
    clock = time.perf_counter_ns
    collecting = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for i, (cache, hot) in enumerate(caches):
                start = clock()
                for key in range(fresh, fresh + batch):
                    cache.get(hot)
                    cache.put(key, key)
                best[i] = min(best[i], (clock() - start) / batch)
                fresh += batch
    finally:
        if collecting:
            gc.enable()
    return best


def memory_kept_by_uses(module: ModuleType, cls: str, capacity: int,
                        steps: tuple[int, int], misses: bool = False) -> tuple[int, int]:
    """The bytes a cache of ``capacity`` keeps allocated after each of two numbers of steps
    (a get and an update of one hot key, then a put of a new key that evicts), measured
    with tracemalloc from before the cache was made. A cache bounded by its capacity keeps
    the same after 2,000 steps as after 40,000; one that keeps something per use (an empty
    LFU bucket per use count passed, a recency list never trimmed) keeps more and more.

    ``misses``: each step is a get of the hot key, then a get of a key never cached (a new
    one each time), then a put of a new key that evicts: a cache that keeps something per
    key it was asked for and did not have (a defaultdict looked up, a setdefault) grows."""
    tracemalloc.start()
    try:
        gc.collect()
        start = tracemalloc.get_traced_memory()[0]
        cache = getattr(module, cls)(capacity)
        hot, fresh, kept = 0, 1 << 40, []
        cache.put(hot, 0)
        done = 0
        for target in steps:
            while done < target:
                cache.get(hot)
                if misses:
                    cache.get(-1 - done)    # never cached
                else:
                    cache.put(hot, done)
                cache.put(fresh + done, done)
                done += 1
            gc.collect()
            kept.append(tracemalloc.get_traced_memory()[0] - start)
        del cache
        return kept[0], kept[1]
    finally:
        tracemalloc.stop()
