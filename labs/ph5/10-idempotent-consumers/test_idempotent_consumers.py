"""ph5.10 - idempotent consumers: a dedup table checked and written in the same transaction
as the event's effect.

* Every event delivered three times applies once.
* A failure that is not a duplicate (a CHECK on the dedup insert, a trigger refusing the
  balance, a connection the database ends) makes handle() raise, never return False.
* Two consumers handling the same event at the same moment, on two connections, driven step by
  step: the test holds a lock on the balance row so the first consumer stops inside its
  transaction, starts the second, waits until it is blocked too, then releases. Again with
  the first transaction failing (the test ends its connection): the second must wait for
  that outcome and apply the event - a busy lock taken as "duplicate" loses it.
* The consumer program (consumer.py, its own process, reading Kafka) is killed with SIGKILL
  while inside an event's transaction - stopped there by a lock the test holds on the balance
  row, or on the event's dedup key - and restarted: the balances must be exact, and once the
  restart has read the topic to its end, its group's committed offset must be that end.
* The consumer program behind a proxy that holds its fetches 6.5 s (a broker slow to
  answer): an empty poll() is not the end of the partition; the partition-EOF event is."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]  # typed, not re-exported

from labrunner.testing import KafkaProxy
from labrunner.testing.kafka_proxy import FETCH

Event = dict[str, Any]


def payment(n: int, account: str, cents: int) -> Event:
    return {"event_id": f"evt-{n}", "account": account, "amount_cents": cents}


EVENTS = [payment(n, f"acct-{n % 3}", 100 * (n + 1)) for n in range(12)]
# Two different payments of the same amount to the same account (two coffees): a dedup on
# the event's content instead of its id would drop the second.
EVENTS.append(payment(12, "acct-0", 100))


def expected_balances(events: list[Event]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for e in events:
        totals[e["account"]] = totals.get(e["account"], 0) + e["amount_cents"]
    return totals


@pytest.fixture
def db(postgres: Any, learner: Any) -> Any:
    mod = learner.load("consumer")
    conn = postgres.connect(autocommit=True)
    mod.setup(conn)  # given: the schema
    yield mod, conn
    conn.close()


def balances(conn: Any) -> dict[str, int]:
    return {a: int(c) for a, c in conn.execute("SELECT account, cents FROM balances "
                                               "WHERE cents <> 0").fetchall()}


def blocked_pids(conn: Any, ignore: set[int]) -> set[int]:
    """Backends of this database waiting for a lock (other than ``ignore``)."""
    rows = conn.execute("SELECT DISTINCT l.pid FROM pg_locks l JOIN pg_stat_activity a "
                        "ON a.pid = l.pid WHERE NOT l.granted AND a.datname = "
                        "current_database()").fetchall()
    return {int(r[0]) for r in rows} - ignore


def left_in_transaction(conn: Any, event: Event, outcome: str) -> str | None:
    """None if ``conn`` is idle after handle() (or gone: the server ended it), else what is
    wrong, to fail with; the transaction left behind is rolled back."""
    status = conn.info.transaction_status
    if conn.closed or status in (psycopg.pq.TransactionStatus.IDLE,
                                 psycopg.pq.TransactionStatus.UNKNOWN):
        return None
    conn.rollback()
    state = ("inside a failed transaction: its next statement fails with "
             "InFailedSqlTransaction, so run()'s next event cannot be handled"
             if status == psycopg.pq.TransactionStatus.INERROR else
             "inside a transaction that never ended: the next event's statements run "
             "inside it and commit with it, its row locks and snapshot are held meanwhile, "
             "and the consumer that stops here leaves it open (idle in transaction)")
    return (f"handle({event['event_id']}) {outcome} with the caller's connection {state}. "
            f"End the transaction on every path - a duplicate's early return and an error "
            f"too: 'with conn.transaction():' commits or rolls back when the block ends, "
            f"where a BEGIN sent by hand ends only where you wrote COMMIT or ROLLBACK")


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}", pytrace=False)
        time.sleep(0.01)


# --- in-process ----------------------------------------------------------------------------

def test_each_event_delivered_three_times_applies_once(db: Any) -> None:
    mod, conn = db
    deliveries = [e for round_ in range(3) for e in (EVENTS if round_ != 1 else EVENTS[::-1])]
    results: dict[str, list[bool]] = {}
    for event in deliveries:
        answer = bool(mod.handle(conn, event))
        results.setdefault(event["event_id"], []).append(answer)
        problem = left_in_transaction(conn, event, f"returned {answer}")
        assert problem is None, problem
    wrong = {k: v for k, v in results.items() if v.count(True) != 1}
    if wrong and list(wrong) == ["evt-12"] and results["evt-12"].count(True) == 0:
        pytest.fail(
            "evt-12 (acct-0, 100 cents) was never applied: it has the same account and amount "
            "as evt-0 but is another payment - deduplicate on the event_id, not on the "
            "event's content", pytrace=False)
    assert not wrong, (
        f"handle() returned {dict(list(wrong.items())[:3])} for three deliveries of the same "
        "event; expected True once (applied) and False twice (duplicate)")
    assert balances(conn) == expected_balances(EVENTS), (
        f"after every event was delivered three times the balances are {balances(conn)}; "
        f"expected {expected_balances(EVENTS)}: each event applies once")


@pytest.mark.parametrize("first", ["commits", "fails"])
def test_two_consumers_handle_one_event_at_once(db: Any, postgres: Any, learner: Any,
                                                first: str) -> None:
    """Consumer A and consumer B (separate connections, separately loaded copies of
    consumer.py - learner.load(fresh=True): no shared module state) get the same event at
    the same moment. A's transaction then commits, or fails (the test ends A's connection
    while it waits): only a COMMITTED dedup row makes B's delivery a duplicate, so after A
    failed B must apply the event."""
    mod, conn = db
    conn.execute("INSERT INTO balances VALUES ('acct-0', 0)")
    event = payment(99, "acct-0", 700)
    consumers = [learner.load("consumer"), learner.load("consumer", fresh=True)]
    conns = [postgres.connect(autocommit=True), postgres.connect(autocommit=True)]
    results: dict[int, Any] = {}

    def consume(i: int) -> None:
        try:
            results[i] = bool(consumers[i].handle(conns[i], event))
        except BaseException as exc:  # noqa: BLE001 - judged below
            results[i] = exc

    blocker = postgres.connect()
    blocker.execute("SELECT * FROM balances WHERE account = 'acct-0' FOR UPDATE")
    blocker_pid = blocker.execute("SELECT pg_backend_pid()").fetchone()[0]
    threads = [threading.Thread(target=consume, args=(i,), daemon=True) for i in (0, 1)]
    try:
        threads[0].start()
        wait_for(lambda: 0 in results or bool(blocked_pids(conn, {blocker_pid})),
                 "consumer A to reach the balance row (locked by the test)")
        waiting = blocked_pids(conn, {blocker_pid})
        threads[1].start()
        wait_for(lambda: 1 in results or bool(blocked_pids(conn, {blocker_pid}) - waiting),
                 "consumer B to block or finish")
        early = results.get(1)
        if first == "fails":  # A's transaction rolls back: evt-99 is neither recorded nor applied
            conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid",
                         (sorted(waiting),))
            wait_for(lambda: 0 in results, "consumer A to fail once its connection was ended")
    finally:
        blocker.rollback()  # release: A and B go on
        blocker.close()
    for thread in threads:
        thread.join(10)
    for c in conns:
        c.close()
    if first == "fails":
        assert_applied_after_the_first_failed(conn, results, early, event)
        return
    errors = [r for r in results.values() if isinstance(r, BaseException)]
    if errors and isinstance(errors[0], psycopg.errors.UniqueViolation):
        pytest.fail(f"handling the same event at the same time raised {errors[0]!r}: the "
                    "duplicate must be skipped, not crash the consumer - let the dedup table's "
                    "primary key decide (INSERT ... ON CONFLICT DO NOTHING, then look at the row "
                    "count) instead of checking first. (A lock in the process - a "
                    "threading.Lock around the check - orders only that process's calls: the "
                    "other consumer is another process, with locks of its own.)", pytrace=False)
    assert not errors, f"handle() raised {type(errors[0]).__name__}: {errors[0]}"
    assert balances(conn) == {"acct-0": 700}, (
        f"acct-0 is {balances(conn).get('acct-0', 0)} after the same 700-cent event was handled "
        "by two consumers at once; expected 700: both passed a 'processed yet?' check before "
        "either committed - let the database decide (INSERT ... ON CONFLICT DO NOTHING on the "
        "dedup key, in the effect's transaction), not a SELECT or the process's memory")
    assert sorted(results.values()) == [False, True], (
        f"the two consumers' handle() returned {results}; expected one True (applied) and one "
        "False (duplicate)")


def assert_applied_after_the_first_failed(conn: Any, results: dict[int, Any], early: Any,
                                          event: Event) -> None:
    """A's transaction for ``event`` failed (rolled back) while B was handling it too."""
    recorded = conn.execute("SELECT count(*) FROM processed_events WHERE event_id = %s",
                            (event["event_id"],)).fetchone()[0]
    if recorded and balances(conn).get("acct-0", 0) == 0:
        pytest.fail(
            f"consumer A's handling of {event['event_id']} failed before applying it (the test "
            f"ended its connection while it waited on the balance row), yet the event is "
            f"recorded as processed, and acct-0 is 0 (expected 700): the dedup row outlived the "
            f"failed effect, so B's delivery (handle() = {results.get(1)!r}) and every later one "
            f"are skipped - the payment is lost. Record the event id and apply the effect in "
            f"ONE transaction (conn.transaction() around both, not autocommit or two "
            f"transactions)", pytrace=False)
    if results.get(1) is False:
        when = ("at once, while A's transaction for it was still in progress (not committed)"
                if early is False else "")
        pytest.fail(
            f"consumer B's handle({event['event_id']}) returned False {when}; A's transaction "
            f"then failed (the test ended its connection) and rolled back: {event['event_id']} "
            f"is recorded {recorded} time(s), acct-0 is {balances(conn).get('acct-0', 0)} "
            f"(expected 700), and B's False lets run() commit its offset - the payment is lost "
            f"for good. Only a COMMITTED dedup row means 'already processed': a duplicate in "
            f"flight must be waited for (INSERT ... ON CONFLICT DO NOTHING blocks until the "
            f"first transaction ends, then inserts if it rolled back) - a busy lock "
            f"(pg_try_advisory_lock, NOWAIT, SKIP LOCKED) is not a duplicate", pytrace=False)
    assert not isinstance(results.get(1), BaseException), (
        f"consumer B's handle() raised {results.get(1)!r} after A's transaction for the same "
        f"event failed; expected True: the event is no duplicate any more, B applies it")
    assert results.get(1) is True and balances(conn) == {"acct-0": 700} and recorded == 1, (
        f"after A's transaction for {event['event_id']} failed, consumer B's handle() gave "
        f"{results.get(1)!r}, acct-0 is {balances(conn).get('acct-0', 0)} and the event is "
        f"recorded {recorded} time(s); expected True, 700 and once: B applies it")


@dataclass(frozen=True)
class OneAccount:
    """Two different payments to one account at once: where that account stands, and the
    uncommitted SQL of the test's that stops both consumers at its balance row."""

    account: str
    opening: int | None   # its committed balance before (None: no row yet)
    hold: str
    what: str


ONE_ACCOUNT = {
    "new": OneAccount("acct-new", None, "INSERT INTO balances VALUES ('acct-new', 0)",
                      "the new account acct-new (no balance row yet)"),
    "existing": OneAccount("acct-old", 1000,
                           "SELECT * FROM balances WHERE account = 'acct-old' FOR UPDATE",
                           "acct-old (balance 1000)"),
}


@pytest.mark.parametrize("case", ONE_ACCOUNT.values(), ids=ONE_ACCOUNT.keys())
def test_two_different_events_for_one_account_at_once(db: Any, postgres: Any, learner: Any,
                                                      case: OneAccount) -> None:
    """Consumers A and B handle two DIFFERENT payments to one account at the same moment.
    The test holds the balance row (an uncommitted insert of a row not there yet, or a lock
    on the one that is), so both stop right where they write it; it then lets go, and both
    go on: the row must be created once, and both amounts added."""
    mod, conn = db
    if case.opening is not None:
        conn.execute("INSERT INTO balances VALUES (%s, %s)", (case.account, case.opening))
    events = [payment(200, case.account, 300), payment(201, case.account, 400)]
    results = two_payments_held_at_the_row(postgres, learner, conn, case.hold, events)
    errors = [r for r in results.values() if isinstance(r, BaseException)]
    if errors and type(errors[0]).__name__ == "UniqueViolation":
        pytest.fail(
            f"two different payments (evt-200, evt-201) to {case.what}, handled "
            f"at once: one raised UniqueViolation ({str(errors[0]).splitlines()[0]}): both "
            f"looked for the balance row, found none, and both INSERTed it - check-then-act "
            f"on the balance row. Create-or-add in one statement: INSERT ... ON CONFLICT "
            f"(account) DO UPDATE SET cents = balances.cents + EXCLUDED.cents", pytrace=False)
    assert not errors, f"handle() raised {type(errors[0]).__name__}: {errors[0]}"
    assert results == {0: True, 1: True}, (
        f"two different events handled at once returned {results}; expected both True: they "
        f"are different payments (different event_id), both to be applied")
    opening = case.opening or 0
    got = balances(conn).get(case.account, 0)
    lost = (f": the {400 if got - opening == 300 else 300} payment was overwritten by the "
            f"other, a lost update - both read the balance before either wrote it, and each "
            f"wrote back its own sum (a read-modify-write: SELECT cents, add in Python, SET "
            f"cents = the new value). Add in SQL, where the row lock orders the two: SET "
            f"cents = balances.cents + EXCLUDED.cents" if got - opening in (300, 400) else "")
    assert got == opening + 700 and balances(conn) == {case.account: opening + 700}, (
        f"{case.account} is {got} after two different payments of 300 and 400 to "
        f"{case.what} handled at once; expected {opening + 700}{lost}")


def two_payments_held_at_the_row(postgres: Any, learner: Any, conn: Any, hold: str,
                                 events: list[Event]) -> dict[int, Any]:
    """Consumers A and B (code loaded twice, a connection each) handle ``events`` at once
    while the test holds the balance row with ``hold`` (uncommitted), until both are blocked
    there (or done); then it rolls back and both go on. What each handle() gave."""
    consumers = [learner.load("consumer"), learner.load("consumer", fresh=True)]
    conns = [postgres.connect(autocommit=True), postgres.connect(autocommit=True)]
    results: dict[int, Any] = {}

    def consume(i: int) -> None:
        try:
            results[i] = bool(consumers[i].handle(conns[i], events[i]))
        except BaseException as exc:  # noqa: BLE001 - judged by the caller
            results[i] = exc

    blocker = postgres.connect()
    blocker.execute(hold)  # not committed
    blocker_pid = blocker.execute("SELECT pg_backend_pid()").fetchone()[0]
    threads = [threading.Thread(target=consume, args=(i,), daemon=True) for i in (0, 1)]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: len(results) == 2 or len(blocked_pids(conn, {blocker_pid})) == 2
                 or (len(results) == 1 and len(blocked_pids(conn, {blocker_pid})) == 1),
                 "both consumers to reach the account's balance row")
    finally:
        blocker.rollback()  # the row was never held: A and B go on
        blocker.close()
    for thread in threads:
        thread.join(10)
    for c in conns:
        c.close()
    return results


# Failures that are NOT a duplicate, each at another point of handle()'s transaction: where
# the error is raised (the dedup insert, the balance update), its class (an IntegrityError
# that is not a unique violation, a plain error, a dropped connection), and the SQL that
# installs it (%(event)s / %(account)s: the event's) and removes it again.
NOT_DUPLICATES = [
    ("the dedup insert is refused by a CHECK (an IntegrityError, not a unique violation)",
     payment(300, "acct-check", 500),
     "ALTER TABLE processed_events ADD CONSTRAINT no_evt_300 CHECK (event_id <> 'evt-300')",
     "ALTER TABLE processed_events DROP CONSTRAINT no_evt_300"),
    ("a trigger refuses the balance update (RAISE EXCEPTION)",
     payment(301, "acct-refused", 600),
     """CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'balance refused for %', NEW.account; END $$;
        CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON balances FOR EACH ROW
          WHEN (NEW.account = 'acct-refused') EXECUTE FUNCTION refuse()""",
     "DROP TRIGGER refuse ON balances; DROP FUNCTION refuse()"),
    ("the database ends the connection mid-transaction (as a Postgres restart does)",
     payment(302, "acct-cut", 700),
     """CREATE FUNCTION cut() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); PERFORM pg_sleep(5);
        RETURN NEW; END $$;
        CREATE TRIGGER cut BEFORE INSERT OR UPDATE ON balances FOR EACH ROW
          WHEN (NEW.account = 'acct-cut') EXECUTE FUNCTION cut()""",
     "DROP TRIGGER cut ON balances; DROP FUNCTION cut()"),
]


@pytest.mark.parametrize("failure", NOT_DUPLICATES, ids=["check", "trigger", "connection"])
def test_a_failure_that_is_not_a_duplicate_raises(db: Any, postgres: Any,
                                                  failure: tuple[str, Event, str, str]) -> None:
    """The database fails handle()'s transaction for a reason other than "already processed":
    handle() must raise (run() then commits no offset and the event comes again), leave
    nothing recorded, and apply the event once the cause is gone."""
    mod, conn = db
    what, event, install, remove = failure
    conn.execute(install)
    consumer = postgres.connect(autocommit=True)
    try:
        answer: Any = bool(mod.handle(consumer, event))
    except Exception as exc:  # noqa: BLE001 - raising is right; what it left is checked
        answer = exc
    try:
        left = left_in_transaction(
            consumer, event, f"raised {type(answer).__name__} ({what})"
            if isinstance(answer, Exception) else f"returned {answer} ({what})")
    finally:
        consumer.close()
    conn.execute(remove)
    recorded = conn.execute("SELECT count(*) FROM processed_events WHERE event_id = %s",
                            (event["event_id"],)).fetchone()[0]
    assert isinstance(answer, Exception), (
        f"handle({event['event_id']}) returned {answer} when {what}: the event is not a "
        f"duplicate and was not applied. Expected an exception: returning False lets run() "
        f"commit the offset, so the payment is never made. Only the dedup key's conflict "
        f"means 'already processed' (INSERT ... ON CONFLICT (event_id) DO NOTHING, "
        f"rowcount 0) - do not catch psycopg.Error, IntegrityError or Exception as a "
        f"duplicate")
    assert left is None, left
    assert not recorded, (
        f"handle({event['event_id']}) failed ({what}) but left the event id recorded as "
        f"processed: its redelivery would be skipped - record and apply in one transaction")
    retry = postgres.connect(autocommit=True)
    try:
        again = bool(mod.handle(retry, event))
    finally:
        retry.close()
    assert again and balances(conn).get(event["account"]) == event["amount_cents"], (
        f"redelivered once the cause was gone ({what}), {event['event_id']} gave "
        f"handle() = {again} and balances {balances(conn)}: expected True and "
        f"{event['amount_cents']} cents on {event['account']}")


# --- the consumer process, killed mid-event ------------------------------------------------

def publish(kafka: Any, deliveries: list[Event]) -> str:
    topic: str = kafka.topic("payments")
    admin = kafka.admin()
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(timeout=30)
    producer = Producer(kafka.producer_config(acks="all"))
    for event in deliveries:
        producer.produce(topic, key=event["account"].encode(), value=json.dumps(event).encode(),
                         partition=0)
    assert producer.flush(15) == 0
    return topic


def restart_to_the_end(learner: Any, postgres: Any, kafka: Any, topic: str) -> None:
    """Start the consumer again; it must read to the end of the topic and exit 0 within
    30 s."""
    second = start_consumer(learner, postgres, kafka, topic)
    try:
        code = second.wait(30)
    except subprocess.TimeoutExpired:
        second.kill()
        second.wait()
        pytest.fail("the restarted consumer did not reach the end of the topic in 30 s",
                    pytrace=False)
    assert code == 0, f"the restarted consumer exited with {code}: {error_tail(second)}"


def start_consumer(learner: Any, postgres: Any, kafka: Any, topic: str,
                   bootstrap: str | None = None) -> subprocess.Popen[bytes]:
    return cast(subprocess.Popen[bytes],
                learner.python("consumer", "--dsn", postgres.dsn, "--bootstrap",
                               bootstrap or kafka.bootstrap, "--topic", topic, "--group",
                               kafka.group("payments"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE))


def expect_started_at_the_beginning(conn: Any, kafka: Any, topic: str, code: int) -> None:
    """Fail, naming where the group started, when the consumer program exited 0 on its
    first run over a topic full of events having handled none and committed no offset."""
    handled = conn.execute("SELECT count(*) FROM processed_events").fetchone()[0]
    if code != 0 or handled or committed_position(kafka, topic) is not None:
        return
    pytest.fail(
        f"the consumer program's first run over a topic already holding "
        f"{end_offset(kafka, topic)} events exited 0 having handled none of them and "
        f"committed no offset: it began at the END of the partition\nA group with no "
        f"committed offset yet starts where auto.offset.reset says, and its default, "
        f"'latest', is the end: every event published before the consumer first started "
        f"(a new service, a new group) is skipped, never handled and never redelivered. Set "
        f"'auto.offset.reset': 'earliest' and let the group's committed offset decide after "
        f"that (assign the partition without an offset of your own: OFFSET_END skips them "
        f"as well)", pytrace=False)


def end_offset(kafka: Any, topic: str) -> int:
    """The offset after partition 0's last event (its high watermark)."""
    reader = Consumer(kafka.consumer_config("watermarks"))
    try:
        return int(reader.get_watermark_offsets(TopicPartition(topic, 0), timeout=15)[1])
    finally:
        reader.close()


def error_tail(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stderr is not None
    text = proc.stderr.read().decode(errors="replace").strip()
    return (text.splitlines()[-1] if text else "(no error output)") + "\n" + text[-1500:]


# What the consumer program reads: every event, some twice; it ends on duplicates (evt-5..8).
DELIVERIES = EVENTS[:6] + EVENTS[:4] + EVENTS[6:] + EVENTS[5:9]


# How long the offsets of the events before the held one may take to show as committed,
# once the consumer waits inside the held one's transaction: each commit() was made before it
# read that event. The reference commits synchronously (seen at once); a right consumer with
# asynchronous commits (commit(message=msg), the default) showed within 0.3 s in 4 timed
# runs on a 2-core machine at a load of 15-26, and passed 6 of 6 more with this wait. A
# consumer that commits at the end, every few events, or msg.offset() never gets there: each
# waits this long before it is failed (it was 15 s: a third of this lab's wrongs' time).
COMMITTED_BY_THEN = 5.0


def kill_mid_event(learner: Any, postgres: Any, kafka: Any, conn: Any, hold: str,
                   args: tuple[Any, ...], held_at: int) -> str:
    """Run the consumer over DELIVERIES with the test holding a lock (``hold``, SQL), kill it
    with SIGKILL when it waits for that lock (the event at offset ``held_at``), once the
    offsets of the events before it are committed; release, restart it to the end. Return
    the topic."""
    topic = publish(kafka, DELIVERIES)
    blocker = postgres.connect()
    blocker.execute(hold, args)
    blocker_pid = blocker.execute("SELECT pg_backend_pid()").fetchone()[0]
    first = start_consumer(learner, postgres, kafka, topic)
    try:
        deadline = time.monotonic() + 20
        while not blocked_pids(conn, {blocker_pid}):
            if first.poll() is not None:
                expect_started_at_the_beginning(conn, kafka, topic, first.returncode)
                pytest.fail(f"the consumer exited ({first.returncode}) before reaching the "
                            f"locked row: {error_tail(first)}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail("the consumer never reached the row the test locked (20 s)",
                            pytrace=False)
            time.sleep(0.01)
        # Every event before the held one is handled, each in a transaction that committed:
        # its offset is due now (a commit may be asynchronous: waited for, not assumed).
        deadline = time.monotonic() + COMMITTED_BY_THEN
        while (at := committed_position(kafka, topic)) is None or at < held_at:
            if first.poll() is not None:
                pytest.fail(f"the consumer exited ({first.returncode}) while waiting for the "
                            f"row the test locked: {error_tail(first)}", pytrace=False)
            if time.monotonic() > deadline:
                done = ", ".join(e["event_id"] for e in DELIVERIES[:held_at])
                if at == held_at - 1:
                    pytest.fail(
                        f"the consumer program had handled {done} (offsets 0..{held_at - 1}) "
                        f"and was inside {DELIVERIES[held_at]['event_id']}'s transaction "
                        f"(offset {held_at}), and its group's committed offset was {at}: the "
                        f"offset of the last event it handled, expected {held_at}, the NEXT "
                        f"one to read - msg.offset() + 1 (commit(message=msg) commits that); "
                        f"as it is, every restart delivers {DELIVERIES[at]['event_id']} again",
                        pytrace=False)
                pytest.fail(
                    f"the consumer program had handled {done} (offsets 0..{held_at - 1}), "
                    f"each in a committed transaction, and was inside "
                    f"{DELIVERIES[held_at]['event_id']}'s (offset {held_at}, held by the test), "
                    f"yet its group's committed offset was "
                    f"{'none' if at is None else at} after {COMMITTED_BY_THEN:g} s, expected "
                    f"{held_at}: commit each event's offset right after its transaction, "
                    f"before reading the next - not once at the end of the partition or every "
                    f"few events. A crash (here, a SIGKILL now) redelivers everything after "
                    f"the committed offset, and a consumer that commits rarely replays a "
                    f"whole batch on every restart, leaning on the dedup table for each "
                    f"event", pytrace=False)
            time.sleep(0.1)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
        # A crash is an instant: what the consumer had not finished when it died must not
        # happen afterwards. Its server session, still waiting for the test's lock, would
        # otherwise finish the statement it was sent (and commit it, outside a transaction)
        # once the lock is released; end it, as if the process had died before sending it.
        stuck = blocked_pids(conn, {blocker_pid})
        for pid in stuck:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        wait_for(lambda: not conn.execute("SELECT count(*) FROM pg_stat_activity "
                                          "WHERE pid = ANY(%s)", (list(stuck),)).fetchone()[0],
                 "the killed consumer's database session to end")
        blocker.rollback()
        blocker.close()

    restart_to_the_end(learner, postgres, kafka, topic)
    return topic


def committed_position(kafka: Any, topic: str) -> int | None:
    """The offset the consumer program's group has committed on partition 0 (None: none)."""
    reader = Consumer(kafka.consumer_config("payments", **{"enable.auto.commit": False}))
    try:
        (position,) = reader.committed([TopicPartition(topic, 0)], timeout=15)
    finally:
        reader.close()
    return position.offset if position.offset >= 0 else None


def assert_resumes_after_the_end(kafka: Any, topic: str) -> None:
    """The restarted consumer read the topic to its end: its group's committed offset must be
    the end - the next offset to read - or the next start redelivers what was done."""
    end, at = len(DELIVERIES), committed_position(kafka, topic)
    why = ("a committed offset is where the group resumes after a restart or a rebalance: "
           "the NEXT event to read, msg.offset() + 1 (commit(message=msg) commits that)")
    if at is None:
        pytest.fail(
            f"the consumer program handled all {end} deliveries (offsets 0..{end - 1}) and "
            f"exited, and its group has no committed offset: every start handles the whole "
            f"topic again, leaning on the dedup table for each event. Commit the offset after "
            f"each event's transaction - {why}", pytrace=False)
    redone = [e["event_id"] for e in DELIVERIES[at:]]
    assert at != end - 1, (
        f"the consumer program handled all {end} deliveries (offsets 0..{end - 1}) and its "
        f"group's committed offset is {at}, the offset of the last event it handled "
        f"({redone[0]}), expected {end}: {why}. Committing the handled event's own offset "
        f"says it is still to do, so every restart delivers it again and only the dedup "
        f"table (once pruned, or a fresh one: nothing) stops a second payment")
    assert at == end, (
        f"the consumer program handled all {end} deliveries (offsets 0..{end - 1}) and its "
        f"group's committed offset is {at}, expected {end}: a restart would deliver "
        f"{', '.join(redone[:6])} again. Commit after EVERY event handled - a duplicate "
        f"(handle() False) too - {why}")


def diagnose(conn: Any, killed: str) -> None:
    """After the kill and the restart, name what went wrong from what the database holds:
    events never processed (the restart began after them: their offset was committed before
    their transaction), events recorded without their payment, or payments applied twice."""
    processed = {r[0] for r in conn.execute("SELECT event_id FROM processed_events")}
    lost = [e["event_id"] for e in EVENTS if e["event_id"] not in processed]
    got, want = balances(conn), expected_balances(EVENTS)
    short = {a: want[a] - got.get(a, 0) for a in want if got.get(a, 0) < want[a]}
    over = {a: got[a] - want.get(a, 0) for a in got if got[a] > want.get(a, 0)}
    if not lost and short and not over:
        pytest.fail(
            f"after the kill (inside {killed}'s handling) and the restart, {short} cents are "
            f"missing from the balances {got} (expected {want}), yet every event id is "
            f"recorded as processed: {killed}'s id was committed without its payment (the "
            f"dedup INSERT and the balance update in separate transactions - autocommit, or "
            f"two conn.transaction() blocks), so the restart skipped it as done. Record the id "
            f"and apply the payment in ONE transaction", pytrace=False)
    if not lost and over and not short:
        pytest.fail(
            f"after the kill (inside {killed}'s handling) and the restart, the balances {got} "
            f"hold {over} cents too many (expected {want}): a payment committed before its "
            f"event id was recorded was applied again after the crash - record the id and "
            f"apply the payment in ONE transaction", pytrace=False)
    if lost:
        pytest.fail(
            f"after the kill and restart {', '.join(lost)} {'was' if len(lost) == 1 else 'were'}"
            f" never processed (balances {balances(conn)}, expected "
            f"{expected_balances(EVENTS)}): the consumer was killed inside {killed}'s "
            f"transaction and the restart began after it - the Kafka offset had been "
            f"committed before the event's database transaction (a commit before handle(), "
            f"or librdkafka's auto-commit: 'enable.auto.commit' left true commits the "
            f"position poll() returned, in the background). Commit the offset only "
            f"after handle() committed: a crash in between then redelivers the event, and the "
            f"dedup table skips it if it was done", pytrace=False)


def test_killed_while_applying_an_effect(db: Any, learner: Any, postgres: Any,
                                         kafka: Any) -> None:
    """The consumer is killed while waiting to update acct-2's balance (the test locks that
    row): everything it did for that event must vanish with it, and the restart applies it."""
    mod, conn = db
    conn.execute("INSERT INTO balances VALUES ('acct-2', 0)")
    topic = kill_mid_event(learner, postgres, kafka, conn,
                   "SELECT * FROM balances WHERE account = %s FOR UPDATE", ("acct-2",),
                   held_at=2)
    diagnose(conn, "evt-2")
    assert balances(conn) == expected_balances(EVENTS), (
        f"after the kill and restart the balances are {balances(conn)}; expected "
        f"{expected_balances(EVENTS)}: an event marked processed in one transaction and "
        "applied in another is lost when the process dies between them - one transaction")
    assert_resumes_after_the_end(kafka, topic)


def test_killed_while_recording_the_event_id(db: Any, learner: Any, postgres: Any,
                                             kafka: Any) -> None:
    """The test holds evt-4's dedup key (an uncommitted insert), so the consumer is killed
    while recording evt-4 as processed: an effect committed before that would be applied again
    after the restart."""
    mod, conn = db
    topic = kill_mid_event(learner, postgres, kafka, conn,
                           "INSERT INTO processed_events (event_id) VALUES (%s)", ("evt-4",),
                           held_at=4)
    diagnose(conn, "evt-4")
    assert balances(conn) == expected_balances(EVENTS), (
        f"after the kill and restart the balances are {balances(conn)}; expected "
        f"{expected_balances(EVENTS)}: an effect committed before its event id is recorded is "
        "applied again after a crash - record and apply in one transaction")
    processed = conn.execute("SELECT count(*) FROM processed_events").fetchone()[0]
    assert processed == len(EVENTS), f"{processed} event ids recorded, expected {len(EVENTS)}"
    assert_resumes_after_the_end(kafka, topic)


# --- the consumer process, when an event fails ---------------------------------------------

def committed_past_why(code: int) -> str:
    """What commits an offset past an event whose transaction failed, by how the program
    ended: exit 0 - run() went on; non-zero - run() did stop, and something else committed."""
    if code == 0:
        return ("An event whose transaction failed is not done - no offset for it (not in a "
                "finally, not after an except that logs and goes on, not after reconnecting): "
                "let the error end run(), and the restart delivers the event again")
    return ("run() did let the error end it, yet an offset past the event was committed: by "
            "a commit in a finally, or by librdkafka itself - 'enable.auto.commit' left at "
            "its default, true, commits the position poll() returned (in close() and every "
            "5 s), whether the event's transaction committed or not. Set "
            "'enable.auto.commit': False and commit each offset yourself, only after its "
            "transaction committed; the restart then delivers the failed event again")


@pytest.mark.parametrize("failure", NOT_DUPLICATES[1:], ids=["trigger", "connection"])
def test_a_failed_event_is_not_committed_past(db: Any, learner: Any, postgres: Any,
                                              kafka: Any,
                                              failure: tuple[str, Event, str, str]) -> None:
    """The consumer program reads three events; the second one's transaction fails for a
    reason that is no duplicate (a trigger refuses its balance, or the database ends the
    connection). run() must let the error end it: the group's committed offset stays AT the
    failed event (the next start reads it again), the program exits non-zero. Once the cause
    is gone, the restarted program applies it."""
    mod, conn = db
    what, failing, install, remove = failure
    deliveries = [payment(400, "acct-ok", 100), failing, payment(401, "acct-ok", 200)]
    topic = publish(kafka, deliveries)
    conn.execute(install)
    first = start_consumer(learner, postgres, kafka, topic)
    try:
        code = first.wait(30)
    except subprocess.TimeoutExpired:
        first.kill()
        first.wait()
        pytest.fail(
            f"the consumer program was still running 30 s after it met {failing['event_id']}, "
            f"whose transaction fails ({what}): expected run() to let handle()'s error end "
            f"it (the program exits non-zero) with no offset committed past the event, so "
            f"that a restart reads it again", pytrace=False)
    finally:
        conn.execute(remove)
    expect_started_at_the_beginning(conn, kafka, topic, code)
    at = committed_position(kafka, topic)
    processed = {r[0] for r in conn.execute("SELECT event_id FROM processed_events")}
    if at is not None and at > 1:
        pytest.fail(
            f"{failing['event_id']} (offset 1) failed ({what}), and the consumer program "
            f"{'exited 0' if code == 0 else f'exited {code}'} with its group's committed "
            f"offset at {at}: past the failed event, which is "
            f"{'recorded' if failing['event_id'] in processed else 'not recorded'} as "
            f"processed and not applied (balances {balances(conn)}). Every later start "
            f"begins after it: the payment is lost for good. {committed_past_why(code)}",
            pytrace=False)
    assert code != 0, (
        f"{failing['event_id']} failed ({what}) and the consumer program exited 0 (offset "
        f"committed: {at}): a failure must not look like success to whatever runs it - let "
        f"handle()'s error leave run() (the program exits non-zero), so it is restarted and "
        f"the event comes again")
    assert failing["event_id"] not in processed, (
        f"{failing['event_id']} failed ({what}) but is recorded as processed: a restart "
        f"would skip it - record and apply in one transaction")

    restart_to_the_end(learner, postgres, kafka, topic)
    want = {"acct-ok": 300, failing["account"]: failing["amount_cents"]}
    assert balances(conn) == want, (
        f"once the cause was gone ({what}), the restarted consumer left the balances "
        f"{balances(conn)}; expected {want}: the failed event comes again and applies once")
    assert committed_position(kafka, topic) == len(deliveries), (
        f"after the restart read the topic to its end the group's committed offset is "
        f"{committed_position(kafka, topic)}, expected {len(deliveries)}")


# --- the consumer process, when the broker is slow -----------------------------------------

# s the test holds the consumer program's fetches: a broker slow to answer. Longer than the
# quiet spells a consumer is tempted to take for the end (a poll(5) that returned None, four
# empty poll(1)s in a row), with room for a Postgres connection made after the first fetch:
# 3 s let both through. Every right consumer waits it out once (its whole cost).
FETCH_HOLD = 6.5


def exit_while_fetches_held(proxy: KafkaProxy, proc: subprocess.Popen[bytes]) -> int | None:
    """Hold ``proc``'s Fetch requests for FETCH_HOLD s from the first one's arrival, then let
    them go; the program's exit code if it exited meanwhile, else None."""
    deadline = time.monotonic() + 20
    while not proxy.requests(FETCH) and proc.poll() is None:
        if time.monotonic() > deadline:
            proxy.wait_for(FETCH, timeout=0, what=" from the consumer program (20 s)")
        time.sleep(0.02)
    fetches = proxy.requests(FETCH)
    ends = (fetches[0].at if fetches else time.monotonic()) + FETCH_HOLD
    while proc.poll() is None and time.monotonic() < ends:
        time.sleep(0.02)
    return proc.poll()


def test_a_slow_broker_is_not_the_end_of_the_partition(db: Any, learner: Any, postgres: Any,
                                                       kafka: Any) -> None:
    """The consumer program runs behind a proxy that holds its Fetch requests for FETCH_HOLD s
    (a broker slow to answer): its polls return nothing meanwhile. run() reads to the end of
    the partition, which is the partition-EOF event - a poll() that returned None is only a
    quiet moment. Released, the program applies all three payments and exits 0."""
    mod, conn = db
    deliveries = [payment(500 + n, "acct-slow", 100 * (n + 1)) for n in range(3)]
    topic = publish(kafka, deliveries)
    with KafkaProxy(kafka.bootstrap) as proxy:
        proxy.hold(FETCH)
        proc = start_consumer(learner, postgres, kafka, topic, bootstrap=proxy.bootstrap)
        try:
            code = exit_while_fetches_held(proxy, proc)
        finally:
            proxy.release(FETCH)
        if code is not None:
            handled = conn.execute("SELECT count(*) FROM processed_events").fetchone()[0]
            pytest.fail(
                f"the test held the consumer program's Kafka fetches for {FETCH_HOLD:g} s (a "
                f"broker slow to answer) and the program exited {code} meanwhile, having "
                f"handled {handled} of the {len(deliveries)} events on the topic: it took a "
                f"poll() that returned nothing for the end of the partition. A poll() that "
                f"returns None (a consume() that returns []) only says no record came within "
                f"its timeout (a broker slow to answer, a consumer still starting); the end is "
                f"the partition-EOF event (enable.partition.eof=true, an error "
                f"_PARTITION_EOF): keep polling until it comes\n{error_tail(proc)}",
                pytrace=False)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("the consumer program did not reach the end of the topic within 30 s "
                        "of the test letting its fetches go", pytrace=False)
    assert code == 0, f"the consumer program exited with {code}: {error_tail(proc)}"
    assert balances(conn) == {"acct-slow": 600}, (
        f"the consumer program, whose fetches the test held {FETCH_HOLD:g} s, exited 0 "
        f"leaving the balances {balances(conn)}; expected {{'acct-slow': 600}}: it stopped "
        f"before the end of the partition - a poll() that returns None (however long its "
        f"timeout, however many in a row) is a quiet moment, not the end; the end is the "
        f"partition-EOF event (enable.partition.eof=true, an error _PARTITION_EOF)")
    at = committed_position(kafka, topic)
    assert at == len(deliveries), (
        f"after the consumer program read the topic to its end the group's committed offset "
        f"is {at}, expected {len(deliveries)}")
