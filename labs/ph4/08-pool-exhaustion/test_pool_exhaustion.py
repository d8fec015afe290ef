"""ph4.8 verification, on a real Postgres (a database of the test's own):

* backends killed with pg_terminate_backend while idle in the pool are replaced on borrow:
  every later query succeeds, on new backends, and the server never holds more of the
  pool's connections than its size (pg_stat_activity, counted from another database);
* exhaustion, policy "queue": with every connection held, a borrower waits (a thread
  blocked in a threading wait in the learner's code, counted where it runs) without opening
  a connection, gets the next one released, and raises PoolExhausted when its timeout ends;
  stats() counts it in 'waiting' while it waits, and no more once it gave up;
* exhaustion, policy "reject": PoolExhausted at once, no waiting;
* backpressure: 8 requests on a pool of 3, held busy on the server by an advisory lock the
  test owns: exactly 3 run, 5 wait, then all complete;
* a failing query gives its connection back, rolled back; execute() of a write (no rows to
  fetch) returns [] and commits it;
* two pools in one process share nothing (no idle deque or count in the class or module);
* a borrower woken and beaten to the connection waits again only for what is left of its
  acquire_timeout (the timeout of its new wait, read where it waits), and acquire() hands
  out connections in no transaction, new or validated;
* a connect that fails - for a new slot or replacing a dead connection - gives its slot
  back: the database refusing connections (ALLOW_CONNECTIONS false) never leaves the pool
  counting connections that do not exist, and a borrower waiting for the slot while the
  connect fails (held, then ended, by a relay in front of Postgres) is woken and connects;
* a connection given back broken (its backend killed mid-query, or closed by the borrower)
  frees its slot and wakes a borrower waiting for one;
* a connection the pool has not lent out - given back twice, or another pool's - is never
  pooled: the pool never hands one connection to two borrowers;
* a stale second release by borrower A, once the pool has lent the same connection to B,
  neither pools B's connection nor lets A query it (ownership by lease, not by connection).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from types import ModuleType
from typing import Any, NoReturn, cast

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from labrunner.testing import TcpRelay, came_true, threads_waiting_in, wait_until

HOLD = "SELECT pg_advisory_xact_lock_shared(4242)"


class Call(threading.Thread):
    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        super().__init__(daemon=True)
        self.fn, self.args = fn, args
        self.result: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            self.error = exc


class Server:
    def __init__(self, postgres: Any) -> None:
        self.admin = psycopg.connect(postgres.admin_dsn, autocommit=True)
        self.holder = postgres.connect(autocommit=True)
        self.dbname = postgres.name

    def pids(self) -> set[int]:
        rows = self.admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND backend_type = "
            "'client backend' AND pid <> %s", (self.dbname, self.holder.info.backend_pid))
        return {r[0] for r in rows.fetchall()}

    def terminate(self, pids: set[int]) -> None:
        for pid in pids:
            self.admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        wait_until(lambda: not (self.pids() & pids), "the terminated backends to go away")

    def lock_waiters(self) -> int:
        (n,) = cast("tuple[int]", self.admin.execute(  # a count(*) always has its row
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE NOT "
            "l.granted AND l.locktype = 'advisory' AND a.datname = %s",
            (self.dbname,)).fetchone())
        return int(n)

    def close(self) -> None:
        self.holder.close()
        self.admin.close()


@pytest.fixture
def server(postgres: Any) -> Iterator[Server]:
    srv = Server(postgres)
    yield srv
    srv.close()


@pytest.fixture
def mod(learner: Any) -> ModuleType:
    module: ModuleType = learner.load("pool")
    for name in ("Pool", "PoolExhausted"):
        if not isinstance(getattr(module, name, None), type):
            pytest.fail(f"pool.py: define a class {name} (see the README)", pytrace=False)
    return module


@pytest.fixture
def pools() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for p in made:
        try:
            p.close()
        except Exception:  # noqa: BLE001 - cleanup of learner objects
            pass


@pytest.fixture
def waiting(learner: Any) -> Callable[[], int]:
    return lambda: int(learner.run_helper(threads_waiting_in, str(learner.dir)))


@pytest.fixture
def on_a_lock(learner: Any) -> Callable[[], int]:
    """How many threads sleep in the learner's code itself (not in a threading wait): blocked
    on a lock, counted where the learner's code runs (the lab's harness)."""
    return lambda: int(learner.harness().threads_asleep_in(str(learner.dir)))


@pytest.fixture
def stranded(learner: Any) -> Callable[[float], int]:
    """How many threads wait in the pool with nothing left to wake them within the seconds
    given: never notified, and no timeout of theirs due by then (the lab's harness, where the
    learner's code runs)."""
    return lambda within: int(learner.harness().waits_nothing_wakes(str(learner.dir),
                                                                    within)[1])


WOKEN_WITHIN = 15.0   # the last resort: a woken borrower runs in milliseconds


def join_unless_stranded(calls: list[Call], stranded: Callable[[float], int],
                         within: float = WOKEN_WITHIN) -> bool:
    """Wait up to ``within`` s for ``calls`` to end, once whatever should wake them (a
    release, a failed connect) is over. True as soon as every call still running is seen,
    three looks in a row, asleep in the pool's wait with nothing left to wake it (never
    notified, its timeout further off than the test's patience): it would sleep on until its
    acquire_timeout, so the wait ends there instead of at the deadline."""
    deadline, looks = time.monotonic() + within, 0
    while time.monotonic() < deadline:
        alive = [c for c in calls if c.is_alive()]
        if not alive:
            return False
        alive[0].join(0.05)
        alive = [c for c in calls if c.is_alive()]
        if not alive:
            return False
        looks = looks + 1 if stranded(deadline - time.monotonic()) >= len(alive) else 0
        if looks >= 3:
            return True
    return False


def still_waiting(seen_stranded: bool) -> str:
    """How a waiter that never got going was seen: at once, or only at the deadline."""
    if seen_stranded:
        return ("was still asleep in the pool's wait with nothing left to wake it (never "
                "notified)")
    return f"was still waiting {WOKEN_WITHIN:.0f} s later"


def blocked_on_a_lock(call: Call, on_a_lock: Callable[[], int], baseline: int,
                      within: float) -> bool:
    """Wait up to ``within`` s for ``call`` to end; True as soon as a thread more than
    ``baseline`` is seen asleep in the learner's code three looks in a row (a lock held
    elsewhere: it goes on only when that is let go), so the wait ends there."""
    deadline, looks = time.monotonic() + within, 0
    while call.is_alive() and time.monotonic() < deadline:
        call.join(0.05)
        looks = looks + 1 if call.is_alive() and on_a_lock() > baseline else 0
        if looks >= 3:
            return True
    return False


def make(mod: ModuleType, pools: list[Any], dsn: str, size: int, **kw: Any) -> Any:
    pool = mod.Pool(dsn, size, **kw)
    pools.append(pool)
    return pool


def stats(pool: Any) -> dict[str, int]:
    try:
        return dict(pool.stats())
    except NotImplementedError:
        pytest.fail("Pool.stats() is not implemented: it must report size, open, idle, "
                    "in_use and waiting", pytrace=False)


def test_killed_backends_are_replaced_on_borrow(mod: ModuleType, pools: list[Any],
                                                 server: Server, postgres: Any) -> None:
    pool = make(mod, pools, postgres.dsn, 3)
    held = [pool.acquire() for _ in range(3)]
    for conn in held:
        pool.release(conn)
    first = server.pids()
    assert len(first) == 3, (
        f"after 3 connections were borrowed and returned, the server holds {len(first)} "
        "connections of the pool, expected 3: returned connections must stay open, idle in "
        "the pool, for the next borrower")
    server.terminate(first)  # e.g. a failover, or an idle timeout on a proxy in between
    seen: set[int] = set()
    for i in range(6):
        try:
            (pid,), = pool.execute("SELECT pg_backend_pid()")
        except Exception as exc:  # noqa: BLE001 - the learner's failure is the message
            pytest.fail(
                f"query {i + 1} after the pool's idle backends were killed with "
                f"pg_terminate_backend failed: {type(exc).__name__}: {exc}\nA connection "
                "whose backend died looks fine on the client (conn.closed is still False) "
                "until it is used. Validate on borrow: run SELECT 1 on the idle connection, "
                "and if that fails close it and open a new one in its place.", pytrace=False)
        seen.add(pid)
    assert not (seen & first), "a query ran on a backend that had been terminated"
    now = server.pids()
    assert len(now) <= 3, (
        f"after replacing killed backends the server holds {len(now)} of the pool's "
        "connections, more than its size 3: a replaced connection must take the dead one's "
        "place, not add to it")
    s = stats(pool)
    assert s["open"] == len(now) and s["in_use"] == 0, (
        f"stats() says {s}, but the server holds {len(now)} of the pool's connections and "
        "none is in use: count a dead connection out when you drop it")


def test_two_pools_share_no_connections(mod: ModuleType, pools: list[Any],
                                        postgres: Any) -> None:
    """Two Pool objects in one process (two databases, two services) each have their own
    connections, count and waiters: the second pool's first borrower opens a connection of
    its own while the first pool's one is idle, and then both pools serve at once."""
    first = make(mod, pools, postgres.dsn, 1, policy="reject")
    second = make(mod, pools, postgres.dsn, 1, policy="reject")
    (first_pid,), = first.execute("SELECT pg_backend_pid()")   # now idle in the first pool
    shared = ("the pools share their state: keep the idle connections, the count and the "
              "condition on the instance (made in __init__), never in a class attribute (a "
              "deque written in the class body is ONE object for every Pool) or a module "
              "global")
    try:
        conn = second.acquire()
    except mod.PoolExhausted as exc:
        pytest.fail(f"a new pool of size 1, nothing borrowed from it, raised PoolExhausted "
                    f"({exc}) on its first acquire(), while another pool held its one "
                    f"connection idle: it counted the other pool's connection as its own - "
                    f"{shared}", pytrace=False)
    (pid,), = conn.execute("SELECT pg_backend_pid()").fetchall()
    conn.rollback()
    assert pid != first_pid, (
        f"a second pool handed out the first pool's idle connection (backend pid {pid}): "
        f"{shared}")
    try:
        again = first.execute("SELECT 1")
    except mod.PoolExhausted as exc:
        pytest.fail(f"the first pool (size 1, its one connection idle) raised PoolExhausted "
                    f"({exc}) while a second pool lent out a connection of its own: "
                    f"{shared}", pytrace=False)
    assert again == [(1,)]
    second.release(conn)
    counts = [(stats(p)["open"], stats(p)["idle"]) for p in (first, second)]
    assert counts == [(1, 1), (1, 1)], (
        f"each of two pools of size 1 opened one connection and has it back, idle; stats() "
        f"says (open, idle) {counts[0]} and {counts[1]}: {shared}")


def borrower_waiting(pool: Any, waiting: Callable[[], int]) -> tuple[Any, Call]:
    """The only connection of ``pool`` held here, and a second borrower seen waiting for it:
    (the held connection, the waiting call)."""
    held = pool.acquire()
    waiter = Call(pool.acquire)
    wait_until(lambda: waiting() >= 1 or not waiter.is_alive(),
               "a second borrower to wait for the only connection")
    assert waiter.is_alive(), f"a borrower of a full pool did not wait: {waiter.error!r}"
    return held, waiter


def barge(learner: Any, pool: Any, held: Any, waiter: Call,
          waiting: Callable[[], int]) -> Any:
    """``held`` released and at once taken again by another borrower (the harness, where
    the learner's code runs), while ``waiter`` waits: the barging borrower's connection,
    once the woken waiter is seen waiting again or ended."""
    barged = learner.harness().release_and_barge(pool, held, str(learner.dir))
    if isinstance(barged, str):
        pytest.fail(f"release() then acquire() at once, with a borrower waiting: the acquire "
                    f"raised {barged}", pytrace=False)
    wait_until(lambda: waiting() >= 1 or not waiter.is_alive(),
               "the woken borrower to wait again or to end")
    return barged


def test_queue_policy_waits_then_times_out(mod: ModuleType, pools: list[Any], server: Server,
                                           postgres: Any, waiting: Callable[[], int],
                                           stranded: Callable[[float], int]) -> None:
    pool = make(mod, pools, postgres.dsn, 2, policy="queue", acquire_timeout=60)
    a, b = pool.acquire(), pool.acquire()
    waiter = Call(pool.acquire)
    wait_until(lambda: waiting() >= 1 or not waiter.is_alive(),
               "the third borrower to wait for a connection")
    if not waiter.is_alive():
        how = (f"raised {type(waiter.error).__name__}: {waiter.error}" if waiter.error
               else "got a connection")
        pytest.fail(f"with both connections of a pool of 2 held, a third acquire() {how} "
                    "instead of waiting\nPolicy 'queue': wait on a threading.Condition until "
                    "a connection is released or acquire_timeout runs out.", pytrace=False)
    assert len(server.pids()) == 2, (
        f"while a borrower waits the server holds {len(server.pids())} of the pool's "
        "connections, expected 2 (the size): a waiting borrower must not open one of its own")
    seen = stats(pool)
    want = {"size": 2, "open": 2, "idle": 0, "in_use": 2, "waiting": 1}
    assert {k: seen.get(k) for k in want} == want, (
        f"with both connections of a pool of 2 held and a third borrower asleep in the pool's "
        f"wait, stats() said {seen}, expected {want}\nstats() is how backpressure is seen "
        "from outside (a queue of borrowers that grows): count a borrower in 'waiting' from "
        "when it starts to wait until it leaves, however it leaves.")
    pid_b = b.info.backend_pid
    pool.release(b)
    never_woken = join_unless_stranded([waiter], stranded)
    assert waiter.error is None and not waiter.is_alive(), (
        "a connection was released while a borrower waited, and the borrower did not get "
        "it: " + (f"it {still_waiting(never_woken)}" if waiter.is_alive() else
                  f"{waiter.error!r}")
        + "\nrelease() must notify() the condition the waiters wait on.")
    got = waiter.result
    assert got.info.backend_pid == pid_b, (
        "the waiting borrower got a new connection instead of the one just released")
    pool.release(got)
    pool.release(a)

    short = make(mod, pools, postgres.dsn, 1, policy="queue", acquire_timeout=0.5)
    only = short.acquire()
    start = time.monotonic()
    late = Call(short.acquire)
    late.join(20)
    elapsed = time.monotonic() - start
    if late.is_alive():
        pytest.fail("acquire() with acquire_timeout=0.5 was still waiting after 20 s: wait "
                    "with a timeout (Condition.wait(remaining)) and give up when it ends",
                    pytrace=False)
    outcome = ("returned a connection" if late.error is None
               else f"raised {type(late.error).__name__}")
    assert isinstance(late.error, mod.PoolExhausted), (
        f"when the timeout ran out acquire() {outcome}, expected PoolExhausted: the caller "
        "needs a distinct error to shed load (503)")
    assert elapsed >= 0.45, (
        f"PoolExhausted came after {elapsed:.2f} s, before the 0.5 s acquire_timeout: the "
        "queue policy waits for a connection first")
    after = stats(short)
    assert after.get("waiting") == 0 and after.get("in_use") == 1, (
        f"after the only borrower waiting gave up (PoolExhausted at its timeout), stats() "
        f"said {after}, expected waiting 0 and in_use 1: a borrower that times out has left "
        "the queue - take it out of 'waiting' on that path too (try/finally around the wait)")
    short.release(only)


def test_a_woken_waiter_beaten_to_the_connection_waits_on(
        learner: Any, mod: ModuleType, pools: list[Any], postgres: Any,
        waiting: Callable[[], int], stranded: Callable[[float], int]) -> None:
    pool = make(mod, pools, postgres.dsn, 1, policy="queue", acquire_timeout=60)
    held, waiter = borrower_waiting(pool, waiting)
    barged = barge(learner, pool, held, waiter, waiting)
    if not waiter.is_alive():
        got = ("got a connection too - two borrowers hold the pool's only connection"
               if waiter.error is None else
               f"raised {type(waiter.error).__name__}: {waiter.error}")
        pytest.fail(
            "a borrower waiting (acquire_timeout=60) was woken by a release, but another "
            f"borrower took the connection first; the woken one then {got}, instead of "
            "waiting on until a connection is free or its 60 s are over\nA wake-up is a "
            "hint, not a promise: wait in a loop (`while nothing free: cond.wait(remaining)`) "
            "and re-check after every wake-up; raise PoolExhausted only when the deadline has "
            "passed.", pytrace=False)
    pool.release(barged)
    never_woken = join_unless_stranded([waiter], stranded)
    assert waiter.error is None and not waiter.is_alive(), (
        "the waiting borrower did not get the connection released next: "
        + (f"it {still_waiting(never_woken)}" if waiter.is_alive() else f"{waiter.error!r}"))
    pool.release(waiter.result)


SPENT = 1.5   # seconds of a waiter's acquire_timeout that pass before a release wakes it


def test_a_woken_waiter_keeps_its_first_deadline(
        learner: Any, mod: ModuleType, pools: list[Any], postgres: Any,
        waiting: Callable[[], int], stranded: Callable[[float], int]) -> None:
    """acquire_timeout counts from the acquire() call. A borrower woken by a release and
    beaten to the connection waits again for what is LEFT of it: the timeout of its new wait
    (read where it waits) is at most acquire_timeout minus the time already spent. A wait
    given the whole timeout again after every wake-up moves the deadline each time: under
    steady churn a borrower waits for ever instead of getting PoolExhausted."""
    timeout = 60.0
    pool = make(mod, pools, postgres.dsn, 1, policy="queue", acquire_timeout=timeout)
    held, waiter = borrower_waiting(pool, waiting)
    started = time.monotonic()  # the waiter's acquire() was called before this
    time.sleep(SPENT)  # part of its timeout goes by: only ever shortens a right wait
    woken_at = time.monotonic()
    barged = barge(learner, pool, held, waiter, waiting)
    timeouts = learner.harness().wait_timeouts(str(learner.dir)) if waiter.is_alive() else []
    pool.release(barged)
    never_woken = join_unless_stranded([waiter], stranded)
    if waiter.error is None and not waiter.is_alive():
        pool.release(waiter.result)
    # at most what was left when the release woke it: acquire() began before `started`
    left = timeout - (woken_at - started)
    longer = [t for t in timeouts if t is None or t > left + 1e-3]
    assert not longer, (
        f"a borrower waiting with acquire_timeout={timeout:.0f} was woken after more than "
        f"{woken_at - started:.1f} s by a release, beaten to the connection, and waited again "
        f"with a timeout of {'none' if longer[0] is None else f'{longer[0]:.1f} s'}, expected "
        f"at most the {left:.1f} s left of its {timeout:.0f} s: every wake-up restarts its "
        "clock, so under steady churn it never gets PoolExhausted and the caller's timeout "
        "means nothing\nCompute the deadline once, when acquire() is called (deadline = "
        "time.monotonic() + acquire_timeout), and wait for what is left of it: "
        "cond.wait(deadline - time.monotonic()).")
    assert waiter.error is None and not waiter.is_alive(), (
        "the waiting borrower did not get the connection released next: "
        + (f"it {still_waiting(never_woken)}" if waiter.is_alive() else f"{waiter.error!r}"))


HANDED_OUT = {
    "new": "a new connection (the pool's first)",
    "validated": "an idle connection, validated on borrow",
}


@pytest.mark.parametrize("how", HANDED_OUT, ids=HANDED_OUT.keys())
def test_a_borrowed_connection_is_in_no_transaction(how: str, mod: ModuleType,
                                                    pools: list[Any], postgres: Any) -> None:
    """What acquire() hands out is idle: no transaction open. One left open by the pool
    (validation's SELECT 1 not rolled back, a SET on a new connection not committed) turns
    the borrower's `with conn.transaction():` into a savepoint whose work release() then
    rolls back, makes now() the pool's time, and holds a snapshot."""
    pool = make(mod, pools, postgres.dsn, 1, policy="reject")
    if how == "validated":
        pool.release(pool.acquire())
    conn = pool.acquire()
    try:
        status = str(conn.info.transaction_status.name)
    finally:
        pool.release(conn)
    assert status == "IDLE", (
        f"acquire() handed out {HANDED_OUT[how]} with a transaction already open (status "
        f"{status}, expected IDLE): the pool ran a statement on it (validation's SELECT 1, a "
        "SET) and never ended the transaction psycopg opened for it\nA borrower's "
        "`with conn.transaction():` then only makes a savepoint, and its commit is rolled "
        "back when the connection is given back; now() returns the pool's time. End what "
        "the pool ran: conn.rollback() after SELECT 1 (or autocommit for it).")


def fill_with_dead(pool: Any, server: Server, n: int) -> None:
    """n idle connections in the pool whose backends the server has since killed (a
    failover): the next borrower finds a dead one and must replace it in its slot."""
    held = [pool.acquire() for _ in range(n)]
    for conn in held:
        pool.release(conn)
    server.terminate(server.pids())


# Where a connect can fail: (what the pool held when it did, which connect it was).
CONNECTS = {
    "new slot": ("an EMPTY pool of 2", "the connect for a new slot"),
    "replacement": ("a pool of 2 whose 2 idle connections had had their backends killed "
                    "(pg_terminate_backend)", "the connect replacing a dead connection"),
}


@pytest.mark.parametrize("where", list(CONNECTS))
def test_a_failed_connect_gives_its_slot_back(where: str, mod: ModuleType, pools: list[Any],
                                              server: Server, postgres: Any) -> None:
    pool_was, which = CONNECTS[where]
    pool = make(mod, pools, postgres.dsn, 2, policy="reject")
    if where == "replacement":
        fill_with_dead(pool, server, 2)
    server.admin.execute(f'ALTER DATABASE "{postgres.name}" ALLOW_CONNECTIONS false')
    try:
        for i in range(3):
            try:
                pool.acquire().close()
            except mod.PoolExhausted:
                pytest.fail(
                    f"the database refused new connections (ALLOW_CONNECTIONS false) and "
                    f"attempt {i + 1} to borrow from {pool_was} raised PoolExhausted: the "
                    f"{i} failed connect(s) before it kept their slots, so the pool now "
                    f"counts connections that never opened\n{which} failed and did not give "
                    "its slot back. Every failure path of a connect must give the reserved "
                    "slot back (open -= 1, notify) before re-raising - or one database "
                    "hiccup leaves the pool refusing everyone forever.", pytrace=False)
            except psycopg.Error:
                continue
            pytest.fail("a connection opened while the database refused connections",
                        pytrace=False)
    finally:
        server.admin.execute(f'ALTER DATABASE "{postgres.name}" ALLOW_CONNECTIONS true')
    try:
        rows = pool.execute("SELECT 41 + 1")
    except Exception as exc:  # noqa: BLE001 - the learner's failure is the message
        pytest.fail(
            f"after 3 connects failed while the database was down ({which}, in {pool_was}), "
            f"the database came back and a query on the pool failed with "
            f"{type(exc).__name__}: {exc}\nA failed connect must give its slot back "
            "(open -= 1), so the pool can open a connection once the database is back.",
            pytrace=False)
    assert rows == [(42,)]


class ConnectGate(TcpRelay):
    """A relay in front of Postgres that can hold new connections: a connect through it
    hangs (a server slow to answer after a failover) until the test ends it, and then it
    fails the way a server going away makes it fail."""

    def __init__(self, dsn: str) -> None:
        info = conninfo_to_dict(dsn)
        super().__init__((str(info.get("host") or "127.0.0.1"), int(str(info.get("port") or 5432))))
        self.dsn = make_conninfo(dsn, host="127.0.0.1", port=self.port, sslmode="disable",
                                 gssencmode="disable")
        self.holding = False
        self.held: list[socket.socket] = []

    def admit(self, client: socket.socket) -> bool:
        with self.lock:
            if self.holding:
                self.held.append(client)
                return False
        return True

    def fail_held(self) -> None:
        """End the held connects (they fail); connections from now on go through."""
        with self.lock:
            held, self.held, self.holding = self.held, [], False
        for sock in held:
            self.shut(sock)


@pytest.fixture
def gate(postgres: Any) -> Iterator[ConnectGate]:
    with ConnectGate(postgres.dsn) as relay:
        yield relay


def outcome_of(call: Call) -> str:
    return ("got a connection" if call.error is None
            else f"raised {type(call.error).__name__}: {call.error}")


def slot_not_handed_on(pool: Any, event: str, when: str) -> tuple[str, str]:
    """(what was seen, what to do) when a waiter for the only slot of a pool of 1 was still
    waiting after `event` freed that slot: the slot kept, or the waiter never woken."""
    s = stats(pool)
    if s.get("open"):
        return (f"{event}, and its slot was never given back: stats() says {s}, open still "
                "counts a connection that no longer exists",
                f"When {when}, give the slot back (open -= 1) and notify() a waiter.")
    return (f"{event} and gave its slot back, but the borrower waiting for a slot was never "
            f"woken (stats() says {s})",
            f"When {when}, give the slot back AND notify() the condition, as for a connection "
            "put back idle: a waiter waits for an idle connection OR a free slot, and "
            "otherwise sleeps until its timeout though a slot is free.")


@pytest.mark.parametrize("where", list(CONNECTS))
def test_a_failed_connect_wakes_a_waiting_borrower(
        where: str, mod: ModuleType, pools: list[Any], server: Server, gate: ConnectGate,
        waiting: Callable[[], int], on_a_lock: Callable[[], int],
        stranded: Callable[[float], int]) -> None:
    _, which = CONNECTS[where]
    pool = make(mod, pools, gate.dsn, 1, policy="queue", acquire_timeout=60)
    if where == "replacement":
        fill_with_dead(pool, server, 1)
    gate.holding = True
    first = Call(pool.acquire)
    wait_until(lambda: bool(gate.held) or not first.is_alive(),
               f"acquire() to connect ({which}) to the database")
    if not first.is_alive():
        pytest.fail(f"acquire() on a pool of 1 ({where}) {outcome_of(first)} without "
                    "connecting to the database", pytrace=False)
    second = Call(pool.acquire)
    # It waits in the pool's condition (or, in a pool that connects holding its lock, on
    # that lock: then it simply goes on once the first borrower lets go), or it connects
    # too: a second connect held by the gate, beside the first one's.
    deadline, on_lock = time.monotonic() + 10, 0
    while waiting() < 1 and second.is_alive() and time.monotonic() < deadline:
        if len(gate.held) >= 2:
            pytest.fail(f"while {which} was still in progress on a pool of 1, a second "
                        "acquire() connected to the database too, instead of waiting for the "
                        "slot: a pool of 1 opening a second connection\nThe size is a hard "
                        "limit: count a slot as taken from the moment a connect for it "
                        "begins, and make the next borrower wait.", pytrace=False)
        on_lock = on_lock + 1 if on_a_lock() > 0 else 0
        if on_lock >= 3:
            break   # asleep on the pool's lock, three looks in a row
        time.sleep(0.01)
    if not second.is_alive():
        pytest.fail(f"while {which} was still in progress on a pool of 1, a second "
                    f"acquire() {outcome_of(second)} instead of waiting for the slot",
                    pytrace=False)
    gate.fail_held()  # the first borrower's connect fails; the database answers again
    first.join(15)
    if first.is_alive():
        pytest.fail(f"{which} failed (the server closed the connection), and acquire() was "
                    "still running 15 s later", pytrace=False)
    if first.error is None:
        pool.release(first.result)   # it tried again and got one: fine, pass it on
    never_woken = join_unless_stranded([second], stranded)
    if second.is_alive():
        head, fix = slot_not_handed_on(pool, "a connect failed", "a connect fails, whichever "
                                       "connect it was (a new slot or a replacement)")
        pytest.fail(f"{head}\nA borrower waited for the only slot of a pool of 1 while "
                    f"{which} failed; the failing acquire() {outcome_of(first)}. With the "
                    "database answering again, the waiter "
                    f"{still_waiting(never_woken)}.\n{fix}", pytrace=False)
    assert second.error is None, (
        f"a borrower waiting for the slot {which} had failed in then {outcome_of(second)}, "
        "once the database answered again: expected a new connection")
    pool.release(second.result)


def test_a_connection_given_back_mid_transaction_is_rolled_back(
        mod: ModuleType, pools: list[Any], postgres: Any) -> None:
    with postgres.connect(autocommit=True) as setup:
        setup.execute("CREATE TABLE IF NOT EXISTS ph48_ledger (note text)")
        setup.execute("TRUNCATE ph48_ledger")
    pool = make(mod, pools, postgres.dsn, 1, policy="reject")
    conn = pool.acquire()
    conn.execute("INSERT INTO ph48_ledger VALUES ('half-done work')")
    pool.release(conn)  # the borrower gave up without committing
    with postgres.connect(autocommit=True) as check:
        (n,), = check.execute("SELECT count(*) FROM ph48_ledger").fetchall()
    assert n == 0, (
        "a borrower INSERTed a row and gave the connection back without committing; the row "
        "is now committed: release() committed the open transaction\nrelease() must ROLL "
        "BACK: work the borrower did not commit was abandoned (an error, a timeout), and "
        "committing it hands half-done changes to everyone.")


TWO_BORROWERS = ("a connection the pool holds twice goes to two borrowers, who then run "
                 "their transactions interleaved on one session. release() must refuse a "
                 "connection it has not lent out and not given back yet (ValueError, as "
                 "psycopg_pool's putconn does), or at least never pool it: keep the lent "
                 "connections of THIS pool (a set on the instance) and check it")


def refused_or_ignored(release: Callable[[], Any], what: str) -> None:
    """``release()`` of a connection the pool must not take: ValueError, or nothing."""
    try:
        release()
    except ValueError:
        pass
    except Exception as exc:  # noqa: BLE001 - the learner's failure is the message
        pytest.fail(f"release() of {what} raised {type(exc).__name__}: {exc}; expected "
                    f"ValueError (or to be ignored): {TWO_BORROWERS}", pytrace=False)


def test_a_connection_given_back_twice_is_never_pooled_twice(
        mod: ModuleType, pools: list[Any], postgres: Any) -> None:
    pool = make(mod, pools, postgres.dsn, 2, policy="reject")
    conn = pool.acquire()
    pool.release(conn)
    refused_or_ignored(lambda: pool.release(conn), "a connection already given back")
    s = stats(pool)
    assert (s["open"], s["idle"]) == (1, 1), (
        f"one connection was borrowed and given back twice; stats() says open {s['open']}, "
        f"idle {s['idle']}, expected 1 and 1: the second release() was counted - "
        f"{TWO_BORROWERS}")
    a, b = pool.acquire(), pool.acquire()
    pids = [c.execute("SELECT pg_backend_pid()").fetchall()[0][0] for c in (a, b)]
    for c in (a, b):
        c.rollback()
    assert a is not b and pids[0] != pids[1], (
        f"after one connection was given back twice, two acquire() calls got the same "
        f"connection (backend pid {pids[0]}): the pool held it twice - {TWO_BORROWERS}")
    pool.release(a)
    pool.release(b)


STALE_LEASE = ("the pool knows what it lent by the connection itself (a set of connections), "
               "and that connection IS lent again - to the next borrower - so the stale call "
               "looks like the right one. Ownership goes by lease, not by connection: "
               "acquire() hands out a handle of its own each time (a small proxy that forwards "
               "to the connection, as HikariCP's ProxyConnection does), release() takes back "
               "only a handle still live, and a handle given back is dead: it refuses to reach "
               "the session it no longer owns")


def test_a_stale_release_never_returns_the_next_borrowers_connection(
        mod: ModuleType, pools: list[Any], postgres: Any) -> None:
    """Borrower A gives its connection back, the pool lends the same connection to B, then A
    gives it back AGAIN (a retry, a second `finally`): that call is A's, stale, and must not
    take B's connection from B."""
    pool = make(mod, pools, postgres.dsn, 1, policy="reject")
    a = pool.acquire()
    pool.release(a)
    b = pool.acquire()                  # a pool of 1: the same connection, lent to B now
    (pid_b,), = b.execute("SELECT pg_backend_pid()").fetchall()
    b.rollback()
    refused_or_ignored(lambda: pool.release(a),
                       "borrower A's connection, given back a second time after the pool "
                       "had lent it to borrower B")
    s = stats(pool)
    try:
        again = pool.acquire()
    except mod.PoolExhausted:
        again = None
    if again is not None:
        (pid,), = again.execute("SELECT pg_backend_pid()").fetchall()
        again.rollback()
        pytest.fail(
            f"borrower A gave its connection back, the pool (size 1) lent it to borrower B "
            f"(backend pid {pid_b}), and A gave it back a second time: that stale release() "
            f"put B's connection back in the pool (stats() then {s}), and the next acquire() "
            f"lent it again (pid {pid}) while B still holds it - two borrowers on one "
            f"session, expected PoolExhausted\nThe second release() came from A, not from "
            f"B: {STALE_LEASE}.", pytrace=False)
    try:
        a.execute("SELECT 1")
        reached = True
    except Exception:  # noqa: BLE001 - any refusal will do
        reached = False
    assert not reached, (
        f"borrower A's handle, given back, still ran a query - on the session borrower B now "
        f"holds (pid {pid_b}): A's stale code runs inside B's transaction\n{STALE_LEASE}.")
    (pid,), = b.execute("SELECT pg_backend_pid()").fetchall()
    b.rollback()
    assert pid == pid_b, f"borrower B's connection changed under it: pid {pid_b}, now {pid}"
    pool.release(b)
    assert stats(pool)["idle"] == 1, (
        f"borrower B gave its connection back; stats() says {stats(pool)}, expected idle 1")


def test_another_pools_connection_is_never_pooled(mod: ModuleType, pools: list[Any],
                                                  postgres: Any) -> None:
    mine = make(mod, pools, postgres.dsn, 1, policy="reject")
    other = make(mod, pools, postgres.dsn, 1, policy="reject")
    (mine_pid,), = mine.execute("SELECT pg_backend_pid()")      # idle in its own pool
    foreign = other.acquire()
    refused_or_ignored(lambda: mine.release(foreign), "another pool's connection")
    s = stats(mine)
    assert (s["open"], s["idle"]) == (1, 1), (
        f"release() of another pool's connection changed this pool's stats() to open "
        f"{s['open']}, idle {s['idle']} (expected 1 and 1, its own connection idle): it took "
        f"the connection as its own - {TWO_BORROWERS}")
    got = mine.acquire()
    (pid,), = got.execute("SELECT pg_backend_pid()").fetchall()
    got.rollback()
    assert pid == mine_pid, (
        f"after another pool's connection was given to release(), this pool lent out that "
        f"connection (backend pid {pid}, its own is {mine_pid}) while the other pool's "
        f"borrower still holds it - {TWO_BORROWERS}")
    mine.release(got)
    other.release(foreign)
    assert stats(other)["idle"] == 1, "the other pool did not take its own connection back"


# A broken connection given back to a pool that must not take it: the pool's check of what
# it lent comes before any path of release(), the broken connection's too. A release() that
# frees a dead connection's slot before that check frees one slot per extra call, and the
# pool then opens more connections than its size. (case id, what is given back, by whom)
DEAD_RELEASES = [
    ("twice", "a broken connection given back a second time"),
    ("foreign", "another pool's broken connection"),
]


def test_a_broken_connection_not_lent_frees_no_slot(mod: ModuleType, pools: list[Any],
                                                    postgres: Any) -> None:
    for how, what in DEAD_RELEASES:     # one database for both cases: a pool each
        pool = make(mod, pools, postgres.dsn, 1, policy="reject")
        if how == "twice":
            dead = pool.acquire()
            dead.close()                # its borrower's connection broke
            pool.release(dead)          # its slot is free again: right
        else:
            dead = make(mod, pools, postgres.dsn, 1, policy="reject").acquire()
            dead.close()
        refused_or_ignored(partial(pool.release, dead), what)
        after = stats(pool)
        held = [pool.acquire()]
        try:
            held.append(pool.acquire())
        except mod.PoolExhausted:
            pass
        pids = [c.execute("SELECT pg_backend_pid()").fetchall()[0][0] for c in held]
        for c in held:
            c.rollback()
            pool.release(c)
        assert len(held) == 1, (
            f"release() of {what} freed a slot of a pool of size 1 (stats() then said open "
            f"{after['open']}, expected 0), and the pool then lent two connections at once "
            f"(backend pids {pids}) where size 1 allows one: check that the connection is one "
            "this pool has lent and not yet been given back BEFORE any path of release(), the "
            "broken connection's too - a dead connection's slot freed again on each extra "
            "call lets the pool open more connections than its size (and Postgres refuses "
            "them past max_connections)")


def test_reject_policy_fails_at_once(mod: ModuleType, pools: list[Any], postgres: Any,
                                     waiting: Callable[[], int], server: Server) -> None:
    pool = make(mod, pools, postgres.dsn, 2, policy="reject", acquire_timeout=30)
    a, b = pool.acquire(), pool.acquire()
    third = Call(pool.acquire)
    wait_until(lambda: not third.is_alive() or waiting() >= 1,
               "the third acquire() to end or wait")
    assert not third.is_alive(), (
        "policy 'reject': with every connection in use, acquire() waited; it must raise "
        "PoolExhausted at once")
    assert isinstance(third.error, mod.PoolExhausted), (
        f"policy 'reject': acquire() on a full pool "
        f"{'returned a connection' if third.error is None else f'raised {third.error!r}'}, "
        "expected PoolExhausted" + (f" (the server now holds {len(server.pids())} of the "
                                    "pool's connections, size 2)" if third.error is None
                                    else ""))
    pool.release(a)
    pool.release(b)
    assert pool.execute("SELECT 1") == [(1,)], "the pool did not work after a rejection"


def test_backpressure_never_more_than_size(mod: ModuleType, pools: list[Any], server: Server,
                                           postgres: Any, waiting: Callable[[], int],
                                           stranded: Callable[[float], int]) -> None:
    pool = make(mod, pools, postgres.dsn, 3, policy="queue", acquire_timeout=60)
    server.holder.execute("SELECT pg_advisory_lock(4242)")
    # Borrowers of other pools still waiting (a test before that failed left one waiting
    # for its acquire_timeout) are not this pool's.
    before = waiting()
    calls = [Call(pool.execute, HOLD) for _ in range(8)]

    def beyond_size() -> bool:
        """More than 3 of the pool's connections on the server, or more than 3 of its
        queries running: the limit is already broken, waiting longer changes nothing."""
        return server.lock_waiters() > 3 or len(server.pids()) > 3

    def settled() -> bool:
        if any(c.error for c in calls) or beyond_size():
            return True
        return server.lock_waiters() == 3 and waiting() - before == 5

    def over_the_limit() -> NoReturn:
        n = len(server.pids())
        pytest.fail(f"8 requests on a pool of 3: the server holds {n} of the pool's "
                    f"connections, {server.lock_waiters()} run, {waiting() - before} wait in the "
                    "pool; "
                    "expected 3 connections, 3 running and 5 waiting\nThe pool's size is a "
                    "hard limit: a request that finds every connection busy waits.",
                    pytrace=False)

    try:
        wait_until(settled, "3 requests to run (blocked on the test's lock) and 5 to wait "
                   "for a connection")
    except BaseException:
        over_the_limit()
    if beyond_size() and not any(c.error for c in calls):
        over_the_limit()
    errors = [c.error for c in calls if c.error]
    assert not errors, f"a request failed while the pool was busy: {errors[0]!r}"
    assert len(server.pids()) == 3, f"the server holds {len(server.pids())} connections, expected 3"
    server.holder.execute("SELECT pg_advisory_unlock(4242)")
    # One deadline for all 8, not 30 s each: a right pool finishes them in milliseconds,
    # and a pool whose waiters are never woken must not keep the run for their 60 s - nor
    # for 15: those left asleep in the pool's wait, never notified, once the rest are done
    # (nothing left to give a connection back), end the wait.
    never_woken = join_unless_stranded(calls, stranded)
    stuck = [c for c in calls if c.is_alive()]
    if stuck and len(stuck) < len(calls):
        pytest.fail(f"{len(calls) - len(stuck)} of 8 requests finished once the lock was "
                    f"released and gave their connections back, but {len(stuck)} "
                    f"{still_waiting(never_woken)} for a connection: release() must wake a "
                    "borrower waiting for one (notify the condition), or it sleeps until its "
                    "acquire_timeout", pytrace=False)
    failed = [c for c in calls if c.error or c.is_alive()]
    assert not failed, (f"{len(failed)} of 8 requests did not complete within 15 s once the "
                        f"lock was released: {failed[0].error!r}")
    s = stats(pool)
    assert s["in_use"] == 0 and s["waiting"] == 0 and s["open"] <= 3, (
        f"after every request completed, stats() says {s}: expected nothing in use or "
        "waiting, at most 3 open")


def test_a_failing_query_returns_its_connection(mod: ModuleType, pools: list[Any],
                                                postgres: Any) -> None:
    pool = make(mod, pools, postgres.dsn, 1, policy="reject")
    (pid,), = pool.execute("SELECT pg_backend_pid()")
    for i in range(3):
        try:
            pool.execute("SELECT * FROM no_such_table")
        except mod.PoolExhausted:
            pytest.fail(f"on a pool of 1, failing query {i + 1} found no free connection: "
                        "the failed query kept its connection\nRelease the connection in a "
                        "finally block, so that an exception gives it back too.", pytrace=False)
        except psycopg.Error:
            continue
        pytest.fail("SELECT * FROM no_such_table did not raise", pytrace=False)
    try:
        rows = pool.execute("SELECT 41 + 1")
    except Exception as exc:  # noqa: BLE001 - the learner's failure is the message
        pytest.fail(f"after three failing queries, a good one failed with "
                    f"{type(exc).__name__}: {exc}\nGive the connection back in a finally "
                    "block, and roll back its failed transaction before another borrower "
                    "gets it.", pytrace=False)
    assert rows == [(42,)]
    (after,), = pool.execute("SELECT pg_backend_pid()")
    assert after == pid, (
        f"after three failing queries on a pool of 1, its connection is a new one (backend "
        f"pid {after}, was {pid}): a query that fails in SQL (no such table) leaves the "
        "session healthy, in a failed transaction, and the pool threw it away - closed on "
        "the error, or given back without that transaction rolled back (rollback() whenever "
        "the status is not IDLE: INERROR too, not only INTRANS), so that validation on "
        "borrow found it failing and replaced it. Each failed query then costs a new "
        "connection: under a burst of errors, a storm of connects on the server. Roll back "
        "and keep it; drop only a connection that is broken (conn.closed)")


def test_execute_commits_a_statement_that_returns_no_rows(mod: ModuleType, pools: list[Any],
                                                          postgres: Any) -> None:
    """execute() runs whatever it is given: a write (INSERT, UPDATE, DDL) has no rows to
    fetch, returns [] and is committed before its connection goes back."""
    with postgres.connect(autocommit=True) as setup:
        setup.execute("CREATE TABLE IF NOT EXISTS ph48_orders (note text)")
        setup.execute("TRUNCATE ph48_orders")
    pool = make(mod, pools, postgres.dsn, 1, policy="reject")
    try:
        rows = pool.execute("INSERT INTO ph48_orders VALUES (%s)", ("paid",))
    except Exception as exc:  # noqa: BLE001 - the learner's failure is the message
        pytest.fail(f"execute() of an INSERT, a statement with no rows to return, raised "
                    f"{type(exc).__name__} ({exc}): it fetched a result that does not exist"
                    "\nAn INSERT, UPDATE or DDL statement returns no rows: there is nothing to "
                    "fetch. Fetch only when the statement has a result (cursor.description is "
                    "not None); otherwise return [].", pytrace=False)
    with postgres.connect(autocommit=True) as check:
        (n,), = check.execute("SELECT count(*) FROM ph48_orders").fetchall()
    assert n == 1, (
        f"execute() of an INSERT returned {rows!r}, but another connection sees {n} rows in "
        "the table: the write was never committed, and release() rolled it back\nexecute() "
        "commits whatever it ran - a statement with no rows to return as well.")
    assert not rows, f"execute() of an INSERT returned {rows!r}: it has no rows, expected []"
    assert pool.execute("SELECT count(*) FROM ph48_orders") == [(1,)], (
        "after an INSERT through execute(), a SELECT through it did not see the row")


# How a borrowed connection comes back broken, for release() to drop it and free its slot.
BROKEN = {
    "killed mid-query": "its backend was killed (pg_terminate_backend, as in a failover) while "
                        "it ran a query through execute(), which failed and gave it back",
    "closed by the borrower": "the borrower closed it (conn.close()) and gave it back",
}


@pytest.mark.parametrize("how", list(BROKEN))
def test_a_broken_connection_given_back_wakes_a_waiting_borrower(
        how: str, mod: ModuleType, pools: list[Any], server: Server, postgres: Any,
        waiting: Callable[[], int], stranded: Callable[[float], int]) -> None:
    pool = make(mod, pools, postgres.dsn, 1, policy="queue", acquire_timeout=60)
    server.holder.execute("SELECT pg_advisory_lock(4242)")
    try:
        if how == "killed mid-query":
            first = Call(pool.execute, HOLD)
            wait_until(lambda: server.lock_waiters() == 1 or not first.is_alive(),
                       "a query on the pool's only connection to run (blocked on a lock)")
            assert first.is_alive(), f"the query did not run: {outcome_of(first)}"
        else:
            conn = pool.acquire()
        second = Call(pool.acquire)
        wait_until(lambda: waiting() >= 1 or not second.is_alive(),
                   "a second borrower to wait for the only connection")
        assert second.is_alive(), (
            f"a borrower of a full pool of 1 {outcome_of(second)} instead of waiting")
        if how == "killed mid-query":
            server.terminate(server.pids())
            first.join(15)
            assert not first.is_alive() and first.error is not None, (
                "execute() of a query whose backend was killed did not fail within 15 s: "
                f"{'still running' if first.is_alive() else 'it returned'}")
        else:
            conn.close()
            pool.release(conn)
        never_woken = join_unless_stranded([second], stranded)
    finally:
        server.holder.execute("SELECT pg_advisory_unlock_all()")
    if second.is_alive():
        head, fix = slot_not_handed_on(pool, f"the pool's only connection broke ({how})",
                                       "release() drops a broken connection")
        pytest.fail(f"{head}\nA borrower waited for the only connection of a pool of 1 "
                    f"(acquire_timeout=60); {BROKEN[how]}. The waiter then "
                    f"{still_waiting(never_woken)}, though the slot was free for a new "
                    f"connection.\n{fix}",
                    pytrace=False)
    assert second.error is None, (
        f"once the only connection of a pool of 1 came back broken ({BROKEN[how]}), the "
        f"borrower waiting for it {outcome_of(second)}: expected a new connection in its slot")
    pool.release(second.result)


class HangingBackend(ConnectGate):
    """A ConnectGate that can also make one relayed connection hang: what its client sends
    is swallowed, nothing comes back (a backend stopped, or a network dropping packets) -
    until the test cuts it."""

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self.mute: int | None = None
        self.muted = threading.Event()

    def upward(self, link: Any, chunk: bytes) -> bool | None:
        if link.index == self.mute:
            self.muted.set()
            return None
        return super().upward(link, chunk)


# A borrower stuck in network I/O: validating an idle connection whose backend stopped
# answering, or connecting to a server slow to accept. Each case: how to get there, what
# the stuck borrower is doing.
STUCK_IN = {
    "validation": "validating (SELECT 1) an idle connection whose backend stopped answering",
    "connect": "connecting a new connection to a server that does not answer the connect",
}
PROMPTLY = 10.0   # a generous bound for what needs only the pool's lock


@pytest.mark.parametrize("stuck", list(STUCK_IN))
def test_a_borrower_stuck_in_network_io_stalls_no_one_else(
        stuck: str, mod: ModuleType, pools: list[Any], postgres: Any,
        on_a_lock: Callable[[], int]) -> None:
    with HangingBackend(postgres.dsn) as relay:
        pool = make(mod, pools, relay.dsn, 2, policy="queue", acquire_timeout=60)
        first = pool.acquire()               # relayed connection 0
        if stuck == "validation":
            held = pool.acquire()            # connection 1, healthy, in use
            pool.release(first)              # idle; its backend now stops answering
            relay.mute = 0
            stalled = Call(pool.acquire)
            came_true(lambda: relay.muted.is_set() or not stalled.is_alive(), PROMPTLY)
            reached = relay.muted.is_set()
        else:
            held = first
            relay.holding = True
            stalled = Call(pool.acquire)
            came_true(lambda: bool(relay.held) or not stalled.is_alive(), PROMPTLY)
            reached = bool(relay.held)
        if not reached:
            how = (f"{outcome_of(stalled)} without sending anything for it"
                   if not stalled.is_alive() else
                   f"still runs and sent nothing for it within {PROMPTLY:.0f} s")
            pytest.fail(f"acquire() on a pool of 2, meant to be {STUCK_IN[stuck]}, {how}",
                        pytrace=False)
        try:
            for what, call in (("stats()", lambda: stats(pool)),
                               ("release() of a healthy connection",
                                lambda: pool.release(held)),
                               ("acquire() with that healthy connection idle",
                                pool.acquire)):
                baseline = on_a_lock()
                done = Call(call)
                locked = blocked_on_a_lock(done, on_a_lock, baseline, PROMPTLY)
                late = ("was seen blocked on a lock in the pool's code" if locked
                        else f"did not return within {PROMPTLY:.0f} s")
                assert not done.is_alive(), (
                    f"{what} {late} while another borrower "
                    f"was {STUCK_IN[stuck]}, expected it at once: the pool's lock was held "
                    "during that network I/O, so one hanging backend stalls every borrower, "
                    "every release and stats() - for a TCP timeout, minutes - and no one "
                    "gets PoolExhausted after acquire_timeout\nThe lock guards the pool's "
                    "bookkeeping only: take a connection (or reserve a slot) under it, then "
                    "let go of it before SELECT 1 or connect(), and take it again to "
                    "record the outcome.")
                assert done.error is None, f"{what} raised {done.error!r}"
                if what.startswith("acquire"):
                    pool.release(done.result)
        finally:
            relay.fail_held()
            relay.cut()
            stalled.join(PROMPTLY)
        if not stalled.is_alive() and stalled.error is None:
            pool.release(stalled.result)


# ---- close(): as psycopg_pool's close() - waiters fail at once, borrowed ones on return ---


def pool_closed(mod: ModuleType) -> type[BaseException]:
    closed = getattr(mod, "PoolClosed", None)
    if not (isinstance(closed, type) and issubclass(closed, BaseException)):
        pytest.fail("pool.py: define an exception class PoolClosed (a PoolExhausted), raised "
                    "by acquire() once the pool is closed (see the README)", pytrace=False)
    return closed


def raised(call: Call) -> str:
    if call.is_alive():
        return "was still waiting"
    if call.error is None:
        return "returned a connection"
    return f"raised {type(call.error).__name__}: {call.error}"


def test_close_wakes_waiting_borrowers_and_refuses_new_ones(
        mod: ModuleType, pools: list[Any], postgres: Any, waiting: Callable[[], int],
        stranded: Callable[[float], int]) -> None:
    """psycopg_pool's close(): the borrowers waiting get PoolClosed at once, not when their
    acquire_timeout (a minute here) runs out, and acquire() afterwards fails at once."""
    closed = pool_closed(mod)
    pool = make(mod, pools, postgres.dsn, 2, policy="queue", acquire_timeout=60)
    held = [pool.acquire(), pool.acquire()]
    waiter = Call(pool.acquire)
    wait_until(lambda: waiting() >= 1 or not waiter.is_alive(),
               "the third borrower to wait for a connection")
    assert waiter.is_alive(), (
        f"with both connections of a pool of 2 held, a third acquire() {raised(waiter)} "
        "instead of waiting")
    closing = Call(pool.close)
    closing.join(PROMPTLY)
    assert not closing.is_alive(), (
        f"close() did not return within {PROMPTLY:.0f} s while two connections were "
        "borrowed: it waits for them to come back\nclose() closes what is idle and marks "
        "the pool closed; a borrowed connection is closed when it is given back.")
    never_woken = join_unless_stranded([waiter], stranded)
    how = still_waiting(never_woken) if waiter.is_alive() else raised(waiter)
    assert not waiter.is_alive() and isinstance(waiter.error, closed), (
        f"close() was called while a borrower waited in acquire() (its acquire_timeout "
        f"60 s); the borrower {how}, expected PoolClosed at once\nA pool that closes must "
        "wake its waiters (notify_all() on the condition), and each must find the pool "
        "closed when it wakes: otherwise a shutdown waits a whole acquire_timeout for each "
        "of them, or hands them connections from a pool that is gone.")
    late = Call(pool.acquire)
    never_woken = join_unless_stranded([late], stranded, PROMPTLY)
    how = still_waiting(never_woken) if late.is_alive() else raised(late)
    assert not late.is_alive() and isinstance(late.error, closed), (
        f"acquire() on a closed pool {how}, expected PoolClosed at once\nA closed pool hands "
        "out nothing and has nothing to wait for: check for closed first in acquire(), "
        "before the idle connections and the free slots.")
    for conn in held:
        pool.release(conn)


def gone_from(server: Server, pid: int) -> bool:
    return pid not in server.pids()


def test_close_closes_idle_now_and_borrowed_on_return(mod: ModuleType, pools: list[Any],
                                                      server: Server, postgres: Any) -> None:
    """psycopg_pool's close() and HikariCP's evict-on-return: the idle connection is closed
    at once, each borrowed one when it is given back, and then no session of the pool is
    left on the server."""
    pool_closed(mod)
    pool = make(mod, pools, postgres.dsn, 3)
    borrowed = [pool.acquire(), pool.acquire()]
    idle = pool.acquire()
    idle_pid = idle.info.backend_pid
    pool.release(idle)
    pool.close()
    gone = came_true(lambda: idle_pid not in server.pids(), PROMPTLY)
    assert gone, (
        f"close() left the pool's idle connection open: its session (pid {idle_pid}) is "
        f"still in pg_stat_activity {PROMPTLY:.0f} s later")
    for i, conn in enumerate(borrowed, 1):
        pid = conn.info.backend_pid
        pool.release(conn)
        s = stats(pool)
        # the server's session, not conn.closed: what acquire() hands out may be a lease,
        # closed to its borrower once given back whatever became of the connection
        assert s.get("idle") == 0 and came_true(partial(gone_from, server, pid), PROMPTLY), (
            f"borrowed connection {i} of 2 was given back after close() and is still open "
            f"(its session pid {pid}; stats() {s}): the pool kept it, expected it closed\n"
            "A closed pool hands nothing out again, so a connection given back to it is "
            "closed on return (psycopg_pool's putconn() after close(), HikariCP's evict on "
            "return); pooled, it stays open on the server until the process ends.")
        assert s.get("idle") == 0, (
            f"after close() and a connection given back, stats() said {s}, expected idle 0")
        still = len(borrowed) - i
        how = ("close() took from the count connections it did not close (the borrowed ones, "
               "counted off when they come back)" if int(s.get("open", 0)) < still else
               "release() after close() closed the connection and did not count it off")
        assert s.get("open") == still, (
            f"after close() and {i} of {len(borrowed)} borrowed connections given back, "
            f"stats() said open {s.get('open')}, expected {still} (the ones still borrowed): "
            f"{how}, so the count no longer says what the server holds. close() counts off "
            "the idle ones it closes, each release() after it the one it closes")
    left = server.pids()
    assert came_true(lambda: not server.pids(), PROMPTLY), (
        f"after close() and every borrowed connection given back, pg_stat_activity still "
        f"shows {len(server.pids())} of the pool's sessions ({sorted(left)}), expected none")
