"""Load-balancing algorithms: round robin, smooth weighted round robin, least connections,
and a consistent-hash ring with virtual nodes. See README.md for what each must do."""

from __future__ import annotations


class RoundRobin:
    def __init__(self, backends: list[str]) -> None:
        self._backends = list(backends)

    def pick(self) -> str:
        raise NotImplementedError("RoundRobin.pick: each backend in turn")


class SmoothWeightedRoundRobin:
    def __init__(self, weights: dict[str, int]) -> None:
        self._weights = dict(weights)

    def pick(self) -> str:
        raise NotImplementedError("SmoothWeightedRoundRobin.pick: nginx's smooth algorithm")


class LeastConnections:
    def __init__(self, backends: list[str]) -> None:
        self._backends = list(backends)

    def acquire(self) -> str:
        raise NotImplementedError("LeastConnections.acquire: fewest requests in flight")

    def release(self, backend: str) -> None:
        raise NotImplementedError("LeastConnections.release")

    def active(self) -> dict[str, int]:
        raise NotImplementedError("LeastConnections.active: requests in flight per backend")


class ConsistentHashRing:
    def __init__(self, nodes: list[str], vnodes: int = 160) -> None:
        self._nodes = list(nodes)

    def add(self, node: str) -> None:
        raise NotImplementedError("ConsistentHashRing.add")

    def remove(self, node: str) -> None:
        raise NotImplementedError("ConsistentHashRing.remove")

    def node_for(self, key: str) -> str:
        raise NotImplementedError("ConsistentHashRing.node_for")

    def nodes_for(self, keys: list[str]) -> list[str]:
        return [self.node_for(key) for key in keys]
