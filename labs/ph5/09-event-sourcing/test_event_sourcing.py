"""ph5.9 - event sourcing: an append-only event store in Postgres with expected-version
concurrency, snapshots, and upcasting of v1 events to v2.

The concurrent append is driven step by step on two real connections: A appends inside a
transaction the test keeps open, B appends with the same expected version, A commits. Exactly
one may win. Snapshots are checked against a full replay, and shown to be used: an old event
changed behind the store's back alters the replay, not the snapshot-based load. A snapshot
must be the fold at its version: another writer commits an event right after save_snapshot's
first read of the stream (the test's cursors on its connection see each statement), so a
version read by a second query, before or after the fold, is paired with the wrong state."""

from __future__ import annotations

import copy
import re
import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from labrunner.testing import PgStatementProxy


@pytest.fixture
def store(postgres: Any, learner: Any) -> Any:
    mod = learner.load("eventstore")
    conn = postgres.connect(autocommit=True)
    mod.setup(conn)  # given: the schema
    yield mod, conn
    conn.close()


def opened(owner: str = "ada") -> dict[str, Any]:
    return {"type": "AccountOpened", "data": {"owner": owner, "currency": "EUR"}}


def deposit(cents: int) -> dict[str, Any]:
    return {"type": "MoneyDeposited", "data": {"amount_cents": cents, "currency": "EUR"}}


def withdraw(cents: int) -> dict[str, Any]:
    return {"type": "MoneyWithdrawn", "data": {"amount_cents": cents, "currency": "EUR"}}


def account(balance: int, transactions: int, owner: str = "ada") -> dict[str, Any]:
    return {"owner": owner, "currency": "EUR", "balance_cents": balance,
            "transactions": transactions}


def versions(conn: Any, stream: str) -> list[tuple[int, str]]:
    return [(int(v), str(t)) for v, t in conn.execute(
        "SELECT version, type FROM events WHERE stream_id = %s ORDER BY version",
        (stream,)).fetchall()]


def expect_conflict(mod: Any, conn: Any, stream: str, expected: int, why: str) -> None:
    try:
        got = mod.append(conn, stream, expected, [withdraw(1)])
    except mod.ConcurrencyError:
        return
    pytest.fail(f"append({stream!r}, expected_version={expected}) returned {got!r}, but {why}: "
                "it must raise ConcurrencyError - the caller decided on a state that is not "
                "the stream's current one", pytrace=False)


def expect_current_schema(conn: Any, stream: str) -> None:
    """Fail, naming the tag, when append() stored its (v2) events under another schema
    version."""
    tags = [int(v) for (v,) in conn.execute(
        "SELECT DISTINCT schema_version FROM events WHERE stream_id = %s ORDER BY 1",
        (stream,)).fetchall()]
    if tags != [2]:
        pytest.fail(
            f"append() stored its events with schema_version {tags}, expected [2]: the events "
            "it is given are in the v2 schema (amount_cents, currency), and the column says "
            "which schema a row's data is in - every reader picks its upcaster by it (a v2 row "
            "tagged 1 is upcast as v1, which looks for 'amount'), today and after the next "
            "schema change. Store new events with the current schema version "
            "(CURRENT_SCHEMA = 2)", pytrace=False)


# --- appending -----------------------------------------------------------------------------

def test_append_load_and_stale_expected_version(store: Any) -> None:
    mod, conn = store
    version = mod.append(conn, "acc-1", 0, [opened(), deposit(1000), withdraw(300)])
    assert version == 3, f"appending 3 events to a new stream returned version {version}, not 3"
    expect_current_schema(conn, "acc-1")
    state, at = mod.load(conn, "acc-1")
    assert (state, at) == (account(700, 2), 3), (
        f"load('acc-1') = {(state, at)}; expected {(account(700, 2), 3)}: the state is the fold "
        "of the events")
    assert mod.append(conn, "acc-1", 3, [deposit(50)]) == 4

    expect_conflict(mod, conn, "acc-1", 2, "the stream is at version 4")
    assert versions(conn, "acc-1")[-1] == (4, "MoneyDeposited"), (
        "a refused append must write nothing")
    expect_conflict(mod, conn, "acc-new", 5, "the stream does not exist yet (version 0)")


def test_every_fold_starts_from_an_empty_account(store: Any) -> None:
    """Two accounts, no snapshot: each replay and each load folds its stream from nothing.
    A fold that starts from a state kept in the module (or in a default argument) and
    changes it in place starts the next fold where the last one ended."""
    mod, conn = store
    mod.append(conn, "acc-f1", 0, [opened("ann"), deposit(900), withdraw(100)])
    mod.append(conn, "acc-f2", 0, [opened("bob"), deposit(40)])
    want = {"acc-f1": (account(800, 2, "ann"), 3), "acc-f2": (account(40, 1, "bob"), 2)}
    done: list[str] = []
    for name, fn in (("replay", mod.replay), ("load", mod.load)):
        for stream in [*want, *want]:
            call, got = f"{name}({stream!r})", copy.deepcopy(fn(conn, stream))  # as it is now
            if got != want[stream]:
                pytest.fail(
                    f"{call} = {got}, expected {want[stream]}, the fold of that stream's "
                    f"events from nothing; folds before it in this test: "
                    f"{', '.join(done) or 'none'}. "
                    + ("It is the first fold: the fold itself is wrong" if not done else
                       "Each fold started where an earlier one ended: the state before the "
                       "first event lives in the module (an EMPTY dict, a default argument "
                       "state={...}) and apply() changes it in place, so every replay and "
                       "load - of any stream, on any connection - adds to the last one's "
                       "result. Start each fold from a new dict and let apply() return a new "
                       "state"), pytrace=False)
            done.append(call)



def test_concurrent_appends_with_the_same_expected_version(store: Any, postgres: Any) -> None:
    """A and B both read version 3 and append. A's transaction is still open when B tries;
    when A commits, B must get ConcurrencyError: only one decision made on version 3 wins."""
    mod, conn = store
    mod.append(conn, "acc-2", 0, [opened(), deposit(500), deposit(500)])
    conn_a, conn_b = postgres.connect(autocommit=True), postgres.connect(autocommit=True)
    pid_b = conn_b.execute("SELECT pg_backend_pid()").fetchone()[0]
    outcome: dict[str, Any] = {}

    def append_b() -> None:
        try:
            outcome["version"] = mod.append(conn_b, "acc-2", 3, [withdraw(800)])
        except BaseException as exc:  # noqa: BLE001 - judged by the main thread
            outcome["error"] = exc

    tx_a = conn_a.transaction()
    tx_a.__enter__()
    try:
        mod.append(conn_a, "acc-2", 3, [withdraw(900)])
        worker = threading.Thread(target=append_b, daemon=True)
        worker.start()
        deadline = time.monotonic() + 10
        while not outcome and time.monotonic() < deadline:  # B done, or B waits for A
            if conn.execute("SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted",
                            (pid_b,)).fetchone()[0]:
                break
            time.sleep(0.01)
    finally:
        tx_a.__exit__(None, None, None)  # A commits
    worker.join(10)
    conn_a.close()
    conn_b.close()
    error = outcome.get("error")
    assert error is not None, (
        f"both appends with expected version 3 succeeded (B returned version "
        f"{outcome.get('version')}); the stream is now {versions(conn, 'acc-2')}: B decided on "
        "a state that no longer existed - the second writer must get ConcurrencyError")
    assert isinstance(error, mod.ConcurrencyError), (
        f"B's append raised {type(error).__name__}: {error}; expected ConcurrencyError - "
        "translate the primary-key violation of (stream_id, version) into it")
    assert versions(conn, "acc-2") == [(1, "AccountOpened"), (2, "MoneyDeposited"),
                                       (3, "MoneyDeposited"), (4, "MoneyWithdrawn")], (
        f"the stream is {versions(conn, 'acc-2')}: expected A's withdrawal as version 4 and "
        "nothing from B")
    state, _ = mod.load(conn, "acc-2")
    assert state["balance_cents"] == 100, f"balance {state['balance_cents']}, expected 100"


def test_an_append_is_all_or_nothing(store: Any) -> None:
    """Three events in one append, the last of which the database refuses (a NUL character:
    jsonb cannot store it): none of the three may stay - one append is one decision."""
    mod, conn = store
    mod.append(conn, "acc-5", 0, [opened(), deposit(100)])
    refused = {"type": "MoneyDeposited",
               "data": {"amount_cents": 5, "currency": "EUR", "memo": "bad\u0000byte"}}
    try:
        got = mod.append(conn, "acc-5", 2, [deposit(10), deposit(20), refused])
    except Exception:  # noqa: BLE001 - any error is right: the database refused an event
        got = None
    stored = versions(conn, "acc-5")
    assert stored == [(1, "AccountOpened"), (2, "MoneyDeposited")], (
        f"an append of 3 events whose 3rd the database refused (jsonb cannot store a NUL "
        f"character) {'returned ' + repr(got) if got is not None else 'raised'}, and left "
        f"the stream as {stored}: the events before the refused one were stored on their "
        "own - write one append's events in ONE transaction (with conn.transaction():), so "
        "it is all or nothing")


def test_a_load_with_nothing_after_the_snapshot_is_at_the_snapshots_version(
        store: Any) -> None:
    """A snapshot, then no event after it: the tail is empty, and the stream's version is
    the snapshot's - the version the caller's next append must expect."""
    mod, conn = store
    mod.append(conn, "acc-s", 0, [opened(), deposit(700), withdraw(200)])
    mod.save_snapshot(conn, "acc-s")
    want = (account(500, 2), 3)
    try:
        seen = mod.load(conn, "acc-s")
    except Exception as exc:  # noqa: BLE001 - any crash here is the mistake being named
        pytest.fail(f"load() of a stream whose snapshot is at its last event (version 3, "
                    f"nothing after it) raised {type(exc).__name__}: {exc} - an empty tail is "
                    "the usual case right after a snapshot: the state and version are the "
                    "snapshot's", pytrace=False)
    assert seen == want, (
        f"load() of a stream whose snapshot is at its last event (version 3, nothing after "
        f"it) = {seen}; expected {want}: with an empty tail the version is the snapshot's, "
        f"not the last event read - a caller appending with expected_version={seen[1]!r} "
        "is refused (or forks the stream)")
    after = mod.append(conn, "acc-s", seen[1], [deposit(1)])
    assert after == 4, (f"an append after load()'s version 3 returned version {after!r}, "
                        "expected 4")


def expect_a_new_account(mod: Any, conn: Any, stream: str) -> None:
    """Nothing was ever appended to stream (others hold events): its state is the fold of no
    events (the empty state every fold starts from) and its version 0 - the expected_version
    of an append to a new stream. A command handler loads, decides, appends with the version
    it loaded: opening an account begins with the load of an empty stream."""
    for name, fn in (("replay", mod.replay), ("load", mod.load)):
        call = f"{name}({stream!r}), a stream with no events (others have some),"
        try:
            got = fn(conn, stream)
        except Exception as exc:  # noqa: BLE001 - any crash here is the mistake being named
            pytest.fail(
                f"{call} raised {type(exc).__name__}: {exc} - a stream nothing was appended "
                "to is a new one, not an error: its state is the fold of no events ({}) and "
                "its version 0, the expected_version an append to a new stream takes "
                "(README). The first command on an account loads it before it decides, so a "
                "crash here means no account can be opened through load/decide/append",
                pytrace=False)
        assert got == ({}, 0), (
            f"{call} = {got!r}; expected ({{}}, 0): the state is the fold of no events - the "
            "empty dict every fold starts from, as the signature says (tuple[dict, int]: not "
            "None, which the caller's decision code cannot read) - and the version 0, the "
            "one an append to a new stream expects (README)")
    try:
        version = mod.append(conn, stream, mod.load(conn, stream)[1], [opened()])
    except mod.ConcurrencyError as exc:
        pytest.fail(f"append({stream!r}, expected_version=load()'s version, [AccountOpened]) "
                    f"raised ConcurrencyError ({exc}): the version load() gives a stream with "
                    "no events must be the one an append to it expects, 0", pytrace=False)
    seen = mod.load(conn, stream)
    assert (version, seen) == (1, (account(0, 0), 1)), (
        f"after opening {stream!r} with the version load() gave, append returned {version} "
        f"and load() = {seen}; expected 1 and {(account(0, 0), 1)}")



def test_each_stream_has_its_own_version_and_snapshot(store: Any) -> None:
    """Two accounts in one store: a stream's version is the count of ITS events (a new
    stream starts at 0 whatever the others hold), and its snapshot is its own. A third,
    with no events yet, replays and loads as ({}, 0), and an append at 0 opens it."""
    mod, conn = store
    mod.append(conn, "acc-ann", 0, [opened("ann"), deposit(900), deposit(100)])
    mod.save_snapshot(conn, "acc-ann")
    try:
        got = mod.append(conn, "acc-bob", 0, [opened("bob"), deposit(40)])
    except mod.ConcurrencyError as exc:
        pytest.fail(f"append('acc-bob', expected_version=0) to a new stream raised "
                    f"ConcurrencyError ({exc}) while another stream, 'acc-ann', is at version "
                    "3: a stream's version is its own - max(version) of ITS events (WHERE "
                    "stream_id = ...), 0 for a stream with none", pytrace=False)
    assert got == 2, (
        f"appending 2 events to the new stream 'acc-bob' returned version {got!r}, not 2, "
        "beside 'acc-ann' at version 3: each stream counts its own versions from 1")
    expect_conflict(mod, conn, "acc-bob", 3, "'acc-bob' is at version 2 ('acc-ann' is at 3)")
    for stream, want in (("acc-bob", (account(40, 1, "bob"), 2)),
                         ("acc-ann", (account(1000, 2, "ann"), 3))):
        seen = mod.load(conn, stream)
        assert seen == want, (
            f"load({stream!r}) = {seen}; expected {want} ('acc-ann' has a snapshot at 3, "
            "'acc-bob' none): a load reads the snapshot and the events of ITS stream only - "
            "WHERE stream_id = ... in every query")
    expect_a_new_account(mod, conn, "acc-none")


# The caller's own transaction, two ways psycopg holds one: an append made inside it is a
# part of it - seen by no one until the caller commits, gone if the caller rolls back.
CALLERS = [
    ("block", "inside `with conn.transaction():` on an autocommit connection"),
    ("implicit", "on a connection with autocommit off (psycopg's default: the caller "
                 "commits)"),
]


class CallersTransaction:
    """A caller's transaction of either kind, opened, committed or rolled back by the test."""

    def __init__(self, postgres: Any, kind: str) -> None:
        self.kind = kind
        self.conn = postgres.connect(autocommit=kind == "block")
        self.block: Any = None

    def begin(self) -> None:
        if self.kind == "block":
            self.block = self.conn.transaction()
            self.block.__enter__()

    def end(self, commit: bool) -> None:
        if self.kind == "block":
            block, self.block = self.block, None
            if commit:
                block.__exit__(None, None, None)
            else:
                exc = psycopg.Rollback(block)
                block.__exit__(type(exc), exc, None)
        elif commit:
            self.conn.commit()
        else:
            self.conn.rollback()

    def close(self) -> None:
        self.conn.close()


@pytest.mark.parametrize("kind,caller", CALLERS, ids=[k for k, _ in CALLERS])
def test_an_append_in_the_callers_transaction_is_part_of_it(store: Any, postgres: Any,
                                                            kind: str, caller: str) -> None:
    """The caller opens a transaction, loads, appends, and rolls back: until its commit no
    one else sees the event, and after its rollback the event is gone. An append that commits on its
    own (COMMIT, conn.commit()) has committed the caller's other work with it."""
    mod, conn = store
    stream = f"acc-tx-{kind}"
    mod.append(conn, stream, 0, [opened(), deposit(100)])
    before = versions(conn, stream)
    tx = CallersTransaction(postgres, kind)
    try:
        tx.begin()
        _, at = mod.load(tx.conn, stream)   # the caller reads, decides, appends
        got = mod.append(tx.conn, stream, at, [deposit(50)])
        assert got == 3, f"append {caller} returned version {got}, expected 3"
        seen = versions(conn, stream)
        assert seen == before, (
            f"append {caller} - the caller's transaction still open - and another connection "
            f"already sees the stream as {seen}: the append committed the caller's "
            "transaction (a COMMIT, or conn.commit(), of its own), so whatever else the "
            "caller had written is committed too, half-way through its decision. Inside a "
            "caller's transaction the append is a part of it: `with conn.transaction():` "
            "nests as a savepoint there, and commits only on an autocommit connection")
        tx.end(commit=False)
        after = versions(conn, stream)
        assert after == before, (
            f"the caller rolled back its transaction after an append {caller}, and the "
            f"stream is {after}, expected {before}: the append was committed apart from the "
            "transaction it was made in")
    finally:
        tx.close()


@pytest.mark.parametrize("kind,caller", CALLERS, ids=[k for k, _ in CALLERS])
def test_a_lost_race_leaves_the_callers_transaction_usable(store: Any, postgres: Any,
                                                           kind: str, caller: str) -> None:
    """Inside the caller's transaction, an append loses the race for version 3 (another
    writer's uncommitted version 3 commits while the append waits on the primary key): it
    raises ConcurrencyError, and the caller, still in its transaction, reloads and retries
    - which must work. A refused INSERT aborts the whole transaction unless the append's
    statements ran in a savepoint."""
    mod, conn = store
    stream = f"acc-race-{kind}"
    mod.append(conn, stream, 0, [opened(), deposit(500)])
    other = postgres.connect()   # the other writer: version 3, not yet committed
    other.execute("INSERT INTO events (stream_id, version, type, schema_version, data) "
                  "VALUES (%s, 3, 'MoneyDeposited', 2, %s)", (stream, Jsonb(deposit(70)["data"])))
    tx = CallersTransaction(postgres, kind)
    pid = tx.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    if kind == "implicit":
        tx.conn.commit()
    outcome: dict[str, Any] = {}

    def caller_appends() -> None:
        tx.begin()
        try:
            _, at = mod.load(tx.conn, stream)   # 2: the other writer has not committed
            mod.append(tx.conn, stream, at, [withdraw(30)])
            outcome["first"] = "returned"
        except BaseException as exc:  # noqa: BLE001 - judged by the main thread
            outcome["first"] = exc
        try:
            _, version = mod.load(tx.conn, stream)
            outcome["reloaded"] = version   # the transaction still runs statements
            outcome["retry"] = mod.append(tx.conn, stream, version, [withdraw(30)])
            tx.end(commit=True)
        except BaseException as exc:  # noqa: BLE001
            outcome["retry_error"] = exc

    worker = threading.Thread(target=caller_appends, daemon=True)
    try:
        worker.start()
        deadline = time.monotonic() + 30   # ends at the lock wait; the rest is for load
        while "first" not in outcome and time.monotonic() < deadline:  # waits for `other`
            if conn.execute("SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted",
                            (pid,)).fetchone()[0]:
                break
            time.sleep(0.01)
        other.commit()
        worker.join(15)
    finally:
        other.close()
        tx.close()
    assert "first" in outcome, (
        f"append {caller}, racing another writer's version 3, had not returned 15 s after "
        "that writer committed: it should have failed on the primary key at once")
    first = outcome.get("first")
    assert isinstance(first, mod.ConcurrencyError), (
        f"append {caller}, racing another writer's version 3, "
        f"{'returned' if first == 'returned' else f'raised {type(first).__name__}: {first}'}"
        "; expected ConcurrencyError")
    error = outcome.get("retry_error")
    reloaded = outcome.get("reloaded")
    assert not (reloaded == 3 and isinstance(error, mod.ConcurrencyError)), (
        f"after append {caller} lost the race for version 3, the caller reloaded (load() "
        f"saw version 3, the transaction usable) and retried with expected_version 3, and "
        f"that raised ConcurrencyError: {error}. The stream is at 3: the append's check "
        "compared with a version it did not read from the events table in this "
        "transaction - one remembered from an earlier append (in the module) is stale as "
        "soon as another writer appends. Read max(version) for the stream in every append")
    assert error is None, (
        f"after append {caller} raised ConcurrencyError (it lost the race for version 3), "
        f"the caller reloaded and retried in the same transaction, and that raised "
        f"{type(error).__name__}: {error}. The refused INSERT aborted the caller's whole "
        "transaction: run the append's statements in a savepoint (`with conn.transaction():` "
        "is one inside a transaction), so a lost race leaves the caller free to retry")
    want = [(1, "AccountOpened"), (2, "MoneyDeposited"), (3, "MoneyDeposited"),
            (4, "MoneyWithdrawn")]
    assert outcome.get("retry") == 4 and versions(conn, stream) == want, (
        f"the retry returned {outcome.get('retry')!r} and the stream is "
        f"{versions(conn, stream)}; expected version 4 and {want}")


# --- snapshots -----------------------------------------------------------------------------

def test_snapshot_plus_tail_equals_full_replay(store: Any) -> None:
    mod, conn = store
    history = [opened()] + [deposit(100 + n) if n % 3 else withdraw(40 + n) for n in range(24)]
    mod.append(conn, "acc-3", 0, history[:20])
    snap_version = mod.save_snapshot(conn, "acc-3")
    assert snap_version == 20, f"save_snapshot returned version {snap_version}, expected 20"
    mod.append(conn, "acc-3", 20, history[20:])

    loaded, replayed = mod.load(conn, "acc-3"), mod.replay(conn, "acc-3")
    assert loaded == replayed and loaded[1] == 25, (
        f"load (snapshot at 20 + events 21-25) = {loaded}, replay of all 25 events = "
        f"{replayed}: they must agree - the tail starts AFTER the snapshot's version")

    # Probe: change event 7 behind the store's back. A full replay sees it; a load that really
    # starts from the snapshot at version 20 cannot.
    conn.execute("UPDATE events SET data = jsonb_set(data, '{amount_cents}', '1000000') "
                 "WHERE stream_id = 'acc-3' AND version = 7")
    assert mod.replay(conn, "acc-3") != replayed, "replay must read every event"
    assert mod.load(conn, "acc-3") == loaded, (
        "load() changed when an event before the snapshot changed: it is replaying the whole "
        "stream - read the snapshot, then only the events after its version")


LONG = 10_500   # events in one stream: past a page of 1,000 or 10,000 rows


def test_a_long_stream_is_read_whole(store: Any) -> None:
    """A stream of LONG events (an account open for years; written straight into the
    table, as many appends would): read_stream, replay, save_snapshot and load see all of
    it - no page of the first N rows taken for the whole stream."""
    mod, conn = store
    mod.append(conn, "acc-long", 0, [opened()])
    conn.execute("INSERT INTO events (stream_id, version, type, schema_version, data) "
                 "SELECT 'acc-long', v, 'MoneyDeposited', 2, %s FROM generate_series(2, %s) v",
                 (Jsonb({"amount_cents": 1, "currency": "EUR"}), LONG))
    want = (account(LONG - 1, LONG - 1), LONG)
    seen = {"replay()": mod.replay(conn, "acc-long")}
    seen["save_snapshot()"] = mod.save_snapshot(conn, "acc-long")
    seen["load() after it"] = mod.load(conn, "acc-long")
    for name, got in seen.items():
        expected = want[1] if name == "save_snapshot()" else want
        if got != expected:
            stopped_short(mod, conn)   # read_stream() read a page: named when so
        assert got == expected, (
            f"{name} on a stream of {LONG} events gave {got}, expected {expected}: every "
            "event counts - read them all, not a first page")


def stopped_short(mod: Any, conn: Any) -> None:
    """Fails the test if read_stream() returns fewer than the LONG events of 'acc-long'
    (read only when something went wrong: 10,500 events cost seconds to hand over from the
    learner's process)."""
    events = mod.read_stream(conn, "acc-long")
    if len(events) != LONG:
        last = events[-1]["version"] if events else None
        pytest.fail(f"read_stream() of a stream of {LONG} events returned {len(events)} "
                    f"(the last at version {last}), expected all {LONG}: a stream is read "
                    "whole - fetchall(), or fetchmany() / LIMIT pages in a loop until one "
                    "comes back empty. One page taken for the stream loses its newest events "
                    "once it outgrows the page: the state is an old one, and the next append "
                    "expects an old version", pytrace=False)


def test_a_snapshot_rolled_back_with_the_callers_transaction_is_gone(store: Any) -> None:
    """In the caller's transaction: two appends and a snapshot, then a rollback. The
    snapshot goes with the events it folded: load() is at the committed version, and the
    next append expects that version. A copy kept in the module (a cache of snapshots or
    of stream versions) outlives the rollback - and is shared by every connection and
    database the process serves."""
    mod, conn = store
    mod.append(conn, "acc-rb", 0, [opened(), deposit(500)])
    with conn.transaction():
        mod.append(conn, "acc-rb", 2, [deposit(1000), withdraw(300)])
        mod.save_snapshot(conn, "acc-rb")
        raise psycopg.Rollback()
    seen = mod.load(conn, "acc-rb")
    assert seen == (account(500, 1), 2), (
        f"after the caller rolled back two appends and the snapshot saved after them, "
        f"load() = {seen}, expected {(account(500, 1), 2)} (the committed stream): the "
        "rolled-back snapshot still counts - a snapshot lives in the snapshots table, "
        "inside the caller's transaction; keep no copy in the module, which a rollback "
        "never takes back")
    got, refused = None, ""
    try:
        got = mod.append(conn, "acc-rb", 2, [deposit(1)])
    except mod.ConcurrencyError as exc:
        refused = str(exc) or type(exc).__name__
    if refused:
        pytest.fail(f"after the caller rolled back two appends, append(expected_version=2) "
                    f"raised ConcurrencyError ({refused}), yet the stream is at version 2: the "
                    "stream's version is read from the events table in the append's own "
                    "transaction, never remembered in the module, where a rollback never "
                    "takes it back", pytrace=False)
    assert got == 3 and mod.load(conn, "acc-rb") == (account(501, 2), 3), (
        f"after the rollback, append(expected_version=2) returned {got!r} and load() gave "
        f"{mod.load(conn, 'acc-rb')}, expected 3 and {(account(501, 2), 3)}")


def test_a_load_reads_only_the_events_after_the_snapshot(store: Any, postgres: Any) -> None:
    """40 events, a snapshot at 40, 3 more: load() needs the snapshot and 3 events. The rows
    the server sends are counted on the wire (a proxy in front of Postgres): a load that
    fetches the whole stream and drops what the snapshot covers afterwards gets the right
    state and saves nothing - the 10,000-event replay the snapshot was for."""
    mod, conn = store
    history = [opened()] + [deposit(10 + n) for n in range(42)]
    mod.append(conn, "acc-8", 0, history[:40])
    mod.save_snapshot(conn, "acc-8")
    mod.append(conn, "acc-8", 40, history[40:])
    proxy = PgStatementProxy.for_dsn(postgres.dsn)
    try:
        with psycopg.connect(proxy.dsn_for(postgres.dsn), autocommit=True) as watched:
            proxy.take_rows()
            loaded = mod.load(watched, "acc-8")
            rows = proxy.take_rows()
    finally:
        proxy.close()
    assert loaded == mod.replay(conn, "acc-8"), (
        f"load() = {loaded}, replay() = {mod.replay(conn, 'acc-8')}")
    tail, allowed = 3, 3 + 2    # the tail, the snapshot's row, one more (a version, a count)
    assert rows <= allowed, (
        f"load() of a stream of 43 events with a snapshot at version 40 fetched {rows} rows "
        f"from Postgres for a tail of {tail} events (at most {allowed} expected: the "
        "snapshot, the tail): it reads the whole stream and drops the events the snapshot "
        "covers in Python. The point of a snapshot is what a load does NOT read - filter in "
        "the query: WHERE version > <the snapshot's version>")


def test_a_slow_snapshot_never_replaces_a_newer_one(store: Any, postgres: Any) -> None:
    """Two writers snapshot one stream: A reads it at version 20, B stores a snapshot at
    version 25 while A is still on its way. When A's write lands, the stored snapshot must
    stay at 25 - a snapshot only ever moves forward."""
    mod, conn = store
    history = [opened()] + [deposit(10 + n) for n in range(24)]
    mod.append(conn, "acc-6", 0, history[:20])
    mod.save_snapshot(conn, "acc-6")
    holder = postgres.connect()          # B's transaction, holding the snapshot row
    conn_a = postgres.connect(autocommit=True)
    pid_a = conn_a.execute("SELECT pg_backend_pid()").fetchone()[0]
    outcome: dict[str, Any] = {}
    try:
        holder.execute("SELECT version FROM snapshots WHERE stream_id = 'acc-6' FOR UPDATE")

        def save_a() -> None:
            try:
                outcome["version"] = mod.save_snapshot(conn_a, "acc-6")
            except BaseException as exc:  # noqa: BLE001 - judged below
                outcome["error"] = exc

        worker = threading.Thread(target=save_a, daemon=True)
        worker.start()
        deadline = time.monotonic() + 10
        while not outcome and time.monotonic() < deadline:   # A waits for B's row lock
            if conn.execute("SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted",
                            (pid_a,)).fetchone()[0]:
                break
            time.sleep(0.01)
        mod.append(conn, "acc-6", 20, history[20:])
        newer, _ = mod.replay(conn, "acc-6")
        holder.execute("UPDATE snapshots SET version = 25, state = %s WHERE stream_id = 'acc-6'",
                       (Jsonb(newer),))
        holder.commit()
        worker.join(10)
    finally:
        holder.close()
        conn_a.close()
    error = outcome.get("error")
    assert error is None, f"save_snapshot raised {type(error).__name__}: {error}"
    row = conn.execute("SELECT version FROM snapshots WHERE stream_id = 'acc-6'").fetchone()
    assert row is not None and row[0] == 25, (
        f"a save_snapshot that had read the stream at version 20 finished after a newer "
        f"snapshot (version 25) was stored, and the stored snapshot is now at version "
        f"{row and row[0]}: the slower writer moved it back - replace a snapshot only with a "
        "newer one (ON CONFLICT (stream_id) DO UPDATE ... WHERE snapshots.version < "
        "EXCLUDED.version)")
    assert mod.load(conn, "acc-6") == mod.replay(conn, "acc-6")


class AppendBetweenReads:
    """Commits one more event to a stream, from another connection, right after the first
    statement of the learner's that reads the events table and before its next statement on
    that connection: between two reads of the stream, if save_snapshot makes two. The
    connection's cursors (``cursor_factory``, see :meth:`cursor_class`) call it around each
    statement, so nothing of the learner's code is touched."""

    def __init__(self, postgres: Any, observer: Any, row: tuple[Any, ...]) -> None:
        self.postgres, self.observer, self.row = postgres, observer, row
        self.armed = self.read = False
        self.writer: threading.Thread | None = None
        self.pid = 0   # the writer's backend
        self.outcome: dict[str, Any] = {}

    def cursor_class(self) -> type:
        hook = self

        class Hooked(psycopg.Cursor):
            def execute(self, query: Any, params: Any = None, **kw: Any) -> Any:
                text = query if isinstance(query, str) else (
                    query.decode() if isinstance(query, bytes) else query.as_string(self))
                hook.before()
                done = super().execute(query, params, **kw)
                hook.read = hook.read or (hook.armed and bool(READS_EVENTS.search(text)))
                return done

        return Hooked

    def before(self) -> None:
        if not (self.armed and self.read) or self.writer is not None:
            return
        self.writer = threading.Thread(target=self._append, daemon=True)
        self.writer.start()
        deadline = time.monotonic() + 15   # committed, or waiting for a lock the learner holds
        while not self.outcome and time.monotonic() < deadline:
            if self.pid and self.observer.execute(
                    "SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted",
                    (self.pid,)).fetchone()[0]:
                return
            time.sleep(0.01)

    def _append(self) -> None:
        try:
            with self.postgres.connect(autocommit=True) as writer:
                self.pid = writer.execute("SELECT pg_backend_pid()").fetchone()[0]
                writer.execute("INSERT INTO events (stream_id, version, type, schema_version, "
                               "data) VALUES (%s, %s, %s, 2, %s)", self.row)
            self.outcome["done"] = True
        except BaseException as exc:  # noqa: BLE001 - judged by the test
            self.outcome["error"] = exc


READS_EVENTS = re.compile(r"\bevents\b", re.IGNORECASE)


def fold_history(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The test's own fold of v2 events (AccountOpened first)."""
    state = account(0, 0)
    for e in events[1:]:
        sign = 1 if e["type"] == "MoneyDeposited" else -1
        state = account(state["balance_cents"] + sign * e["data"]["amount_cents"],
                        state["transactions"] + 1)
    return state


def test_a_snapshot_is_the_fold_at_its_version(store: Any, postgres: Any) -> None:
    """The stream is at version 20. Right after save_snapshot's first read of the events
    table (and before its next statement), another writer commits a deposit as version 21.
    Whatever save_snapshot stores must be the fold AT the version it stores: the state and
    its version come from the same read of the stream."""
    mod, conn = store
    history = [opened()] + [deposit(100 + n) if n % 4 else withdraw(30 + n) for n in range(19)]
    mod.append(conn, "acc-7", 0, history)
    late = deposit(7000)
    between = AppendBetweenReads(postgres, conn, ("acc-7", 21, late["type"],
                                                  Jsonb(late["data"])))
    snapper = postgres.connect(autocommit=True, cursor_factory=between.cursor_class())
    try:
        between.armed = True
        mod.save_snapshot(snapper, "acc-7")
        between.armed = False
        if between.writer is not None:
            between.writer.join(30)
    finally:
        snapper.close()
    error = between.outcome.get("error")
    assert error is None, f"the test's append of version 21 failed: {error!r}"
    history.append(late)
    row = conn.execute("SELECT version, state FROM snapshots WHERE stream_id = 'acc-7'"
                       ).fetchone()
    assert row is not None, "save_snapshot stored no snapshot for acc-7"
    version, state = int(row[0]), row[1]
    if state != fold_history(history[:version]):
        folded = [n for n in range(1, len(history) + 1) if fold_history(history[:n]) == state]
        of = f"the fold of events 1-{folded[0]}" if folded else "a state no prefix folds to"
        effect = ("the deposit is skipped" if folded and folded[0] < version
                  else "the deposit counts twice")
        pytest.fail(
            f"save_snapshot stored version {version} with {of} ({state}): a deposit was "
            f"committed as version 21 between its reads of the stream (after its first read "
            f"of the events, before its next statement), and it took the state from one read "
            f"and the version from another. Every load() now starts from a wrong state "
            f"({effect}). A snapshot is the fold AT its version: take the version from the "
            f"events you folded (the last one's), not from a separate query", pytrace=False)
    loaded, replayed = mod.load(conn, "acc-7"), mod.replay(conn, "acc-7")
    assert loaded == replayed, (
        f"after a snapshot at version {version}, load() = {loaded} but replay() = {replayed}")


# --- upcasting -----------------------------------------------------------------------------

LEGACY = [  # recorded years ago with schema v1: euros as decimal strings, no currency
    ("AccountOpened", {"owner": "grace"}),
    ("MoneyDeposited", {"amount": "12.50"}),
    ("MoneyDeposited", {"amount": "0.29"}),
    ("MoneyWithdrawn", {"amount": "4.35"}),
]


def write_v1(conn: Any, stream: str, rows: Any) -> None:
    """Store (version, (type, data)) rows as schema v1, behind the store's back."""
    for version, (event_type, data) in rows:
        conn.execute("INSERT INTO events (stream_id, version, type, schema_version, data) "
                     "VALUES (%s, %s, %s, 1, %s)", (stream, version, event_type, Jsonb(data)))


def test_v1_events_are_upcast_when_read(store: Any) -> None:
    mod, conn = store
    # Written newest first (a migration copied them so): the table's order is not the
    # stream's, only ORDER BY version is.
    write_v1(conn, "acc-old", reversed(list(enumerate(LEGACY, start=1))))
    mod.append(conn, "acc-old", 4, [deposit(1000)])
    # No index scans in this session: the primary key's index would hand the rows over in
    # version order whatever the query says; only ORDER BY version orders them now.
    for setting in ("enable_indexscan", "enable_bitmapscan", "enable_indexonlyscan"):
        conn.execute(f"SET {setting} = off")

    events = mod.read_stream(conn, "acc-old")
    got = [(e["version"], e["type"], e["data"]) for e in events]
    versions = [v for v, _, _ in got]
    assert versions == sorted(versions), (
        f"read_stream gave the versions {versions}: a stream is read in version order - "
        f"ORDER BY version (rows come back in whatever order the table holds them)")
    want = [(1, "AccountOpened", {"owner": "grace", "currency": "EUR"}),
            (2, "MoneyDeposited", {"amount_cents": 1250, "currency": "EUR"}),
            (3, "MoneyDeposited", {"amount_cents": 29, "currency": "EUR"}),
            (4, "MoneyWithdrawn", {"amount_cents": 435, "currency": "EUR"}),
            (5, "MoneyDeposited", {"amount_cents": 1000, "currency": "EUR"})]
    assert got == want, (
        f"read_stream gave {got}; expected every event in the v2 schema {want}: upcast v1 "
        "(amount '12.50' euros, no currency) to v2 (amount_cents 1250, currency 'EUR') - with "
        "Decimal: float('0.29') * 100 is 28.999999999999996")
    state, version = mod.load(conn, "acc-old")
    want_state = (account(1250 + 29 - 435 + 1000, 4, "grace"), 5)
    assert (state, version) == want_state, (
        f"load('acc-old') = {(state, version)}; expected {want_state}: fold the upcast events")
    mod.save_snapshot(conn, "acc-old")
    assert mod.load(conn, "acc-old") == mod.replay(conn, "acc-old")
    stored = conn.execute("SELECT schema_version, data FROM events WHERE stream_id = 'acc-old' "
                          "AND version = 2").fetchone()
    assert tuple(stored) == (1, {"amount": "12.50"}), (
        f"the stored v1 event became {tuple(stored)}: upcast when reading, never rewrite "
        "recorded events - the log is append-only")


# Every way v1 wrote euros: a decimal string with two decimals, one, or none at all.
V1_AMOUNTS = [("12.50", 1250), ("12.5", 1250), ("0.5", 50), ("7", 700), ("0.05", 5),
              ("100", 10000), ("19.99", 1999), ("3.1", 310), ("0.29", 29)]


# Amounts past 2**53 cents: a float holds about 16 significant digits, so float(amount),
# rounded or not, turns 90071992547409.93 euros into ...994 cents. Decimal is exact at any size.
V1_LARGE_AMOUNTS = [("90071992547409.93", 9007199254740993),
                    ("123456789012345.67", 12345678901234567)]


def test_every_v1_amount_string_is_converted_exactly(store: Any) -> None:
    mod, conn = store
    rows = [("AccountOpened", {"owner": "grace"})]
    rows += [("MoneyDeposited", {"amount": amount}) for amount, _ in V1_AMOUNTS]
    rows += [("MoneyDeposited", {"amount": amount}) for amount, _ in V1_LARGE_AMOUNTS]
    write_v1(conn, "acc-v1", enumerate(rows, start=1))
    events = mod.read_stream(conn, "acc-v1")
    got = {e["version"]: e["data"].get("amount_cents") for e in events}
    for version, (amount, cents) in enumerate(V1_AMOUNTS, start=2):
        assert got.get(version) == cents, (
            f"the v1 deposit {{'amount': {amount!r}}} was upcast to amount_cents "
            f"{got.get(version)!r}; expected {cents}: a v1 amount is a decimal string of euros "
            f"with two, one or no decimals ('12.50', '12.5', '7') - convert its value "
            f"(Decimal(amount) * 100), not its digits split at the dot or with the dot removed")
    for version, (amount, cents) in enumerate(V1_LARGE_AMOUNTS, start=2 + len(V1_AMOUNTS)):
        assert got.get(version) == cents, (
            f"the v1 deposit {{'amount': {amount!r}}} was upcast to amount_cents "
            f"{got.get(version)!r}; expected {cents}: the amount went through a float, which "
            f"holds about 16 significant digits - rounding it or going back to Decimal "
            f"cannot bring back the cents it lost. Convert the string with "
            f"Decimal(amount) * 100, exact at any size")
