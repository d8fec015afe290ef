"""ph2.9 verification: four caching patterns, with the DB queries counted on the wire.

"A hit skips the DB" is not taken on the learner's word: the learner's code gets a DSN that
points at a small TCP proxy in front of the real Postgres, which reads the frontend
protocol as it passes and records every statement executed (a simple Query, or the
prepared statement a Bind executes). A statement is recorded before its bytes are
forwarded, so by the time the learner's call has its answer the count is final.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import psycopg
import pytest

from labrunner.testing import (
    PgStatementProxy,
    RelayLink,
    TcpRelay,
    came_true,
    redis_commands,
    redis_gate,
    resp_command,
)

PRODUCTS = [(1, "Espresso cup", 900), (2, "Teapot", 3500), (3, "Kettle", 4900),
            (4, "Mug", 1200), (5, "Saucer", 400)]
READS = r"^\s*(with\b.*)?select\b.*\bproducts\b"
WRITES = r"^\s*(with\b.*)?(update|insert|delete|merge)\b.*\bproducts\b"


@dataclass
class Shop:
    """The test's products table, the learner's (proxied) DSN, Redis, and the counters."""

    dsn: str
    redis_url: str
    wire: PgStatementProxy
    direct: Any  # the test's own connection, not proxied, not counted
    redis: Any
    module: ModuleType
    opened: list[Any] = field(default_factory=list)

    def reads(self) -> int:
        return self.wire.count(READS)

    def writes(self) -> int:
        return self.wire.count(WRITES)

    def db_price(self, product_id: int) -> int:
        (price,) = self.direct.execute("SELECT price_cents FROM products WHERE id = %s",
                                       (product_id,)).fetchone()
        return int(price)

    def cached(self, product_id: int) -> dict[str, Any] | None:
        raw = self.redis.get(f"product:{product_id}")
        return None if raw is None else dict(json.loads(raw))

    def make(self, name: str, *args: Any, **kwargs: Any) -> Any:
        cls = getattr(self.module, name, None)
        if not isinstance(cls, type):
            pytest.fail(f"caching.py: define a class {name} (see the README)", pytrace=False)
        instance = cls(*args, **kwargs)
        self.opened.append(instance)
        return instance


@pytest.fixture
def shop(learner: Any, postgres: Any, redis_db: Any) -> Iterator[Shop]:
    direct = postgres.connect(autocommit=True)
    direct.execute("CREATE TABLE products (id integer PRIMARY KEY, name text NOT NULL, "
                   "price_cents integer NOT NULL)")
    with direct.cursor() as cur:
        cur.executemany("INSERT INTO products VALUES (%s, %s, %s)", PRODUCTS)
    # Each Bind is one execution; a simple Query is counted as one statement, as sent.
    wire = PgStatementProxy.for_dsn(postgres.dsn, count_on="bind", split=False, ignore=None)
    # sslmode=disable: the proxy reads the protocol, so it must not be encrypted
    dsn = wire.dsn_for(postgres.dsn)
    client = redis_db.client(decode_responses=True)
    state = Shop(dsn, redis_db.url, wire, direct, client, learner.load("caching"))
    yield state
    # Cleanup, not a check: each instance is stopped and closed on a thread of its own, and
    # the test waits for that only a little - a worker blocked for ever in Redis (tests that
    # pass before the one that names that mistake) keeps a stop() that joins it waiting
    # for its whole join timeout, for nothing decided here.
    closers = [threading.Thread(target=close_quietly, args=(instance,), daemon=True)
               for instance in state.opened]
    for closer in closers:
        closer.start()
    deadline = time.monotonic() + CLEANUP_S
    for closer in closers:
        closer.join(max(0.0, deadline - time.monotonic()))
    wire.close()
    client.close()
    direct.close()


CLEANUP_S = 2.0  # how long a test's end waits for the learner's instances to stop


def close_quietly(instance: Any) -> None:
    for method in ("stop", "close"):
        if callable(getattr(instance, method, None)):
            try:
                getattr(instance, method)()
            except Exception:  # noqa: BLE001 - cleanup of learner objects
                pass


def row(product_id: int) -> dict[str, Any]:
    pid, name, price = PRODUCTS[product_id - 1]
    return {"id": pid, "name": name, "price_cents": price}


def delta(counter: Callable[[], int], action: Callable[[], Any]) -> tuple[Any, int]:
    before = counter()
    result = action()
    return result, counter() - before


def assert_ttl(shop: Shop, product_id: int, ttl: int, pattern: str) -> None:
    key = f"product:{product_id}"
    left = shop.redis.pttl(key)
    assert left != -2, (
        f"{pattern}: no Redis key {key} after reading product {product_id}: "
        "the cache entry must be product:<id> holding the product as JSON")
    assert left != -1, (
        f"{pattern}: {key} has no TTL, expected 1..{ttl} seconds: without an expiry an entry "
        "the invalidation missed stays wrong forever (SET key value EX ttl)")
    assert left <= ttl * 1000, (
        f"{pattern}: {key} expires in {left / 1000:.1f} s, expected at most ttl_seconds="
        f"{ttl}: the TTL bounds how long an entry the invalidation missed stays wrong")
    # Jitter (a TTL drawn a little short, so entries written together do not expire
    # together) is fine; a thousandth of it is a unit mistake.
    assert left >= ttl * 500, (
        f"{pattern}: {key} expires in {left / 1000:.1f} s, expected about ttl_seconds={ttl} "
        f"s: the TTL was given in the wrong unit - EX, setex() and expire() take seconds; "
        f"PX, psetex() and pexpire() milliseconds - so the entry lives a thousandth of its "
        f"TTL, nearly every read misses and the database takes the load the cache was "
        "meant to take")


# --------------------------------------------------------------------------------------


def test_cache_aside_hit_skips_the_database(shop: Shop) -> None:
    app = shop.make("CacheAside", shop.dsn, shop.redis_url, ttl_seconds=86400)
    got, reads = delta(shop.reads, lambda: app.get_product(1))
    assert got == row(1), f"get_product(1) returned {got!r}, expected {row(1)!r}"
    assert reads == 1, (
        f"the first get_product(1) ran {reads} SELECTs on products, expected 1 (a miss "
        "reads the database once)")
    assert shop.cached(1) == row(1), (
        f"after a miss, Redis product:1 holds {shop.cached(1)!r}, expected the row as JSON")
    assert_ttl(shop, 1, 86400, "cache-aside")
    for _ in range(3):
        got, reads = delta(shop.reads, lambda: app.get_product(1))
        assert got == row(1) and reads == 0, (
            f"a repeated get_product(1) ran {reads} SELECTs on products, expected 0: a cache "
            f"hit must not touch the database (returned {got!r})")
    assert app.get_product(999) is None, "get_product(999) must return None (no such row)"


def test_cache_aside_no_stale_read_after_write(shop: Shop) -> None:
    writer = shop.make("CacheAside", shop.dsn, shop.redis_url, ttl_seconds=300)
    other = shop.make("CacheAside", shop.dsn, shop.redis_url, ttl_seconds=300)  # 2nd server
    assert writer.get_product(2) == row(2) and other.get_product(2) == row(2)
    writer.update_price(2, 3333)
    assert shop.db_price(2) == 3333, (
        f"after update_price(2, 3333) the database holds {shop.db_price(2)}: cache-aside "
        "writes go to the database")
    for who, app in (("the writing instance", writer), ("another instance", other)):
        got = app.get_product(2)
        assert got is not None and got["price_cents"] == 3333, (
            f"after update_price(2, 3333), {who} read price {got and got['price_cents']}: a "
            "stale cache entry. Delete product:2 from Redis after the database write")


def test_cache_aside_invalidates_after_the_write_not_before(shop: Shop, postgres: Any) -> None:
    """The race delete-then-write loses: the test holds product 2's row lock, so the
    writer's UPDATE waits; meanwhile another server reads product 2. If the cache entry was
    already deleted, that read misses, reads the old row (the UPDATE is not committed) and
    puts it back in the cache - where it stays after the write. Deleting AFTER the write
    leaves nothing stale."""
    writer = shop.make("CacheAside", shop.dsn, shop.redis_url, ttl_seconds=300)
    other = shop.make("CacheAside", shop.dsn, shop.redis_url, ttl_seconds=300)
    assert other.get_product(2) == row(2)  # product:2 is cached
    shop.direct.execute("BEGIN")
    shop.direct.execute("SELECT 1 FROM products WHERE id = 2 FOR UPDATE")
    done: list[BaseException | None] = []

    def write() -> None:
        try:
            writer.update_price(2, 3333)
            done.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            done.append(exc)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        with postgres.connect(autocommit=True) as watch:
            deadline = time.monotonic() + 15
            while not done and time.monotonic() < deadline:
                (waiting,) = watch.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'").fetchone()
                if waiting:
                    break
                time.sleep(0.01)
            else:
                if not done:
                    pytest.fail("update_price(2, ...) never reached the database's row lock "
                                "within 15 s", pytrace=False)
        # the writer's UPDATE is waiting; another server reads product 2 now
        during = other.get_product(2)
    finally:
        shop.direct.execute("COMMIT")
        thread.join(15)
    assert done and done[0] is None, f"update_price(2, 3333) failed: {done and done[0]!r}"
    after = other.get_product(2)
    assert after is not None and after["price_cents"] == 3333, (
        f"after update_price(2, 3333) returned, another server reads price "
        f"{after and after['price_cents']} (cache: {shop.cached(2)}): product:2 was deleted "
        f"BEFORE the database write, so a read in between ({during and during['price_cents']}"
        f" then) refilled the cache with the old row - write the database first, then delete "
        f"the cache entry")


COMMIT = re.compile(r"^\s*(COMMIT|END)\b", re.IGNORECASE)


class CommitGate(PgStatementProxy):
    """A statement proxy that runs ``at_commit`` once, in the thread of the connection that
    sends COMMIT (or END), before the server gets it: that connection's transaction is still
    open, and everything it did before (its UPDATE, a Redis DEL) has happened."""

    at_commit: Callable[[], None] | None = None

    def before_forwarding(self, link: Any, sql: str) -> None:
        if self.at_commit is not None and COMMIT.match(sql):
            run, self.at_commit = self.at_commit, None
            run()


@pytest.fixture
def commit_gate(postgres: Any) -> Iterator[CommitGate]:
    gate = CommitGate.for_dsn(postgres.dsn, count_on="bind", split=False, ignore=None)
    yield gate
    gate.close()


def test_cache_aside_invalidates_after_the_commit(shop: Shop, commit_gate: CommitGate,
                                                  postgres: Any) -> None:
    """The same race one step later: a writer that deletes product:2 inside its transaction
    (a connection that is not in autocommit, a `with conn.transaction():` block) has deleted
    it before anyone else can see its UPDATE. The writer's COMMIT is held at the wire while
    another server reads product 2: it misses, reads the committed row - the OLD price - and
    caches it, where it stays after the commit. The entry must be deleted after the COMMIT."""
    writer = shop.make("CacheAside", commit_gate.dsn_for(postgres.dsn), shop.redis_url,
                       ttl_seconds=300)
    other = shop.make("CacheAside", shop.dsn, shop.redis_url, ttl_seconds=300)
    assert other.get_product(2) == row(2)  # product:2 is cached
    during: dict[str, Any] = {}

    def read_meanwhile() -> None:  # the writer has sent COMMIT; the server has not got it
        during["cached"] = shop.cached(2)
        try:
            during["read"] = other.get_product(2)
        except Exception as exc:  # noqa: BLE001 - reported below
            during["read"] = exc

    commit_gate.at_commit = read_meanwhile
    writer.update_price(2, 3333)
    commit_gate.at_commit = None
    assert shop.db_price(2) == 3333, (
        f"after update_price(2, 3333) the database holds {shop.db_price(2)}")
    after = other.get_product(2)
    read = during.get("read")
    assert after is not None and after["price_cents"] == 3333, (
        f"after update_price(2, 3333) returned, another server reads price "
        f"{after and after['price_cents']} (cache: {shop.cached(2)}): product:2 was deleted "
        f"INSIDE the writer's transaction, before its COMMIT. While the COMMIT was on its way "
        f"(held by the test) the entry was {'gone' if during.get('cached') is None else 'there'}"
        f" and another server's read got "
        f"{read['price_cents'] if isinstance(read, dict) else read!r}: it missed, read the "
        f"committed row - still the old price - and cached it, where it stays for the whole "
        f"TTL\nOther servers see a write only once it is committed: delete the cache entry "
        f"AFTER the commit (an autocommit connection, or commit() before the delete).")


FILL_STEPS = 20   # more Redis commands than any read sends between its SELECT and its end


@dataclass(frozen=True)
class StaleFill:
    """One read path that fills the cache after a miss, and what its pattern's write does
    to the entry: the race its fill must not lose, and the cure the message names."""

    pattern: str
    build: Callable[[Shop, str], Any]
    write_does: str
    cure: str


LEASE_CURE = (
    "A fill must not land after a write it did not see (a plain SET or SET NX both do: the "
    "write deleted the entry). Take a lease before reading the database (a token, SET "
    "product:<id>:lease NX PX), have a write delete it with the entry, and fill only if the "
    "lease is still yours - checked and set in ONE step (a Lua script, or WATCH/MULTI): "
    "memcache's leases (Scaling Memcache at Facebook, 3.2.1).")
# In write-through and write-behind a write SETs the entry: a fill only has to never
# overwrite one - memcached's `add` (SET ... NX), or the same lease as cache-aside.
ADD_CURE = (
    "Here a write SETs the entry with the new row, so a fill must never overwrite an entry "
    "that is there: fill with SET ... NX (memcached's `add`: only if absent), checked and "
    "set in ONE command - or a lease as in cache-aside. A plain SET, or an EXISTS/GET and "
    "then a SET, puts the row read before the write over the write's.")
STALE_FILLS = [
    StaleFill("CacheAside", lambda shop, url: shop.make("CacheAside", shop.dsn, url,
                                                        ttl_seconds=300),
              "committed and deleted product:2", LEASE_CURE),
    StaleFill("WriteThrough", lambda shop, url: shop.make("WriteThrough", shop.dsn, url,
                                                          ttl_seconds=300),
              "committed and set product:2 to the new row", ADD_CURE),
    # no TTL on write-behind's entries: an old row put back stays until the next write
    StaleFill("WriteBehind", lambda shop, url: shop.make("WriteBehind", shop.dsn, url),
              "set product:2 to the new row (its change queued for the database)", ADD_CURE),
]


@pytest.mark.parametrize("case", STALE_FILLS, ids=[c.pattern for c in STALE_FILLS])
def test_a_read_that_missed_before_a_write_never_caches_the_old_row(
        shop: Shop, case: StaleFill) -> None:
    """The race a read's fill loses ("stale set"): a read misses and reads the row; before
    it fills the cache, another server's write lands (cache-aside: commits and deletes the
    entry; write-through and write-behind: sets it to the new row) - then the read's fill
    puts back the row it read, the OLD one (for a whole TTL; write-behind's entries have
    none: until the next write). Driven step by step: the reader's Redis goes through a gate
    that runs the writer's whole update_price just before the reader's k-th Redis command
    after its SELECT, for k = 1, 2, ... until the read ends in fewer commands: a fill that
    checks and sets in two commands is caught between them."""
    pattern = case.pattern
    writer = case.build(shop, shop.redis_url)
    other = case.build(shop, shop.redis_url)
    step: dict[str, Any] = {}

    def before(command: list[bytes]) -> None:
        if "k" not in step or "wrote" in step or shop.reads() == step["reads"]:
            return   # not armed, done, or the read has not read the row yet
        step["after"] += 1
        if step["after"] == step["k"]:
            step["wrote"] = " ".join(c.decode(errors="replace") for c in command[:2])
            writer.update_price(2, step["price"])

    with redis_gate(shop.redis_url, before) as url:
        reader = case.build(shop, url)
        for k in range(1, FILL_STEPS + 1):
            for key in shop.redis.scan_iter("product:2*"):   # the entry (and any lease)
                shop.redis.delete(key)
            old, price = shop.db_price(2), 5000 + k
            step.clear()
            step.update(k=k, price=price, after=0, reads=shop.reads())
            got = reader.get_product(2)
            wrote = step.pop("wrote", None)
            step.clear()
            if wrote is None:
                break   # the read sent fewer than k commands after its SELECT: all tried
            cached, left = shop.cached(2), shop.redis.ttl("product:2")
            after = other.get_product(2)
            assert (cached is None or cached.get("price_cents") == price) and \
                after is not None and after["price_cents"] == price, (
                f"{pattern}: a read of product 2 missed and read the row (price {old}, "
                f"returned {got and got['price_cents']}); then, just before its Redis command "
                f"no. {k} after that SELECT ({wrote}), another server's update_price(2, "
                f"{price}) {case.write_does}. The read went on and cached the row it had "
                f"read: product:2 now holds price {cached and cached.get('price_cents')} "
                f"({'no TTL' if left == -1 else f'TTL {left} s'}) where the write put "
                f"{price}, and another server reads {after and after['price_cents']} - every "
                f"reader gets the old price until "
                f"{'the TTL runs out' if left != -1 else 'the next write'}.\n{case.cure}")
        else:
            pytest.fail(f"{pattern}: get_product(2) sent more than {FILL_STEPS} Redis "
                        "commands after its SELECT", pytrace=False)


class HeldAfterSelect:
    """A read held just before its first Redis command after its SELECT (its fill), on a
    thread of its own, until released - the reader another server runs meanwhile."""

    def __init__(self, shop: Shop) -> None:
        self.shop, self.reads = shop, -1
        self.held, self.release = threading.Event(), threading.Event()
        self.result: list[Any] = []

    def before(self, command: list[bytes]) -> None:
        if self.reads >= 0 and not self.held.is_set() and self.shop.reads() > self.reads:
            self.held.set()
            self.release.wait(15)

    def run(self, app: Any) -> threading.Thread:
        self.reads = self.shop.reads()

        def read() -> None:
            try:
                self.result.append(app.get_product(2))
            finally:
                self.held.set()   # a read that sends nothing after its SELECT: done
        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        return thread


def under_anothers_lease(k: int, wrote: str, old: int, got: Any, price: int,
                         hold: HeldAfterSelect, cached: Any, left: int, after: Any) -> str:
    return (
        f"CacheAside: read A of product 2 missed and read the row (price {old}, "
        f"returned {got and got['price_cents']}); just before A's Redis command no. "
        f"{k} after that SELECT ({wrote}), another server's update_price(2, {price}) "
        f"committed and invalidated, and a third server's read B missed, took its "
        f"lease and read the new row (held before its fill, returned "
        f"{hold.result[0]['price_cents'] if hold.result and hold.result[0] else None}"
        f"). A's fill went on under B's lease: product:2 now holds price "
        f"{cached and cached.get('price_cents')} (TTL {left} s) where the write put "
        f"{price}, and another server reads {after and after['price_cents']}.\nA "
        f"lease is one read's: its token must be unique to that read (uuid4, "
        f"secrets.token_hex), and the fill must compare the lease's VALUE with its "
        f"own token - a token every read shares, or a check that a lease merely "
        f"exists, lets a read that missed before a write fill under a later read's "
        f"lease.")


def test_a_read_never_fills_under_another_reads_lease(shop: Shop) -> None:
    """Two reads and a write: read A misses, takes its lease and reads the row; then, just
    before A's k-th Redis command after that SELECT, another server's update_price(2) commits
    and invalidates, and a third server's read B misses, takes a lease of its own and reads
    the new row - held before its fill. A's fill must see that the lease is no longer ITS
    lease: a token every read shares (a constant, the product id) or a fill that checks only
    that some lease exists lets A put the old row in, under B's lease."""
    writer = shop.make("CacheAside", shop.dsn, shop.redis_url, ttl_seconds=300)
    other = shop.make("CacheAside", shop.dsn, shop.redis_url, ttl_seconds=300)
    step: dict[str, Any] = {}

    def before_a(command: list[bytes]) -> None:
        if "k" not in step or "wrote" in step or shop.reads() == step["reads"]:
            return   # not armed, done, or A has not read the row yet
        step["after"] += 1
        if step["after"] == step["k"]:
            step["wrote"] = " ".join(c.decode(errors="replace") for c in command[:2])
            writer.update_price(2, step["price"])
            step["b"] = step["hold"].run(step["reader_b"])
            step["hold"].held.wait(15)

    with redis_gate(shop.redis_url, before_a) as url_a:
        reader_a = shop.make("CacheAside", shop.dsn, url_a, ttl_seconds=300)
        for k in range(1, FILL_STEPS + 1):
            for key in shop.redis.scan_iter("product:2*"):   # the entry (and any lease)
                shop.redis.delete(key)
            hold = HeldAfterSelect(shop)
            with redis_gate(shop.redis_url, hold.before) as url_b:
                old, price = shop.db_price(2), 6000 + k
                step.clear()
                step.update(k=k, price=price, after=0, reads=shop.reads(), hold=hold,
                            reader_b=shop.make("CacheAside", shop.dsn, url_b,
                                               ttl_seconds=300))
                got = reader_a.get_product(2)
                wrote, thread_b = step.pop("wrote", None), step.pop("b", None)
                step.clear()
                hold.release.set()
                if thread_b is not None:
                    thread_b.join(15)
            if wrote is None:
                break   # A sent fewer than k commands after its SELECT: all tried
            cached, left = shop.cached(2), shop.redis.ttl("product:2")
            after = other.get_product(2)
            assert (cached is None or cached.get("price_cents") == price) and \
                after is not None and after["price_cents"] == price, under_anothers_lease(
                    k, wrote, old, got, price, hold, cached, left, after)
        else:
            pytest.fail(f"CacheAside: get_product(2) sent more than {FILL_STEPS} Redis "
                        "commands after its SELECT", pytrace=False)


def test_a_cache_aside_read_cut_off_from_the_database_leaves_nothing_for_ever(
        shop: Shop, postgres: Any) -> None:
    """A read may die between its first Redis command and its fill: its database
    connection is cut (a restart, a failover), a timeout, the process killed. Whatever it
    put in Redis before reading the database (the lease that guards its fill, a lock) must
    then expire on its own: nothing else ever deletes it unless a write to that product
    happens, and meanwhile no read of the product fills the cache again."""
    app = shop.make("CacheAside", shop.dsn, shop.redis_url, ttl_seconds=300)
    cut_the_apps_sessions(postgres, shop)
    try:
        outcome = f"returned {app.get_product(1)!r}"
    except NotImplementedError as exc:
        pytest.fail(f"CacheAside.get_product is not implemented yet: {exc}", pytrace=False)
    except Exception as exc:  # noqa: BLE001 - a read whose database is gone may fail
        outcome = f"raised {type(exc).__name__}"
    forever = sorted(str(key) for key in shop.redis.scan_iter() if shop.redis.ttl(key) == -1)
    assert not forever, (
        f"cache-aside: get_product(1) with its database connection cut (as a restart or a "
        f"failover does) {outcome} and left {forever} in Redis with no expiry: whatever a "
        f"read takes before it reads the database (the lease that guards its fill: SET "
        f"product:<id>:lease <token> NX PX <ms>) must expire on its own - the read may die "
        f"before its fill, and then no later read of product 1 fills the cache until a write "
        f"happens to delete it: every one goes to the database")


def test_cache_aside_write_deletes_the_entry(shop: Shop) -> None:
    app = shop.make("CacheAside", shop.dsn, shop.redis_url, ttl_seconds=300)
    assert app.get_product(1) == row(1)  # product:1 is cached
    app.update_price(1, 1500)
    assert shop.db_price(1) == 1500, (
        f"after update_price(1, 1500) the database holds {shop.db_price(1)}")
    left = shop.cached(1)
    assert left is None, (
        f"after update_price(1, 1500) Redis product:1 holds {left}: cache-aside DELETES the "
        "entry after the database write. Writing the new value into the cache instead races "
        "with another writer: A writes 1500 to the database, B writes 1600 to the database "
        "and to the cache, then A's cache write lands last - the cache serves 1500 for a "
        "whole TTL while the database holds 1600. A delete cannot go stale: the next read "
        "loads the committed row")


def test_read_through_cache_calls_the_loader_only_on_a_miss(shop: Shop) -> None:
    calls: list[int] = []

    def loader(product_id: int) -> dict[str, Any] | None:
        calls.append(product_id)
        found = [row(pid) for pid, _, _ in PRODUCTS if pid == product_id]
        return found[0] if found else None

    cache = shop.make("ReadThrough", shop.redis_url, loader, ttl_seconds=43200)
    assert cache.get(3) == row(3), f"get(3) returned {cache.get(3)!r}, expected {row(3)!r}"
    assert calls == [3], f"the first get(3) called the loader for {calls}, expected [3]"
    assert_ttl(shop, 3, 43200, "read-through")
    assert cache.get(3) == row(3) and cache.get(3) == row(3)
    assert calls == [3], (
        f"the loader was called {len(calls)} times for product 3, expected once: the "
        "cache answers hits itself")
    assert cache.get(4) == row(4) and calls == [3, 4], (
        f"get(4) must load product 4 through the loader once (loader calls: {calls})")
    assert shop.reads() == 0, "the read-through cache must not query the database itself"


def test_write_through_updates_database_and_cache_in_one_call(shop: Shop) -> None:
    app = shop.make("WriteThrough", shop.dsn, shop.redis_url, ttl_seconds=21600)
    app.update_price(3, 4242)
    assert shop.db_price(3) == 4242, (
        f"when update_price(3, 4242) returned, the database held {shop.db_price(3)}: "
        "write-through writes the database synchronously")
    cached = shop.cached(3)
    assert cached == dict(row(3), price_cents=4242), (
        f"when update_price(3, 4242) returned, Redis product:3 held {cached!r}: write-through "
        "writes the new value into the cache too (deleting it is cache-aside)")
    assert_ttl(shop, 3, 21600, "write-through")
    got, reads = delta(shop.reads, lambda: app.get_product(3))
    assert got == dict(row(3), price_cents=4242) and reads == 0, (
        f"get_product(3) after the write ran {reads} SELECTs, returned {got!r}: it must be "
        "served from the cache the write just filled")


def test_write_through_caches_only_what_the_database_accepted(shop: Shop) -> None:
    app = shop.make("WriteThrough", shop.dsn, shop.redis_url, ttl_seconds=90)
    assert app.get_product(3) == row(3)
    shop.direct.execute("ALTER TABLE products ADD CONSTRAINT price_positive "
                        "CHECK (price_cents > 0)")
    refused: BaseException | None = None
    try:
        app.update_price(3, -5)
    except Exception as exc:  # noqa: BLE001 - any error is right: the write was refused
        refused = exc
    cached = shop.cached(3)
    assert cached is None or cached.get("price_cents") == row(3)["price_cents"], (
        f"update_price(3, -5) was refused by the database (CHECK price_cents > 0"
        f"{'' if refused is None else ', ' + type(refused).__name__}), yet Redis product:3 "
        f"now holds {cached}: the cache was written before the database. Write-through "
        "writes the system of record first and caches what it accepted (UPDATE ... "
        "RETURNING), so the cache never serves a price the database never held")
    assert refused is not None, (
        "update_price(3, -5) was refused by the database (CHECK price_cents > 0) but "
        "returned normally: let the database's error out")


# Each read path that decides hit or miss from Redis, as (pattern, how to build it, the read).
READ_PATHS: list[tuple[str, Callable[[Shop, str], Any], str]] = [
    ("CacheAside", lambda shop, url: shop.make("CacheAside", shop.dsn, url, ttl_seconds=300),
     "get_product"),
    ("ReadThrough", lambda shop, url: shop.make(
        "ReadThrough", url, lambda pid: row(pid) if 1 <= pid <= len(PRODUCTS) else None,
        ttl_seconds=300), "get"),
    ("WriteThrough", lambda shop, url: shop.make("WriteThrough", shop.dsn, url,
                                                 ttl_seconds=300), "get_product"),
]


@pytest.mark.parametrize("pattern,build,method", READ_PATHS, ids=[p[0] for p in READ_PATHS])
def test_an_entry_that_vanishes_mid_read_is_a_miss_not_an_error(
        shop: Shop, pattern: str, build: Callable[[Shop, str], Any], method: str) -> None:
    """A cache entry can vanish at any instant: another server's invalidation, its TTL
    running out. The learner's Redis goes through a gate that, the moment a read sends a
    SECOND command on product:2, deletes product:2 first (as that other server would). A
    read deciding hit or miss from one GET never sends a second one; a check-then-act read
    (EXISTS, TTL or KEYS, then GET) gets None from its GET for an entry it was just told
    exists."""
    vanished: list[int]  # what the DEL answered: the number of keys it removed
    key, seen, vanished = "product:2", [], []

    def before(command: list[bytes]) -> None:
        if key.encode() not in command[1:]:
            return
        seen.append(b" ".join(command[:2]).decode(errors="replace"))
        if len(seen) == 2 and not vanished:
            vanished.append(shop.redis.delete(key))

    with redis_gate(shop.redis_url, before) as url:
        app = build(shop, url)
        shop.redis.set(key, json.dumps(row(2)), ex=300)  # product 2 is cached
        read = getattr(app, method)
        error: BaseException | None = None
        try:
            got = read(2)
        except Exception as exc:  # noqa: BLE001 - named in the message below
            got, error = None, exc
    if got == row(2) and error is None:
        return
    outcome = (f"raised {type(error).__name__}: {error}" if error is not None
               else f"returned {got!r}")
    pytest.fail(
        f"{pattern}.{method}(2) {outcome}, expected {row(2)!r}: product:2 existed when the "
        f"read began, and vanished (deleted, as another server's invalidation or its TTL "
        f"would) just before the read's second Redis command on it (commands on {key}: "
        f"{', '.join(seen)}). A read that asks whether the entry is there and then fetches "
        f"it in a second command assumes nothing happens in between - decide hit or miss "
        f"from the ONE GET's answer (None = miss: load from the database)", pytrace=False)


LEFT_MS = 100_000   # what the test leaves of a cached entry's life: less than ttl_seconds


@pytest.mark.parametrize("pattern,build,method", READ_PATHS, ids=[p[0] for p in READ_PATHS])
def test_a_hit_leaves_the_entry_ttl_alone(
        shop: Shop, pattern: str, build: Callable[[Shop, str], Any], method: str) -> None:
    """A TTL bounds how long a missed invalidation can serve a wrong value, counted from
    when the entry was written. A hit that renews it (GETEX ... EX, EXPIRE after the GET,
    a SET on a hit) slides the bound with every read: an entry read often never expires,
    so the hottest products would stay wrong for ever."""
    app = build(shop, shop.redis_url)
    key = "product:2"
    shop.redis.set(key, json.dumps(row(2)), px=LEFT_MS)  # cached earlier: 100 s left
    got = getattr(app, method)(2)
    left = shop.redis.pttl(key)
    assert got == row(2), f"{pattern}.{method}(2) on a cached product 2 returned {got!r}"
    assert 0 <= left <= LEFT_MS or left == -2, (
        f"{pattern}.{method}(2) was a hit on {key}, which had {LEFT_MS / 1000:.0f} s left to "
        f"live; after the hit it has "
        f"{'no expiry at all' if left == -1 else f'{left / 1000:.0f} s'}: the read renewed "
        f"the entry's TTL (GETEX ... EX, EXPIRE, or a SET on a hit)\nThe TTL is what heals "
        f"an invalidation that was missed, at most ttl_seconds after the entry was written; "
        f"renewed by every hit, it never runs out for a product that is read often. Read "
        f"with a plain GET; set the TTL only when the entry is written.")


# ---- one worker per queue ------------------------------------------------------------------
UPDATE_PRODUCTS = re.compile(r"^\s*update\b.*\bproducts\b", re.IGNORECASE | re.DOTALL)
# How long the test holds the worker's first write, looking for a second write in flight
# beside it (a second worker's): those start at start() or with each write, and take a
# change the moment it is queued. A correct worker only costs the test this long.
OVERLAP_S = 1.5


class WriteGate(PgStatementProxy):
    """A statement proxy that holds the first UPDATE of products at the wire (in the thread
    of the connection that sent it) until :attr:`release` is set, and notes each UPDATE of
    products another connection sends meanwhile: with one worker there is none, as the
    worker waits for its write's answer before it takes the next change."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held, self.release = threading.Event(), threading.Event()
        self.beside: list[str] = []
        self._first = threading.Lock()
        self._armed = True

    def before_forwarding(self, link: Any, sql: str) -> None:
        if not UPDATE_PRODUCTS.match(sql):
            return
        with self._first:
            first, self._armed = self._armed, False
        if first:
            self.held.set()
            self.release.wait(60)
        elif not self.release.is_set():
            self.beside.append(" ".join(sql.split()))


@pytest.fixture
def write_gate(postgres: Any) -> Iterator[WriteGate]:
    gate = WriteGate.for_dsn(postgres.dsn, count_on="bind", split=False, ignore=None)
    yield gate
    gate.release.set()
    gate.close()


def test_write_behind_one_worker_writes_a_products_changes_in_order(
        shop: Shop, write_gate: WriteGate, postgres: Any, deaths: Any) -> None:
    """Six changes to one product are queued to a started worker. The test holds the first
    UPDATE to reach the database at the wire: a single worker waits for it, so nothing else
    is written meanwhile. A second worker (a pool started by start(), a thread per write)
    takes the next change and writes it - the older change then lands LAST."""
    shop.direct.execute(PRICE_LOG)
    app = shop.make("WriteBehind", write_gate.dsn_for(postgres.dsn), shop.redis_url)
    app.get_product(3)   # cached: the writes below need no database
    prices = [301, 302, 303, 304, 305, 306]
    app.start()
    for price in prices:
        app.update_price(3, price)
    if not came_true(write_gate.held.is_set, 15):
        pytest.fail("write-behind: 15 s after start() and six update_price(3, ...) calls, no "
                    "UPDATE of products reached the database", pytrace=False)
    came_true(lambda: bool(write_gate.beside) or bool(deaths.thread_deaths()), OVERLAP_S)
    beside = list(write_gate.beside)
    if beside:   # let the newer write land before the held one, as a slow write would
        came_true(lambda: bool(applied(shop, 3)), 5)
    write_gate.release.set()
    if not beside:
        expect_applied(shop, deaths, {3: prices},
                       "six changes to product 3 were queued to a started worker")
        return
    settle(shop, deaths)
    seen = applied(shop, 3)
    swapped = next(((new, old) for i, new in enumerate(seen) for old in seen[i + 1:]
                    if old < new), None)
    landed = (f": {swapped[1]} landed after {swapped[0]}, an older price after a newer one"
              if swapped else "")
    final = shop.db_price(3)
    ends = (f", and it holds {final}, not the last price written ({prices[-1]})"
            if final != prices[-1] else "")
    pytest.fail(
        f"write-behind: six changes to product 3 ({prices}) were queued to a started worker; "
        f"the test held the first UPDATE to reach the database, and meanwhile "
        f"{len(beside)} more UPDATE(s) of products arrived on other connections "
        f"({beside[0]}): more than one worker writes the queue. The database received "
        f"{seen} in that order{landed}{ends}\nTwo workers sharing a queue write one "
        f"product's changes in whatever order they finish: a slower older write lands after "
        f"a newer one, and the database keeps a price the application overwrote. Run ONE "
        f"worker per queue "
        f"(start() starts one thread; update_price only queues), so changes land in the "
        f"order they were queued.", pytrace=False)


def test_write_behind_persists_eventually_even_after_a_crash(shop: Shop) -> None:
    app = shop.make("WriteBehind", shop.dsn, shop.redis_url)
    _, writes = delta(shop.writes, lambda: app.update_price(4, 1111))
    assert writes == 0 and shop.db_price(4) == 1200, (
        f"update_price(4, 1111) wrote to the database before returning ({writes} writes): "
        "write-behind returns after updating the cache and queueing the write")
    got, reads = delta(shop.reads, lambda: app.get_product(4))
    assert got is not None and got["price_cents"] == 1111 and reads == 0, (
        f"get_product(4) right after the write returned {got!r} with {reads} SELECTs: the "
        "cache holds the new value and serves it")

    # The process dies before its worker ever ran: `app` is abandoned here, never started,
    # never stopped. A new process starts, with a worker of its own.
    successor = shop.make("WriteBehind", shop.dsn, shop.redis_url)
    for price in (1, 2, 3):
        successor.update_price(5, price)
    successor.start()
    wait_for_db(shop, {4: 1111, 5: 3}, "write-behind")  # the fixture stops the workers


def test_write_behind_worker_dying_mid_write_loses_nothing(shop: Shop,
                                                            postgres: Any) -> None:
    app = shop.make("WriteBehind", shop.dsn, shop.redis_url)
    app.update_price(4, 1111)
    # Hold product 4's row: the worker takes the change off the queue and its UPDATE waits.
    shop.direct.execute("BEGIN")
    shop.direct.execute("SELECT 1 FROM products WHERE id = 4 FOR UPDATE")
    try:
        app.start()
        with postgres.connect(autocommit=True) as watch:
            deadline, pid = time.monotonic() + 15, None
            while pid is None and time.monotonic() < deadline:
                found = watch.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND pid <> %s",
                    (shop.direct.info.backend_pid,)).fetchone()
                pid = found[0] if found else None
                time.sleep(0.01)
            if pid is None:
                pytest.fail("write-behind: after start() no worker UPDATE of product 4 reached "
                            "the database within 15 s", pytrace=False)
            # The worker dies in the middle of its write: its session is cut.
            watch.execute("SELECT pg_terminate_backend(%s)", (pid,))
    finally:
        shop.direct.execute("COMMIT")
    app.stop()
    successor = shop.make("WriteBehind", shop.dsn, shop.redis_url)
    successor.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and shop.db_price(4) != 1111:
        time.sleep(0.05)
    assert shop.db_price(4) == 1111, (
        f"write-behind: the worker's session died while it wrote product 4's queued change "
        f"(its UPDATE was waiting for a row lock); a new worker ran for 5 s and the database "
        f"still holds {shop.db_price(4)}, not 1111: the change left Redis before it reached "
        f"Postgres - taken off the queue by a pop (BRPOP), so only the worker's memory held "
        f"it, or removed (LREM) when its write failed on the cut connection - and died with "
        f"the worker. Move it to a processing list (LMOVE/BLMOVE) and remove it only after "
        f"its UPDATE committed: on a lost connection keep it, reconnect and write it again; "
        f"a starting worker takes back what is left there")


def blocked_clients(redis_db: Any) -> list[dict[str, Any]]:
    """The Redis connections on this test's logical database that wait in a blocking
    command (BLMOVE, BLPOP, XREAD BLOCK...), as the server lists them (flag b)."""
    admin = redis_db.admin_client(decode_responses=True)
    try:
        return [c for c in admin.client_list()
                if int(c.get("db", -1)) == redis_db.db and "b" in c.get("flags", "")]
    finally:
        admin.close()


# Longer than a Redis client's default socket timeout (redis-py: 5 s): a worker that
# blocks with no timeout (BLMOVE ... 0) outlasts it and dies of the TimeoutError.
QUIET_S = 6
# Where each blocking read names how long it may wait (seconds; XREAD's BLOCK is in ms).
TIMEOUT_LAST = {"BLMOVE", "BRPOPLPUSH", "BLPOP", "BRPOP", "BZPOPMIN", "BZPOPMAX"}
TIMEOUT_FIRST = {"BLMPOP", "BZMPOP"}


def blocking_timeout(command: list[str]) -> float | None:
    """How long a blocking read may wait, in seconds (0 = for ever); None if not one."""
    name, args = command[0], command[1:]
    try:
        if name in TIMEOUT_LAST and args:
            return float(args[-1])
        if name in TIMEOUT_FIRST and args:
            return float(args[0])
        if name in ("XREAD", "XREADGROUP"):
            upper = [a.upper() for a in args]
            if "BLOCK" in upper:
                return float(args[upper.index("BLOCK") + 1]) / 1000
    except (ValueError, IndexError):
        return None
    return None


def price_reaches(shop: Shop, product_id: int, price: int, within: float) -> bool:
    return came_true(lambda: shop.db_price(product_id) == price, within)


@pytest.fixture
def deaths(learner: Any) -> Iterator[Any]:
    """The lab's harness, noting the threads of the learner's process that die of an
    exception from now on (a worker killed by a TimeoutError): a wait for that worker's
    write ends when it is seen dead, not at its deadline."""
    harness = learner.harness()
    harness.watch_thread_deaths()
    yield harness
    harness.unwatch_thread_deaths()


def test_write_behind_worker_survives_quiet_time_and_ends_with_stop(
        shop: Shop, redis_db: Any, deaths: Any) -> None:
    app = shop.make("WriteBehind", shop.dsn, shop.redis_url)
    with redis_commands(redis_db) as commands:
        app.start()
        app.update_price(3, 100)
        wait_for_db(shop, {3: 100}, "write-behind", within=15)  # the worker runs
        # and waits for the next change
        came_true(lambda: sum(blocking_timeout(c) is not None for c in commands) > 1, 2)
    waits = [(c, blocking_timeout(c)) for c in commands]
    long_waits = [c for c, t in waits if t is not None and (t == 0 or t >= 1)]
    if long_waits:
        # A worker that blocks a long time must live through a quiet spell (as at night):
        # the quiet time is only spent on a worker seen doing so.
        time.sleep(QUIET_S)
        app.update_price(3, 150)

        def worker_dead() -> bool:
            # a thread of the learner's died, and no connection waits in Redis for changes
            return bool(deaths.thread_deaths()) and not blocked_clients(redis_db)

        came_true(lambda: shop.db_price(3) == 150 or worker_dead(), 15)
        died = deaths.thread_deaths()
        within = "" if died else " 15 s later"
        assert price_reaches(shop, 3, 150, 0.5 if died else 0), (
            f"write-behind: the worker wrote a first change and then waited in "
            f"{' '.join(long_waits[-1])}; after {QUIET_S} quiet seconds a change queued is "
            f"not in the database{within} (it holds {shop.db_price(3)}): the worker is gone"
            f"{' - ' + '; '.join(died) if died else ''}. A blocking read with no timeout "
            f"(0) waits longer than the client's "
            f"socket timeout (redis-py: 5 s by default) and ends in a TimeoutError that "
            f"kills the thread - block briefly (BLMOVE ... 0.2) and loop, which also lets "
            f"the worker notice stop()")
    if any(t is not None for _, t in waits):
        # stop() is asked while the worker waits in its blocking read, where it spends its
        # idle time: asked between two of its commands (just after a write), any worker
        # ends at its next flag check, and a read that never returns would go unseen.
        came_true(lambda: bool(blocked_clients(redis_db)), 5)
    app.stop()
    blocked = blocked_clients(redis_db)
    assert not blocked, (
        f"write-behind: stop() returned, but the worker still waits in Redis "
        f"({', '.join(c.get('cmd', '?').upper() for c in blocked)} on a connection of this "
        f"database, {blocked[0].get('age', '?')} s old): it checks its stop flag only "
        f"between commands, and a blocking command with timeout 0 waits until the next "
        f"change arrives - block briefly (BLMOVE ... 0.2) and loop, and have stop() wait "
        f"for the thread to end (join), or a 'stopped' instance keeps taking changes off "
        f"the shared queue and writes them beside its successor's worker, out of order")
    # Another server queues a change: nobody is started, so nobody may write it yet.
    other = shop.make("WriteBehind", shop.dsn, shop.redis_url)
    other.update_price(3, 200)
    assert not price_reaches(shop, 3, 200, 1), (
        "write-behind: after stop() returned, a change another server queued reached the "
        "database with no worker started: the stopped instance's worker is still running "
        "and taking changes off the shared queue - stop() must end it before returning")
    other.start()
    wait_for_db(shop, {3: 200}, "write-behind", within=15)


def wait_for_db(shop: Shop, want: dict[int, int], pattern: str, within: float = 5) -> None:
    deadline = time.monotonic() + within
    seen: dict[int, int] = {}
    while time.monotonic() < deadline:
        seen = {pid: shop.db_price(pid) for pid in want}
        if seen == want:
            return
        time.sleep(0.05)
    older = {5: (1, 2)}  # the earlier writes to product 5
    if seen.get(4) == want.get(4) and seen.get(5) in older[5]:
        pytest.fail(
            f"{pattern}: {within:.0f} s after start() the database holds prices {seen}, "
            f"expected {want}: product 5 ended with an OLDER write ({seen[5]}) - the worker "
            f"applied the queued writes out of order; take the oldest first (push on one end "
            f"of the list, pop from the other)", pytrace=False)
    assert seen == want, (
        f"{pattern}: {within:.0f} s after start() the database holds prices {seen}, expected "
        f"{want}: the queued writes never reached Postgres. Keep the queue in Redis (a list), "
        "not in the process: product 4's write was made by a process that died before its "
        "worker ran, and the last of several writes to product 5 must win")


# ---- the write-behind worker and a lost database connection -------------------------------
# A write-behind queue survives a lost connection, as a queue consumer does: the worker
# reconnects and writes the change it held again, before any newer one (one product's
# writes land oldest first), never dropping it. What reached the table, and in which
# order, is read from a log a trigger keeps of every UPDATE of a price.

PRICE_LOG = """
CREATE TABLE price_log (seq bigserial PRIMARY KEY, id integer NOT NULL,
                        price_cents integer NOT NULL);
CREATE FUNCTION log_price() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO price_log (id, price_cents) VALUES (NEW.id, NEW.price_cents);
    RETURN NEW;
END $$;
CREATE TRIGGER log_price AFTER UPDATE ON products FOR EACH ROW EXECUTE FUNCTION log_price();
"""
SETTLED_S = 15.0   # the last resort: a reconnecting worker is done in well under a second


def applied(shop: Shop, product_id: int) -> list[int]:
    """The prices written to the product since the log began, in the order they landed."""
    rows = shop.direct.execute("SELECT price_cents FROM price_log WHERE id = %s ORDER BY seq",
                               (product_id,)).fetchall()
    return [int(r[0]) for r in rows]


DEAD = "write-behind:dead"   # the README's list of changes the database refused


def pending(shop: Shop) -> int:
    """Changes still in Redis lists (queued, or held by a worker): 0 once all are written.
    The test's logical database holds nothing else but the refused changes set aside."""
    return sum(int(shop.redis.llen(key)) for key in shop.redis.scan_iter()
               if key != DEAD and shop.redis.type(key) == "list")


def lock_waiter(shop: Shop, watch: Any) -> int:
    """The pid of the worker's session, once its UPDATE waits for the row the test holds."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = watch.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND pid <> %s",
            (shop.direct.info.backend_pid,)).fetchone()
        if found:
            return int(found[0])
        time.sleep(0.01)
    pytest.fail("write-behind: after start() no worker UPDATE reached the database within "
                "15 s", pytrace=False)


def cut_the_apps_sessions(postgres: Any, shop: Shop) -> None:
    """End every client session of the test database but the test's own: the app's
    connections, as a failover or a restart of Postgres cuts them."""
    with postgres.connect(autocommit=True) as watch:
        sessions = {int(r[0]) for r in watch.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND "
            "backend_type = 'client backend' AND pid <> ALL(%s)",
            ([shop.direct.info.backend_pid, watch.info.backend_pid],)).fetchall()}
        terminate(watch, sessions)


def terminate(watch: Any, pids: set[int]) -> None:
    """Cut these sessions, as a failover or a restart does, and wait until they are gone."""
    for pid in pids:
        watch.execute("SELECT pg_terminate_backend(%s)", (pid,))
    gone = came_true(lambda: not watch.execute(
        "SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", (list(pids),)).fetchone(), 15)
    assert gone, f"the test could not end the sessions {sorted(pids)}"


def settle(shop: Shop, deaths: Any, also: Callable[[], bool] = lambda: False) -> None:
    """Wait until no change is left in Redis (three looks in a row), a thread of the
    learner's died, or ``also()`` (a mistake seen)."""
    deadline, looks = time.monotonic() + SETTLED_S, 0
    while time.monotonic() < deadline and looks < 3 and not deaths.thread_deaths():
        if also():
            return
        looks = looks + 1 if pending(shop) == 0 else 0
        time.sleep(0.05)


def expect_applied(shop: Shop, deaths: Any, want: dict[int, list[int]], when: str) -> None:
    """Wait until no change is left in Redis (three looks in a row) or a thread of the
    learner's died, then compare what reached the table with ``want``, naming the mistake."""
    settle(shop, deaths)
    seen = {pid: applied(shop, pid) for pid in want}
    if seen == want:
        return
    died = deaths.thread_deaths()
    left = pending(shop)
    why = (f"{when}; the database then received {seen}, expected {want} (each product's "
           f"prices in the order they landed), and {left} change(s) are still in Redis")
    if died:
        pytest.fail(f"write-behind: {why}: the worker died - {'; '.join(died)}\nA lost "
                    "connection (its session killed, Postgres restarted, a failover) must not "
                    "end the worker for good, or every write queued after it waits for ever: "
                    "catch psycopg.OperationalError, reconnect (after a short pause), and "
                    "write the change it held again before taking the next.", pytrace=False)
    for pid, prices in want.items():
        missing = [p for p in prices if p not in seen[pid]]
        if missing:
            pytest.fail(f"write-behind: {why}: product {pid}'s change to {missing[0]} never "
                        "reached the database: the change the worker held when the connection "
                        "broke was lost - removed from Redis when its write failed (LREM on "
                        "error), or popped off the queue (BRPOP) so only the worker's memory "
                        "held it\nA change leaves the processing list only once its UPDATE "
                        "committed: keep it held, reconnect, and write it again; lost, the "
                        "write is gone though update_price() returned.", pytrace=False)
    for pid, prices in want.items():
        if sorted(seen[pid]) == sorted(prices) and seen[pid] != prices:
            pytest.fail(f"write-behind: {why}: product {pid}'s writes landed out of order, "
                        f"ending at {seen[pid][-1]}, an older price than the last one written "
                        f"({prices[-1]})\nA change whose write failed is retried before any "
                        "newer change (not put back behind them), and a worker starting up "
                        "puts a dead worker's leftovers back at the OLDEST end of the queue: "
                        "one product's writes must land oldest first.", pytrace=False)
    for pid, prices in want.items():
        if len(seen[pid]) > len(prices):
            pytest.fail(f"write-behind: {why}: product {pid} received a change more than "
                        "once\nA change is written again only when its write did not "
                        "commit, and once it committed it leaves the processing list.",
                        pytrace=False)
    pytest.fail(f"write-behind: {why}", pytrace=False)


def test_write_behind_worker_reconnects_and_writes_the_change_it_held(
        shop: Shop, postgres: Any, deaths: Any) -> None:
    """The session is cut while the worker's UPDATE waits for a row lock: the worker holds
    a change it has not written, and a newer change to the same product is queued."""
    shop.direct.execute(PRICE_LOG)
    app = shop.make("WriteBehind", shop.dsn, shop.redis_url)
    app.update_price(3, 111)
    shop.direct.execute("BEGIN")
    shop.direct.execute("SELECT 1 FROM products WHERE id = 3 FOR UPDATE")
    try:
        app.start()
        with postgres.connect(autocommit=True) as watch:
            pid = lock_waiter(shop, watch)
            app.update_price(3, 222)   # newer, queued behind the change the worker holds
            terminate(watch, {pid})
    finally:
        shop.direct.execute("COMMIT")
    expect_applied(shop, deaths, {3: [111, 222]},
                   "the worker's database session was cut while it wrote product 3's change "
                   "to 111 (its UPDATE waited for a row lock), with a change to 222 queued")


def test_write_behind_worker_survives_a_lost_connection_between_changes(
        shop: Shop, postgres: Any, deaths: Any) -> None:
    """Every session of the app is cut while the worker waits for changes (as a Postgres
    restart does): the next change's write fails on the dead connection."""
    shop.direct.execute(PRICE_LOG)
    app = shop.make("WriteBehind", shop.dsn, shop.redis_url)
    app.get_product(4)   # cached: the writes below need no database
    app.start()
    app.update_price(3, 111)
    expect_applied(shop, deaths, {3: [111]}, "a first change was queued")
    cut_the_apps_sessions(postgres, shop)
    app.update_price(4, 444)
    app.update_price(3, 333)
    expect_applied(shop, deaths, {3: [111, 333], 4: [444]},
                   "every database session of the app was cut while its worker waited (as a "
                   "restart does), then changes to 444 (product 4) and 333 (product 3) were "
                   "queued")


def test_write_behind_leftover_of_a_dead_worker_lands_before_newer_changes(
        shop: Shop, postgres: Any, deaths: Any) -> None:
    """A worker loses its session mid-write while the database refuses new connections, and
    is stopped: its change stays in the processing list. Another server queues a newer
    change to the same product; the next worker must write the leftover first."""
    shop.direct.execute(PRICE_LOG)
    app = shop.make("WriteBehind", shop.dsn, shop.redis_url)
    other = shop.make("WriteBehind", shop.dsn, shop.redis_url)
    app.update_price(4, 1111)
    shop.direct.execute("BEGIN")
    shop.direct.execute("SELECT 1 FROM products WHERE id = 4 FOR UPDATE")
    with psycopg.connect(postgres.admin_dsn, autocommit=True) as admin:
        try:
            app.start()
            with postgres.connect(autocommit=True) as watch:
                pid = lock_waiter(shop, watch)
                admin.execute(f'ALTER DATABASE "{postgres.name}" ALLOW_CONNECTIONS false')
                terminate(watch, {pid})
            shop.direct.execute("COMMIT")
            stopping = threading.Thread(target=app.stop, daemon=True)
            stopping.start()
            stopping.join(10)
            assert not stopping.is_alive(), (
                "write-behind: stop() did not return within 10 s while the worker could not "
                "reconnect (the database refused connections): a worker retrying its "
                "connection must still notice stop()")
        finally:
            if shop.direct.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                shop.direct.execute("COMMIT")
            admin.execute(f'ALTER DATABASE "{postgres.name}" ALLOW_CONNECTIONS true')
    other.update_price(4, 2222)   # a newer change, from another server: the cache has 4
    successor = shop.make("WriteBehind", shop.dsn, shop.redis_url)
    successor.start()
    expect_applied(shop, deaths, {4: [1111, 2222]},
                   "a worker's session was cut while it wrote product 4's change to 1111 and "
                   "it was stopped before it could reconnect; another server then queued 2222 "
                   "for product 4, and a new worker started")


# ---- a change the database refuses ----------------------------------------------------------
# (why the database refuses, the refused price): not a lost connection, so a retry fails too
REFUSED = [("a CHECK constraint, price_cents > 0", -5),
           ("a value past the integer column's range", 3_000_000_000)]


@pytest.mark.parametrize("why,bad", REFUSED, ids=["check_violation", "out_of_range"])
def test_write_behind_worker_sets_a_refused_change_aside_and_goes_on(
        shop: Shop, deaths: Any, why: str, bad: int) -> None:
    """The database refuses one queued change. Write-behind accepted it long ago (the caller
    has its answer), so the worker cannot report it back: like a queue consumer with a
    poison message it keeps the change aside (the README's dead-letter list) and goes on -
    the changes queued behind it must still land."""
    shop.direct.execute(PRICE_LOG)
    shop.direct.execute("ALTER TABLE products ADD CONSTRAINT price_positive "
                        "CHECK (price_cents > 0)")
    app = shop.make("WriteBehind", shop.dsn, shop.redis_url)
    app.get_product(4)   # cached: the writes below need no database
    app.start()
    writes = shop.writes()
    changes = [(3, 111), (3, bad), (3, 333), (4, 444)]
    for product_id, price in changes:
        app.update_price(product_id, price)
    settle(shop, deaths, also=lambda: shop.writes() - writes > len(changes))
    sent, died = shop.writes() - writes, deaths.thread_deaths()
    seen = {pid: applied(shop, pid) for pid in (3, 4)}
    dead = [str(entry) for entry in shop.redis.lrange(DEAD, 0, -1)]
    what = (f"changes to 111, {bad}, 333 (product 3) and 444 (product 4) were queued, and "
            f"the database refused the one to {bad} ({why}); then the database received "
            f"{seen}, by {sent} UPDATE(s), and {pending(shop)} change(s) are still queued")
    if died:
        pytest.fail(f"write-behind: {what}: the worker died of the refused write - "
                    f"{'; '.join(died)}\nEvery change queued after it now waits for ever. "
                    f"Only a lost connection (psycopg.OperationalError) is worth a reconnect "
                    f"and a retry; a change the database refuses (any other psycopg.Error) "
                    f"goes to the list {DEAD} with its error, and the worker goes on.",
                    pytrace=False)
    assert sent <= len(changes), (
        f"write-behind: {what}: the worker wrote the refused change again - a write the "
        f"database refuses fails every time it is sent, and the changes queued behind it "
        f"wait for ever.\nRetry only a lost connection (psycopg.OperationalError); a "
        f"change the database refuses (any other psycopg.Error) goes to the list {DEAD} with "
        f"its error, and the worker goes on with the next.")
    assert seen == {3: [111, 333], 4: [444]}, (
        f"write-behind: {what}, expected {{3: [111, 333], 4: [444]}}: the changes queued "
        f"after the refused one must still land, in order")
    assert len(dead) == 1 and str(bad) in dead[0], (
        f"write-behind: {what}: all as expected, but the list {DEAD} holds {dead}, expected "
        f"the refused change (to {bad}) once: a change the database refused was accepted by "
        f"update_price long ago and exists nowhere else - dropped (only logged) or left in "
        f"the queue, it is lost or blocks the queue. Keep it aside in {DEAD} (with the "
        f"database's error) for someone to look at.")


class CrashGate(TcpRelay):
    """Redis for a process that dies just before its k-th command: that command is held
    (the test reads what the process left in Redis), then neither it nor anything after it
    reaches the server, and the process never connects again."""

    def __init__(self, target: tuple[str, int], k: int) -> None:
        super().__init__(target)
        self.k, self.sent, self.down = k, 0, False
        self.held_at: list[bytes] = []
        self.held, self.release = threading.Event(), threading.Event()

    def admit(self, client: Any) -> bool:
        if self.down:
            client.close()
        return not self.down

    def upward(self, link: RelayLink, chunk: bytes) -> bool | None:
        buf = link.state.get("buf", b"") + chunk
        while (got := resp_command(buf)) is not None:
            command, used = got
            self.sent += 1
            if self.sent == self.k or self.down:
                self.held_at = self.held_at or command
                self.held.set()
                self.release.wait(15)
                self.down = True
                return False
            link.upstream.sendall(buf[:used])
            buf = buf[used:]
        link.state["buf"] = buf
        return None


def test_write_behind_write_cut_off_leaves_cache_and_queue_agreeing(shop: Shop) -> None:
    """update_price writes two things to Redis: the entry (what every read now serves) and
    the queued change (what the database will get). The process can die between any two of
    its commands: each k in turn, the test stops it just before its k-th Redis command for
    good, a successor's worker then drains the queue, and product 4's entry and row must
    agree - both the new price or neither. Written apart, the entry can show a price the
    database never gets (no TTL: for ever), or the database get one the entry never shows."""
    successor = shop.make("WriteBehind", shop.dsn, shop.redis_url)
    successor.start()
    parts = shop.redis.connection_pool.connection_kwargs
    for k in range(1, FILL_STEPS + 1):
        shop.redis.delete("product:4")
        shop.direct.execute("UPDATE products SET price_cents = 1200 WHERE id = 4")
        price, marker = 7000 + k, 8000 + k
        with CrashGate((parts.get("host", "127.0.0.1"), int(parts.get("port", 6379))),
                       k) as gate:
            doomed = shop.make("WriteBehind", shop.dsn, gate.url_for(shop.redis_url))
            call = threading.Thread(target=close_quietly_after, daemon=True,
                                    args=(doomed.update_price, 4, price))
            call.start()
            came_true(functools.partial(held_or_returned, gate, call), 15)
            if not gate.held.is_set():
                break   # update_price sent fewer than k commands: every step tried
            cached = shop.cached(4)   # what the dead process left
            gate.release.set()
            successor.update_price(5, marker)   # queued behind whatever it left
            drained = price_reaches(shop, 5, marker, 5)
            landed = shop.db_price(4)
            shown = None if cached is None else cached.get("price_cents")
            leaves = ("a price shown that the database never gets" if shown == price else
                      "a price the database got that the entry (no TTL) never shows")
            assert drained and shown in (None, landed), (
                f"write-behind: update_price(4, {price}) died just before its Redis command "
                f"no. {k} ({' '.join(c.decode(errors='replace') for c in gate.held_at[:2])})"
                f": it had left product:4 showing {shown}, and after a successor's worker ran "
                f"the queue the database holds {landed}"
                f"{'' if drained else ' (the successor never wrote its own change in 5 s)'}: "
                f"the cache entry and the queued change were written apart, so a crash "
                f"between them leaves {leaves}.\nWrite the entry and the queued change in "
                f"ONE step: a MULTI/EXEC transaction (redis-py pipeline(transaction=True)) "
                f"or one Lua script.")
    else:
        pytest.fail(f"write-behind: update_price sent more than {FILL_STEPS} Redis commands",
                    pytrace=False)


def held_or_returned(gate: CrashGate, call: threading.Thread) -> bool:
    return gate.held.is_set() or not call.is_alive()


def close_quietly_after(call: Callable[..., Any], *args: Any) -> None:
    """Run a learner call whose process the test pretends is dead: how it ends is not the
    test's business."""
    try:
        call(*args)
    except Exception:  # noqa: BLE001 - the call's Redis is cut off on purpose
        pass
