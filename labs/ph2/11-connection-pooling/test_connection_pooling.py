"""ph2.11 verification: pool size, server connection count, waiting and failing.

Everything is observed from outside the learner's code:
* server connections are counted in pg_stat_activity for this test's database, by a
  connection to another database (so the counting never counts itself);
* requests are held busy *on the server*: the test takes an advisory lock and each request
  asks for it, so a request that has a connection shows up in pg_locks as waiting, and the
  test knows exactly how many connections are in use;
* a request still waiting for a connection is a thread blocked in a threading wait (the
  pool's condition variable) under the learner's code, with no server connection of its own;
  those threads are counted where the learner's code runs (a process of its own when
  grading), by labrunner.testing.threads_waiting_in.
The test releases the lock to let everything finish.

Mistakes a learner makes here, each caught with its own message:
- floor / int() instead of ceil, ceil of float noise (14.000000000000002 -> 15)
- round() (or round to 1 decimal) before ceil: only fractions below .5 show it (1.2, 1.01)
- no minimum of 1: no traffic still needs a connection
- the latency counted in whole milliseconds: 0.5 ms becomes 0 (or 1)
- an acquire timeout stretched: rounded up to whole seconds, or a second try after
  PoolTimeout                                              -> how long the request took
- no pool at all, or a pool per query                      -> server connections counted
- the library's PoolTimeout / TooManyRequests let out      -> the exception's class
- no acquire timeout, or no wait (fails at once)           -> how long the request took
- no max_waiting (an unbounded queue)                      -> a third waiter not rejected
- max_waiting checked before asking the pool (requests_waiting, or a counter of one's
  own): a check-then-act                                   -> a burst, slowed line by line
                                                              (harness.py), queues too many
- getconn() without commit: putconn() rolls the write back -> a row written, read back
- committing only when no rows come back (cursor.description is None), or only statements
  that start with INSERT/UPDATE/DELETE                     -> INSERT/UPDATE ... RETURNING,
                                                              WITH ... INSERT, read back
- getconn() without try/finally: a failing query keeps its connection (a leak)
                                                           -> failing queries, then a query
- every error turned into PoolExhausted (a SQL error is not an exhausted pool)
- psycopg.OperationalError turned into PoolExhausted (it is the pool errors' base class, and
  also what a statement_timeout, a lock_timeout or a terminated backend raise), or only the
  database's "timeouts" or lost connections taken for an exhausted pool
                                                           -> each of those, provoked for real
- close() that leaves the connections open                 -> counted after close()
- no params passed on as () (or []): psycopg then reads each % as a placeholder
                                                           -> LIKE 'a%' without params
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from labrunner.testing import came_true, threads_waiting_in, wait_until

HOLD = "SELECT pg_advisory_xact_lock_shared(4242)"  # blocks while the test holds the lock


class Call(threading.Thread):
    """One request on its own thread: result or error, and how long it took."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        super().__init__(daemon=True)
        self.fn, self.args = fn, args
        self.result: Any = None
        self.error: BaseException | None = None
        self.elapsed = 0.0

    def run(self) -> None:
        start = time.monotonic()
        try:
            self.result = self.fn(*self.args)
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            self.error = exc
        self.elapsed = time.monotonic() - start


@dataclass
class Server:
    """The test's view of the server: counts connections and holds the lock."""

    admin: Any      # connection to the maintenance database
    dbname: str
    holder: Any     # connection to the test database that takes the advisory lock

    def connections(self) -> int:
        """Client connections to the test database, besides the test's lock holder."""
        (n,) = self.admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
            "AND backend_type = 'client backend' AND pid <> %s",
            (self.dbname, self.holder.info.backend_pid)).fetchone()
        return int(n)

    def lock_waiters(self) -> int:
        """Requests that have a connection and are running (waiting on the test's lock)."""
        (n,) = self.admin.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE NOT l.granted AND l.locktype = 'advisory' AND a.datname = %s",
            (self.dbname,)).fetchone()
        return int(n)

    def hold(self) -> None:
        self.holder.execute("SELECT pg_advisory_lock(4242)")

    def release(self) -> None:
        self.holder.execute("SELECT pg_advisory_unlock(4242)")


@pytest.fixture
def server(postgres: Any) -> Iterator[Server]:
    admin = psycopg.connect(postgres.admin_dsn, autocommit=True)
    holder = postgres.connect(autocommit=True)
    yield Server(admin, postgres.name, holder)
    holder.close()
    admin.close()


@pytest.fixture
def pooling(learner: Any) -> ModuleType:
    module: ModuleType = learner.load("pooling")
    for name in ("PoolExhausted", "Database"):
        if not isinstance(getattr(module, name, None), type):
            pytest.fail(f"pooling.py: define a class {name} (see the README)", pytrace=False)
    return module


@pytest.fixture
def queued(learner: Any) -> Callable[[], int]:
    """How many requests are waiting in a threading wait inside the learner's code."""
    return lambda: int(learner.run_helper(threads_waiting_in, str(learner.dir)))


@pytest.fixture
def opened() -> Iterator[list[Any]]:
    """Databases the test opened, closed at the end whatever happened."""
    dbs: list[Any] = []
    yield dbs
    for db in dbs:
        try:
            db.close()
        except Exception:  # noqa: BLE001 - cleanup of learner objects
            pass


def open_db(pooling: ModuleType, opened: list[Any], dsn: str, rate: float, latency: float,
            timeout: float, max_waiting: int = 0) -> Any:
    db = pooling.Database(dsn, rate, latency, timeout, max_waiting=max_waiting)
    opened.append(db)
    return db


def start(calls: list[Call]) -> list[Call]:
    for call in calls:
        call.start()
    return calls


def release(server: Server, calls: list[Call]) -> None:
    """Release the lock and let every request run to its end."""
    server.release()
    for call in calls:
        call.join(15)


def assert_completed(calls: list[Call]) -> None:
    failed = [c for c in calls if c.error is not None or c.is_alive()]
    assert not failed, (
        f"{len(failed)} of {len(calls)} requests did not complete once connections were free "
        f"again: {failed[0].error!r}")


def still_waiting(calls: list[Call], timeout: float) -> bool:
    """For wait_until: while the pool is full these requests can only wait; fail at once,
    with the reason, if one has already ended."""
    for call in calls:
        if call.error is not None:
            pytest.fail(
                f"a request failed after {call.elapsed:.2f} s while the pool was busy, with "
                f"{type(call.error).__name__}: {call.error}. With an acquire timeout of "
                f"{timeout:.0f} s it must wait for a connection to come free", pytrace=False)
        if call.ident is not None and not call.is_alive():
            pytest.fail(
                f"a request completed ({call.result!r}) while every pooled connection was "
                "busy: it cannot have used the pool; it must wait for a pooled connection",
                pytrace=False)
    return True


def assert_pool_exhausted(pooling: ModuleType, call: Call, context: str) -> None:
    assert call.error is not None, (
        f"{context}: the request succeeded, expected pooling.PoolExhausted: with every "
        "connection busy it can only have opened a connection of its own")
    assert isinstance(call.error, pooling.PoolExhausted), (
        f"{context}: the request raised {type(call.error).__module__}."
        f"{type(call.error).__name__}, expected pooling.PoolExhausted: translate the "
        "pool's errors into your own, so callers need not know which pool library you use")


# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "latency", "want"), [
    (200, 0.05, 10),
    (200, 0.07, 14),     # 200 * 0.07 = 14.000000000000002 in floating point
    (30, 0.05, 2),       # 1.5 connections busy on average: round up
    (30, 0.04, 2),       # 1.2: round() first would give 1
    (101, 0.01, 2),      # 1.01: rounding to a decimal first would give 1
    (1001, 0.001, 2),    # 1.001: rounding to two (or three) decimals first would give 1
    (7, 0.3, 3),         # 2.1 (2.0999999999999996 in floating point)
    (1000, 0.2, 200),
    (0.5, 0.1, 1),       # almost idle: still one connection
    (0, 0.1, 1),         # no traffic yet: still one connection, never a pool of 0
    (10000, 0.0005, 5),  # half a millisecond each (a cached read): 5 busy, not 0
    (5000, 0.0003, 2),   # 0.3 ms each: 1.5 busy
])
def test_pool_size_follows_littles_law(learner: Any, rate: float, latency: float,
                                       want: int) -> None:
    pool_size = learner.function("pooling", "pool_size")
    got = pool_size(rate, latency)
    busy = rate * latency
    why = "Little's Law, L = arrival rate x time per request, rounded up (and at least 1)"
    whole_ms = max(1, math.ceil(round(rate * round(latency * 1000)) / 1000))
    if want == 1 and got == 0:
        why = "a pool of 0 serves nobody: at least 1 connection, whatever the traffic"
    elif latency < 0.001 and got == whole_ms != want:
        why = (f"{latency * 1000:g} ms per request is less than a millisecond, not 0 (or 1): "
               f"{rate}/s x {latency} s keeps {busy:g} connections busy - rounding the "
               f"latency to whole milliseconds first loses it; keep the product in floating "
               f"point and round only its noise away (e.g. round(x, 9)), then ceil")
    elif got == round(busy) < want:
        why = (f"{busy!r} busy on average rounds to {got} but needs {want}: round() (or "
               f"any rounding to the nearest) before ceil() drops a fraction below .5 - "
               f"round only the floating-point noise away (e.g. round(x, 9)), then ceil")
    elif got == want - 1 and 0 < busy - int(busy) < 0.01:
        why = (f"{busy!r} busy on average needs {want}, not {got}: the fraction is small but "
               f"real - rounding to a few decimals before ceil() (round(x, 2)) drops it, and "
               f"so does rounding down; round only the floating-point noise away (e.g. "
               f"round(x, 9)), then ceil")
    elif got == want - 1:
        why = (f"{busy!r} busy on average: a fraction of a connection still needs a whole "
               f"one - round UP (ceil), not down (floor, int())")
    elif got == want + 1:
        why = (f"{busy!r} is {want} plus floating-point noise: ceil() of it opens a "
               f"connection nobody needs - round the noise away (e.g. round(x, 9)) first")
    assert got == want, f"pool_size({rate}/s, {latency} s) returned {got}, expected {want}: {why}"


def test_never_more_server_connections_than_the_pool(pooling: ModuleType, opened: list[Any],
                                                     server: Server, postgres: Any,
                                                     queued: Callable[[], int]) -> None:
    db = open_db(pooling, opened, postgres.dsn, rate=40, latency=0.1, timeout=10)
    assert db.max_connections == 4, f"max_connections is {db.max_connections}, expected 4"

    peak = [0]
    sampling = threading.Event()
    sampler_conn = psycopg.connect(postgres.admin_dsn, autocommit=True)
    sampler_view = Server(sampler_conn, server.dbname, server.holder)

    def sample() -> None:  # the highest count seen while the requests run
        while not sampling.is_set():
            peak[0] = max(peak[0], sampler_view.connections())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    server.hold()
    sampler.start()
    calls = start([Call(db.query, HOLD) for _ in range(12)])
    try:
        # every request is either running on a connection or waiting for one, and the
        # pool's 4 are in use (a pool that opens them as requests come may still be opening)
        wait_until(lambda: still_waiting(calls, 10)
                   and (running := server.lock_waiters()) + queued() == 12 and running >= 4,
                   "all 12 requests to be running or queued, 4 of them running")
        now = server.connections()
        assert now <= 4, (
            f"12 concurrent requests opened {now} server connections, expected at most the "
            "pool's 4: a pool hands out the connections it has and makes the rest wait - one "
            "pool per Database, made once, not one per request (nor one made by each of the "
            "first requests, which all found none yet)")
        assert server.lock_waiters() == 4, (
            f"{server.lock_waiters()} requests are running, expected 4: all of the pool's "
            "connections should be in use while requests are queued")
    finally:
        release(server, calls)
        sampling.set()
        sampler.join(5)
        sampler_conn.close()
    assert_completed(calls)
    assert peak[0] <= 4, (
        f"at some point the test database had {peak[0]} client connections, expected at "
        "most 4 (the pool's size) at every moment")
    pids = {db.query("SELECT pg_backend_pid()")[0][0] for _ in range(20)}
    assert len(pids) <= 4, (
        f"20 sequential queries ran on {len(pids)} different server connections: a pool "
        "reuses its connections instead of paying a new handshake per request")


def test_excess_request_waits_then_fails_with_pool_exhausted(
        pooling: ModuleType, opened: list[Any], server: Server, postgres: Any) -> None:
    db = open_db(pooling, opened, postgres.dsn, rate=20, latency=0.1, timeout=1.2)
    server.hold()
    busy = start([Call(db.query, HOLD) for _ in range(2)])
    try:
        wait_until(lambda: server.lock_waiters() == 2, "the pool's 2 connections to be busy")
        extra = Call(db.query, "SELECT 1")
        extra.start()
        extra.join(5)  # the pool is full: only the acquire timeout ends this wait
        assert not extra.is_alive(), (
            "a third request on a full pool of 2 with an acquire timeout of 1.2 s was still "
            "waiting after 5 s, expected PoolExhausted after about 1.2 s: acquire_timeout_s "
            "is in seconds, and so is psycopg_pool's timeout (a value read as milliseconds, "
            "or the pool's default of 30 s, lets requests pile up behind a slow database)")
        assert_pool_exhausted(pooling, extra, "a third request on a full pool of 2")
        assert extra.elapsed >= 0.96, (
            f"the third request failed after {extra.elapsed:.2f} s, expected it to wait for "
            "the acquire timeout (1.2 s) first: a connection may come free meanwhile")
        assert extra.elapsed <= 3, (
            f"the third request waited {extra.elapsed:.1f} s, expected to give up after the "
            "acquire timeout of 1.2 s")
        assert extra.elapsed < 1.7, (
            f"the third request waited {extra.elapsed:.2f} s on a full pool, expected to give "
            "up after the acquire timeout of 1.2 s: the wait was stretched - a timeout "
            "rounded up to whole seconds (math.ceil, int seconds as libpq's connect_timeout "
            "takes) or a second try after PoolTimeout; a caller's "
            "deadline is acquire_timeout_s, fractions included")
    finally:
        release(server, busy)
    assert_completed(busy)


def test_waiting_request_gets_the_next_free_connection(
        pooling: ModuleType, opened: list[Any], server: Server, postgres: Any,
        queued: Callable[[], int]) -> None:
    db = open_db(pooling, opened, postgres.dsn, rate=20, latency=0.1, timeout=10)
    server.hold()
    busy = start([Call(db.query, HOLD) for _ in range(2)])
    waiting = Call(db.query, "SELECT 42")
    try:
        wait_until(lambda: server.lock_waiters() == 2, "the pool's 2 connections to be busy")
        waiting.start()
        wait_until(lambda: still_waiting([waiting], 10) and queued() == 1,
                   "the third request to wait in the pool")
        assert server.connections() <= 2, (
            f"while the third request waits, the server has {server.connections()} "
            "connections: with both pooled connections busy it must queue, not connect")
    finally:
        release(server, [*busy, waiting])
    assert_completed([*busy, waiting])
    assert waiting.result == [(42,)], (
        f"the waiting request returned {waiting.result!r} once a connection came free, "
        "expected [(42,)]")


def test_full_wait_queue_rejects_at_once(pooling: ModuleType, opened: list[Any],
                                         server: Server, postgres: Any,
                                         queued: Callable[[], int]) -> None:
    db = open_db(pooling, opened, postgres.dsn, rate=20, latency=0.1, timeout=10,
                 max_waiting=2)
    server.hold()
    busy = start([Call(db.query, HOLD) for _ in range(2)])
    waiting: list[Call] = []
    try:
        wait_until(lambda: server.lock_waiters() == 2, "the pool's 2 connections to be busy")
        waiting = start([Call(db.query, "SELECT 1") for _ in range(2)])
        wait_until(lambda: still_waiting(waiting, 10) and queued() == 2,
                   "2 requests to wait in the pool's queue")
        extra = Call(db.query, "SELECT 1")
        extra.run()
        assert_pool_exhausted(pooling, extra, "a request with max_waiting=2 already waiting")
        assert extra.elapsed < 1, (
            f"the request was rejected after {extra.elapsed:.1f} s: with the wait queue full "
            "(max_waiting=2) it must fail at once, not wait - that is backpressure")
    finally:
        release(server, [*busy, *waiting])
    assert_completed([*busy, *waiting])


# A burst of requests arriving together on a full pool with max_waiting=2, each line of the
# learner's code slowed by STEP_DELAY (harness.py) so that they interleave step by step.
BURST, STEP_DELAY = 5, 0.05


def test_a_burst_never_queues_more_than_max_waiting(
        pooling: ModuleType, learner: Any, opened: list[Any], server: Server, postgres: Any,
        queued: Callable[[], int]) -> None:
    # A long acquire timeout: a queued request stays queued until the test releases it.
    db = open_db(pooling, opened, postgres.dsn, rate=20, latency=0.1, timeout=60,
                 max_waiting=2)
    server.hold()
    busy = start([Call(db.query, HOLD) for _ in range(2)])
    burst = None
    try:
        wait_until(lambda: server.lock_waiters() == 2, "the pool's 2 connections to be busy")
        burst = learner.harness().Burst(pooling, db, "SELECT 1", BURST, STEP_DELAY)
        # every request of the burst ends up either waiting in the queue or rejected
        wait_until(lambda: len(burst.ended()) + queued() == BURST,
                   f"each of the {BURST} requests of the burst to wait in the pool or end",
                   timeout=30)
        waiting, ended = queued(), burst.ended()
    finally:
        release(server, busy)
        if burst is not None:
            burst.join(15)
    assert waiting <= 2, (
        f"{BURST} requests arriving together on a full pool with max_waiting=2: {waiting} "
        f"of them waited in the pool's queue, expected at most 2 (the others rejected at "
        f"once with PoolExhausted): a limit checked before asking the pool (its "
        f"requests_waiting, or a counter of your own) is a check-then-act - requests that "
        f"arrive together all see room and all queue. Let the pool decide where the queue "
        f"is, under its lock: ConnectionPool(..., max_waiting=max_waiting)")
    wrong = [o for o in ended if o[0] != "error" or not o[2]]
    assert not wrong, (
        f"a request of the burst that found the queue full ended with {wrong[0]}, expected "
        f"pooling.PoolExhausted")
    assert_completed(busy)


def test_each_database_has_a_pool_of_its_own(pooling: ModuleType, opened: list[Any],
                                             server: Server, postgres: Any,
                                             queued: Callable[[], int]) -> None:
    """Two Databases on one DSN, sized 1 and 3: 4 requests, 3 on the larger, 1 on the
    smaller, all run at once; and closing one leaves the other working. A pool kept in a
    module global, a class attribute or a cache by DSN is shared: one size for both, and the
    first close() closes it for the other too."""
    small = open_db(pooling, opened, postgres.dsn, rate=10, latency=0.1, timeout=60)
    large = open_db(pooling, opened, postgres.dsn, rate=30, latency=0.1, timeout=60)
    sizes = (small.max_connections, large.max_connections)
    assert sizes == (1, 3), f"max_connections are {sizes}, expected (1, 3)"
    server.hold()
    calls = start([Call(large.query, HOLD) for _ in range(3)] + [Call(small.query, HOLD)])
    try:  # a pool that opens its connections as requests come may still be opening them
        came_true(lambda: still_waiting(calls, 60) and server.lock_waiters() == 4, 10)
        running, waiting = server.lock_waiters(), queued()
    finally:
        release(server, calls)
    assert running == 4, (
        f"two Databases made side by side on one DSN, sized 1 and 3: of 4 requests (3 on the "
        f"one sized 3, 1 on the one sized 1) {running} ran at once and {waiting} waited for "
        f"a connection 10 s on, expected all 4 to run: the two share one pool - a pool kept in a "
        f"module global, a class attribute or a cache by DSN serves every Database with the "
        f"size of whichever made it. Each Database makes its own pool in __init__")
    assert_completed(calls)
    small.close()
    opened.remove(small)
    after = Call(large.query, "SELECT 7")
    after.run()
    assert after.error is None and after.result == [(7,)], (
        f"after close() of one Database, a query on the other gave {after.result!r} / "
        f"{after.error!r}, expected [(7,)]: closing one closed the pool both use - each "
        f"Database has a pool of its own, and close() closes only that one")


def test_requests_arriving_at_a_new_database_share_one_pool(
        pooling: ModuleType, learner: Any, opened: list[Any], server: Server,
        postgres: Any) -> None:
    """A burst of first requests on a new Database, each line of the learner's code slowed
    (harness.py) so that they interleave step by step; then close(). A pool made by the
    first query, checked and then made in two steps (`if self.pool is None:`), is made by
    every request of the burst: the pools nobody keeps hold their connections after close()."""
    db = open_db(pooling, opened, postgres.dsn, rate=20, latency=0.1, timeout=30)
    burst = learner.harness().Burst(pooling, db, "SELECT 1", BURST, STEP_DELAY)
    burst.join(30)
    ended = burst.ended()
    failed = [o for o in ended if o[0] != "ok"]
    assert len(ended) == BURST and not failed, (
        f"{BURST} requests arriving together at a new Database (a pool of 2, a 30 s acquire "
        f"timeout): {len(ended) - len(failed)} returned, "
        f"{failed[0] if failed else 'the others never ended'}")
    db.close()
    opened.remove(db)
    if came_true(lambda: server.connections() == 0, 10):
        return
    left = server.connections()
    assert left <= db.max_connections, (
        f"{BURST} requests arriving together at a new Database (a pool of "
        f"{db.max_connections}), then close(): the server still has {left} connections from "
        f"it 10 s on, more than one pool holds - more than one pool was made: each request "
        f"found no pool yet and made one (a pool made lazily, checked and then made in two "
        f"steps, even with a lock around only the making), and close() closed the last. "
        f"Make the pool in __init__, or check and make it under one lock")
    pytest.fail(f"after close() the server still has {left} connections from your pool: "
                f"close() must close the pool and every connection it opened", pytrace=False)


# A query without parameters, holding a literal %: psycopg reads % as a placeholder
# whenever execute() is given parameters - even () - and refuses "%'".
LITERAL_PERCENT = ("SELECT s FROM (VALUES ('a%'), ('ab'), ('ba')) AS v (s) "
                   "WHERE s LIKE 'a%' ORDER BY s")


def test_a_query_without_params_runs_as_written(pooling: ModuleType, opened: list[Any],
                                                postgres: Any) -> None:
    db = open_db(pooling, opened, postgres.dsn, rate=1, latency=0.5, timeout=5)
    why = ("query(sql) without params must run sql as written, where a % is a plain "
           "character: psycopg reads each % as a placeholder (%s) whenever execute() is "
           "given parameters, even an empty tuple - pass None when there are none, not the "
           "default ()")
    try:
        rows = db.query(LITERAL_PERCENT)
    except Exception as exc:  # noqa: BLE001 - explained
        pytest.fail(f"query({LITERAL_PERCENT!r}) with no params raised "
                    f"{type(exc).__name__}: {exc}; expected [('a%',), ('ab',)]\n{why}",
                    pytrace=False)
    assert rows == [("a%",), ("ab",)], (
        f"query({LITERAL_PERCENT!r}) with no params returned {rows!r}, expected "
        f"[('a%',), ('ab',)] (LIKE 'a%': the values that start with 'a')\n{why}")


@dataclass(frozen=True)
class Write:
    """A statement that changes data, what query() returns for it, and the pages another
    connection reads once it is committed."""

    what: str
    sql: str
    params: tuple[Any, ...]
    returns: list[tuple[Any, ...]]
    then: list[str]


# Writes of every shape: committing only when no rows come back (cursor.description is
# None), or only statements that start with INSERT / UPDATE / DELETE, loses some of them.
WRITES = [
    Write("the INSERT", "INSERT INTO visits VALUES (%s)", ("home",), [], ["home"]),
    Write("the INSERT ... RETURNING (rows came back, and it wrote)",
          "INSERT INTO visits VALUES (%s) RETURNING page", ("cart",), [("cart",)],
          ["cart", "home"]),
    Write("the UPDATE ... RETURNING (rows came back, and it wrote)",
          "UPDATE visits SET page = %s WHERE page = 'cart' RETURNING page", ("checkout",),
          [("checkout",)], ["checkout", "home"]),
    Write("the WITH ... INSERT (a write whose first word is not INSERT)",
          "WITH v AS (SELECT %s::text AS page) INSERT INTO visits SELECT page FROM v",
          ("help",), [], ["checkout", "help", "home"]),
]


def test_writes_are_committed_and_a_failing_query_gives_its_connection_back(
        pooling: ModuleType, opened: list[Any], server: Server, postgres: Any) -> None:
    db = open_db(pooling, opened, postgres.dsn, rate=20, latency=0.1, timeout=1)
    with postgres.connect(autocommit=True) as setup:
        setup.execute("CREATE TABLE visits (page text)")
    for write in WRITES:
        try:
            result = db.query(write.sql, write.params)
        except Exception as exc:  # noqa: BLE001 - explained below
            hint = ("" if write.returns else " - a statement that returns no rows must give "
                    "[] (check cursor.description before fetchall())")
            pytest.fail(f"query({write.sql!r}) raised {type(exc).__name__}: {exc}{hint}",
                        pytrace=False)
        assert result == write.returns, (
            f"query({write.sql!r}) returned {result!r}, expected {write.returns!r}")
        with postgres.connect(autocommit=True) as check:
            seen = [page for (page,) in
                    check.execute("SELECT page FROM visits ORDER BY page").fetchall()]
        assert seen == write.then, (
            f"after query({write.sql!r}) returned {result!r}, another connection reads the "
            f"pages {seen}, expected {write.then}: {write.what} was not committed - a write "
            f"is a write whether or not rows come back and whatever its first word, so "
            f"commit every query's transaction (with pool.connection() as conn: commits "
            f"when the block ends); a connection given back with putconn() uncommitted is "
            f"rolled back")

    # More failing queries than the pool has connections: each must give its connection
    # back, and reach the caller as the database's error, not as an exhausted pool.
    for n in range(1, 4):
        call = Call(db.query, "SELECT 1 / 0")
        call.run()
        if call.error is None:
            pytest.fail(f"query('SELECT 1 / 0') returned {call.result!r}: the database's "
                        f"error must reach the caller", pytrace=False)
        if isinstance(call.error, pooling.PoolExhausted):
            if n == 1:
                pytest.fail(
                    "query('SELECT 1 / 0') raised PoolExhausted: a division by zero is not "
                    "an exhausted pool - translate only the pool's own errors (PoolTimeout, "
                    "TooManyRequests) and let the database's errors out", pytrace=False)
            pytest.fail(
                f"after {n - 1} failing queries, query #{n} found no free connection in a "
                f"pool of 2 (PoolExhausted): each failing query kept its connection - give "
                f"it back whatever happens (with pool.connection() as conn:, or putconn() "
                f"in a finally)", pytrace=False)
        assert type(call.error).__name__ == "DivisionByZero", (
            f"query('SELECT 1 / 0') raised {type(call.error).__name__}: {call.error}, "
            f"expected psycopg.errors.DivisionByZero - let the database's error out as it is")
    after = Call(db.query, "SELECT 7")
    after.run()
    if isinstance(after.error, pooling.PoolExhausted):
        pytest.fail(
            "after 3 failing queries a pool of 2 had no free connection for 'SELECT 7': the "
            "failing queries kept their connections - give a connection back whatever "
            "happens (with pool.connection() as conn:)", pytrace=False)
    assert after.error is None and after.result == [(7,)], (
        f"after 3 failing queries, query('SELECT 7') gave {after.result!r} / "
        f"{after.error!r}: a connection that saw an error must be rolled back before reuse")

    db.close()
    opened.remove(db)
    try:
        wait_until(lambda: server.connections() == 0, "the pool's connections to close")
    except BaseException:
        pytest.fail(
            f"after close() the server still has {server.connections()} connections from "
            f"your pool: close() must close the pool and every connection it opened",
            pytrace=False)


@dataclass(frozen=True)
class ServerError:
    """An OperationalError the database raises on a pooled connection that was free."""

    what: str       # what happened, as the learner reads it
    settings: str   # session settings of the pool's connections (libpq options)
    sql: str
    expected: str   # the psycopg.errors class the database raises
    terminate: bool = False  # the test ends the request's backend while it waits


SERVER_ERRORS = [
    ServerError("a statement_timeout (0.5 s) that fired", "-c statement_timeout=500",
                "SELECT pg_sleep(30)", "QueryCanceled"),
    ServerError("a lock_timeout (0.5 s) on a lock the test holds", "-c lock_timeout=500",
                HOLD, "LockNotAvailable"),
    ServerError("its server process ended by pg_terminate_backend()", "", HOLD,
                "AdminShutdown", terminate=True),
]


def waiting_backend(server: Server) -> int:
    """The pid of the one request waiting on the test's lock."""
    rows = server.admin.execute(
        "SELECT a.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE NOT l.granted AND l.locktype = 'advisory' AND a.datname = %s",
        (server.dbname,)).fetchall()
    return int(rows[0][0])


def waiting_elsewhere(server: Server, pid: int) -> bool:
    """Whether a request other than backend `pid` waits on the test's lock."""
    rows = server.admin.execute(
        "SELECT 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE NOT l.granted AND l.locktype = 'advisory' AND a.datname = %s AND a.pid <> %s",
        (server.dbname, pid)).fetchall()
    return bool(rows)


def terminate_and_refuse_a_retry(server: Server, call: Call, case: ServerError) -> None:
    """End the backend the request waits on; it must end too, not wait again elsewhere."""
    ended = waiting_backend(server)
    server.admin.execute("SELECT pg_terminate_backend(%s)", (ended,))
    wait_until(lambda: not call.is_alive() or waiting_elsewhere(server, ended),
               "the request to end after its server process was terminated", 20)
    assert not call.is_alive(), (
        f"query({case.sql!r}) ran again on another server connection after {case.what}, "
        f"expected the database's {case.expected} to reach the caller: a retry repeats a "
        f"statement that may already have taken effect (a write whose COMMIT reached the "
        f"server before the connection died is made twice) - only the caller knows whether "
        f"it is safe to repeat; raise the error, and the pool replaces the broken connection "
        f"for the next query")


@pytest.mark.parametrize("case", SERVER_ERRORS, ids=lambda c: c.expected)
def test_database_operational_errors_are_not_an_exhausted_pool(
        pooling: ModuleType, opened: list[Any], server: Server, postgres: Any,
        case: ServerError) -> None:
    # The pool's PoolTimeout and TooManyRequests are psycopg.OperationalErrors, and so is
    # what the server raises on a connection the pool did lend: the request below has a
    # free pool of 1 and a 10 s acquire timeout, so no pool error can be what it saw.
    dsn = make_conninfo(postgres.dsn, options=case.settings) if case.settings else postgres.dsn
    db = open_db(pooling, opened, dsn, rate=10, latency=0.1, timeout=10)
    server.hold()
    call = Call(db.query, case.sql)
    try:
        call.start()
        if case.terminate:
            wait_until(lambda: still_waiting([call], 10) and server.lock_waiters() == 1,
                       "the request to run on its pooled connection")
            terminate_and_refuse_a_retry(server, call, case)
        call.join(20)
    finally:
        release(server, [call])
    query = f"query({case.sql!r})"
    assert not call.is_alive(), (
        f"{query} was still running 20 s after {case.what}, expected it to raise the "
        f"database's {case.expected} at once")
    assert call.error is not None, (
        f"{query} returned {call.result!r} after {case.what}, expected the database's "
        f"{case.expected} to reach the caller")
    error = type(call.error)
    if isinstance(call.error, pooling.PoolExhausted):
        cause = call.error.__cause__
        pytest.fail(
            f"{query} on a free pool raised PoolExhausted after {case.what} (the database "
            f"raised {type(cause).__name__ if cause else 'an error'}), expected the "
            f"database's own {case.expected}: only PoolTimeout and TooManyRequests mean no "
            f"connection was free - catching their base class psycopg.OperationalError (or "
            f"any timeout or lost connection) also takes in statement timeouts, lock "
            f"timeouts and terminated backends, and tells callers to back off from a pool "
            f"that had a connection for them", pytrace=False)
    names = {cls.__name__ for cls in error.__mro__}
    assert "OperationalError" in names, (
        f"{query} raised {error.__module__}.{error.__name__}: {call.error} after "
        f"{case.what}, expected the database's own {case.expected} (a "
        f"psycopg.OperationalError) - let the database's errors out as they are")
    after = Call(db.query, "SELECT 7")
    after.run()
    assert after.error is None and after.result == [(7,)], (
        f"after {case.what}, the next query('SELECT 7') gave {after.result!r} / "
        f"{after.error!r}, expected [(7,)]: the pool must give the connection back (or "
        f"replace a broken one) whatever error the query met")
