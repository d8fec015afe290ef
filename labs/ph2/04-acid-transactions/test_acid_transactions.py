"""ph2.4 ACID: the learner's transfer() on real Postgres 15.

* Consistency: the schema itself refuses a negative balance, a zero or negative amount, a
  ledger row naming a missing account, and NULL in any of those columns (a CHECK or a
  foreign key lets NULL through: NOT NULL is part of the invariant).
* Atomicity: an overdraft, an unknown account, and a connection killed between the debit
  and the credit (through the after_debit hook) all leave balances and ledger untouched.
* Isolation: two transfers from one account are interleaved step by step - the first
  holds its debit open while the second is seen waiting on its row lock - and only one may
  spend the money; then four threads with their own connections run 100 transfers and
  every balance must equal the sum of the transfers that returned.
* Durability: a committed transfer survives an immediate (crash) restart of the server,
  and a transfer caught mid-way by that crash leaves no trace.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import psycopg
import pytest

from labrunner.testing import StatementGate, wait_until

Conn = psycopg.Connection[Any]
State = tuple[dict[int, int], list[tuple[int, int, int]]]


@dataclass
class Bank:
    """The learner's bank module on this test's database, with the test's own views."""

    postgres: Any
    module: ModuleType
    learner: Any

    def second_instance(self) -> Bank:
        """Another copy of bank.py sharing no module state with the first, as a second app
        server would run it: whatever keeps two transfers apart must hold across it."""
        return Bank(self.postgres, self.learner.load("bank", fresh=True), self.learner)

    def connect(self) -> Conn:
        conn: Conn = self.postgres.connect(autocommit=True)
        return conn

    def open(self, balances: dict[int, int]) -> None:
        """Create the learner's schema and the accounts."""
        with self.connect() as conn:
            self.module.create_schema(conn)
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO accounts (id, balance) VALUES (%s, %s)",
                                list(balances.items()))

    def transfer(self, conn: Conn, from_id: int, to_id: int, amount: int,
                 after_debit: Callable[[], None] | None = None) -> Any:
        if after_debit is None:
            return self.module.transfer(conn, from_id, to_id, amount)
        return self.module.transfer(conn, from_id, to_id, amount, after_debit=after_debit)

    def state(self) -> State:
        """Balances and ledger, read on a new connection (so after a restart too)."""
        with self.connect() as conn:
            balances = dict(conn.execute("SELECT id, balance FROM accounts").fetchall())
            ledger = conn.execute(
                "SELECT from_id, to_id, amount FROM transfers ORDER BY id").fetchall()
        return balances, ledger

    @property
    def insufficient(self) -> type[Exception]:
        return self.module.InsufficientFunds  # type: ignore[no-any-return]

    @property
    def unknown(self) -> type[Exception]:
        return self.module.UnknownAccount  # type: ignore[no-any-return]


@pytest.fixture
def bank(postgres: Any, learner: Any) -> Bank:
    module = learner.load("bank")
    for name in ("create_schema", "transfer", "InsufficientFunds", "UnknownAccount"):
        if not hasattr(module, name):
            pytest.fail(f"bank.py has no {name}: see README.md for the interface",
                        pytrace=False)
    return Bank(postgres, module, learner)


def waiting_on_lock(admin: Conn, pid: int) -> bool:
    """Is that session waiting for a lock another transaction holds (a row's, the
    transaction's, or an advisory lock taken to keep transfers apart)?"""
    row = admin.execute("SELECT wait_event_type, wait_event FROM pg_stat_activity "
                        "WHERE pid = %s", (pid,)).fetchone()
    return row is not None and row[0] == "Lock" and row[1] in (
        "transactionid", "tuple", "advisory")


def outcome(future: Future[Any]) -> str:
    """'ok' or the name of the exception the call raised."""
    exc = future.exception(timeout=30)
    return "ok" if exc is None else type(exc).__name__


def diff(got: State, want: State) -> str:
    (gb, gl), (wb, wl) = got, want
    parts = []
    for acct in sorted(set(gb) | set(wb)):
        if gb.get(acct) != wb.get(acct):
            parts.append(f"account {acct} holds {gb.get(acct)}, expected {wb.get(acct)}")
    if gl != wl:
        parts.append(f"ledger {gl}, expected {wl}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------
# Consistency and the simple paths


# A CHECK fails only when its expression is FALSE: for NULL it is unknown, and the row
# passes. A foreign key is not checked for NULL either. So every column an invariant is
# about needs NOT NULL too (or a CHECK that says IS NOT NULL itself).
NULL_REFUSED = (psycopg.errors.NotNullViolation, psycopg.errors.CheckViolation)
NULL_WHY = ("a CHECK or REFERENCES lets NULL through (a CHECK rejects only a FALSE result, "
            "and NULL >= 0 is unknown, not false; a foreign key is not checked for NULL): "
            "declare the column NOT NULL as well")
# (statement, the error it must raise, why)
SCHEMA_CASES: list[tuple[str, type[Exception] | tuple[type[Exception], ...], str]] = [
    ("UPDATE accounts SET balance = -1 WHERE id = 1", psycopg.errors.CheckViolation,
     "a negative balance must be impossible: CHECK (balance >= 0) on accounts"),
    ("INSERT INTO transfers (from_id, to_id, amount) VALUES (1, 999, 5)",
     psycopg.errors.ForeignKeyViolation,
     "the ledger must only name existing accounts: to_id REFERENCES accounts"),
    ("INSERT INTO transfers (from_id, to_id, amount) VALUES (1, 2, 0)",
     psycopg.errors.CheckViolation, "an amount must be positive: CHECK (amount > 0)"),
    ("INSERT INTO transfers (from_id, to_id, amount) VALUES (1, 2, -5)",
     psycopg.errors.CheckViolation,
     "an amount must be positive, and -5 is not: a ledger row of -5 from 1 to 2 says money "
     "went the wrong way - CHECK (amount > 0), not a check that only rules out 0"),
    ("UPDATE accounts SET balance = NULL WHERE id = 1", NULL_REFUSED,
     "a balance must be a number (NULL + 50 is NULL: the next credit would vanish) - "
     + NULL_WHY),
    ("INSERT INTO transfers (from_id, to_id, amount) VALUES (1, 2, NULL)", NULL_REFUSED,
     "a ledger row must move a positive amount, and NULL is no amount - " + NULL_WHY),
    ("INSERT INTO transfers (from_id, to_id, amount) VALUES (NULL, 2, 5)", NULL_REFUSED,
     "a ledger row must name an existing source account, NULL names none - " + NULL_WHY),
    ("INSERT INTO transfers (from_id, to_id, amount) VALUES (1, NULL, 5)", NULL_REFUSED,
     "a ledger row must name an existing destination account, NULL names none - "
     + NULL_WHY),
]


def expected_names(expected: type[Exception] | tuple[type[Exception], ...]) -> str:
    classes = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(cls.__name__ for cls in classes)


def test_schema_enforces_the_invariants(bank: Bank) -> None:
    bank.open({1: 10, 2: 0})
    problems = []
    with bank.connect() as conn:
        for statement, expected, why in SCHEMA_CASES:
            try:
                with conn.transaction(force_rollback=True):
                    conn.execute(statement)
                problems.append(f"{statement!r} was accepted, expected "
                                f"{expected_names(expected)}: {why}")
            except expected:
                pass
            except psycopg.Error as exc:
                problems.append(f"{statement!r} failed with {type(exc).__name__}, expected "
                                f"{expected_names(expected)}: {why}")
    assert not problems, "\n".join(problems)


def test_transfer_moves_money_and_records_it(bank: Bank) -> None:
    bank.open({1: 100, 2: 5})
    with bank.connect() as conn:
        first = bank.transfer(conn, 1, 2, 30)
        try:
            second = bank.transfer(conn, 2, 1, 35)  # all of account 2's money: allowed
        except bank.insufficient:
            pytest.fail("transferring 35 from account 2, which holds exactly 35, raised "
                        "InsufficientFunds: moving all of an account's money is allowed - "
                        "refuse only when the balance is LESS than the amount (balance >= "
                        "amount may go on)", pytrace=False)
        still_autocommit(conn, f"transfer() returned {first!r} and {second!r}")
    got = bank.state()
    want = ({1: 105, 2: 0}, [(1, 2, 30), (2, 1, 35)])
    assert got == want, f"after 1->2 30 and 2->1 35: {diff(got, want)}"
    with bank.connect() as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM transfers ORDER BY id")]
    assert [first, second] == ids, (
        f"transfer() returned {first!r} and {second!r}, the ledger ids are {ids}: return "
        f"the id of the transfers row you inserted")


# Money in cents outgrows 32 bits early: 2**31 - 1 cents is only 21 million.
BIG = 5_000_000_000


def test_balances_and_amounts_past_32_bits_fit(bank: Bank) -> None:
    try:
        bank.open({1: BIG, 2: 0})
    except psycopg.errors.NumericValueOutOfRange as exc:
        pytest.fail(f"opening account 1 with a balance of {BIG:,} failed ({exc}): balances "
                    f"are bigint - an integer column holds at most 2,147,483,647, and an "
                    f"account in cents passes that at 21 million", pytrace=False)
    moved = BIG - 1_000_000_000
    raised: BaseException | None = None
    with bank.connect() as conn:
        try:
            bank.transfer(conn, 1, 2, moved)
        except Exception as exc:  # noqa: BLE001 - named below
            raised = exc
    assert raised is None, (
        f"transferring {moved:,} (account 1 holds {BIG:,}) raised "
        f"{type(raised).__name__}: {raised} - amounts, like balances, are bigint: an integer "
        f"column (or an int4 cast) holds at most 2,147,483,647")
    got = bank.state()
    want: State = ({1: BIG - moved, 2: moved}, [(1, 2, moved)])
    assert got == want, f"after 1->2 {moved:,}: {diff(got, want)}"

def ended_its_transaction(conn: Conn, what: str) -> None:
    """A refusal must end the transaction it began: one left open keeps its debit (and
    row locks) pending on the caller's connection, and whatever runs next there - the next
    transfer's COMMIT, a context manager's exit - commits the half-done transfer."""
    status = conn.info.transaction_status
    harm = ("every later statement on the connection fails until someone rolls it back"
            if status == psycopg.pq.TransactionStatus.INERROR else
            "the refused transfer's writes stay pending, and the caller's next COMMIT (its "
            "next transfer, or leaving `with connect()`) commits them")
    assert status == psycopg.pq.TransactionStatus.IDLE, (
        f"{what}, and left its transaction open on the connection (status {status.name}): "
        f"{harm}. Every way out of transfer() must end the transaction it began: ROLLBACK "
        f"before raising (with conn.transaction(): does it for you)")


def still_autocommit(conn: Conn, what: str) -> None:
    """The caller's connection comes back in the mode it was handed over in (autocommit):
    the caller's next statement there must commit on its own. A transfer() that turned
    autocommit off and left it so makes every later write on the connection wait for a
    COMMIT the caller never sends - lost when the connection closes."""
    conn.execute("SELECT 1")
    status = conn.info.transaction_status
    assert status == psycopg.pq.TransactionStatus.IDLE, (
        f"{what}; then a plain SELECT the caller ran on the same connection opened a "
        f"transaction (status {status.name}): transfer() left the connection's autocommit "
        f"off, so the caller's later writes there wait for a COMMIT it never sends (and are "
        f"lost at close). Open the transaction with conn.transaction() (or BEGIN/COMMIT), or "
        f"put autocommit back as you found it on every way out")


def test_overdraft_is_refused_and_changes_nothing(bank: Bank) -> None:
    bank.open({1: 50, 2: 0})
    before = bank.state()
    with bank.connect() as conn:
        try:
            bank.transfer(conn, 1, 2, 51)
        except bank.insufficient:
            pass
        else:
            pytest.fail("transferring 51 from an account holding 50 succeeded: expected "
                        "InsufficientFunds", pytrace=False)
        ended_its_transaction(conn, "transfer() refused an overdraft (1->2 51, account 1 "
                                    "holds 50)")
        still_autocommit(conn, "transfer() refused an overdraft (1->2 51, account 1 holds "
                               "50)")
    after = bank.state()
    assert after == before, f"the refused overdraft left a trace: {diff(after, before)}"


@pytest.mark.parametrize(("from_id", "to_id"), [(1, 999), (999, 1)],
                         ids=["to-unknown", "from-unknown"])
def test_unknown_account_changes_nothing(bank: Bank, from_id: int, to_id: int) -> None:
    bank.open({1: 100, 2: 0})
    before = bank.state()
    raised: BaseException | None = None
    with bank.connect() as conn:
        try:
            bank.transfer(conn, from_id, to_id, 10)
        except Exception as exc:  # noqa: BLE001 - which one is checked below
            raised = exc
        if raised is not None:
            ended_its_transaction(conn, f"a transfer {from_id}->{to_id} (account 999 does "
                                        f"not exist) raised {type(raised).__name__}")
            still_autocommit(conn, f"a transfer {from_id}->{to_id} (account 999 does not "
                                   f"exist) raised {type(raised).__name__}")
    after = bank.state()
    assert after == before, (
        f"a transfer {from_id}->{to_id} (account 999 does not exist) changed the data: "
        f"{diff(after, before)} - the debit and the credit must commit together or not at "
        f"all (an UPDATE matching no row is not an error: check its rowcount)")
    assert isinstance(raised, bank.unknown), (
        f"a transfer {from_id}->{to_id} (account 999 does not exist) "
        f"{'returned normally' if raised is None else 'raised ' + type(raised).__name__}: "
        f"expected UnknownAccount")


def test_an_account_deleted_after_a_check_is_still_unknown(bank: Bank) -> None:
    """Check-then-act: the destination is deleted (another session, committed) after the
    debit, so any existence check made before it is stale by the time of the credit. Only
    what the credit itself finds (its rowcount, under its row lock) tells."""
    bank.open({1: 100, 2: 0})
    deleted: list[bool] = []
    with bank.connect() as admin, bank.connect() as conn:

        def delete_destination() -> None:
            # SKIP LOCKED: a transfer that locked account 2 first (SELECT ... FOR UPDATE)
            # keeps it - nothing is deleted under it and the transfer goes through.
            row = admin.execute(
                "DELETE FROM accounts WHERE id = (SELECT id FROM accounts WHERE id = 2 "
                "FOR UPDATE SKIP LOCKED) RETURNING id").fetchone()
            deleted.append(row is not None)

        raised: BaseException | None = None
        try:
            bank.transfer(conn, 1, 2, 10, after_debit=delete_destination)
        except Exception as exc:  # noqa: BLE001 - which one is checked below
            raised = exc
    assert deleted, "transfer() never called after_debit(): call it between the debit " \
                    "and the credit"
    if not deleted[0]:  # account 2 was locked by the transfer: it could not vanish
        return
    after = bank.state()
    want: State = ({1: 100}, [])
    assert isinstance(raised, bank.unknown) and after == want, (
        f"transfer 1->2 while account 2 was deleted by another session after the debit (it "
        f"had no ledger rows): transfer() "
        f"{'returned normally' if raised is None else 'raised ' + type(raised).__name__}"
        f"{': ' + diff(after, want) if after != want else ''}, expected UnknownAccount and "
        f"nothing changed. An existence check made before the writes, without a lock, is "
        f"stale by the time of the credit (check-then-act): decide from the writes "
        f"themselves - a credit that updates 0 rows means the account does not exist")


# --------------------------------------------------------------------------------------
# Atomicity when the connection dies in the middle


def told_as_done(raised: BaseException | None, returned: Any, what: str) -> None:
    """A transfer that did not happen must not return as if it had: its caller (a checkout,
    a payout) takes a normal return for "the money moved" and acts on it."""
    assert raised is not None, (
        f"{what}, and transfer() returned {returned!r} instead of raising: nothing was "
        f"transferred, yet a caller that sees a normal return takes the transfer as done "
        f"(ships the goods, shows 'paid'). A failure in the middle is the caller's to know: "
        f"let the error out (or raise one of your own from it) - never swallow it and return")


def test_connection_killed_between_debit_and_credit_leaves_nothing(bank: Bank) -> None:
    bank.open({1: 100, 2: 50})
    before = bank.state()
    called = threading.Event()
    with bank.connect() as admin, bank.connect() as conn:
        pid = conn.info.backend_pid

        def kill_backend() -> None:
            """The 'crash': the server ends this transfer's session between its steps."""
            called.set()
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            wait_until(lambda: admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s",
                                             (pid,)).fetchone() is None,
                       "the killed session to end")

        raised: BaseException | None = None
        returned: Any = None
        try:
            returned = bank.transfer(conn, 1, 2, 30, after_debit=kill_backend)
        except Exception as exc:  # noqa: BLE001 - the transfer is expected to fail here
            raised = exc
    assert called.is_set(), "transfer() never called after_debit(): call it between the " \
                            "debit and the credit"
    after = bank.state()
    assert after == before, (
        f"the session died after the debit and before the credit, yet: {diff(after, before)}"
        f" - the debit was committed on its own; put both updates in one transaction")
    told_as_done(raised, returned, "the session of transfer 1->2 30 was killed between the "
                                   "debit and the credit (nothing changed: right)")


def test_a_failing_ledger_insert_leaves_nothing(bank: Bank) -> None:
    bank.open({1: 100, 2: 50})
    before = bank.state()
    with bank.connect() as admin:
        # The ledger refuses the next row: the last step of a transfer fails.
        admin.execute("""
            CREATE FUNCTION refuse_ledger() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'the ledger is closed (injected by the check)'; END $$;
            CREATE TRIGGER refuse_ledger BEFORE INSERT ON transfers
                FOR EACH ROW EXECUTE FUNCTION refuse_ledger()""")
    raised: BaseException | None = None
    with bank.connect() as conn:
        try:
            bank.transfer(conn, 1, 2, 30)
        except Exception as exc:  # noqa: BLE001 - any error is right here
            raised = exc
        if raised is not None:
            ended_its_transaction(conn, f"the ledger INSERT failed (a trigger the check "
                                        f"installed refused it), transfer() raised "
                                        f"{type(raised).__name__}")
    after = bank.state()
    assert after == before, (
        f"the ledger INSERT failed (a trigger the check installed refused it) and the "
        f"transfer {'returned' if raised is None else 'raised ' + type(raised).__name__}, "
        f"yet: {diff(after, before)} - the money moved without its ledger row. The ledger "
        f"row belongs to the same transaction as the debit and the credit: insert it before "
        f"that transaction commits, so a failure there rolls the money back too")
    assert raised is not None, (
        "the ledger INSERT failed (a trigger the check installed refused it) and transfer() "
        "returned normally: let the error out, the transfer did not happen")


# --------------------------------------------------------------------------------------
# Isolation


def test_two_transfers_cannot_spend_the_same_money(bank: Bank) -> None:
    """A debits account 1 and pauses; B tries to spend the same balance and must wait for
    A's row lock; A commits; B must then see the new balance and be refused."""
    bank.open({1: 100, 2: 0, 3: 0})
    bank_b = bank.second_instance()  # B runs as on another app server
    a_debited, release_a = threading.Event(), threading.Event()

    def hold_a() -> None:
        a_debited.set()
        release_a.wait(timeout=30)

    with (bank.connect() as admin, bank.connect() as conn_a, bank.connect() as conn_b,
          ThreadPoolExecutor(max_workers=2) as pool):
        fut_a = pool.submit(bank.transfer, conn_a, 1, 2, 60, hold_a)
        wait_until(lambda: a_debited.is_set() or fut_a.done(), "transfer A's debit")
        if fut_a.done():
            pytest.fail(f"transfer A finished without calling after_debit() "
                        f"({outcome(fut_a)}): call it between the debit and the credit",
                        pytrace=False)
        fut_b = pool.submit(bank_b.transfer, conn_b, 1, 3, 60)
        pid_b = conn_b.info.backend_pid
        # B either blocks on A's row lock (the transfers are serialized) or runs through
        # (A's debit was already committed, or B never locked the row).
        wait_until(lambda: fut_b.done() or waiting_on_lock(admin, pid_b),
                   "transfer B to finish or wait for A's lock")
        release_a.set()
        results = {"A": outcome(fut_a), "B": outcome(fut_b)}
    got = bank.state()
    want = ({1: 40, 2: 60, 3: 0}, [(1, 2, 60)])
    if got != want:
        money = sum(got[0].values())
        lost = (" - money was created: B read the balance before A's debit committed and "
                "wrote its own result over A's (a lost update). B ran in a second copy of "
                "bank.py, as on a second app server: a lock of your process (threading.Lock) "
                "does not hold it back, only the database's lock does - let the database "
                "compute balance - amount under the row lock, or SELECT ... FOR UPDATE first"
                if money > 100 else "")
        pytest.fail(f"account 1 held 100; A (1->2, 60) and B (1->3, 60) ran concurrently "
                    f"and ended {results}: {diff(got, want)}{lost}", pytrace=False)
    assert results == {"A": "ok", "B": "InsufficientFunds"}, (
        f"A (1->2, 60) and B (1->3, 60) on an account holding 100 ended {results}: expected "
        f"A ok and B InsufficientFunds once it sees A's committed debit")


# Two transfers of 30 that share an account, each with enough money: whatever point of A's
# transaction B starts at, B must either go through or wait for A's lock and then go through.
# A lock taken for reading (FOR SHARE, FOR KEY SHARE) and then upgraded by the UPDATE lets
# both in first: each UPDATE then waits for the other's lock, a deadlock, and Postgres kills
# one. Trying every statement of A as the point where B starts finds that step every time.
SHARED_ACCOUNT = {
    "same-source": ((1, 2), (1, 3), {1: 40, 2: 130, 3: 30}),
    "same-destination": ((1, 3), (2, 3), {1: 70, 2: 70, 3: 60}),
}


def lost_update(story: str, results: dict[str, str], balances: dict[int, int],
                final: dict[int, int]) -> None:
    """Both transfers returned, yet money appeared or vanished: one wrote a balance it
    had computed from a read taken before the other's write."""
    if set(results.values()) != {"ok"} or sum(balances.values()) == sum(final.values()):
        return
    off = {k: balances.get(k, 0) - v for k, v in final.items() if balances.get(k, 0) != v}
    pytest.fail(
        f"{story}. The total is {sum(balances.values())}, not {sum(final.values())}: "
        f"{off} off - a lost update: one transfer wrote a balance it had computed from a "
        f"row read unlocked before the other's write (SET balance = <read + amount>), "
        f"overwriting it. Let the database do the arithmetic (balance = balance + %s, on "
        f"the debit AND the credit) or lock each row (FOR UPDATE) before reading it",
        pytrace=False)


@pytest.mark.parametrize("case", list(SHARED_ACCOUNT))
def test_two_transfers_sharing_an_account_queue_at_every_step(bank: Bank, postgres: Any,
                                                              case: str) -> None:
    (a_from, a_to), (b_from, b_to), final = SHARED_ACCOUNT[case]
    bank.open({1: 100, 2: 100, 3: 0})
    bank_b = bank.second_instance()  # B runs as on another app server
    with (StatementGate.for_dsn(postgres.dsn) as gate, bank.connect() as admin,
          ThreadPoolExecutor(max_workers=2) as pool):
        step = 0
        while True:
            step += 1
            assert step <= 60, "transfer A sent more than 60 statements for one transfer"
            admin.execute("UPDATE accounts SET balance = CASE id WHEN 3 THEN 0 ELSE 100 END")
            admin.execute("DELETE FROM transfers")
            gate.arm(step)
            with (psycopg.connect(gate.dsn_for(postgres.dsn), autocommit=True) as conn_a,
                  bank.connect() as conn_b):
                fut_a = pool.submit(bank.transfer, conn_a, a_from, a_to, 30)
                # (each wait's lambda is called within this pass: B023 does not apply)
                wait_until(lambda: gate.held is not None or fut_a.done(),  # noqa: B023
                           f"transfer A ({a_from}->{a_to}) to send its statement #{step}")
                held = gate.held
                if held is None:   # A sent fewer statements: every step was tried
                    assert outcome(fut_a) == "ok", (
                        f"transfer {a_from}->{a_to} of 30 from an account holding 100, alone, "
                        f"ended {outcome(fut_a)}")
                    break
                fut_b = pool.submit(bank_b.transfer, conn_b, b_from, b_to, 30)
                pid_b = conn_b.info.backend_pid
                wait_until(lambda: fut_b.done() or waiting_on_lock(admin, pid_b),  # noqa: B023
                           f"transfer B ({b_from}->{b_to}) to finish or wait for A's lock, "
                           f"while A was held before {held!r}")
                b_waited = not fut_b.done()
                gate.release()
                results = {"A": outcome(fut_a), "B": outcome(fut_b)}
            got = bank.state()
            if results == {"A": "ok", "B": "ok"} and got[0] == final:
                continue
            story = (f"A ({a_from}->{a_to}, 30) was held before its statement #{step} "
                     f"({held[:90]!r}) while B ({b_from}->{b_to}, 30) "
                     f"{'ran until it waited for a lock' if b_waited else 'ran to its end'}; "
                     f"then A went on. They ended {results}, balances "
                     f"{dict(sorted(got[0].items()))}: expected both "
                     f"ok and {final} - the accounts hold enough for both")
            lost_update(story, results, got[0], final)
            if "DeadlockDetected" in results.values():
                pytest.fail(f"{story}. They deadlocked: each held a lock the other's UPDATE "
                            f"needed. A row read with a shared lock (FOR SHARE, FOR KEY SHARE) "
                            f"and then updated lets two transfers both take it first; take "
                            f"the row for writing at once (SELECT ... FOR UPDATE, or let the "
                            f"UPDATE lock it), so the second waits before it reads",
                            pytrace=False)
            if "SerializationFailure" in results.values():
                pytest.fail(f"{story}. Under REPEATABLE READ or SERIALIZABLE a transfer whose "
                            f"row another one changed fails (40001) instead of waiting and "
                            f"going on: stay in READ COMMITTED (with the check in the UPDATE "
                            f"itself), or retry the transfer on 40001", pytrace=False)
            pytest.fail(story, pytrace=False)


def test_many_concurrent_transfers_keep_the_total(bank: Bank) -> None:
    accounts = {acct: 1000 for acct in range(1, 7)}
    bank.open(accounts)
    start = threading.Barrier(4)

    def worker(seed: int) -> list[tuple[int, int, int, str]]:
        rng = random.Random(seed)
        done = []
        with bank.connect() as conn:
            start.wait(timeout=30)
            for _ in range(25):
                # From a lower to a higher id: every transfer locks rows in the same order,
                # so these cannot deadlock (deadlocks are ph2.6).
                src, dst = sorted(rng.sample(sorted(accounts), 2))
                amount = rng.randint(1, 400)
                try:
                    bank.transfer(conn, src, dst, amount)
                    done.append((src, dst, amount, "ok"))
                except (bank.insufficient, psycopg.errors.DeadlockDetected) as exc:
                    done.append((src, dst, amount, type(exc).__name__))
        return done

    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = [f.result(timeout=60) for f in [pool.submit(worker, s) for s in range(4)]]
    applied = [(s, d, a) for run in runs for (s, d, a, result) in run if result == "ok"]
    expected = dict(accounts)
    for src, dst, amount in applied:
        expected[src] -= amount
        expected[dst] += amount
    balances, ledger = bank.state()
    assert sum(balances.values()) == sum(accounts.values()), (
        f"after 100 concurrent transfers the bank holds {sum(balances.values())}, it started "
        f"with {sum(accounts.values())}: money was created or destroyed (lost updates)")
    assert balances == expected, (
        f"balances {balances} do not match the {len(applied)} transfers that returned "
        f"(expected {expected}): a transfer that returned must be applied exactly once, "
        f"one that raised not at all")
    assert Counter(ledger) == Counter(applied), (
        f"the ledger has {len(ledger)} rows for {len(applied)} transfers that returned")
    assert min(balances.values()) >= 0


# --------------------------------------------------------------------------------------
# Durability

# What synchronous_commit is in force when each transfer commits, whichever way it was set
# (SET, SET LOCAL, set_config(), ALTER DATABASE/ROLE): a deferred constraint trigger fires
# inside the transfer's own transaction, at its COMMIT, after anything the transaction ran.
COMMIT_WATCH = """
    CREATE TABLE commit_watch (setting text NOT NULL);
    CREATE FUNCTION commit_watch() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO commit_watch VALUES (current_setting('synchronous_commit'));
        RETURN NULL;
    END $$;
    CREATE CONSTRAINT TRIGGER commit_watch AFTER INSERT ON transfers
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION commit_watch();
"""


def test_committed_transfer_survives_a_server_crash(bank: Bank, postgres: Any) -> None:
    """Commit one transfer, then crash the server (immediate shutdown: no checkpoint, WAL
    replayed at start) in the middle of a second one. The first must be there after
    recovery, the second must have left no trace."""
    bank.open({1: 100, 2: 0, 3: 0})
    with bank.connect() as admin:
        admin.execute(COMMIT_WATCH)
    with bank.connect() as conn:
        bank.transfer(conn, 1, 2, 30)
    with bank.connect() as admin:
        seen = admin.execute("SELECT DISTINCT setting FROM commit_watch").fetchall()
    assert seen, "transfer 1->2 30 returned but wrote no row into transfers before its COMMIT"
    asynchronous = sorted(s for (s,) in seen if s == "off")
    assert not asynchronous, (
        "transfer 1->2 30 committed with synchronous_commit = off (read by a trigger at its "
        "COMMIT): Postgres then answers COMMIT before the commit's WAL record is written, and "
        "a crash in the next few hundred milliseconds loses a transfer the caller was told "
        "had happened - durability is exactly that COMMIT returns only once the WAL is "
        "written. Leave synchronous_commit at its default (on), in the session, the "
        "transaction (SET LOCAL) and the database alike")

    crashed = threading.Event()

    def crash_server() -> None:
        crashed.set()
        postgres.restart(mode="immediate")

    raised: BaseException | None = None
    returned: Any = None
    with bank.connect() as conn:
        try:
            returned = bank.transfer(conn, 1, 3, 20, after_debit=crash_server)
        except Exception as exc:  # noqa: BLE001 - its connection died with the server
            raised = exc
    assert crashed.is_set(), "transfer() never called after_debit(): call it between the " \
                             "debit and the credit"
    got = bank.state()
    want = ({1: 70, 2: 30, 3: 0}, [(1, 2, 30)])
    if not got[0]:
        pytest.fail("after the crash the accounts table is empty: an UNLOGGED table is not "
                    "written to the WAL and is emptied by crash recovery - durable data "
                    "needs a logged table", pytrace=False)
    assert got == want, (
        f"after a crash restart (WAL replay): {diff(got, want)} - expected the committed "
        f"1->2 30 kept and the interrupted 1->3 20 gone")
    told_as_done(raised, returned, "the server crashed between the debit and the credit of "
                                   "transfer 1->3 20 (it left no trace: right)")

