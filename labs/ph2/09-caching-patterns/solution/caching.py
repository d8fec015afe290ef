"""Four caching patterns over one Postgres table and one Redis.

The table (created by the test):  products(id int primary key, name text, price_cents int)
The cache entry for a product:     key product:<id>, value JSON {"id", "name", "price_cents"}

* cache-aside   the application reads the cache, on a miss reads the DB and fills the cache;
                on a write it updates the DB, then deletes the cache entry.
* read-through  the cache object owns the loading: the application only ever asks the cache.
* write-through a write goes to the DB and to the cache in the same call.
* write-behind  a write goes to the cache and to a queue in Redis; a background worker
                writes the queue to the DB later.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import redis

Product = dict[str, Any]
RETRY_FIRST_S, RETRY_MAX_S = 0.1, 2.0   # the write-behind worker's pauses before a reconnect
log = logging.getLogger(__name__)


def cache_key(product_id: int) -> str:
    return f"product:{product_id}"


class _Store:
    """What every pattern that talks to Postgres and Redis shares."""

    def __init__(self, dsn: str, redis_url: str, ttl_seconds: int) -> None:
        # autocommit: a read is not left as an open transaction holding a snapshot
        self.dsn = dsn
        self.db = psycopg.connect(dsn, autocommit=True)
        self.r = redis.Redis.from_url(redis_url, decode_responses=True)
        self.ttl = ttl_seconds

    def _load(self, product_id: int) -> Product | None:
        row = self.db.execute("SELECT id, name, price_cents FROM products WHERE id = %s",
                              (product_id,)).fetchone()
        return None if row is None else {"id": row[0], "name": row[1], "price_cents": row[2]}

    def _cached(self, product_id: int) -> Product | None:
        raw = self.r.get(cache_key(product_id))
        return None if raw is None else dict(json.loads(raw))

    def _fill(self, product: Product) -> None:
        # SET ... EX in one command: an entry never exists without its expiry
        self.r.set(cache_key(product["id"]), json.dumps(product), ex=self.ttl)

    def _add(self, product: Product) -> None:
        # A read's fill after a miss, where every write SETs the entry (write-through,
        # write-behind): only if absent (NX, memcached's `add`). A read that read the row
        # before a write must not put the old row over the one the write set meanwhile.
        self.r.set(cache_key(product["id"]), json.dumps(product), ex=self.ttl or None,
                   nx=True)

    def close(self) -> None:
        self.db.close()
        self.r.close()


class CacheAside(_Store):
    # A miss fills the cache only if no write invalidated the product since the miss: the
    # reader takes a lease (a token in product:<id>:lease) before it reads the database,
    # and a writer's invalidation deletes the lease with the entry. Without it a read that
    # read the row just before a write committed puts the old row back after the write's
    # delete, for a whole TTL ("stale sets"; memcache's leases: Nishtala et al., Scaling
    # Memcache at Facebook, NSDI 2013, 3.2.1).
    LEASE_MS = 10_000
    # the lease's check and the fill in one step: between two commands a write could land
    FILL = """
    if redis.call('GET', KEYS[2]) == ARGV[1] then
        redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
        redis.call('DEL', KEYS[2])
    end"""

    def __init__(self, dsn: str, redis_url: str, ttl_seconds: int = 300) -> None:
        super().__init__(dsn, redis_url, ttl_seconds)
        self._fill_if_leased = self.r.register_script(self.FILL)

    def get_product(self, product_id: int) -> Product | None:
        cached = self._cached(product_id)
        if cached is not None:
            return cached  # hit: the DB is not touched
        key, lease = cache_key(product_id), f"{cache_key(product_id)}:lease"
        token = uuid.uuid4().hex
        # NX: a reader already filling keeps its lease; this one then just reads
        leased = self.r.set(lease, token, nx=True, px=self.LEASE_MS)
        product = self._load(product_id)
        if product is not None and leased:
            self._fill_if_leased(keys=[key, lease], args=[token, json.dumps(product), self.ttl])
        return product

    def update_price(self, product_id: int, price_cents: int) -> None:
        # DB first, then delete the entry (not overwrite it): the next reader loads the
        # committed value. Deleting before the write would let a concurrent reader put
        # the old value back in between. The lease goes too: a read that missed before
        # this write must not fill the cache with what it read.
        self.db.execute("UPDATE products SET price_cents = %s WHERE id = %s",
                        (price_cents, product_id))
        self.r.delete(cache_key(product_id), f"{cache_key(product_id)}:lease")


class ReadThrough:
    """The cache is the only thing the application talks to; it calls `loader` on a miss."""

    def __init__(self, redis_url: str, loader: Callable[[int], Product | None],
                 ttl_seconds: int = 300) -> None:
        self.r = redis.Redis.from_url(redis_url, decode_responses=True)
        self.loader = loader
        self.ttl = ttl_seconds

    def get(self, product_id: int) -> Product | None:
        raw = self.r.get(cache_key(product_id))
        if raw is not None:
            return dict(json.loads(raw))
        product = self.loader(product_id)
        if product is not None:
            self.r.set(cache_key(product_id), json.dumps(product), ex=self.ttl)
        return product

    def close(self) -> None:
        self.r.close()


class WriteThrough(_Store):
    def __init__(self, dsn: str, redis_url: str, ttl_seconds: int = 300) -> None:
        super().__init__(dsn, redis_url, ttl_seconds)

    def get_product(self, product_id: int) -> Product | None:
        cached = self._cached(product_id)
        if cached is not None:
            return cached
        product = self._load(product_id)
        if product is not None:
            self._add(product)
        return product

    def update_price(self, product_id: int, price_cents: int) -> None:
        # The DB is the system of record: write it first and take the row it now holds
        # (RETURNING) as the value to cache, so the cache never holds what the DB refused.
        row = self.db.execute(
            "UPDATE products SET price_cents = %s WHERE id = %s RETURNING id, name, price_cents",
            (price_cents, product_id)).fetchone()
        if row is None:
            raise KeyError(product_id)
        self._fill({"id": row[0], "name": row[1], "price_cents": row[2]})


class WriteBehind(_Store):
    """Writes land in Redis at once; a worker thread copies them to Postgres later.

    The queue of pending writes lives in Redis, not in this process: if the process dies
    before the worker ran, the next process's worker still finds them. The worker moves an
    entry to a processing list while it writes it (LMOVE), and removes it only after the
    DB commit, so a crash in between leaves the entry to be retried, not lost. A lost
    database connection does not end the worker: it reconnects and writes the change it
    holds again before taking the next one. A change the database refuses goes to a
    dead-letter list, and the worker goes on. One worker runs per queue (start() on one
    instance at a time): two would apply one product's writes in whatever order they
    finish, and a starting one would take back the other's change in flight."""

    QUEUE = "write-behind:queue"
    PROCESSING = "write-behind:processing"
    DEAD = "write-behind:dead"     # changes the database refused, kept for a human

    def __init__(self, dsn: str, redis_url: str) -> None:
        # No TTL: until the worker has written it, the cache holds the only copy of a write.
        super().__init__(dsn, redis_url, ttl_seconds=0)
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    def get_product(self, product_id: int) -> Product | None:
        cached = self._cached(product_id)
        if cached is not None:
            return cached
        product = self._load(product_id)
        if product is not None:
            self._add(product)   # no TTL here (ttl 0): see __init__
        return product

    def update_price(self, product_id: int, price_cents: int) -> None:
        current = self.get_product(product_id)
        if current is None:
            raise KeyError(product_id)
        current["price_cents"] = price_cents
        change = json.dumps({"id": product_id, "price_cents": price_cents})
        # cache entry and queued change together, in one MULTI/EXEC
        pipe = self.r.pipeline(transaction=True)
        pipe.set(cache_key(product_id), json.dumps(current))
        pipe.lpush(self.QUEUE, change)
        pipe.execute()

    def start(self) -> None:
        """Start the background worker that writes queued changes to the DB."""
        self._stop.clear()
        self._worker = threading.Thread(target=self._run, name="write-behind", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout=5)
            self._worker = None

    def _run(self) -> None:
        # The worker has its own connections: psycopg and redis-py connections are not
        # for sharing between threads mid-command.
        r = redis.Redis(connection_pool=self.r.connection_pool)
        db: psycopg.Connection[Any] | None = None
        held: str | None = None             # the change taken, not yet written
        pause = RETRY_FIRST_S
        try:
            # leftovers of a worker that died mid-write come first: each goes back to the
            # oldest end of the queue, the last one moved (the oldest) outermost
            while r.lmove(self.PROCESSING, self.QUEUE, "LEFT", "RIGHT") is not None:
                pass
            while not self._stop.is_set():
                if held is None:
                    # oldest change first; block briefly so stop() is noticed quickly
                    raw = r.blmove(self.QUEUE, self.PROCESSING, 0.2, "RIGHT", "LEFT")
                    if raw is None:
                        continue
                    held = str(raw)
                change = json.loads(held)
                try:
                    if db is None:
                        db = psycopg.connect(self.dsn, autocommit=True)
                    db.execute("UPDATE products SET price_cents = %s WHERE id = %s",
                               (change["price_cents"], change["id"]))
                except psycopg.OperationalError:
                    # The connection is gone (its session killed, a restart, a failover):
                    # keep the change held, reconnect after a pause (growing, capped) and
                    # write it again before any other, as a queue consumer retries the
                    # message it holds. Setting a price twice leaves the same price, so a
                    # write that committed just before the connection broke does no harm.
                    if db is not None:
                        db.close()
                    db = None
                    self._stop.wait(pause)
                    pause = min(pause * 2, RETRY_MAX_S)
                    continue
                except psycopg.Error as exc:
                    # The database refused this change (a constraint, a value out of
                    # range): writing it again would fail again, and the changes queued
                    # behind it would wait for ever. Keep it aside with the error (a dead
                    # letter, as a queue consumer does with a poison message), say so, and
                    # go on with the next.
                    log.error("write-behind: the database refused %s: %s", held, exc)
                    pipe = r.pipeline(transaction=True)
                    pipe.lpush(self.DEAD, json.dumps({"change": change, "error": str(exc)}))
                    pipe.lrem(self.PROCESSING, 1, held)
                    pipe.execute()
                    held = None
                    continue
                pause = RETRY_FIRST_S
                r.lrem(self.PROCESSING, 1, held)
                held = None
        finally:
            if db is not None:
                db.close()

    def close(self) -> None:
        self.stop()
        super().close()
