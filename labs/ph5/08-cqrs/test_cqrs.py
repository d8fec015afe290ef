"""ph5.8 - CQRS: commands on normalized tables, a projector building a denormalized read model
from the event log, queries answered from the read model only.

Checks, on real Postgres: queries lag until the projector runs (so they cannot be reading the
write side); the projector continues from its checkpoint, also after failing part-way; a
rebuild from the events gives the same model; and an event whose transaction commits late,
after a later event was projected, is not skipped (two real connections, driven step by
step: the late one's caller keeps its transaction open, or a trigger holds it right after its
INSERT into events drew the seq - what a lock taken after that INSERT lets through); two
projectors running at once apply an event once (the checkpoint read under a row lock, not a
plain SELECT, FOR SHARE or a position read once per run)."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg.pq import TransactionStatus

Row = tuple[Any, ...]


@pytest.fixture
def store(postgres: Any, learner: Any) -> Any:
    """The learner's module and an autocommit connection to a database with the schema."""
    mod = learner.load("cqrs")
    conn = postgres.connect(autocommit=True)
    mod.setup(conn)  # given: the schema
    yield mod, conn
    conn.close()


def seed(mod: Any, conn: Any) -> None:
    """Two customers and three products: five events."""
    mod.register_customer(conn, "alice", "Alice")
    mod.register_customer(conn, "bob", "Bob")
    mod.add_product(conn, "book", "A book", 1500)
    mod.add_product(conn, "pen", "A pen", 200)
    mod.add_product(conn, "lamp", "A lamp", 4500)


def read_model(conn: Any) -> dict[str, list[Row]]:
    return {
        "order_summaries": conn.execute(
            "SELECT order_id, customer_id, customer_name, item_count, total_cents, status "
            "FROM order_summaries ORDER BY order_id").fetchall(),
        "customer_stats": conn.execute(
            "SELECT customer_id, name, open_orders, spent_cents FROM customer_stats "
            "ORDER BY customer_id").fetchall(),
    }


def summary(order_id: str, name: str, items: int, total: int,
            status: str = "placed") -> dict[str, Any]:
    return {"order_id": order_id, "customer_name": name, "item_count": items,
            "total_cents": total, "status": status}


def check_summary(mod: Any, conn: Any, order_id: str, want: dict[str, Any] | None,
                  why: str) -> None:
    got = mod.order_summary(conn, order_id)
    got = dict(got) if got is not None else None
    if want is not None and got is not None:
        got = {k: got.get(k) for k in want}
    assert got == want, f"order_summary({order_id!r}) = {got}; expected {want}: {why}"


def project(mod: Any, conn: Any, **kwargs: Any) -> int:
    """The learner's project(); a second insert of the same read-model row means an event
    was applied twice, which is said in those words. Given an autocommit connection with no
    transaction open, it must leave none open."""
    idle = conn.info.transaction_status == TransactionStatus.IDLE
    try:
        applied = int(mod.project(conn, **kwargs))
    except psycopg.errors.UniqueViolation as exc:
        detail = str(exc).splitlines()[-1]
        twice = f"project() applied an event a second time ({detail})"
    else:
        if idle:
            no_transaction_left_open(conn, "project()")
        return applied
    pytest.fail(f"{twice}: continue after the checkpoint, and move the checkpoint together "
                "with each event's changes, in one transaction", pytrace=False)


def no_transaction_left_open(conn: Any, what: str) -> None:
    """The caller's autocommit connection, idle before ``what``, is idle after it."""
    status = conn.info.transaction_status
    if status == TransactionStatus.INERROR:
        pytest.fail(
            f"{what} left the transaction it began on the caller's connection open and "
            "aborted (INERROR): every later statement on that connection fails ('current "
            "transaction is aborted'), and the locks it took - the checkpoint's FOR UPDATE - "
            "stay held\nEnd every transaction on every way out, the failing one too: "
            "`with conn.transaction():` rolls back when an exception leaves it.",
            pytrace=False)
    assert status == TransactionStatus.IDLE, (
        f"{what} returned with a transaction still open on the autocommit connection it was "
        f"given ({status.name}): the checkpoint row it locked (FOR UPDATE) stays locked, so "
        "another projector waits for ever, and the caller's next statements run inside it"
        "\nEnd every transaction you begin on every way out, an early return too: "
        "`with conn.transaction():` commits or rolls back by itself.")


class Background:
    """A call of the learner's code on a thread of its own: its result or its exception."""

    def __init__(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        self.outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                self.outcome["result"] = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                self.outcome["error"] = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def done(self) -> bool:
        return bool(self.outcome)

    def join(self, what: str, timeout: float = 30) -> Any:
        self.thread.join(timeout)
        if not self.outcome:
            pytest.fail(f"{what} did not return within {timeout:.0f} s", pytrace=False)
        return self.outcome.get("result")


def backend_pid(conn: Any) -> int:
    return int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])


def waits_for_lock(conn: Any, pid: int) -> bool:
    return bool(conn.execute("SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted",
                             (pid,)).fetchone()[0])


def wait_blocked_or_done(conn: Any, pid: int, call: Background, timeout: float = 15) -> bool:
    """Wait until the backend ``pid`` waits for a lock (True) or ``call`` returned (False)."""
    deadline = time.monotonic() + timeout
    while not call.done() and time.monotonic() < deadline:
        if waits_for_lock(conn, pid):
            return True
        time.sleep(0.01)
    return False


# --- tests -------------------------------------------------------------------------------

def test_queries_are_served_from_the_read_model(store: Any) -> None:
    mod, conn = store
    seed(mod, conn)
    project(mod, conn)
    mod.place_order(conn, "o1", "alice", [("book", 2), ("pen", 3)])
    check_summary(mod, conn, "o1", None,
                  "the order is not projected yet - a query that already sees it reads the "
                  "write tables; queries must read only the read model (it lags until the "
                  "projector runs)")
    project(mod, conn)
    check_summary(mod, conn, "o1", summary("o1", "Alice", 5, 3600),
                  "after project() the read model holds the order: item_count = sum of "
                  "quantities, total = sum of qty x price when ordered")
    customer = mod.customer_summary(conn, "alice")
    assert customer is not None and (customer["open_orders"], customer["spent_cents"]) == (
        1, 3600), f"customer_summary('alice') = {customer}; expected 1 open order, 3600 spent"

    mod.rename_customer(conn, "alice", "Alice Liddell")
    check_summary(mod, conn, "o1", summary("o1", "Alice", 5, 3600),
                  "the rename is not projected yet, so the read model still says 'Alice'")
    project(mod, conn)
    check_summary(mod, conn, "o1", summary("o1", "Alice Liddell", 5, 3600),
                  "the read model copies the customer's name into each order summary "
                  "(denormalized): CustomerRenamed must update every copy")

    mod.cancel_order(conn, "o1")
    project(mod, conn)
    check_summary(mod, conn, "o1", summary("o1", "Alice Liddell", 5, 3600, "cancelled"),
                  "after OrderCancelled is projected the status is 'cancelled'")
    customer = mod.customer_summary(conn, "alice")
    assert customer is not None and (customer["name"], customer["open_orders"],
                                     customer["spent_cents"]) == ("Alice Liddell", 0, 0), (
        f"customer_summary('alice') = {customer}; expected Alice Liddell, 0 open orders, "
        "0 spent after the only order was cancelled")

    # A command the write model's rules refuse records no event: cancelling the cancelled
    # o1 again, and an order that does not exist.
    for order_id in ("o1", "no-such-order"):
        events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        try:
            mod.cancel_order(conn, order_id)
        except Exception:  # noqa: BLE001 - refusing is right; what it recorded is checked
            pass
        added = conn.execute("SELECT type FROM events ORDER BY seq OFFSET %s",
                             (events,)).fetchall()
        project(mod, conn)
        customer = mod.customer_summary(conn, "alice")
        assert not added, (
            f"cancel_order({order_id!r}) of an order that is "
            f"{'already cancelled' if order_id == 'o1' else 'not there'} appended "
            f"{[a for (a,) in added]}; projected, alice's summary is now {customer}: a command "
            f"checks the write model's rule first (only a placed order can be cancelled: "
            f"UPDATE ... WHERE status = 'placed', then look at rowcount) and refuses - an "
            f"event records what happened, and this cancellation changed nothing")


def test_a_rename_reaches_every_summary_of_the_customer(store: Any) -> None:
    """The name is copied into each of the customer's order summaries: a rename must reach
    every copy - the cancelled order's too (it is still that customer's order, and a
    rebuild from the events would give it the new name)."""
    mod, conn = store
    seed(mod, conn)
    mod.place_order(conn, "o1", "alice", [("book", 1)])
    mod.place_order(conn, "o2", "alice", [("pen", 2)])
    mod.cancel_order(conn, "o1")
    project(mod, conn)
    mod.rename_customer(conn, "alice", "Alice Liddell")
    project(mod, conn)
    names = {order_id: (mod.order_summary(conn, order_id) or {}).get("customer_name")
             for order_id in ("o1", "o2")}
    assert names == {"o1": "Alice Liddell", "o2": "Alice Liddell"}, (
        f"alice placed o1 and o2, cancelled o1, then was renamed 'Alice Liddell'; projected, "
        f"the summaries' customer_name are {names}, expected 'Alice Liddell' in both: the "
        "rename skipped a summary of hers (the cancelled one?)\nCustomerRenamed updates "
        "every order_summaries row of that customer_id, whatever its status.")


def test_a_rename_of_no_customer_records_no_event(store: Any) -> None:
    """rename_customer of a customer never registered: refused, like a cancellation of an
    order that is not there - no event, and no customer made on the way."""
    mod, conn = store
    seed(mod, conn)
    events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    try:
        mod.rename_customer(conn, "nobody", "Nobody")
    except Exception:  # noqa: BLE001 - refusing is right; what it recorded is checked
        pass
    added = [t for (t,) in conn.execute("SELECT type FROM events ORDER BY seq OFFSET %s",
                                        (events,)).fetchall()]
    made = conn.execute("SELECT count(*) FROM customers WHERE customer_id = 'nobody'"
                        ).fetchone()[0]
    assert not added and not made, (
        f"rename_customer('nobody', 'Nobody') of a customer never registered appended "
        f"{added} and left {made} customer row(s) for 'nobody', expected neither: a command "
        "checks the write model's rule first and refuses (UPDATE customers ... WHERE "
        "customer_id = %s, then look at rowcount) - an event records what happened, and "
        "this rename changed nothing. " + (
            "An upsert registers a customer with no CustomerRegistered event, so the read "
            "model never hears of it and no rebuild can give it back." if made else
            "Projected, it renames nobody; replayed, it says a customer existed who never did."))


def test_a_failing_command_changes_nothing_and_appends_no_event(store: Any) -> None:
    """place_order with an unknown product fails on its second line: the order row, its
    first line and the event must all be gone - one transaction per command."""
    mod, conn = store
    seed(mod, conn)
    events_before = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    try:
        mod.place_order(conn, "o9", "alice", [("book", 1), ("no-such-sku", 1)])
    except Exception:  # noqa: BLE001 - refusing is right; what it left is checked below
        pass
    else:
        pytest.fail("place_order with an unknown product ('no-such-sku') succeeded: refuse it",
                    pytrace=False)
    orders = conn.execute("SELECT count(*) FROM orders WHERE order_id = 'o9'").fetchone()[0]
    lines = conn.execute("SELECT count(*) FROM order_lines WHERE order_id = 'o9'").fetchone()[0]
    events = conn.execute("SELECT count(*) FROM events").fetchone()[0] - events_before
    assert (orders, lines, events) == (0, 0, 0), (
        f"place_order failed on its second line, yet left {orders} order row(s), {lines} "
        f"order line(s) and {events} event(s) behind: a command is ONE transaction - the "
        f"write tables and its event change together or not at all (with conn.transaction())")


def test_an_order_for_no_customer_is_refused(store: Any) -> None:
    """place_order for a customer never registered: refused by the command (the foreign key
    only backs it up), and nothing recorded - no order, no event, no customer made on the
    way. An event for a customer the read model never heard of breaks every replay."""
    mod, conn = store
    seed(mod, conn)
    events_before = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    try:
        mod.place_order(conn, "o9", "nobody", [("book", 1)])
    except Exception:  # noqa: BLE001 - refusing is right; what it left is checked below
        refused = True
    else:
        refused = False
    orders = conn.execute("SELECT count(*) FROM orders WHERE order_id = 'o9'").fetchone()[0]
    made = conn.execute("SELECT count(*) FROM customers WHERE customer_id = 'nobody'"
                        ).fetchone()[0]
    added = [t for (t,) in conn.execute("SELECT type FROM events ORDER BY seq OFFSET %s",
                                        (events_before,)).fetchall()]
    assert refused and (orders, made, added) == (0, 0, []), (
        f"place_order('o9', 'nobody', ...) for a customer never registered "
        f"{'raised' if refused else 'returned as if the order was placed'}, and left "
        f"{orders} order row(s), {made} customer row(s) for 'nobody' and the events {added}; "
        "expected a refusal (raise ValueError) and nothing recorded: a command checks the "
        "write model's rules and refuses what breaks them. " + (
            "Making the customer on the way registers one with no CustomerRegistered event: "
            "the read model never hears of it, so the OrderPlaced cannot be projected."
            if made else "A refusal swallowed looks like success to the caller, who then "
            "waits for an order that was never placed." if not refused else ""))


# Names and ids are the user's text: a quote, a percent sign, braces, SQL-looking text.
# (customer id, name, order id, new name) - all must come back exactly as sent.
TEXT_CASES = [
    ("o'brien", "Miles O'Brien", "o'1", "Keiko O'Brien"),
    ("x'); --", "Robert'); DROP TABLE customer_stats; --", "o2' OR '1'='1",
     "Bobby' || 'Tables"),
    ("50%", "100% {off} %s %(name)s \\ \"q\"", "o%s", "Zoë \\'; SELECT 1; --"),
]
# Ids that exist nowhere, but match every row if pasted into a WHERE clause.
PROBES = ["nobody' OR '1'='1", "' OR ''='"]


def test_text_is_passed_to_postgres_as_parameters(store: Any) -> None:
    """Names with a quote (O'Brien) and text that looks like SQL go through every command,
    the projector and both queries unchanged: values go to Postgres as parameters, never
    pasted into the SQL text (an f-string breaks on the quote, and runs the SQL-looking
    text: the classic injection)."""
    mod, conn = store
    seed(mod, conn)
    why = ("a value pasted into the SQL text (f-string, %, +, format) breaks on a quote and "
           "runs whatever SQL a name holds (injection): pass values as parameters - "
           "conn.execute(\"... WHERE customer_id = %s\", (customer_id,))")

    def call(what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(conn, *args)
        except Exception as exc:  # noqa: BLE001 - reported with what was sent
            pytest.fail(f"{what}({', '.join(map(repr, args))}) raised {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}; expected it to "
                        f"work with this text: {why}", pytrace=False)

    for customer_id, name, order_id, new_name in TEXT_CASES:
        call("register_customer", mod.register_customer, customer_id, name)
        call("place_order", mod.place_order, order_id, customer_id, [("book", 1)])
        call("rename_customer", mod.rename_customer, customer_id, new_name)
    call("project", mod.project)
    for customer_id, name, order_id, new_name in TEXT_CASES:
        got = call("order_summary", mod.order_summary, order_id)
        got_name = dict(got).get("customer_name") if got is not None else None
        assert got_name == new_name, (
            f"order_summary({order_id!r}) gave the customer name {got_name!r} (the whole "
            f"answer: {got}); expected {new_name!r}, the name customer {customer_id!r} was "
            f"renamed to (registered as {name!r}): {why}")
        customer = call("customer_summary", mod.customer_summary, customer_id)
        got_name = dict(customer).get("name") if customer is not None else None
        assert got_name == new_name, (
            f"customer_summary({customer_id!r}) gave the name {got_name!r}; expected "
            f"{new_name!r}: {why}")
    for probe in PROBES:
        for what, fn in (("order_summary", mod.order_summary),
                         ("customer_summary", mod.customer_summary)):
            got = call(what, fn, probe)
            assert got is None, (
                f"{what}({probe!r}) of an id that does not exist returned {got}, expected "
                f"None: the id was pasted into the WHERE clause, and its quote made it "
                f"match other rows - {why}")
    tables = {t for (t,) in conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()}
    assert {"customers", "customer_stats", "order_summaries", "events"} <= tables, (
        f"a table is gone after commands with SQL-looking names (tables left: "
        f"{sorted(tables)}): a name ran as SQL - {why}")


EXPECTED_AFTER_CATCH_UP = {
    "order_summaries": [("o1", "alice", "Alice", 1, 4500, "placed"),
                        ("o2", "bob", "Bob", 4, 800, "cancelled"),
                        ("o3", "alice", "Alice", 2, 3000, "placed")],
    "customer_stats": [("alice", "Alice", 2, 7500), ("bob", "Bob", 0, 0)],
}


def test_the_read_model_shows_only_the_events_applied(store: Any) -> None:
    """The read model is a function of the events applied so far, not of the write tables
    now: OrderPlaced applied while a rename is still pending shows the name as of that event,
    and a rename shows the name it carries, not the latest one. A projector that looks the
    current state up in the write tables shows changes whose events it has not applied (and
    a replay could never give back the model as it was at a checkpoint)."""
    mod, conn = store
    seed(mod, conn)
    project(mod, conn)
    mod.place_order(conn, "o1", "alice", [("book", 2)])
    mod.rename_customer(conn, "alice", "Alice Liddell")
    mod.rename_customer(conn, "alice", "Alice Hargreaves")
    pending = ("OrderPlaced(o1), CustomerRenamed('Alice Liddell'), "
               "CustomerRenamed('Alice Hargreaves')")
    lesson = ("The projector builds the read model from the EVENT and the read model itself (the "
              "name in customer_stats, the name the rename event carries) - never from the "
              "write tables (customers, orders, ...), which are already ahead of it.")
    for applied, name in ((1, "Alice"), (1, "Alice Liddell"), (1, "Alice Hargreaves")):
        count = project(mod, conn, max_events=applied)
        done = {"Alice": "only OrderPlaced(o1)",
                "Alice Liddell": "OrderPlaced(o1) and the first rename",
                "Alice Hargreaves": "all three"}[name]
        got = mod.order_summary(conn, "o1")
        customer = mod.customer_summary(conn, "alice")
        seen = ((got or {}).get("customer_name"), (customer or {}).get("name"))
        assert count == 1 and seen == (name, name), (
            f"pending: {pending}; one project(max_events=1) at a time, {done} applied: "
            f"order_summary('o1') says customer_name {seen[0]!r} and customer_summary('alice') "
            f"name {seen[1]!r}, expected {name!r} in both: the read model shows a name the "
            f"events applied so far do not give - it read the write side's current state\n"
            f"{lesson}")


def test_projector_catches_up_from_its_checkpoint(store: Any) -> None:
    mod, conn = store
    seed(mod, conn)
    first = project(mod, conn)
    assert first == 5, f"the first project() applied {first} events; expected 5 (2 customers, " \
                       "3 products)"
    mod.place_order(conn, "o1", "alice", [("lamp", 1)])
    mod.place_order(conn, "o2", "bob", [("pen", 4)])
    mod.place_order(conn, "o3", "alice", [("book", 2)])
    mod.cancel_order(conn, "o2")
    none = project(mod, conn, max_events=0)
    assert none == 0, (
        f"project(max_events=0) applied {none} events; expected 0: a limit of 0 is a limit "
        "(only None means no limit) - `if max_events` or `while not max_events or ...` reads "
        "0 as None and runs the projector to the end")
    counts = [project(mod, conn, max_events=2), project(mod, conn), project(mod, conn)]
    assert counts == [2, 2, 0], (
        f"project(max_events=2), project(), project() applied {counts} events; expected "
        "[2, 2, 0]: each run continues after the last event applied, stored as a checkpoint")
    model = read_model(conn)
    assert model == EXPECTED_AFTER_CATCH_UP, (
        f"after catching up the read model is {model}; expected {EXPECTED_AFTER_CATCH_UP}")


def test_projector_failing_part_way_resumes_exactly(store: Any) -> None:
    """The projector hits an event it cannot apply (a trigger refuses o-bad); once that is
    fixed it must continue where it stopped: no event applied twice, none skipped."""
    mod, conn = store
    seed(mod, conn)
    project(mod, conn)
    conn.execute("""
        CREATE FUNCTION refuse_bad() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF NEW.order_id = 'o-bad' THEN RAISE EXCEPTION 'read model refused o-bad'; END IF;
          RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_bad BEFORE INSERT ON order_summaries
          FOR EACH ROW EXECUTE FUNCTION refuse_bad();
    """)
    mod.place_order(conn, "o4", "alice", [("book", 1)])
    mod.place_order(conn, "o-bad", "bob", [("pen", 1)])
    mod.place_order(conn, "o5", "alice", [("pen", 2)])
    with pytest.raises(Exception):  # noqa: B017 - whatever the learner lets through
        mod.project(conn)  # the trigger refuses o-bad
    no_transaction_left_open(conn, "project() that failed (the trigger refused o-bad)")
    conn.execute("DROP TRIGGER refuse_bad ON order_summaries")
    project(mod, conn)
    want = {
        "order_summaries": [("o-bad", "bob", "Bob", 1, 200, "placed"),
                            ("o4", "alice", "Alice", 1, 1500, "placed"),
                            ("o5", "alice", "Alice", 2, 400, "placed")],
        "customer_stats": [("alice", "Alice", 2, 1900), ("bob", "Bob", 1, 200)],
    }
    model = read_model(conn)
    assert model == want, (
        f"after a failed projection and a retry the read model is {model}; expected {want}: "
        "apply each event and move the checkpoint in the SAME transaction, so a failure "
        "leaves them agreeing and nothing is applied twice")


def test_rebuild_gives_the_same_model(store: Any) -> None:
    mod, conn = store
    seed(mod, conn)
    mod.place_order(conn, "o1", "alice", [("book", 1), ("lamp", 2)])
    mod.place_order(conn, "o2", "bob", [("pen", 10)])
    mod.rename_customer(conn, "bob", "Robert")
    mod.cancel_order(conn, "o1")
    mod.place_order(conn, "o3", "alice", [("pen", 1)])
    project(mod, conn)
    before = read_model(conn)
    conn.execute("UPDATE customer_stats SET spent_cents = -1")   # the read model is damaged
    conn.execute("DELETE FROM order_summaries WHERE order_id = 'o2'")
    replayed = mod.rebuild(conn)
    no_transaction_left_open(conn, "rebuild()")
    assert replayed == 10, f"rebuild() replayed {replayed} events; expected all 10"
    after = read_model(conn)
    assert after == before, (
        f"after rebuild() the read model is {after}; before it was damaged it was {before}: "
        "empty the read model, reset the checkpoint, replay every event")


def test_events_are_applied_in_seq_order_however_they_are_stored(store: Any) -> None:
    """A command rolled back after its event INSERT leaves a dead row (and a gap in seq);
    VACUUM frees its slot, and a later event is stored there, before an earlier one."""
    mod, conn = store
    seed(mod, conn)
    project(mod, conn)
    with conn.transaction(force_rollback=True):  # the caller's transaction: undone
        mod.place_order(conn, "o-undone", "alice", [("book", 1)])
    mod.place_order(conn, "o1", "alice", [("lamp", 1)])
    conn.execute("VACUUM events")
    mod.place_order(conn, "o2", "bob", [("pen", 2)])
    stored = [seq for (seq,) in conn.execute(
        "SELECT seq FROM events WHERE type = 'OrderPlaced' ORDER BY ctid")]
    applied = project(mod, conn)
    orders = [order_id for (order_id, *_) in read_model(conn)["order_summaries"]]
    if orders == ["o1", "o2"]:
        return
    story = (f"a command was rolled back after drawing seq {min(stored) - 1}, VACUUM freed its "
             f"row, and the next two orders' events are stored in the order seq {stored}")
    if orders == ["o2"]:
        pytest.fail(
            f"{story}; project() applied {applied} event(s) and the read model holds only o2: "
            f"o1 (seq {min(stored)}) was skipped. Without ORDER BY seq, SQL returns rows in "
            "whatever order the scan meets them, not by seq; the projector took the later "
            "event first and moved its checkpoint past o1 for good. Take the next event with "
            "WHERE seq > checkpoint ORDER BY seq", pytrace=False)
    if not orders:
        pytest.fail(
            f"{story}; project() applied {applied} event(s) and the read model holds no order: "
            f"seq {min(stored) - 1} was never committed, so a projector that looks for "
            "checkpoint + 1 waits for it forever. A sequence has gaps (rolled-back INSERTs "
            "still draw a number): take the next event with WHERE seq > checkpoint "
            "ORDER BY seq", pytrace=False)
    pytest.fail(f"{story}; project() applied {applied} event(s) and the read model holds "
                f"orders {orders}: expected o1 and o2, applied in seq order", pytrace=False)


# The command whose transaction commits late, holding the lower seq: another order, or a
# command of another kind - every command appends, so every one must take its turn.
LATE_COMMANDS = {
    "place_order": ("place_order('late')",
                    lambda mod, conn: mod.place_order(conn, "late", "alice", [("book", 1)])),
    "rename_customer": ("rename_customer('alice', 'Alice Late')",
                        lambda mod, conn: mod.rename_customer(conn, "alice", "Alice Late")),
}
# How it comes late: its caller keeps the transaction open after the command returned, or
# it is held right after its INSERT into events drew the seq (a trigger the test adds waits
# there for a lock the test holds), before anything else the command does.
HOW_LATE = {
    "caller_transaction_open": "its caller kept the transaction open after the command",
    "held_after_drawing_seq": "it was held right after its INSERT into events drew the seq",
}
HOLD_KEYS = (58, 8001)  # the test's advisory lock (two int keys: apart from any bigint key)
HOLD_AFTER_APPEND = f"""
CREATE FUNCTION hold_after_append() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF current_setting('lab.hold_append', true) = 'on' THEN
    PERFORM pg_advisory_xact_lock({HOLD_KEYS[0]}, {HOLD_KEYS[1]});
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER hold_after_append AFTER INSERT ON events
  FOR EACH ROW EXECUTE FUNCTION hold_after_append();
"""


class Late:
    """The late command, on a connection of its own: started, it is late - its transaction
    still open and its event's seq drawn; :meth:`commit` lets it commit."""

    def __init__(self, mod: Any, conn: Any, postgres: Any, how: str, command: Any) -> None:
        self.conn = postgres.connect(autocommit=True)
        self.call: Background | None = None
        if how == "caller_transaction_open":
            self.tx = self.conn.transaction()   # the caller's: the command's nests in it
            self.tx.__enter__()
            command(mod, self.conn)
            return
        conn.execute(HOLD_AFTER_APPEND)
        self.conn.execute("SET lab.hold_append = on")
        # The pid is read before the command starts: the connection serves one call at a
        # time, so a read of it once the command waits in the trigger would wait too, for a
        # lock this thread releases only afterwards (a hang that load made happen).
        pid = backend_pid(self.conn)
        self.call = Background(command, mod, self.conn)
        if not wait_blocked_or_done(conn, pid, self.call):
            pytest.fail(f"the late command returned without its INSERT into events waiting "
                        f"for the test's lock ({self.call.outcome}): every command appends "
                        f"its event to the events table", pytrace=False)

    def commit(self, what: str) -> None:
        """Once the test's lock is released: a held command goes on and commits, a caller's
        transaction commits."""
        if self.call is None:
            self.tx.__exit__(None, None, None)
        else:
            self.call.join(f"{what}, released")
            assert "error" not in self.call.outcome, (
                f"{what} failed: {self.call.outcome.get('error')!r}")
        self.conn.close()


@pytest.mark.parametrize(("late_command", "how"), [
    (command, how) for how in HOW_LATE for command in LATE_COMMANDS])
def test_event_committed_late_is_not_skipped(store: Any, postgres: Any, late_command: str,
                                             how: str) -> None:
    """A's command draws the lower event seq but commits late: its caller keeps the
    transaction open, or it is held right after its INSERT into events. Meanwhile B places an
    order and the projector runs; then A commits. A's event must reach the read model."""
    mod, conn = store
    seed(mod, conn)
    project(mod, conn)
    what, command = LATE_COMMANDS[late_command]
    holder = postgres.connect(autocommit=True)
    holder.execute("SELECT pg_advisory_lock(%s, %s)", HOLD_KEYS)
    conn_b = postgres.connect(autocommit=True)
    pid_b = backend_pid(conn_b)
    try:
        late = Late(mod, conn, postgres, how, command)
        place_b = Background(mod.place_order, conn_b, "early", "bob", [("pen", 1)])
        wait_blocked_or_done(conn, pid_b, place_b, timeout=10)  # B finished or B waits for A
        early_first = place_b.done() and "error" not in place_b.outcome
        project(mod, conn)  # runs while A is still open
    finally:
        holder.close()  # a held A goes on
    late.commit(what)
    place_b.join("place_order on the second connection")
    conn_b.close()
    assert "error" not in place_b.outcome, (
        f"place_order on the second connection failed: {place_b.outcome.get('error')!r}")
    project(mod, conn)
    missing = [o for o in ("late", "early") if mod.order_summary(conn, o) is None
               and (o == "early" or late_command == "place_order")]
    alice = mod.customer_summary(conn, "alice")
    renamed = late_command != "rename_customer" or (alice or {}).get("name") == "Alice Late"
    if not missing and renamed:
        return
    lost = (f"the rename (alice's name in the read model: {(alice or {}).get('name')!r})"
            if not renamed else f"{missing} (never in the read model)")
    story = (f"{what} drew the lower event seq and {HOW_LATE[how]}; place_order('early') on "
             f"another connection drew a higher one and committed "
             f"{'first' if early_first else 'too'}, and the projector moved its checkpoint "
             f"past 'early' - so {lost}, committed behind it, was skipped")
    if how == "held_after_drawing_seq":
        fix = ("serialize appends BEFORE the seq is drawn: pg_advisory_xact_lock first, then "
               "the INSERT into events, in every command - a lock taken after the INSERT "
               "orders the commits but not the seqs")
    elif late_command == "rename_customer":
        fix = ("every command appends an event, so EVERY one must take its turn (the same "
               "pg_advisory_xact_lock before each append), not only place_order")
    else:
        fix = ("events must commit in seq order: take the append lock before the INSERT and "
               "hold it until commit (pg_advisory_xact_lock, not a session lock released "
               "when the command returns), or hold back events behind still-open "
               "transactions")
    pytest.fail(f"{story}: {fix}", pytrace=False)


def test_two_cancellations_at_once_record_one_event(store: Any, postgres: Any) -> None:
    """Two cancel_order('o1') at once on two connections (a double click, a retry): the first
    is held right after its INSERT into events (the test's trigger waits for a lock the test
    holds), so the second runs while the first's cancellation is not committed. Once the
    first commits, the second must find o1 cancelled and refuse: one OrderCancelled in all.
    A check made apart from the change (SELECT status, then UPDATE) sees 'placed' - the
    other transaction's change is not committed yet - and both go through."""
    mod, conn = store
    seed(mod, conn)
    mod.place_order(conn, "o1", "alice", [("lamp", 1)])
    project(mod, conn)
    conn.execute(HOLD_AFTER_APPEND)
    holder = postgres.connect(autocommit=True)
    holder.execute("SELECT pg_advisory_lock(%s, %s)", HOLD_KEYS)
    first, second = postgres.connect(autocommit=True), postgres.connect(autocommit=True)
    pids = backend_pid(first), backend_pid(second)  # before the commands use them
    first.execute("SET lab.hold_append = on")
    try:
        c1 = Background(mod.cancel_order, first, "o1")
        if not wait_blocked_or_done(conn, pids[0], c1):
            pytest.fail(f"cancel_order('o1') returned without its INSERT into events waiting "
                        f"for the test's lock ({c1.outcome}): a cancellation appends "
                        f"OrderCancelled to the events table", pytrace=False)
        c2 = Background(mod.cancel_order, second, "o1")
        wait_blocked_or_done(conn, pids[1], c2)  # waits for the first, or is done
    finally:
        holder.close()  # the first goes on and commits
    for call, what in ((c1, "the first cancel_order('o1')"),
                       (c2, "the second cancel_order('o1')")):
        call.thread.join(30)
        if not call.done():
            pytest.fail(f"{what} did not return within 30 s", pytrace=False)
    first.close()
    second.close()
    assert "error" not in c1.outcome, (
        f"the first cancel_order('o1') failed: {c1.outcome.get('error')!r}")
    cancels = conn.execute("SELECT count(*) FROM events WHERE type = 'OrderCancelled' "
                           "AND data->>'order_id' = 'o1'").fetchone()[0]
    project(mod, conn)
    alice = mod.customer_summary(conn, "alice")
    stats = None if alice is None else (alice["open_orders"], alice["spent_cents"])
    second_outcome = (f"raised {type(c2.outcome['error']).__name__}" if "error" in c2.outcome
                      else "returned")
    assert cancels == 1 and stats == (0, 0), (
        f"two cancel_order('o1') at once on two connections: the second ran while the "
        f"first's cancellation was not committed yet, then {second_outcome}; the events "
        f"table holds {cancels} OrderCancelled for o1 and, projected, alice's (open_orders, "
        f"spent_cents) are {stats}, expected 1 event and (0, 0): the second cancellation "
        "checked a status the first was changing - 'placed' in its snapshot - and recorded "
        "a cancellation that changed nothing\nCheck and change in one step: UPDATE orders "
        "SET status = 'cancelled' WHERE order_id = %s AND status = 'placed' waits for the "
        "first and re-checks the row once it commits; append the event only when its "
        "rowcount is 1 (or read the row with SELECT ... FOR UPDATE before checking it).")


def test_two_projectors_at_once_apply_each_event_once(store: Any, postgres: Any) -> None:
    """Two projectors run at once (two instances of the service). The test holds the
    customer_stats table (SHARE mode), so projector 1 reads the checkpoint and the pending
    OrderCancelled, then waits to apply it; projector 2 starts meanwhile. It must wait for
    projector 1's checkpoint (or skip the event), not read the same checkpoint and apply the
    same event a second time once the table is released."""
    mod, conn = store
    seed(mod, conn)
    mod.place_order(conn, "o1", "alice", [("lamp", 1)])
    project(mod, conn)
    mod.cancel_order(conn, "o1")  # the one pending event
    first, second = postgres.connect(autocommit=True), postgres.connect(autocommit=True)
    pids = backend_pid(first), backend_pid(second)  # before the projectors use them
    holder = postgres.connect()
    holder.execute("LOCK TABLE customer_stats IN SHARE MODE")
    try:
        p1 = Background(mod.project, first)
        wait_blocked_or_done(conn, pids[0], p1)
        p2 = Background(mod.project, second)
        wait_blocked_or_done(conn, pids[1], p2)
    finally:
        holder.rollback()  # the read model is writable again: both go on
        holder.close()
    calls = [(p1, "projector 1"), (p2, "projector 2")]
    applied = [call.join(what) for call, what in calls]
    first.close()
    second.close()
    alice = mod.customer_summary(conn, "alice")
    for call, what in calls:
        error = call.outcome.get("error")
        if isinstance(error, psycopg.errors.UniqueViolation | psycopg.errors.DeadlockDetected):
            pytest.fail(
                f"{what} failed with {type(error).__name__} while another projector ran "
                f"({str(error).splitlines()[0]}): both read the same checkpoint and went for "
                f"the same event. Lock the checkpoint row (SELECT ... FOR UPDATE, not FOR "
                f"SHARE) in the transaction that applies the event: a second projector then "
                f"waits and reads the moved checkpoint", pytrace=False)
        assert error is None, (
            f"{what} raised {error!r} while another projector ran: the second one should "
            "wait for the first (SELECT ... FOR UPDATE on the checkpoint) and then find "
            "nothing left, or skip what the first holds")
    counts = [int(a) for a in applied]
    stats = None if alice is None else (alice["open_orders"], alice["spent_cents"])
    twice = sum(counts) > 1 or (stats is not None and stats[0] < 0)
    assert sum(counts) == 1 and stats == (0, 0), (
        f"two projectors ran at once with one event pending (OrderCancelled of o1): they "
        f"returned {counts} events applied and alice's (open_orders, spent_cents) are now "
        f"{stats}, expected one event applied in all and (0, 0)"
        + (": both read the checkpoint before either moved it, and both applied the "
           "cancellation. Read the checkpoint with SELECT ... FOR UPDATE in the transaction "
           "that applies the event and moves it: a second projector then waits for the "
           "first and sees the moved checkpoint" if twice else ""))


def test_two_projector_instances_share_only_the_database(store: Any, postgres: Any,
                                                         learner: Any) -> None:
    """Two instances of the service (two copies of cqrs.py sharing no module state, as two
    processes would) take turns projecting. What one applied is in the read model in
    Postgres, and only there: a projector that remembers customer names in its own memory
    (a module-level dict, an lru_cache) gives an order the name it saw before the other
    instance applied a rename."""
    mod, conn = store
    other = learner.load("cqrs", fresh=True)
    other_conn = postgres.connect(autocommit=True)
    try:
        seed(mod, conn)
        mod.place_order(conn, "o1", "alice", [("book", 1)])
        project(other, other_conn)  # instance B: the customers, the products, o1
        mod.rename_customer(conn, "alice", "Alice Liddell")
        project(mod, conn)  # instance A: the rename
        mod.place_order(conn, "o2", "alice", [("pen", 2)])
        project(other, other_conn)  # instance B again: o2
    finally:
        other_conn.close()
    got = mod.order_summary(conn, "o2")
    name = None if got is None else got.get("customer_name")
    assert name == "Alice Liddell", (
        f"two projector instances took turns - B applied CustomerRegistered('Alice') and "
        f"OrderPlaced(o1), A applied CustomerRenamed('Alice Liddell'), then B applied "
        f"OrderPlaced(o2) - and order_summary('o2') gives customer_name {name!r}, expected "
        "'Alice Liddell': instance B took the name from its own memory (a module-level "
        "cache), which never saw A's rename. Projectors share only the read model in "
        "Postgres: read the name from customer_stats in the event's transaction")
