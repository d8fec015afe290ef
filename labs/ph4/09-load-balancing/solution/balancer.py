"""Load-balancing algorithms: round robin, smooth weighted round robin, least connections,
and a consistent-hash ring with virtual nodes."""

from __future__ import annotations

import bisect
import hashlib
import threading


class RoundRobin:
    """Each backend in turn: a, b, c, a, b, c, ..."""

    def __init__(self, backends: list[str]) -> None:
        self._backends = list(backends)
        self._next = 0
        self._lock = threading.Lock()

    def pick(self) -> str:
        with self._lock:
            backend = self._backends[self._next]
            self._next = (self._next + 1) % len(self._backends)
            return backend


class SmoothWeightedRoundRobin:
    """nginx's smooth weighted round robin: every pick adds each backend's weight to its
    current value, takes the largest (first listed on a tie) and subtracts the total from it.
    Weights 5, 1, 1 give a a b a c a a: the heavy backend's turns are spread out."""

    def __init__(self, weights: dict[str, int]) -> None:
        self._weights = dict(weights)
        self._current = {backend: 0 for backend in weights}
        self._total = sum(weights.values())
        self._lock = threading.Lock()

    def pick(self) -> str:
        with self._lock:
            best = None
            for backend, weight in self._weights.items():
                self._current[backend] += weight
                if best is None or self._current[backend] > self._current[best]:
                    best = backend
            assert best is not None
            self._current[best] -= self._total
            return best


class LeastConnections:
    """The backend with the fewest requests in flight (first listed on a tie)."""

    def __init__(self, backends: list[str]) -> None:
        self._active = {backend: 0 for backend in backends}
        self._lock = threading.Lock()

    def acquire(self) -> str:
        with self._lock:
            backend = min(self._active, key=self._active.__getitem__)
            self._active[backend] += 1
            return backend

    def release(self, backend: str) -> None:
        with self._lock:
            self._active[backend] -= 1

    def active(self) -> dict[str, int]:
        with self._lock:
            return dict(self._active)


def _point(label: str) -> int:
    """A position on the ring: the first 8 bytes of MD5, stable across processes."""
    return int.from_bytes(hashlib.md5(label.encode()).digest()[:8], "big")


class ConsistentHashRing:
    """Each node owns `vnodes` points on a ring of 2**64 positions; a key belongs to the
    first point clockwise from its own position (wrapping past the end)."""

    def __init__(self, nodes: list[str], vnodes: int = 160) -> None:
        self._vnodes = vnodes
        self._points: list[int] = []
        self._owner: dict[int, str] = {}
        for node in nodes:
            self.add(node)

    def add(self, node: str) -> None:
        for i in range(self._vnodes):
            point = _point(f"{node}#{i}")
            self._owner[point] = node
            bisect.insort(self._points, point)

    def remove(self, node: str) -> None:
        self._points = [p for p in self._points if self._owner[p] != node]
        self._owner = {p: n for p, n in self._owner.items() if n != node}

    def node_for(self, key: str) -> str:
        if not self._points:
            raise LookupError("the ring has no nodes")
        i = bisect.bisect_left(self._points, _point(key))
        return self._owner[self._points[i % len(self._points)]]

    def nodes_for(self, keys: list[str]) -> list[str]:
        return [self.node_for(key) for key in keys]
