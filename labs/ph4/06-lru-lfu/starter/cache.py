"""O(1) in-process caches: LRU (hash map + doubly linked list) and LFU (frequency buckets).
No collections.OrderedDict, no functools.lru_cache: build the structures yourself."""

from __future__ import annotations

from typing import Any


class LRUCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity

    def get(self, key: Any) -> Any:
        raise NotImplementedError("LRUCache.get: the value, or None; marks the key as used")

    def put(self, key: Any, value: Any) -> None:
        raise NotImplementedError("LRUCache.put: evict the least recently used when full")

    def __len__(self) -> int:
        raise NotImplementedError("LRUCache.__len__")


class LFUCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity

    def get(self, key: Any) -> Any:
        raise NotImplementedError("LFUCache.get: the value, or None; counts as a use")

    def put(self, key: Any, value: Any) -> None:
        raise NotImplementedError("LFUCache.put: evict the least frequently used when full")

    def __len__(self) -> int:
        raise NotImplementedError("LFUCache.__len__")
