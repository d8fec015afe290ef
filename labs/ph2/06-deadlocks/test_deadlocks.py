"""ph2.6 deadlocks, lock ordering, SKIP LOCKED and lock_timeout on real Postgres 15.

* Opposite transfers: T1 (1->2) takes its first lock and is held there by the
  after_first_lock hook; T2 (2->1) starts. With a fixed lock order T2 is seen waiting for
  T1's row; without one it takes account 2 and reaches its own hook - then both go on,
  each wanting the other's row, and Postgres aborts one with 40P01. Either way the check
  knows which world it is in before letting anything proceed. A deadlock caught and
  retried shows as a second call of the hook. Then four threads run random transfers in
  both directions: no 40P01, totals kept.
* Job queue: four workers, 200 jobs. Each worker's first handler waits until all four
  hold a job at once (so SKIP LOCKED is really exercised); a worker seen waiting for a
  row lock means the queue serializes. Every job must be handled exactly once, and a job
  whose handler raised must go back to the queue.
* lock_timeout: the check holds a row lock on its own connection; the learner's update
  must fail with LockBusy after about the timeout (a LockNotAvailable underneath), leave
  the connection usable and the setting not leaked to the session.
  Any other error on that path (a statement_timeout, a deadlock, a check violation) must
  come out as it is, never as LockBusy.

The data is not kind: jobs are stored in an order that is not their id order (a claim
without ORDER BY takes whatever the heap holds first), and the learner's session starts
with a lock_timeout that is not the server's default (a RESET "restores" the wrong value).

Mistakes a learner makes here, each caught with its own message:
- locking from then to (opposite orders)           -> 2->1 seen holding account 2 / 40P01
- catching 40P01 and retrying                      -> after_first_lock called twice
- no row lock (read, then write)                   -> balances
- the debit and credit outside the locking transaction (or in two transactions)
                                                   -> session killed before the credit:
                                                      money lost
- FOR UPDATE without SKIP LOCKED                   -> a worker seen waiting for a row lock
- a claim without LIMIT 1 (or every free row locked, the oldest picked in Python)
                                                   -> one worker holds the whole queue locked
- the job picked by an unlocked read (or an earlier transaction), then locked by id
                                                   -> A held at each step: a job handled twice
- claim committed before handling                  -> a failed handler's job is lost
- a handler's error swallowed and the job marked done -> the job is not taken again
- the oldest job not taken first (no ORDER BY)     -> jobs taken out of id order
- NOWAIT instead of a bounded wait                 -> LockBusy before the timeout
- statement_timeout instead of lock_timeout        -> the cause is QueryCanceled
- SET (session) instead of SET LOCAL, or SET then RESET -> lock_timeout after the call
- a session SET restored to a value remembered from an earlier call (module variable,
  cache per DSN)                                   -> a second connection gets the first's
- lock_timeout in the wrong unit (0 disables it)   -> still waiting after 10 s
- the row locked before lock_timeout is set, or SET LOCAL outside the transaction
                                                   -> LockBusy only at the session's own 7 s
- the balance read (in or before the transaction), then the sum written back
                                                   -> A held before its write: B's update lost
- any error turned into LockBusy (except OperationalError, psycopg.Error, Exception, or
  a statement_timeout too)                         -> a 57014, 40P01 or 23514 as LockBusy
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg.pq import TransactionStatus

from labrunner.testing import StatementGate, wait_until

Conn = psycopg.Connection[Any]


def blocked_on_lock(admin: Conn, pid: int) -> bool:
    """Is that session waiting for a row lock (another transaction's row or xact)?"""
    row = admin.execute("SELECT wait_event_type, wait_event FROM pg_stat_activity "
                        "WHERE pid = %s", (pid,)).fetchone()
    return row is not None and row[0] == "Lock" and row[1] in ("transactionid", "tuple")


def error_name(future: Future[Any]) -> str | None:
    exc = future.exception(timeout=30)
    return None if exc is None else type(exc).__name__


def ended(future: Future[Any]) -> str:
    """How a finished call ended, in words."""
    exc = future.exception(timeout=30)
    return "returned" if exc is None else f"raised {type(exc).__name__}: {exc}"


def api(learner: Any, name: str) -> Any:
    """The learner's locking module, loaded once (so LockBusy is the class it raises)."""
    module = learner.load("locking")
    if not callable(getattr(module, name, None)):
        pytest.fail(f"locking.py: define a function {name}()", pytrace=False)
    return module


@dataclass
class Db:
    postgres: Any

    def connect(self) -> Conn:
        conn: Conn = self.postgres.connect(autocommit=True)
        return conn

    def balances(self) -> dict[int, int]:
        with self.connect() as conn:
            return dict(conn.execute("SELECT id, balance FROM accounts").fetchall())


@pytest.fixture
def db(postgres: Any) -> Db:
    with postgres.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE accounts (id integer PRIMARY KEY, "
                     "balance bigint NOT NULL CHECK (balance >= 0))")
        conn.execute("INSERT INTO accounts SELECT g, 10000 FROM generate_series(1, 3) g")
        conn.execute("""CREATE TABLE jobs (
                            id      integer PRIMARY KEY,
                            payload text    NOT NULL,
                            status  text    NOT NULL DEFAULT 'queued',
                            done_by text,
                            done_at timestamptz)""")
        # Stored out of id order: 1 is not the first row of the heap.
        conn.execute("INSERT INTO jobs (id, payload) "
                     "SELECT g, 'job-' || g FROM generate_series(1, 200) g "
                     "ORDER BY (g * 73) % 200 DESC")
    return Db(postgres)


# --------------------------------------------------------------------------------------
# Lock ordering


@dataclass
class Transfer:
    """One transfer() in its own thread, held at after_first_lock on its first call."""

    label: str
    conn: Conn
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    calls: int = 0
    future: Future[Any] | None = None

    def after_first_lock(self) -> None:
        self.calls += 1
        if self.calls == 1:
            self.arrived.set()
            self.release.wait(timeout=30)

    @property
    def done(self) -> bool:
        return self.future is not None and self.future.done()


def test_opposite_transfers_do_not_deadlock(db: Db, learner: Any) -> None:
    transfer = api(learner, "transfer").transfer
    with (db.connect() as admin, db.connect() as c1, db.connect() as c2,
          ThreadPoolExecutor(max_workers=2) as pool):
        t1, t2 = Transfer("1->2", c1), Transfer("2->1", c2)
        t1.future = pool.submit(transfer, c1, 1, 2, 10, after_first_lock=t1.after_first_lock)
        wait_until(lambda: t1.arrived.is_set() or t1.done, "transfer 1->2 to take a lock")
        if not t1.arrived.is_set():
            pytest.fail(f"transfer 1->2 {ended(t1.future)} - without calling "
                        f"after_first_lock(): call it once you hold the first row lock",
                        pytrace=False)
        t2.future = pool.submit(transfer, c2, 2, 1, 10, after_first_lock=t2.after_first_lock)
        pid2 = c2.info.backend_pid
        # Either T2 queues behind T1 (same first row: ordered) or it holds account 2 and
        # reaches its hook (each holds what the other needs next).
        wait_until(lambda: t2.arrived.is_set() or t2.done or blocked_on_lock(admin, pid2),
                   "transfer 2->1 to take its first lock or to wait for one")
        t2_held_a_lock = t2.arrived.is_set()
        held = row_locks(admin) if t2_held_a_lock else {}
        t1.release.set()
        t2.release.set()
        errors = {t.label: error_name(t.future) for t in (t1, t2) if t.future is not None}

    failed = {label: err for label, err in errors.items() if err}
    if held.get(1) == "shared" and held.get(2) is None:
        pytest.fail(
            f"both transfers held account 1 at the same time (1->2 and 2->1 each passed "
            f"after_first_lock with it; then {failed or 'no error'}): the first lock is "
            f"shared (FOR SHARE / FOR KEY SHARE), so both get it, and each one's UPDATE then "
            f"waits for the other's share lock - a lock-upgrade deadlock even in the right "
            f"order. Lock the rows you will write with FOR UPDATE", pytrace=False)
    if "DeadlockDetected" in failed.values():
        pytest.fail(
            f"deadlock detected (40P01) in {', '.join(failed)}: 1->2 held account 1 and "
            f"waited for 2 while 2->1 held account 2 and waited for 1 - lock the two rows in "
            f"the same order in every transfer (lowest id first)", pytrace=False)
    assert not failed, f"the transfers failed: {failed}"
    assert t1.calls == 1 and t2.calls == 1, (
        f"after_first_lock was called {t1.calls} time(s) by 1->2 and {t2.calls} by 2->1: a "
        f"transaction started over - a deadlock (40P01) caught and retried still costs a "
        f"deadlock_timeout and an aborted transaction; lock in a fixed order instead")
    assert not t2_held_a_lock, (
        "2->1 took its first lock (account 2) while 1->2 held account 1: the two transfers "
        "lock in opposite orders; it only did not deadlock by luck")
    assert db.balances() == {1: 10000, 2: 10000, 3: 10000}, (
        f"after 1->2 10 and 2->1 10 the balances are {db.balances()}, expected unchanged")


def row_locks(admin: Conn) -> dict[int, str | None]:
    """Which of accounts 1 and 2 are locked right now, probed with NOWAIT from the test's
    own connection: "exclusive" (FOR UPDATE/NO KEY UPDATE), "shared" (FOR SHARE/KEY SHARE:
    another share lock is granted, an update lock is not) or None (free)."""
    held: dict[int, str | None] = {}
    for account in (1, 2):
        state: str | None = "exclusive"
        for mode, free_state in (("UPDATE", None), ("SHARE", "shared")):
            try:
                with admin.transaction():
                    admin.execute(f"SELECT 1 FROM accounts WHERE id = %s FOR {mode} NOWAIT",
                                  (account,))
            except psycopg.errors.LockNotAvailable:
                continue  # held in a mode that conflicts: try the weaker probe
            state = free_state  # granted: nothing stronger than that is held
            break
        held[account] = state
    return held


def test_random_transfers_in_both_directions_never_deadlock(db: Db, learner: Any) -> None:
    transfer = api(learner, "transfer").transfer
    start = threading.Barrier(4)

    def worker(seed: int) -> list[tuple[int, int, int]]:
        rng = random.Random(seed)
        done = []
        with db.connect() as conn:
            start.wait(timeout=30)
            for _ in range(30):
                src, dst = rng.sample([1, 2, 3], 2)
                amount = rng.randint(1, 9)
                transfer(conn, src, dst, amount)
                done.append((src, dst, amount))
        return done

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(worker, seed) for seed in range(4)]
        failures = [f.exception(timeout=60) for f in futures]
    errors = Counter(type(e).__name__ for e in failures if e is not None)
    if errors.get("DeadlockDetected"):
        pytest.fail(f"{errors['DeadlockDetected']} of 4 workers stopped with a deadlock "
                    f"(40P01) running random transfers in both directions: lock accounts in "
                    f"a fixed order (lowest id first) so no two transfers wait for each "
                    f"other", pytrace=False)
    first_error = next((e for e in failures if e is not None), None)
    assert first_error is None, (
        f"{sum(errors.values())} of 4 workers stopped: {type(first_error).__name__}: "
        f"{first_error}")
    expected = {1: 10000, 2: 10000, 3: 10000}
    for f in futures:
        for src, dst, amount in f.result():
            expected[src] -= amount
            expected[dst] += amount
    assert db.balances() == expected, (
        f"balances {db.balances()} after 120 transfers, expected {expected}")


def test_a_transfer_cut_off_midway_moves_all_or_nothing(db: Db, learner: Any,
                                                         postgres: Any) -> None:
    """transfer(1->2) is held before each of its statements in turn and its session is
    killed there, as when the process dies: whatever had run must vanish with it, or all
    of it must have been committed - never a debit without its credit."""
    transfer = api(learner, "transfer").transfer
    with (StatementGate.for_dsn(postgres.dsn) as gate, db.connect() as admin,
          ThreadPoolExecutor(max_workers=1) as pool):
        for step in range(1, 30):
            admin.execute("UPDATE accounts SET balance = 10000")
            gate.arm(step)
            with psycopg.connect(gate.dsn_for(postgres.dsn), autocommit=True) as conn:
                pid = conn.info.backend_pid
                future = pool.submit(transfer, conn, 1, 2, 10)
                wait_until(lambda: gate.held is not None or future.done(),  # noqa: B023
                           f"transfer 1->2 to send its statement #{step}")
                held = gate.held
                if held is None:   # fewer statements: every cut was tried
                    assert ended(future) == "returned", f"transfer 1->2 {ended(future)}"
                    return
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                gate.release()
                future.exception(timeout=30)
            after = dict(sorted(db.balances().items()))
            assert after in ({1: 10000, 2: 10000, 3: 10000}, {1: 9990, 2: 10010, 3: 10000}), (
                f"transfer 1->2 of 10 lost its session before its statement #{step} "
                f"({held[:80]!r}) and left the balances at {after}: part of the transfer "
                f"was committed without the rest (money "
                f"{'lost' if sum(after.values()) < 30000 else 'made up'}) - the debit and "
                f"the credit must run in the one transaction that took the row locks, so a "
                f"crash between them rolls both back (an UPDATE after that transaction "
                f"commits runs in a transaction of its own)")
    pytest.fail("transfer sent more than 30 statements for one transfer")


# --------------------------------------------------------------------------------------
# A job queue with SKIP LOCKED


def test_four_workers_take_200_jobs_exactly_once(db: Db, learner: Any) -> None:
    take_job = api(learner, "take_job").take_job
    names = [f"worker-{n}" for n in range(1, 5)]
    handled: list[tuple[str, int, str]] = []
    guard = threading.Lock()
    holding = {name: threading.Event() for name in names}
    go = threading.Event()

    def work(name: str, conn: Conn) -> int:
        first = True

        def handle(job_id: int, payload: str) -> None:
            nonlocal first
            with guard:
                handled.append((name, job_id, payload))
            if first:  # hold the first job until all four workers hold one
                first = False
                holding[name].set()
                go.wait(timeout=30)

        taken = 0
        while take_job(conn, name, handle) is not None:
            taken += 1
        return taken

    with db.connect() as admin, ThreadPoolExecutor(max_workers=4) as pool:
        conns = {name: db.connect() for name in names}
        try:
            futures = {name: pool.submit(work, name, conns[name]) for name in names}
            pids = {name: conns[name].info.backend_pid for name in names}

            def waiting() -> list[str]:
                return [n for n in names if blocked_on_lock(admin, pids[n])]

            wait_until(lambda: all(holding[n].is_set() or futures[n].done() for n in names)
                       or bool(waiting()), "the four workers to each hold a job")
            blocked = waiting()
            at_once = sorted(n for n in names if holding[n].is_set())
            over_locked = "" if blocked else jobs_locked_beyond_those_held(admin, at_once)
            go.set()
            errors = {n: ended(f) for n, f in futures.items() if f.exception(timeout=30)}
        finally:
            for conn in conns.values():
                conn.close()

    assert not blocked, (
        f"{', '.join(blocked)} waited for a row lock held by another worker: without SKIP "
        f"LOCKED every worker queues behind the first one's locked job")
    assert not errors, "workers stopped: " + "; ".join(f"{n} {e}" for n, e in errors.items())
    assert not over_locked, over_locked
    by_job: dict[int, list[str]] = {}
    for name, job_id, _ in handled:
        by_job.setdefault(job_id, []).append(name)
    twice = {job: who for job, who in by_job.items() if len(who) > 1}
    assert not twice, (
        f"{len(twice)} job(s) handled more than once, e.g. job {min(twice)} by "
        f"{' and '.join(twice[min(twice)])}: two workers claimed the same row - lock it "
        f"(FOR UPDATE) in the transaction that handles it, and take the job the locking "
        f"statement itself finds queued (a status read before the lock may be stale: "
        f"another worker can finish the job in between)")
    assert at_once == names, (
        f"only {', '.join(at_once) or 'no worker'} held a job while the others had none: "
        f"the workers did not work in parallel")
    missing = sorted(set(range(1, 201)) - set(by_job))
    assert not missing, f"{len(missing)} job(s) never handled, e.g. {missing[:5]}"
    with db.connect() as conn:
        rows = conn.execute("SELECT id, status, done_by FROM jobs ORDER BY id").fetchall()
    who = {job: names_[0] for job, names_ in by_job.items()}
    wrong = [(job, status, done_by) for job, status, done_by in rows
             if status != "done" or done_by != who.get(job)]
    assert not wrong, (
        f"{len(wrong)} job row(s) not marked done by the worker that handled them, e.g. "
        f"{wrong[0]} (handled by {who.get(wrong[0][0])})")


def jobs_locked_beyond_those_held(admin: Conn, holders: list[str]) -> str:
    """While each worker in ``holders`` is in its handler (one job each) and the others have
    returned: how many queued jobs are locked, probed with SKIP LOCKED from the test's own
    connection and rolled back. More than one per holder starves the others; "" if not."""
    with admin.transaction(force_rollback=True):
        queued, free = admin.execute(
            "SELECT (SELECT count(*) FROM jobs WHERE status = 'queued'), count(*) FROM "
            "(SELECT id FROM jobs WHERE status = 'queued' FOR UPDATE SKIP LOCKED) f"
        ).fetchone() or (0, 0)
    locked = queued - free
    if locked <= len(holders):
        return ""
    return (f"{', '.join(holders) or 'no worker'} held {locked} of the {queued} queued jobs "
            f"row-locked while handling {len(holders)} - the others found {free} free and "
            f"returned None: the claiming statement locked every row it returned, not "
            f"only the job taken (FOR UPDATE locks each row the query produces, fetched or "
            f"not: without LIMIT 1 that is the whole queue). Put ORDER BY id LIMIT 1 in the "
            f"statement that says FOR UPDATE SKIP LOCKED, so a claim locks one job")


@dataclass(frozen=True)
class Stepped:
    """What a race driven one statement at a time needs: the gate in front of Postgres, the
    test's database and admin connection, a pool of two workers, the database's DSN."""

    gate: StatementGate
    db: Db
    admin: Conn
    pool: ThreadPoolExecutor
    dsn: str


def a_held_while_b_runs(run: Stepped, step: int, call_a: Callable[[Any], Any],
                        call_b: Callable[[Any], Any], names: tuple[str, str, str]
                        ) -> tuple[str, bool, dict[str, str]] | None:
    """``call_a`` on a connection through the gate, held before its statement #``step``,
    while ``call_b`` runs on a connection of its own until it ends or waits for a lock; then
    A goes on. (the statement A was held before, whether B waited, how each call ended), or
    None when A sent fewer statements than ``step`` (it must then have returned).
    ``names``: A's, B's and A-alone's names, for the messages."""
    name_a, name_b, alone = names
    run.gate.arm(step)
    with (psycopg.connect(run.gate.dsn_for(run.dsn), autocommit=True) as conn_a,
          run.db.connect() as conn_b):
        fut_a = run.pool.submit(call_a, conn_a)
        wait_until(lambda: run.gate.held is not None or fut_a.done(),
                   f"{name_a} to send its statement #{step}")
        held = run.gate.held
        if held is None:
            assert ended(fut_a) == "returned", f"{alone} {ended(fut_a)}"
            return None
        fut_b = run.pool.submit(call_b, conn_b)
        pid_b = conn_b.info.backend_pid
        wait_until(lambda: fut_b.done() or blocked_on_lock(run.admin, pid_b),
                   f"{name_b} to finish or wait for a lock while A was held before {held!r}")
        b_waited = not fut_b.done()
        run.gate.release()
        return held, b_waited, {"A": ended(fut_a), "B": ended(fut_b)}


def claim_race_story(step: int, held: str, b_waited: bool, handled: list[tuple[str, int]],
                     results: dict[str, str]) -> str:
    return (f"worker A was held before its statement #{step} ({held[:90]!r}) while worker B "
            f"{'ran until it waited for a lock' if b_waited else 'ran take_job to its end'}; "
            f"then A went on. Handled {handled}, take_job {results}")


def test_a_claim_interleaved_at_every_step_takes_each_job_once(db: Db, learner: Any,
                                                               postgres: Any) -> None:
    """Two queued jobs; worker A is held before each of its statements in turn while worker
    B runs a whole take_job: whatever A read before the hold, neither job may be handled
    twice, and both get done - a status read without the lock is stale after B's turn."""
    take_job = api(learner, "take_job").take_job
    with (StatementGate.for_dsn(postgres.dsn) as gate, db.connect() as admin,
          ThreadPoolExecutor(max_workers=2) as pool):
        handled: list[tuple[str, int]] = []
        for step in range(1, 40):
            admin.execute("DELETE FROM jobs")
            admin.execute("INSERT INTO jobs (id, payload) VALUES (1, 'job-1'), (2, 'job-2')")
            handled.clear()
            # (each lambda is called within this pass: B023 does not apply)
            turn = a_held_while_b_runs(
                Stepped(gate, db, admin, pool, postgres.dsn), step,
                lambda conn: take_job(conn, "A", lambda job_id, _p: handled.append(  # noqa: B023
                    ("A", job_id))),
                lambda conn: take_job(conn, "B", lambda job_id, _p: handled.append(  # noqa: B023
                    ("B", job_id))),
                ("worker A's take_job", "worker B", "take_job alone"))
            if turn is None:   # A sent fewer statements: every step was tried
                return
            held, b_waited, results = turn
            story = claim_race_story(step, held, b_waited, handled, results)
            jobs = sorted(job for _, job in handled)
            assert len(set(jobs)) == len(jobs), (
                f"a job was handled twice: {story}. A read which job was queued before it "
                f"locked it, and by the time it locked the row B had handled the job and "
                f"marked it done: decide in the locking statement itself (WHERE status = "
                f"'queued' ... FOR UPDATE SKIP LOCKED), never from an earlier read or an "
                f"earlier transaction")
            assert not b_waited, (
                f"{story}: B waited for A's row lock - without SKIP LOCKED every worker "
                f"queues behind the first one's locked job")
            assert jobs == [1, 2], f"expected jobs 1 and 2 each handled once: {story}"
    pytest.fail("take_job sent more than 40 statements for one job")

def test_jobs_are_taken_oldest_first(db: Db, learner: Any) -> None:
    take_job = api(learner, "take_job").take_job
    seen: list[int] = []
    with db.connect() as conn:
        for _ in range(3):
            take_job(conn, "worker-1", lambda job_id, payload: seen.append(job_id))
    assert seen == [1, 2, 3], (
        f"three take_job calls on a fresh queue handled jobs {seen}, expected the oldest "
        f"first: [1, 2, 3]. The rows are not stored in id order here - without ORDER BY id "
        f"(before LIMIT 1 FOR UPDATE SKIP LOCKED) you get whichever row the scan meets first")


def test_a_job_whose_handler_fails_goes_back_to_the_queue(db: Db, learner: Any) -> None:
    take_job = api(learner, "take_job").take_job
    crashed: list[int] = []

    def crash(job_id: int, payload: str) -> None:
        crashed.append(job_id)
        raise RuntimeError(f"handler crashed on {payload}")

    seen: list[int] = []
    with db.connect() as conn:
        try:
            take_job(conn, "worker-1", crash)
        except RuntimeError:
            pass  # the handler's error may propagate; it must not lose the job
        assert crashed, "take_job(conn, worker, handle) never called handle(job_id, payload)"
        assert conn.info.transaction_status == TransactionStatus.IDLE, (
            "after the handler raised, the connection was left inside a transaction: "
            "roll it back so the job's lock is released")
        job = take_job(conn, "worker-2", lambda job_id, payload: seen.append(job_id))
        (status, done_by) = conn.execute("SELECT status, done_by FROM jobs WHERE id = %s",
                                         (crashed[0],)).fetchone() or (None, None)
    if seen != crashed and status == "done":
        pytest.fail(
            f"the handler of job {crashed[0]} raised, yet the job is marked done (by "
            f"{done_by}) and was never handled again: an error in the handler must not be "
            f"swallowed - let it roll the claiming transaction back, so the job stays "
            f"queued", pytrace=False)
    assert seen == crashed and job == crashed[0], (
        f"the handler of job {crashed[0]} raised, then the next take_job handled "
        f"{seen or 'nothing'}: job {crashed[0]} should have gone back to the queue - handle "
        f"it inside the transaction that claimed it, so a failure rolls the claim back")


def test_a_job_whose_worker_dies_goes_back_to_the_queue(db: Db, learner: Any) -> None:
    take_job = api(learner, "take_job").take_job
    crashed: list[int] = []
    with db.connect() as admin:
        with db.connect() as conn:
            pid = conn.info.backend_pid

            def die(job_id: int, payload: str) -> None:
                # The worker dies in the middle of the job: its database session goes with
                # it, as when its process is killed.
                crashed.append(job_id)
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                raise RuntimeError(f"worker killed while handling {payload}")

            try:
                take_job(conn, "worker-1", die)
            except Exception:  # noqa: BLE001, S110 - the dead worker's errors do not matter
                pass
        assert crashed, "take_job(conn, worker, handle) never called handle(job_id, payload)"
        wait_until(lambda: admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                                          (pid,)).fetchone() == (0,),
                   "the dead worker's session to end")
        status = admin.execute("SELECT status FROM jobs WHERE id = %s",
                               (crashed[0],)).fetchone()
    seen: list[int] = []
    with db.connect() as conn:
        take_job(conn, "worker-2", lambda job_id, payload: seen.append(job_id))
    assert seen == crashed, (
        f"job {crashed[0]}'s worker died while handling it; afterwards the job is "
        f"{status[0] if status else None!r} and the next take_job handled {seen or 'nothing'} "
        f"instead of it: the claim was committed before the work was done, so it outlived "
        f"the worker (an except block that puts it back never runs when the process dies). "
        f"Keep the claim - the row lock - in the transaction that handles the job and marks "
        f"it done: a dead worker's transaction, and its claim, vanish with it")


# --------------------------------------------------------------------------------------
# lock_timeout

TIMEOUT_MS = 300


def test_a_blocked_update_fails_within_the_lock_timeout(db: Db, learner: Any) -> None:
    module = api(learner, "update_balance_with_timeout")
    update, lock_busy = module.update_balance_with_timeout, module.LockBusy
    with (db.connect() as holder, db.connect() as conn,
          ThreadPoolExecutor(max_workers=1) as pool):
        # The caller's session has a lock_timeout of its own, not the server's default:
        # it must be what it was after the call (a RESET would give the server's 0).
        conn.execute("SET lock_timeout = '7s'")
        default = show_lock_timeout(conn)
        # Without contention the call simply applies and commits the change...
        update(conn, 1, 5, TIMEOUT_MS)
        assert db.balances()[1] == 10005, (
            f"with the row free, update_balance_with_timeout(conn, 1, 5, ...) left the "
            f"balance at {db.balances()[1]}, expected 10005 (committed)")
        assert_not_leaked(conn, default, "after a successful update")

        # ...and with the row locked by someone else it gives up after the timeout.
        holder.execute("BEGIN")
        holder.execute("SELECT 1 FROM accounts WHERE id = 1 FOR UPDATE")
        started = time.monotonic()
        future = pool.submit(update, conn, 1, 5, TIMEOUT_MS)
        try:
            exc = future.exception(timeout=10)
        except TimeoutError:
            holder.execute("ROLLBACK")  # let the learner's update finish
            future.exception(timeout=30)
            pytest.fail(f"the update was still waiting for the locked row after 10 s: no "
                        f"lock_timeout of {TIMEOUT_MS} ms was in effect - SET LOCAL "
                        f"lock_timeout = '{TIMEOUT_MS}ms' inside the transaction, before the "
                        f"UPDATE (a value without a unit is milliseconds; 0 means wait "
                        f"forever)", pytrace=False)
        elapsed_ms = (time.monotonic() - started) * 1000
        holder.execute("ROLLBACK")

        assert exc is not None, (
            "the update returned normally although the row was locked the whole time")
        assert isinstance(exc, lock_busy), (
            f"expected LockBusy, the update raised {type(exc).__name__}: {exc} - catch the "
            f"lock timeout and raise your own error")
        chain = {type(e) for e in (exc.__cause__, exc.__context__) if e is not None}
        if psycopg.errors.QueryCanceled in chain:
            pytest.fail("LockBusy came from a statement_timeout (57014): that cancels any "
                        "slow statement; lock_timeout bounds only the wait for a lock (55P03)",
                        pytrace=False)
        assert psycopg.errors.LockNotAvailable in chain, (
            f"LockBusy should be raised from the LockNotAvailable (55P03) that lock_timeout "
            f"produces (raise LockBusy(...) from exc); its cause was {chain or 'nothing'}")
        assert elapsed_ms >= TIMEOUT_MS * 0.8, (
            f"LockBusy after {elapsed_ms:.0f} ms, before the {TIMEOUT_MS} ms timeout: that "
            f"is NOWAIT (give up at once), or a lock_timeout shorter than asked, not a "
            f"bounded wait of timeout_ms")
        assert elapsed_ms <= TIMEOUT_MS + 2000, (
            f"LockBusy only after {elapsed_ms:.0f} ms, for a timeout of {TIMEOUT_MS} ms (the "
            f"caller's session has lock_timeout = 7s of its own): the wait for the row lock "
            f"ran without your timeout - SET LOCAL lock_timeout inside the transaction, "
            f"before the first statement that can wait for the row (a SELECT ... FOR UPDATE "
            f"before the SET, or a SET LOCAL outside the transaction, waits unbounded)")
        assert conn.info.transaction_status == TransactionStatus.IDLE, (
            f"after LockBusy the connection is {conn.info.transaction_status.name}: roll "
            f"the failed transaction back")
        assert_not_leaked(conn, default, "after LockBusy")
    assert db.balances()[1] == 10005, "the refused update changed the balance"


ZERO_WAIT_S = 5.0  # a call that must not wait at all, still waiting this long on: it waits


def test_a_timeout_of_zero_does_not_wait(db: Db, learner: Any) -> None:
    """timeout_ms=0 is "wait at most 0 ms": LockBusy at once. Postgres' lock_timeout = 0
    means no timeout at all, and leaving lock_timeout unset for 0 leaves the session's."""
    module = api(learner, "update_balance_with_timeout")
    update, lock_busy = module.update_balance_with_timeout, module.LockBusy
    with (db.connect() as holder, db.connect() as conn,
          ThreadPoolExecutor(max_workers=1) as pool):
        conn.execute("SET lock_timeout = '7s'")  # the caller's session's own, as above
        default = show_lock_timeout(conn)
        update(conn, 1, 5, 0)
        assert db.balances()[1] == 10005, (
            f"with the row free, update_balance_with_timeout(conn, 1, 5, 0) left the "
            f"balance at {db.balances()[1]}, expected 10005 (committed): a free row needs "
            f"no wait")
        holder.execute("BEGIN")
        holder.execute("SELECT 1 FROM accounts WHERE id = 1 FOR UPDATE")
        future = pool.submit(update, conn, 1, 5, 0)
        try:
            exc = future.exception(timeout=ZERO_WAIT_S)
        except TimeoutError:
            with db.connect() as watch:
                waiting = blocked_on_lock(watch, conn.info.backend_pid)
            holder.execute("ROLLBACK")  # let the learner's update finish
            future.exception(timeout=30)
            pytest.fail(
                f"update_balance_with_timeout(conn, 1, 5, timeout_ms=0) on a locked row "
                f"was still {'waiting for the row lock' if waiting else 'running'} "
                f"{ZERO_WAIT_S:.0f} s on, expected LockBusy at once: a timeout of 0 ms is "
                f"no wait at all. Postgres' lock_timeout = 0 means the opposite - no "
                f"timeout, wait forever - and with no lock_timeout set the caller's session's "
                f"own (7s here) applies: take the row with SELECT ... FOR UPDATE NOWAIT "
                f"when timeout_ms is 0 (it fails at once with the same 55P03)",
                pytrace=False)
        holder.execute("ROLLBACK")
        assert isinstance(exc, lock_busy), (
            "update_balance_with_timeout(conn, 1, 5, timeout_ms=0) on a locked row "
            + ("returned normally" if exc is None else
               f"raised {type(exc).__name__}: {exc}")
            + ", expected LockBusy at once: the row stayed locked for longer than 0 ms")
        chain = {type(e) for e in (exc.__cause__, exc.__context__) if e is not None}
        assert psycopg.errors.LockNotAvailable in chain, (
            f"with timeout_ms=0, LockBusy should be raised from the LockNotAvailable "
            f"(55P03) that NOWAIT produces; its cause was {chain or 'nothing'}")
        assert conn.info.transaction_status == TransactionStatus.IDLE, (
            f"after LockBusy (timeout_ms=0) the connection is "
            f"{conn.info.transaction_status.name}: roll the failed transaction back")
        assert_not_leaked(conn, default, "after LockBusy with timeout_ms=0")
    assert db.balances()[1] == 10005, "the refused update (timeout_ms=0) changed the balance"


def test_each_connection_keeps_its_own_lock_timeout(db: Db, learner: Any) -> None:
    """Two callers' sessions with lock_timeouts of their own, calls on them interleaved:
    each must have its own value back - not one remembered from another connection."""
    update = api(learner, "update_balance_with_timeout").update_balance_with_timeout
    with db.connect() as first, db.connect() as second:
        first.execute("SET lock_timeout = '7s'")
        second.execute("SET lock_timeout = '4s'")
        sessions = [("first", first, show_lock_timeout(first)),
                    ("second", second, show_lock_timeout(second))]
        for turn, (name, conn, own) in enumerate(sessions + sessions[:1], start=1):
            update(conn, 1, 1, TIMEOUT_MS)
            now = show_lock_timeout(conn)
            others = [value for other, _, value in sessions if other != name]
            if now != own and now in others:
                pytest.fail(
                    f"call #{turn}, on the {name} connection (its session's lock_timeout "
                    f"{own}), left lock_timeout = {now} there: the value of the other "
                    f"connection's session. The value to restore was remembered from an "
                    f"earlier call (in a module-level variable or cache) and is not this "
                    f"session's - each connection has settings of its own. SET LOCAL "
                    f"(set_config(..., true)) ends with the transaction and needs nothing "
                    f"remembered", pytrace=False)
            assert_not_leaked(conn, own, f"after call #{turn}, on the {name} connection")
    assert db.balances()[1] == 10003, (
        f"three updates of +1 left account 1 at {db.balances()[1]}, expected 10003")


def test_two_updates_interleaved_at_every_step_lose_neither(db: Db, learner: Any,
                                                            postgres: Any) -> None:
    """Update A (+5) is held before each of its statements in turn while update B (+7) runs
    to its end (or waits for A's row lock): account 1 must end at 10012 every time - a
    balance read before the write is stale once B commits, and writing it back loses B."""
    update = api(learner, "update_balance_with_timeout").update_balance_with_timeout
    with (StatementGate.for_dsn(postgres.dsn) as gate, db.connect() as admin,
          ThreadPoolExecutor(max_workers=2) as pool):
        for step in range(1, 30):
            admin.execute("UPDATE accounts SET balance = 10000 WHERE id = 1")
            turn = a_held_while_b_runs(
                Stepped(gate, db, admin, pool, postgres.dsn), step,
                lambda conn: update(conn, 1, 5, 10_000),
                lambda conn: update(conn, 1, 7, 10_000),
                ("update A", "update B", "the update alone"))
            if turn is None:   # A sent fewer statements: every step was tried
                return
            held, b_waited, results = turn
            balance = db.balances()[1]
            lost = balance in (10005, 10007)
            assert balance == 10012, (
                f"account 1 ended at {balance}, expected 10000 + 5 + 7 = 10012"
                + (f" - {'B' if balance == 10005 else 'A'}'s committed update was lost"
                   if lost else "")
                + f": update A (+5) was held before its statement #{step} ({held[:90]!r}) "
                f"while B (+7) {'waited for a lock' if b_waited else 'ran to its end'}, "
                f"then went on ({results})"
                + (". One wrote back a balance it had read before the other committed "
                   "(read, add in Python, write the sum): a read without a row lock is "
                   "stale by then. Let the UPDATE do the arithmetic (SET balance = balance "
                   "+ %s), or read with SELECT ... FOR UPDATE after the SET LOCAL"
                   if lost else ""))
    pytest.fail("update_balance_with_timeout sent more than 30 statements for one update")


@dataclass(frozen=True)
class OtherError:
    """An error on update_balance_with_timeout's path that is not a lock timeout."""

    id: str
    what: str  # what happened, for the message
    error: type[Exception]  # what must come out, as it is
    setup: tuple[str, ...] = ()  # on the check's own connection, beforehand
    session: str | None = None  # on the learner's connection, beforehand
    delta: int = 5
    row_locked: bool = False  # the check holds account 1's row lock during the call


OTHER_ERRORS = [
    OtherError("statement-timeout",
               "the caller's session has statement_timeout = 200ms, and with the row "
               "locked by the check the UPDATE was cancelled by it (QueryCanceled, SQLSTATE "
               "57014) long before its lock_timeout of 10 s",
               psycopg.errors.QueryCanceled, session="SET statement_timeout = '200ms'",
               row_locked=True),
    OtherError("deadlock",
               "the UPDATE failed with DeadlockDetected (SQLSTATE 40P01, raised by a "
               "trigger the check installed)", psycopg.errors.DeadlockDetected,
               setup=("CREATE FUNCTION deadlock() RETURNS trigger LANGUAGE plpgsql AS $$ "
                      "BEGIN RAISE EXCEPTION 'deadlock detected (injected by the check)' "
                      "USING ERRCODE = '40P01'; END $$",
                      "CREATE TRIGGER deadlock BEFORE UPDATE ON accounts FOR EACH ROW "
                      "EXECUTE FUNCTION deadlock()")),
    OtherError("check-violation",
               "the row was free and the UPDATE (delta -20000 on a balance of 10000) broke "
               "CHECK (balance >= 0): a CheckViolation, SQLSTATE 23514",
               psycopg.errors.CheckViolation, delta=-20000),
]


@pytest.mark.parametrize("case", OTHER_ERRORS, ids=[c.id for c in OTHER_ERRORS])
def test_only_a_lock_timeout_becomes_lockbusy(db: Db, learner: Any, case: OtherError) -> None:
    module = api(learner, "update_balance_with_timeout")
    update, lock_busy = module.update_balance_with_timeout, module.LockBusy
    with db.connect() as holder, db.connect() as conn:
        for statement in case.setup:
            holder.execute(statement)
        if case.session is not None:
            conn.execute(case.session)
        if case.row_locked:
            holder.execute("BEGIN")
            holder.execute("SELECT 1 FROM accounts WHERE id = 1 FOR UPDATE")
        try:
            update(conn, 1, case.delta, 10_000)
            exc: Exception | None = None
        except Exception as raised:  # noqa: BLE001 - which one is judged below
            exc = raised
        finally:
            if case.row_locked:
                holder.execute("ROLLBACK")
    if isinstance(exc, lock_busy):
        cause = exc.__cause__ or exc.__context__
        pytest.fail(
            f"update_balance_with_timeout raised LockBusy (from "
            f"{type(cause).__name__ if cause else 'nothing'}) where no lock wait ran out: "
            f"{case.what}. LockBusy tells the caller the row stayed locked past "
            f"timeout_ms, which is not what happened - the "
            f"caller would wait and retry for a lock that was never the problem. Turn only "
            f"LockNotAvailable (SQLSTATE 55P03) into LockBusy (except "
            f"psycopg.errors.LockNotAvailable, not OperationalError, psycopg.Error or "
            f"Exception) and let every other error out as it is", pytrace=False)
    assert isinstance(exc, case.error), (
        f"{case.what}: expected that {case.error.__name__} to come out of "
        f"update_balance_with_timeout as it is, but it "
        f"{'returned normally' if exc is None else 'raised ' + type(exc).__name__}")
    assert db.balances()[1] == 10000, "the failed update changed the balance"


def show_lock_timeout(conn: Conn) -> str:
    row = conn.execute("SHOW lock_timeout").fetchone()
    assert row is not None
    return str(row[0])


def assert_not_leaked(conn: Conn, default: str, when: str) -> None:
    now = show_lock_timeout(conn)
    assert now == default, (
        f"{when}, lock_timeout on your connection is {now} (it was {default}): "
        + ("a RESET (or SET back to 0) restores the server's default, not what the "
           "caller's session had" if now in ("0", "0ms") else
           "a plain SET stays for every later statement of the session")
        + " - use SET LOCAL (or set_config(..., true)) inside the transaction: it ends "
          "with the transaction")


# --------------------------------------------------------------------------------------
# Every path ends its transaction


@dataclass(frozen=True)
class Call:
    """One call of the learner's API on one path (returns or raises), on a fresh db."""

    id: str
    what: str
    function: str
    args: tuple[Any, ...]
    setup: str | None = None  # on the check's own connection, beforehand


def ignore_job(job_id: int, payload: str) -> None:
    pass


CALLS = [
    Call("take-job-empty-queue", "take_job(conn, 'worker-1', handle) on a queue with no "
         "queued job", "take_job", ("worker-1", ignore_job),
         setup="UPDATE jobs SET status = 'done'"),
    Call("take-job", "take_job(conn, 'worker-1', handle) on a full queue", "take_job",
         ("worker-1", ignore_job)),
    Call("transfer", "transfer(conn, 1, 2, 10)", "transfer", (1, 2, 10)),
    Call("transfer-refused", "transfer(conn, 1, 2, 20000), which breaks CHECK "
         "(balance >= 0) on account 1's 10000,", "transfer", (1, 2, 20000)),
    Call("update-balance", "update_balance_with_timeout(conn, 1, 5, 1000)",
         "update_balance_with_timeout", (1, 5, 1000)),
    Call("update-balance-refused", "update_balance_with_timeout(conn, 1, -20000, 1000), "
         "which breaks CHECK (balance >= 0),", "update_balance_with_timeout",
         (1, -20000, 1000)),
]


@pytest.mark.parametrize("call", CALLS, ids=[c.id for c in CALLS])
def test_every_path_ends_its_transaction(db: Db, learner: Any, call: Call) -> None:
    function = getattr(api(learner, call.function), call.function)
    with db.connect() as admin, db.connect() as conn:
        if call.setup is not None:
            admin.execute(call.setup)
        try:
            outcome = f"returned {function(conn, *call.args)!r}"
        except Exception as exc:  # noqa: BLE001 - an error may come out; the state is judged
            outcome = f"raised {type(exc).__name__}"
        status = conn.info.transaction_status
        if status != TransactionStatus.IDLE:
            row = admin.execute(
                "SELECT string_agg(DISTINCT relation::regclass::text, ', ') FROM pg_locks "
                "WHERE pid = %s AND relation IN ('accounts'::regclass, 'jobs'::regclass)",
                (conn.info.backend_pid,)).fetchone()
            holding = f", still holding locks on {row[0]}" if row and row[0] else ""
            pytest.fail(
                f"{call.what} {outcome} and left the connection {status.name}: inside a "
                f"transaction that never ended{holding}. Its locks (and writes) last until "
                f"it ends - other sessions wait on them - and the next call on this "
                f"connection runs inside it (its `with conn.transaction()` becomes a "
                f"SAVEPOINT) and never commits. Every path that BEGINs must COMMIT or "
                f"ROLLBACK, returns and errors alike (`with conn.transaction():` ends it on "
                f"every way out)", pytrace=False)
