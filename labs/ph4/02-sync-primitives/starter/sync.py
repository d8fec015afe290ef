"""Synchronization primitives built on threading.Condition: a readers-writer lock with
writer preference, a semaphore-based concurrency limiter, a bounded blocking queue.
See README.md."""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Any


class RWLock:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # TODO: one lock for everyone - readers exclude each other

    def acquire_read(self) -> None:
        self._lock.acquire()

    def release_read(self) -> None:
        self._lock.release()

    def acquire_write(self) -> None:
        self._lock.acquire()

    def release_write(self) -> None:
        self._lock.release()


class Limiter:
    def __init__(self, limit: int, timeout: float | None = None) -> None:
        self.limit = limit
        self.timeout = timeout

    def __enter__(self) -> Limiter:
        raise NotImplementedError("Limiter: at most `limit` callers inside at once")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        pass


class BoundedQueue:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity

    def put(self, item: Any) -> None:
        raise NotImplementedError("BoundedQueue.put: block while full")

    def get(self) -> Any:
        raise NotImplementedError("BoundedQueue.get: block while empty")

    def __len__(self) -> int:
        raise NotImplementedError
