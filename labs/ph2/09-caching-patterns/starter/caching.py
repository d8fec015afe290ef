"""Four caching patterns over one Postgres table and one Redis.

The table (the test creates it):  products(id int primary key, name text, price_cents int)
The cache entry for a product:     key product:<id>, value JSON {"id", "name", "price_cents"}

See README.md for what each class must do.
"""

from __future__ import annotations

import json  # noqa: F401 - you will need it
import threading  # noqa: F401 - for the write-behind worker
from collections.abc import Callable
from typing import Any

import psycopg  # noqa: F401
import redis  # noqa: F401

Product = dict[str, Any]


class CacheAside:
    def __init__(self, dsn: str, redis_url: str, ttl_seconds: int = 300) -> None:
        self.dsn, self.redis_url, self.ttl = dsn, redis_url, ttl_seconds

    def get_product(self, product_id: int) -> Product | None:
        raise NotImplementedError("CacheAside.get_product: cache first, then the database")

    def update_price(self, product_id: int, price_cents: int) -> None:
        raise NotImplementedError("CacheAside.update_price: database, then invalidate")

    def close(self) -> None:
        pass


class ReadThrough:
    def __init__(self, redis_url: str, loader: Callable[[int], Product | None],
                 ttl_seconds: int = 300) -> None:
        self.redis_url, self.loader, self.ttl = redis_url, loader, ttl_seconds

    def get(self, product_id: int) -> Product | None:
        raise NotImplementedError("ReadThrough.get: the cache calls the loader on a miss")

    def close(self) -> None:
        pass


class WriteThrough:
    def __init__(self, dsn: str, redis_url: str, ttl_seconds: int = 300) -> None:
        self.dsn, self.redis_url, self.ttl = dsn, redis_url, ttl_seconds

    def get_product(self, product_id: int) -> Product | None:
        raise NotImplementedError("WriteThrough.get_product")

    def update_price(self, product_id: int, price_cents: int) -> None:
        raise NotImplementedError("WriteThrough.update_price: database and cache, now")

    def close(self) -> None:
        pass


class WriteBehind:
    def __init__(self, dsn: str, redis_url: str) -> None:
        self.dsn, self.redis_url = dsn, redis_url

    def get_product(self, product_id: int) -> Product | None:
        raise NotImplementedError("WriteBehind.get_product")

    def update_price(self, product_id: int, price_cents: int) -> None:
        raise NotImplementedError("WriteBehind.update_price: cache now, database later")

    def start(self) -> None:
        raise NotImplementedError("WriteBehind.start: the worker that writes to the database")

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass
