"""O(1) in-process caches: LRU (hash map + doubly linked list) and LFU (frequency buckets)."""

from __future__ import annotations

from typing import Any


class _Node:
    __slots__ = ("key", "value", "prev", "next")

    def __init__(self, key: Any = None, value: Any = None) -> None:
        self.key, self.value = key, value
        self.prev: _Node = self
        self.next: _Node = self


class LRUCache:
    """Least recently used out first. The map finds a key's node; the list keeps recency:
    most recent right after the sentinel, least recent right before it."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._map: dict[Any, _Node] = {}
        self._head = _Node()  # sentinel: head.next is the most recent, head.prev the least

    def _unlink(self, node: _Node) -> None:
        node.prev.next, node.next.prev = node.next, node.prev

    def _push_front(self, node: _Node) -> None:
        node.prev, node.next = self._head, self._head.next
        self._head.next.prev = node
        self._head.next = node

    def get(self, key: Any) -> Any:
        node = self._map.get(key)
        if node is None:
            return None
        self._unlink(node)
        self._push_front(node)
        return node.value

    def put(self, key: Any, value: Any) -> None:
        if self.capacity <= 0:
            return
        node = self._map.get(key)
        if node is not None:
            node.value = value
            self._unlink(node)
            self._push_front(node)
            return
        if len(self._map) >= self.capacity:
            lru = self._head.prev
            self._unlink(lru)
            del self._map[lru.key]
        node = _Node(key, value)
        self._map[key] = node
        self._push_front(node)

    def __len__(self) -> int:
        return len(self._map)


class LFUCache:
    """Least frequently used out first; among equally frequent keys, the least recently
    used. Every get and put of a key counts as a use. Buckets map a frequency to its keys in
    the order they reached it (a dict keeps insertion order), and min_freq names the bucket
    to evict from."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._values: dict[Any, Any] = {}
        self._freq: dict[Any, int] = {}
        self._buckets: dict[int, dict[Any, None]] = {}
        self._min_freq = 0

    def _touch(self, key: Any) -> None:
        f = self._freq[key]
        bucket = self._buckets[f]
        del bucket[key]
        if not bucket:
            del self._buckets[f]
            if self._min_freq == f:
                self._min_freq = f + 1
        self._freq[key] = f + 1
        self._buckets.setdefault(f + 1, {})[key] = None

    def get(self, key: Any) -> Any:
        if key not in self._values:
            return None
        self._touch(key)
        return self._values[key]

    def put(self, key: Any, value: Any) -> None:
        if self.capacity <= 0:
            return
        if key in self._values:
            self._values[key] = value
            self._touch(key)
            return
        if len(self._values) >= self.capacity:
            bucket = self._buckets[self._min_freq]
            victim = next(iter(bucket))
            del bucket[victim]
            if not bucket:
                del self._buckets[self._min_freq]
            del self._values[victim], self._freq[victim]
        self._values[key] = value
        self._freq[key] = 1
        self._buckets.setdefault(1, {})[key] = None
        self._min_freq = 1

    def __len__(self) -> int:
        return len(self._values)
