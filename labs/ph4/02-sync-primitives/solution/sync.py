"""Synchronization primitives built on threading.Condition: a readers-writer lock with
writer preference, a semaphore-based concurrency limiter, a bounded blocking queue."""

from __future__ import annotations

import threading
from collections import deque
from types import TracebackType
from typing import Any


class RWLock:
    """Many readers or one writer. Writer preference: once a writer waits, new readers wait
    behind it, so a steady stream of readers cannot starve writers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0          # readers inside
        self._writer = False       # a writer inside
        self._writers_waiting = 0

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            except BaseException:
                # A writer that gives up (interrupted: Ctrl-C, a deadline's exception) wakes
                # everyone: readers held back only because it waited may go in now (Java's
                # ReentrantReadWriteLock wakes the readers queued behind a cancelled writer).
                # They run once we let go of the lock, after the finally below.
                self._cond.notify_all()
                raise
            finally:
                self._writers_waiting -= 1
            self._writer = True

    def release_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()


class Limiter:
    """At most `limit` callers inside at once (`with limiter: ...`)."""

    def __init__(self, limit: int, timeout: float | None = None) -> None:
        self._sem = threading.BoundedSemaphore(limit)
        self._timeout = timeout

    def __enter__(self) -> Limiter:
        # A timed acquire must be checked: False means no permit - the caller must not go
        # in (and, raising here, its __exit__ never runs to release a permit it never took).
        if not self._sem.acquire(timeout=self._timeout):
            raise TimeoutError(f"no permit free within {self._timeout} s")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._sem.release()


class BoundedQueue:
    """FIFO with a capacity: put() blocks while full, get() blocks while empty."""

    def __init__(self, capacity: int) -> None:
        self._items: deque[Any] = deque()
        self._capacity = capacity
        self._cond = threading.Condition()

    def put(self, item: Any) -> None:
        with self._cond:
            while len(self._items) >= self._capacity:   # while, not if: re-check on wake-up
                self._cond.wait()
            self._items.append(item)
            self._cond.notify_all()

    def get(self) -> Any:
        with self._cond:
            while not self._items:
                self._cond.wait()
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)
