"""ph5.6 - the order saga.

Orchestrated: the learner's orchestrator drives four participants the test provides. Each
participant is a small "service" with its own state in Postgres: it logs every call it gets and
records its effect idempotently (a repeated call changes nothing). The test makes step k fail
(StepFailed) or makes the orchestrator "crash" at a call - an exception it must not handle,
after which its connection is gone; a freshly loaded orchestrator (no memory of the first) must
resume from the state in Postgres.

Choreographed: four services, each its own consumer group on one Kafka topic, react to each
other's events; the test reads the topic back and checks every order's chain of events.

The rules are also checked one by one on react(), at their boundaries (a limit is
inclusive: exactly 100000 cents, exactly 10 items), and a crash that is an ordinary
exception (a participant's connection error) must escape like any other crash.

Mistakes a learner makes here, each caught with its own message:
- compensating the failed step too, or forward order               -> the calls seen
- progress kept in memory, or marked done before calling            -> resume after a crash
- the compensation not stored (a resumed run goes forward again)    -> resume while compensating
- a compensation that failed (its service down, or a refund refused for now: StepFailed from
  undo()) skipped or counted as done, the older steps undone anyway  -> a failing undo
- any exception treated as a refusal (except Exception / BaseException, or StepFailed
  together with TimeoutError, or everything but ConnectionError): a crash compensates
               -> a ConnectionError, a TimeoutError after the charge, a ValueError
- state updated for every saga, not this one                        -> two sagas at once
- limits off by one (< instead of <=)                               -> react() at the limit
- the order cancelled without a refund, refund on the wrong event   -> the chains over Kafka
- a restarted service re-reading the topic from the start (an offset given to assign(), a
  group of its own per instance)                                    -> a restart, a new order
- start_saga resetting a saga that exists (upsert, delete + insert) -> a repeated start
- the steps taken in the participants dict's order, not STEPS      -> the dict, newest first
- two orchestrators driving one saga (no lock, a lock in the process, FOR UPDATE released
  with its autocommit statement)                                    -> one held, one refused
- a service committing its input offset before its reactions are acknowledged (flush after
  commit): its reaction's Produce request is held at a proxy until pump() waits in flush()
  (a harness follows its calls); an OffsetCommit arriving before that is the mistake
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from textwrap import shorten
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from labrunner.testing import API_NAMES, KafkaProxy, came_true, read_all, wait_until
from labrunner.testing.kafka_proxy import OFFSET_COMMIT, PRODUCE

STEPS = ("create_order", "charge_payment", "reserve_inventory", "schedule_shipping")
ORDER = {"order_id": "order-1", "amount_cents": 4200, "sku": "book", "qty": 1, "country": "DE"}


class Crash(BaseException):
    """The orchestrator's process dies at this point (not a business failure: the
    orchestrator must not catch it)."""


@dataclass
class Service:
    """A participant: logs each call it receives, records its effect once (idempotent)."""

    step: str
    conn: Any
    step_failed: type[Exception]
    fail: bool = False           # do() refuses: raise the learner's StepFailed
    crash: str | None = None     # "before" / "after" doing the work: raise Crash, once
    crash_on: str = "do"

    def do(self, saga_id: str, order: dict[str, Any]) -> None:
        self._call("do", saga_id)

    def undo(self, saga_id: str, order: dict[str, Any]) -> None:
        self._call("undo", saga_id)

    def _call(self, action: str, saga_id: str) -> None:
        self.conn.execute("INSERT INTO svc_calls (saga_id, step, action) VALUES (%s, %s, %s)",
                          (saga_id, self.step, action))
        if action == "do" and self.fail:
            raise self.step_failed(f"{self.step} refused")
        crashing = self.crash if action == self.crash_on else None
        if crashing == "before":
            self.crash = None
            raise Crash(f"orchestrator died calling {action} {self.step}")
        self.conn.execute("INSERT INTO svc_effects VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                          (saga_id, self.step, action))
        if crashing == "after":
            self.crash = None
            raise Crash(f"orchestrator died after {action} {self.step}")


@pytest.fixture
def world(postgres: Any, learner: Any) -> Any:
    """The learner's saga module and the participants' tables (the learner's own tables are
    created by its setup(), called at the start of each test)."""
    conn = postgres.connect(autocommit=True)
    conn.execute("CREATE TABLE svc_calls (id bigserial PRIMARY KEY, saga_id text, step text, "
                 "action text)")
    conn.execute("CREATE TABLE svc_effects (saga_id text, step text, action text, "
                 "PRIMARY KEY (saga_id, step, action))")
    yield learner.load("saga"), conn
    conn.close()


def services(mod: Any, conn: Any, **special: dict[str, Any]) -> dict[str, Service]:
    # Handed over newest step first: the saga's order is STEPS, whatever the dict's order.
    return {step: Service(step, conn, mod.StepFailed, **special.get(step, {}))
            for step in reversed(STEPS)}


def calls(conn: Any, saga_id: str) -> list[str]:
    rows = conn.execute("SELECT action, step FROM svc_calls WHERE saga_id = %s ORDER BY id",
                        (saga_id,)).fetchall()
    return [f"{a} {s}" for a, s in rows]


def effects(conn: Any, saga_id: str) -> set[str]:
    rows = conn.execute("SELECT action, step FROM svc_effects WHERE saga_id = %s",
                        (saga_id,)).fetchall()
    return {f"{a} {s}" for a, s in rows}


def do(*indexes: int) -> list[str]:
    return [f"do {STEPS[i]}" for i in indexes]


def undo(*indexes: int) -> list[str]:
    return [f"undo {STEPS[i]}" for i in indexes]


def crash_run(mod: Any, postgres: Any, saga_id: str, parts: dict[str, Service]) -> None:
    """Run the saga until the participant crashes it; the orchestrator must let it through."""
    try:
        result = mod.run_saga(postgres.dsn, saga_id, parts)
    except Crash:
        return
    pytest.fail(f"run_saga returned {result!r} although the orchestrator crashed in the middle "
                "(the test's Crash is a BaseException): never catch BaseException - a crash is "
                "not a business failure to compensate", pytrace=False)


# --- orchestration -----------------------------------------------------------------------

def test_orchestrated_saga_completes(world: Any, postgres: Any) -> None:
    mod, conn = world
    mod.setup(postgres.dsn)
    mod.start_saga(postgres.dsn, "s-ok", ORDER)
    status = mod.run_saga(postgres.dsn, "s-ok", services(mod, conn))
    assert (status, calls(conn, "s-ok")) == ("completed", do(0, 1, 2, 3)), (
        f"run_saga returned {status!r} after the calls {calls(conn, 's-ok')}; expected "
        f"'completed' after {do(0, 1, 2, 3)}: each step once, in the order of STEPS (the "
        "participants dict is keyed by step; its own order is not the saga's)")
    assert mod.saga_status(postgres.dsn, "s-ok") == "completed", (
        "saga_status must read the saga's state from Postgres")


@pytest.mark.parametrize("k", range(4), ids=[f"fail_at_{s}" for s in STEPS])
def test_failure_at_step_k_compensates_in_reverse(world: Any, postgres: Any, k: int) -> None:
    mod, conn = world
    mod.setup(postgres.dsn)
    saga_id = f"s-fail-{k}"
    mod.start_saga(postgres.dsn, saga_id, ORDER)
    status = mod.run_saga(postgres.dsn, saga_id, services(mod, conn, **{STEPS[k]: {"fail": True}}))
    want = do(*range(k + 1)) + undo(*reversed(range(k)))
    got = calls(conn, saga_id)
    assert got == want, (
        f"{STEPS[k]} failed; the participants saw {got}; expected {want}: compensate the "
        "steps that completed before the failure, newest first - not the failed step (it did "
        "nothing), and nothing after it")
    assert status == "compensated" == mod.saga_status(postgres.dsn, saga_id), (
        f"after compensating, run_saga returned {status!r} and saga_status says "
        f"{mod.saga_status(postgres.dsn, saga_id)!r}; expected 'compensated'")


def test_resume_after_crash_going_forward(world: Any, postgres: Any, learner: Any) -> None:
    """The orchestrator dies while calling reserve_inventory (before the call took effect).
    A new orchestrator resumes: it calls reserve_inventory again, then schedule_shipping -
    and not the two steps recorded as done."""
    mod, conn = world
    mod.setup(postgres.dsn)
    mod.start_saga(postgres.dsn, "s-crash", ORDER)
    parts = services(mod, conn, reserve_inventory={"crash": "before"})
    crash_run(mod, postgres, "s-crash", parts)
    status = mod.saga_status(postgres.dsn, "s-crash")
    assert status == "running", f"after the crash the stored status is {status!r}, not 'running'"

    fresh = learner.load("saga")  # a new process: nothing survives but Postgres
    result = fresh.run_saga(postgres.dsn, "s-crash", parts)
    got = calls(conn, "s-crash")
    assert got == do(0, 1, 2, 2, 3), (
        f"the participants saw {got}; expected {do(0, 1, 2, 2, 3)}: the resumed orchestrator "
        "must continue from the state stored after each step - call the interrupted step "
        "again (participants are idempotent), never redo a step recorded as done")
    assert effects(conn, "s-crash") == set(do(0, 1, 2, 3)) and result == "completed", (
        f"after the resume the participants' effects are {sorted(effects(conn, 's-crash'))} "
        f"and run_saga returned {result!r}; expected all four steps done, 'completed': a step "
        "is done when its participant answered, not when the orchestrator was about to call it")


def test_resume_after_crash_while_compensating(world: Any, postgres: Any,
                                               learner: Any) -> None:
    """schedule_shipping fails; while compensating, the orchestrator dies right after
    charge_payment's undo took effect. A new orchestrator finishes the compensation - it
    does not go forward again."""
    mod, conn = world
    mod.setup(postgres.dsn)
    mod.start_saga(postgres.dsn, "s-comp", ORDER)
    parts = services(mod, conn, schedule_shipping={"fail": True},
                     charge_payment={"crash": "after", "crash_on": "undo"})
    crash_run(mod, postgres, "s-comp", parts)
    status = mod.saga_status(postgres.dsn, "s-comp")
    assert status == "compensating", (
        f"after a crash in the middle of compensating the stored status is {status!r}; "
        "expected 'compensating' (store it: the next orchestrator must know to go backwards)")

    fresh = learner.load("saga")
    parts["schedule_shipping"].fail = False  # the world moved on: a forward retry would work
    result = fresh.run_saga(postgres.dsn, "s-comp", parts)
    got = calls(conn, "s-comp")
    want = do(0, 1, 2, 3) + undo(2, 1, 1, 0)
    assert got == want, (
        f"the participants saw {got}; expected {want}: the resumed orchestrator repeats the "
        "interrupted undo and continues backwards - a saga that started compensating "
        "finishes compensating")
    assert result == "compensated", f"run_saga returned {result!r}, expected 'compensated'"


# Crashes that are ordinary exceptions (an Exception, not StepFailed): the step's service is
# down before it did anything; its reply timed out AFTER it took effect (the outcome is
# unknown to the orchestrator); its client failed on a malformed reply.
CRASHES: dict[str, tuple[str, bool, Callable[[], Exception], str]] = {
    "service_down": ("reserve_inventory", False,
                     lambda: ConnectionError("inventory service unreachable"),
                     "its service is down"),
    "reply_timed_out": ("charge_payment", True,
                        lambda: TimeoutError("timed out reading the reply"),
                        "the charge was taken, then the reply timed out: the outcome is "
                        "unknown to the orchestrator, and compensating only the steps "
                        "before it leaves the customer charged for a cancelled order"),
    "malformed_reply": ("schedule_shipping", False,
                        lambda: ValueError("unexpected reply from the shipping service"),
                        "its client failed on a reply it could not read"),
}


@pytest.mark.parametrize("crash", CRASHES)
def test_a_crash_that_is_an_ordinary_exception_is_not_a_refusal(world: Any, postgres: Any,
                                                                 crash: str) -> None:
    """A participant's do() raises an ordinary exception (an Exception but not StepFailed):
    that is a crash, not a business refusal - nothing may be compensated; the error escapes
    and the saga stays 'running', so a resumed run issues that (idempotent) do() again."""
    step, took_effect, error, meaning = CRASHES[crash]
    mod, conn = world
    mod.setup(postgres.dsn)
    saga = f"s-{crash}"
    mod.start_saga(postgres.dsn, saga, ORDER)
    parts = services(mod, conn)
    kind = type(error()).__name__

    def crashing(saga_id: str, order: dict[str, Any]) -> None:
        conn.execute("INSERT INTO svc_calls (saga_id, step, action) VALUES (%s, %s, 'do')",
                     (saga_id, step))
        if took_effect:
            conn.execute("INSERT INTO svc_effects VALUES (%s, %s, 'do') ON CONFLICT DO NOTHING",
                         (saga_id, step))
        raise error()

    parts[step].do = crashing  # type: ignore[method-assign]
    try:
        result = mod.run_saga(postgres.dsn, saga, parts)
    except Exception as exc:  # noqa: BLE001 - explained below
        result = None if type(exc).__name__ == kind else f"raised {type(exc).__name__}: {exc}"
    got = calls(conn, saga)
    undone = [c for c in got if c.startswith("undo")]
    assert not undone, (
        f"{step} raised {kind} ({meaning} - a crash, not a refusal) and the orchestrator "
        f"compensated: {undone}. Only StepFailed means the step did nothing; catch "
        f"StepFailed alone and let any other exception escape, the saga staying 'running' "
        f"so that a resumed run issues the idempotent do() again")
    assert result is None, (
        f"{step} raised {kind} and run_saga {result!r} instead of letting that {kind} "
        f"escape: a crash is not a result")
    status = mod.saga_status(postgres.dsn, saga)
    assert status == "running", (
        f"after {step}'s {kind} the stored status is {status!r}; expected 'running' "
        f"(nothing was refused: a resumed run goes forward)")


# How an undo fails: the payment service is down (a crash), or it refuses the refund for now
# (StepFailed from undo(): a refusal of the compensation, not of a step - nothing to
# compensate for it, it is simply not done yet).
FAILED_UNDOS: dict[str, tuple[str, Callable[[Any], Exception]]] = {
    "payment_down": ("raised ConnectionError (the payment service is down)",
                     lambda mod: ConnectionError("payment service unreachable")),
    "refund_refused": ("raised StepFailed (the payment service refuses the refund for now)",
                       lambda mod: mod.StepFailed("refund refused for now")),
}


@pytest.mark.parametrize("how", FAILED_UNDOS)
def test_a_compensation_that_fails_is_retried_not_skipped(world: Any, postgres: Any,
                                                          learner: Any, how: str) -> None:
    """schedule_shipping refuses; while compensating, charge_payment's undo (the refund)
    fails - its service is down, or it refuses the refund for now. The refund must not be
    skipped nor counted as done: the error escapes, the saga stays 'compensating' at that
    step (create_order is not undone before the refund), and a resumed run issues that undo
    again and then finishes."""
    mod, conn = world
    mod.setup(postgres.dsn)
    saga_id = f"s-undo-{how}"
    mod.start_saga(postgres.dsn, saga_id, ORDER)
    parts = services(mod, conn, schedule_shipping={"fail": True})
    failed, make_error = FAILED_UNDOS[how]
    down = [True]
    real_undo = parts["charge_payment"].undo

    def flaky_undo(saga_id: str, order: dict[str, Any]) -> None:
        if down[0]:
            conn.execute("INSERT INTO svc_calls (saga_id, step, action) VALUES (%s, %s, "
                         "'undo')", (saga_id, "charge_payment"))
            raise make_error(mod)
        real_undo(saga_id, order)

    parts["charge_payment"].undo = flaky_undo  # type: ignore[method-assign]
    escaped = "nothing"
    try:
        result = mod.run_saga(postgres.dsn, saga_id, parts)
    except Exception as exc:  # noqa: BLE001 - any error escaping is right here
        result, escaped = None, type(exc).__name__
    seen = calls(conn, saga_id)
    owed = f"charge_payment's undo {failed}; the participants saw {seen}"
    assert undo(0)[0] not in seen, (
        f"{owed}: the orchestrator went on to undo create_order although the refund is still "
        f"owed - a failed compensation was skipped (or counted as done). A compensation must "
        f"eventually succeed: let the error escape with the saga still 'compensating' at "
        f"charge_payment, so a resumed run issues that undo again; compensate newest first, "
        f"never past a step not yet undone")
    assert result is None, (
        f"{owed}, and run_saga returned {result!r}: the charge was never refunded. A "
        f"compensation must eventually succeed - let the error escape with the saga still "
        f"'compensating', so a resumed run issues that undo again; never give up on it or "
        f"count it as done")
    status = mod.saga_status(postgres.dsn, saga_id)
    assert status == "compensating", (
        f"{owed}, run_saga raised {escaped}, and the stored status is {status!r}; expected "
        f"'compensating' (the undo is still owed)")
    down[0] = False
    resumed = learner.load("saga").run_saga(postgres.dsn, saga_id, parts)
    seen = calls(conn, saga_id)
    after = seen[len(do(0, 1, 2, 3) + undo(2, 1)):]
    assert "undo charge_payment" in effects(conn, saga_id) and resumed == "compensated" and (
        after[-2:] == undo(1, 0)), (
        f"charge_payment's undo {failed} once; the resumed run returned {resumed!r} and the "
        f"participants saw {seen}: expected charge_payment's undo issued again, then "
        f"create_order's, and 'compensated'")


def test_two_sagas_keep_their_own_state(world: Any, postgres: Any, learner: Any) -> None:
    """Saga A crashes before reserve_inventory; saga B then runs to its end; A resumed
    goes on from its own state, not B's."""
    mod, conn = world
    mod.setup(postgres.dsn)
    mod.start_saga(postgres.dsn, "s-a", ORDER)
    mod.start_saga(postgres.dsn, "s-b", {**ORDER, "order_id": "order-2"})
    crash_run(mod, postgres, "s-a", services(mod, conn, reserve_inventory={"crash": "before"}))
    b = mod.run_saga(postgres.dsn, "s-b", services(mod, conn, schedule_shipping={"fail": True}))
    status_a = mod.saga_status(postgres.dsn, "s-a")
    assert b == "compensated" and status_a == "running", (
        f"saga s-b (schedule_shipping refused) ended {b!r}, and saga s-a - crashed earlier, "
        f"untouched since - is now stored as {status_a!r}, expected 'compensated' and "
        f"'running': every state change must be for its own saga (WHERE saga_id = ...)")
    result = learner.load("saga").run_saga(postgres.dsn, "s-a", services(mod, conn))
    got = calls(conn, "s-a")
    assert got == do(0, 1, 2, 2, 3) and result == "completed", (
        f"saga s-a resumed after saga s-b ran: its participants saw {got}, run_saga "
        f"returned {result!r}; expected {do(0, 1, 2, 2, 3)} and 'completed' - each saga "
        f"resumes from its own stored position")


def test_one_orchestrator_at_a_time(world: Any, postgres: Any, learner: Any) -> None:
    """A retried request (or a second worker) calls run_saga for a saga another run_saga is
    still driving: the first is held inside reserve_inventory's do() (a slow inventory
    service); the second, from another process, finds reserve_inventory refusing. Were both
    to drive the saga, the second would compensate what the first goes on to build on. The
    second must wait for the first (a lock on the saga) or refuse; whichever, the saga ends
    with the participants' effects its status says."""
    mod, conn = world
    mod.setup(postgres.dsn)
    mod.start_saga(postgres.dsn, "s-race", ORDER)
    harness = learner.harness()
    gate = harness.Gate("reserve_inventory")
    first = harness.Call(mod.run_saga, postgres.dsn, "s-race",
                         gate.participants(services(mod, conn)))
    second: Any = None
    try:
        wait_until(lambda: gate.arrived() or first.done(),
                   "the first run_saga to reach reserve_inventory")
        other = learner.load("saga", fresh=True)  # another process: no shared state
        second = harness.Call(other.run_saga, postgres.dsn, "s-race",
                              services(other, conn, reserve_inventory={"fail": True}))
        waits_sql = ("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                     "current_database() AND wait_event_type = 'Lock'")
        came_true(lambda: second.done() or conn.execute(waits_sql).fetchone()[0] > 0, 20)
    finally:
        gate.release()
    ends = (first.join(30), second.join(30) if second is not None else None)
    assert None not in ends, (
        f"two run_saga calls of one saga did not both end within 30 s of the first's "
        f"release (they ended: {ends})")
    status = mod.saga_status(postgres.dsn, "s-race")
    got = effects(conn, "s-race")
    standing = sorted(e for e in got if e.startswith("do ") and f"un{e}" not in got)
    consistent = {"completed": sorted(do(0, 1, 2, 3)), "compensated": []}
    assert standing == consistent.get(status), (
        f"two run_saga calls drove saga s-race at once - the first held in reserve_inventory's "
        f"do(), the second (a retried request, from another process) found reserve_inventory "
        f"refusing - and the saga ended {status!r} with {standing} in effect (every call: "
        f"{calls(conn, 's-race')}; the runs {ends}): one undid what the other went on to "
        "build on. Only one orchestrator may drive a saga at a time: take a lock on the saga "
        "for the whole run - pg_advisory_lock on its id, on the connection that drives it (a "
        "crash closes it and frees the lock) - so a second call waits for it, or refuses. A "
        "lock in the process (threading.Lock) does not reach another process, and a SELECT "
        "... FOR UPDATE on an autocommit connection is released when that statement ends")


def test_a_repeated_start_never_restarts_a_saga(world: Any, postgres: Any) -> None:
    """The order request is retried after its saga ran to its end (compensated: the charge
    refunded). start_saga with the same id may refuse the duplicate or leave the saga as it
    is; it must not reset it, or the next run_saga charges the customer again."""
    mod, conn = world
    mod.setup(postgres.dsn)
    mod.start_saga(postgres.dsn, "s-dup", ORDER)
    parts = services(mod, conn, schedule_shipping={"fail": True})
    assert mod.run_saga(postgres.dsn, "s-dup", parts) == "compensated"
    before = calls(conn, "s-dup")
    try:
        mod.start_saga(postgres.dsn, "s-dup", ORDER)
    except Exception:  # noqa: BLE001 - refusing the duplicate is one right answer
        pass
    status = mod.saga_status(postgres.dsn, "s-dup")
    result = mod.run_saga(postgres.dsn, "s-dup", parts)
    again = calls(conn, "s-dup")[len(before):]
    assert status == "compensated" and not again, (
        f"start_saga('s-dup') of a saga that had already been compensated left it "
        f"{status!r}, and the next run_saga returned {result!r} after calling {again}: a "
        "repeated start (a retried request) restarted the saga, charging the customer again "
        "for an order it had refunded. The saga's row is its memory: refuse the duplicate "
        "(the primary key) or keep the row as it is (ON CONFLICT DO NOTHING) - never reset it")


# An order as a client sends it: more than the fields the saga's rules read, nested, not
# only ASCII. The participants need all of it (shipping the address, payment the amount).
RICH_ORDER = {"order_id": "order-ü-1", "amount_cents": 4200, "sku": "book", "qty": 1,
              "country": "DE", "note": "Zoë's gift, \"fragile\" ✓",
              "lines": [{"sku": "book", "qty": 1, "price_cents": 4200}],
              "address": {"name": "Jürgen O'Hara", "city": "Köln"}, "gift": True,
              "coupon": None}


def test_each_participant_gets_the_order_as_started(world: Any, postgres: Any) -> None:
    """Every do() and undo() receives the order start_saga was given, a dict equal to it -
    the orchestrator keeps the order in its row and hands it to each participant."""
    mod, conn = world
    mod.setup(postgres.dsn)
    mod.start_saga(postgres.dsn, "s-order", RICH_ORDER)
    seen: list[tuple[str, Any]] = []

    class Keeping(Service):
        def do(self, saga_id: str, order: dict[str, Any]) -> None:
            seen.append((f"do {self.step}", order))
            super().do(saga_id, order)

        def undo(self, saga_id: str, order: dict[str, Any]) -> None:
            seen.append((f"undo {self.step}", order))
            super().undo(saga_id, order)

    parts = {step: Keeping(step, conn, mod.StepFailed, fail=step == STEPS[2]) for step in STEPS}
    mod.run_saga(postgres.dsn, "s-order", parts)
    wrong = [(call, order) for call, order in seen if order != RICH_ORDER]
    if wrong:
        call, got = wrong[0]
        as_text = isinstance(got, str | bytes)
        pytest.fail(
            (f"the order reached {call} as JSON text ({type(got).__name__}), not decoded: "
             if as_text else f"{call} received another order than start_saga was given: ")
            + f"{shorten(repr(got), 120)}; expected the dict {shorten(repr(RICH_ORDER), 120)}"
            + (" - store it as jsonb (psycopg's Jsonb) and psycopg gives back a dict, or "
               "json.loads() it on the way out" if as_text else
               " - store the whole order in the saga's row (a jsonb column) and hand each "
               "participant the whole of it: the participants need more than the saga's "
               "rules read (shipping the address, payment the lines)"), pytrace=False)
    assert [call for call, _ in seen] == do(0, 1, 2) + undo(1, 0), (
        f"the participants saw {[call for call, _ in seen]}, expected "
        f"{do(0, 1, 2) + undo(1, 0)}")


# Saga ids as clients make them (an order reference, a name): quotes, a semicolon, non-ASCII.
ODD_IDS = ["s-o'hara", "s-x'; SELECT 1; --", "s-zoë ' OR '1'='1"]


def test_a_saga_id_is_data_not_sql(world: Any, postgres: Any) -> None:
    """Saga ids with quotes in them start, run and report like any other: an id is a value
    passed to the query as a parameter, never text pasted into the SQL."""
    mod, conn = world
    mod.setup(postgres.dsn)
    for saga_id in ODD_IDS:
        step, error = "start_saga", ""
        try:
            mod.start_saga(postgres.dsn, saga_id, ORDER)
            step = "run_saga"
            result = mod.run_saga(postgres.dsn, saga_id, services(mod, conn))
            step = "saga_status"
            status = mod.saga_status(postgres.dsn, saga_id)
        except Exception as exc:  # noqa: BLE001 - reported as the mistake it shows
            error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"
        if error:
            pytest.fail(
                f"{step}() of the saga {saga_id!r} raised {error} - the saga id was pasted "
                "into the SQL text (an f-string, % or .format()), so its quote ended the "
                "string literal: pass every "
                "value as a query parameter (conn.execute(\"... WHERE saga_id = %s\", "
                "(saga_id,))) - text pasted into SQL is also how SQL injection happens",
                pytrace=False)
        got = calls(conn, saga_id)
        assert (result, status, got) == ("completed", "completed", do(0, 1, 2, 3)), (
            f"the saga {saga_id!r}: run_saga returned {result!r}, saga_status {status!r}, "
            f"its participants saw {got}; expected 'completed' twice after {do(0, 1, 2, 3)} - "
            "a saga id with quotes in it is read as SQL when it is pasted into the query "
            "text: pass it as a query parameter (%s)")


# --- choreography --------------------------------------------------------------------------

# (service, event, order, what it publishes) - the boundaries are inclusive
RULES: list[tuple[str, str, dict[str, Any], list[str]]] = [
    ("payment", "OrderPlaced", {"amount_cents": 100_000}, ["PaymentCharged"]),
    ("payment", "OrderPlaced", {"amount_cents": 100_001}, ["PaymentDeclined"]),
    ("inventory", "PaymentCharged", {"qty": 10}, ["InventoryReserved"]),
    ("inventory", "PaymentCharged", {"qty": 11}, ["InventoryRejected"]),
    ("shipping", "InventoryReserved", {"country": "NL"}, ["ShipmentScheduled"]),
    ("shipping", "InventoryReserved", {"country": "BE"}, ["ShipmentRejected"]),
    ("payment", "InventoryReleased", {}, ["PaymentRefunded"]),
    ("payment", "InventoryRejected", {}, ["PaymentRefunded"]),
    ("inventory", "ShipmentRejected", {}, ["InventoryReleased"]),
    ("order", "InventoryRejected", {}, []),          # the order waits for the refund
    ("order", "ShipmentRejected", {}, []),
    ("order", "PaymentRefunded", {}, ["OrderCancelled"]),
    ("payment", "PaymentCharged", {}, []),           # nobody reacts to its own facts
    ("shipping", "ShipmentScheduled", {}, []),
]


@pytest.mark.parametrize(("service", "kind", "fields", "want"), RULES,
                         ids=[f"{r[0]}-{r[1]}-{'-'.join(map(str, r[2].values())) or 'any'}"
                              for r in RULES])
def test_react_follows_the_rules(learner: Any, service: str, kind: str,
                                 fields: dict[str, Any], want: list[str]) -> None:
    react = learner.function("saga", "react")
    order = {"order_id": "o-7", "sku": "book", "amount_cents": 4200, "qty": 1,
             "country": "DE", **fields}
    out = react(service, {"type": kind, "order_id": "o-7", "order": order, "source": "x"})
    got = [e.get("type") for e in out]
    if got != want:
        limit = {"amount_cents": "the credit limit, 100000 cents, is inclusive (<=)",
                 "qty": "the stock, 10 per SKU, is inclusive (<=)",
                 "country": "ships to DE, FR and NL only"}
        why = "; ".join(limit[k] for k in fields if k in limit) or (
            "see the rules table: which service answers which event")
        pytest.fail(f"react({service!r}, {kind} with {fields or order}) published {got}, "
                    f"expected {want}: {why}", pytrace=False)
    for e in out:
        assert e.get("order_id") == "o-7" and e.get("order") == order, (
            f"react({service!r}, {kind}) published {e}: carry the order_id and the order on")

CHAINS = {
    "ok": ["OrderPlaced", "PaymentCharged", "InventoryReserved", "ShipmentScheduled",
           "OrderCompleted"],
    "declined": ["OrderPlaced", "PaymentDeclined", "OrderCancelled"],
    "no-stock": ["OrderPlaced", "PaymentCharged", "InventoryRejected", "PaymentRefunded",
                 "OrderCancelled"],
    "no-shipping": ["OrderPlaced", "PaymentCharged", "InventoryReserved", "ShipmentRejected",
                    "InventoryReleased", "PaymentRefunded", "OrderCancelled"],
}
ORDERS = {
    "ok": {"amount_cents": 4200, "qty": 1, "country": "DE"},
    "declined": {"amount_cents": 250_000, "qty": 1, "country": "DE"},
    "no-stock": {"amount_cents": 4200, "qty": 50, "country": "FR"},
    "no-shipping": {"amount_cents": 4200, "qty": 2, "country": "US"},
}
# keyed by str | None: looked up with an event's "type", which an event may lack
OWNER: dict[str | None, str] = {
    "PaymentCharged": "payment", "PaymentDeclined": "payment", "PaymentRefunded": "payment",
    "InventoryReserved": "inventory", "InventoryRejected": "inventory",
    "InventoryReleased": "inventory", "ShipmentScheduled": "shipping",
    "ShipmentRejected": "shipping", "OrderCompleted": "order", "OrderCancelled": "order",
    "OrderPlaced": "order"}


def read_events(kafka: Any, topic: str) -> list[dict[str, Any]]:
    return [json.loads(r.value or b"null") for r in read_all(kafka, topic)]


def test_choreographed_saga_over_kafka(learner: Any, kafka: Any) -> None:
    """Four orders, four outcomes: every order's events, in topic order, form the expected
    chain, each event published by the service that owns it, compensations newest first."""
    mod = learner.load("saga")
    topic = kafka.create_topic("saga-events")
    producer = Producer(kafka.producer_config(acks="all"))
    for name, order in ORDERS.items():
        full = {"order_id": name, "sku": "book", **order}
        producer.produce(topic, key=name.encode(), value=json.dumps(
            {"type": "OrderPlaced", "order_id": name, "order": full, "source": "order"}).encode())
    assert producer.flush(15) == 0

    names = ("order", "payment", "inventory", "shipping")
    running = [mod.ChoreographyService(kafka.bootstrap, topic, name, kafka.group(name))
               for name in names]
    try:
        first_round_handles_what_was_there(running, names, kafka, topic)
        for _ in range(11):  # rounds: each service handles what is on the topic so far
            if sum(service.pump() for service in running) == 0:
                break
        else:
            pytest.fail("the services never went quiet after 12 rounds: some rule reacts to "
                        "its own events forever", pytrace=False)
    finally:
        for service in running:
            service.close()

    events = read_events(kafka, topic)
    for name, chain in CHAINS.items():
        got = [e.get("type") for e in events if e.get("order_id") == name]
        assert got == chain, (
            f"order {name!r} ({ORDERS[name]}) produced the events {got}; expected {chain}: "
            "every failure is answered by the compensations of the services that already "
            "acted, newest first, and ends with the order's own OrderCompleted/OrderCancelled")
    wrong_source = [(e["type"], e.get("source")) for e in events
                    if OWNER.get(e.get("type")) != e.get("source")]
    assert not wrong_source, (
        f"events published by the wrong service: {wrong_source[:4]}: in a choreography each "
        "service publishes its own facts (payment refunds, inventory releases)")

    # Every service restarts (a deploy): each resumes at its committed offset and, since it
    # handled everything, finds nothing to handle.
    again: dict[str, int] = {}
    for name in names:
        restarted = mod.ChoreographyService(kafka.bootstrap, topic, name, kafka.group(name))
        try:
            again[name] = restarted.pump()
        finally:
            restarted.close()
    redone = {name: n for name, n in again.items() if n}
    assert not redone or max(redone.values()) < len(events), (
        f"after a restart the services re-read the whole topic: {redone} events handled "
        f"again, with {len(events)} on it before the restart (the re-read reactions add "
        f"more): a restarted service must resume at its group's committed "
        "offset (the group id it was given, assign() without an offset), not read from the "
        "beginning - every old event's reaction is published a second time")
    assert not redone, (
        f"after a restart the services handled events again: {redone} - each had handled "
        "and committed everything, so the committed offset must be the NEXT one to read "
        "(the last handled offset + 1); committing the last handled one makes every restart "
        "handle it, and publish its reaction, twice")
    late_order_after_restart(mod, kafka, topic, names, events)


def first_round_handles_what_was_there(running: list[Any], names: tuple[str, ...],
                                       kafka: Any, topic: str) -> None:
    """The services' first pump(): their groups are new (no committed offset) and the orders
    were on the topic before they started - a new group must start at the beginning."""
    handled: list[int] = []
    try:
        for service in running:
            handled.append(service.pump())
    except Exception as exc:  # noqa: BLE001 - named below when nothing was committed
        name = names[len(handled)]
        reader = Consumer(kafka.consumer_config(name))
        try:
            (tp,) = reader.committed([TopicPartition(topic, 0)], timeout=10)
        finally:
            reader.close()
        if tp.offset >= 0:
            raise
        outcome = f"raised {type(exc).__name__}: {exc}"
    else:
        if any(handled):
            return
        name, outcome = names[0], "returned 0, as did the others'"
    pytest.fail(
        f"{len(ORDERS)} orders were on the topic before the services started, each with a "
        f"consumer group that had never committed; {name}'s first pump() {outcome}, having "
        "handled none of them (nothing committed): a group with no committed offset starts "
        "where 'auto.offset.reset' says, and 'latest' (librdkafka's default) is the end of "
        "the topic at the first fetch - it skips every event published before the service "
        "started. A new group starts at the beginning: 'auto.offset.reset': 'earliest' (as "
        "the plumbing given has it)", pytrace=False)


def late_order_after_restart(mod: Any, kafka: Any, topic: str, names: tuple[str, ...],
                             before: list[dict[str, Any]]) -> None:
    """A new order arrives after the restart: each restarted service handles the events
    published since, and none of the ones it had committed."""
    late = {"order_id": "late", "sku": "book", **ORDERS["ok"]}
    producer = Producer(kafka.producer_config(acks="all"))
    producer.produce(topic, key=b"late", value=json.dumps(
        {"type": "OrderPlaced", "order_id": "late", "order": late, "source": "order"}).encode())
    assert producer.flush(15) == 0
    running = [mod.ChoreographyService(kafka.bootstrap, topic, name, kafka.group(name))
               for name in names]
    handled = dict.fromkeys(names, 0)
    try:
        for _ in range(12):
            counts = [service.pump() for service in running]
            for name, count in zip(names, counts, strict=True):
                handled[name] += count
            if not any(counts):
                break
    finally:
        for service in running:
            service.close()
    events = read_events(kafka, topic)
    new = len(events) - len(before)
    reread = {name: n for name, n in handled.items() if n != new}
    assert not reread, (
        f"after a restart, with one new order on the topic, the services handled {reread} "
        f"events; {new} were published since the restart (the new order's chain): a "
        "restarted service must resume at its group's committed offset - re-reading the "
        "topic from the beginning re-handles every committed event and publishes its "
        f"reaction again (the topic now holds {len(events)} events)")
    got = [e.get("type") for e in events if e.get("order_id") == "late"]
    assert got == CHAINS["ok"], (
        f"the order placed after the restart produced {got}; expected {CHAINS['ok']}")


def test_a_service_commits_only_after_its_reactions_are_acknowledged(learner: Any,
                                                                      kafka: Any) -> None:
    """The payment service reads one OrderPlaced and must publish PaymentCharged. It reaches
    the broker through a proxy that holds its Produce requests: the reaction cannot be
    acknowledged until the test sees pump() waiting for it (in the producer's flush() or
    poll()); only then is it released. An OffsetCommit that arrives before that commits an
    event whose reaction may still be lost: a crash right there, and nobody publishes it."""
    mod = learner.load("saga")
    harness = learner.harness()
    topic = kafka.create_topic("saga-acked")
    order = {"order_id": "acked", "sku": "book", **ORDERS["ok"]}
    producer = Producer(kafka.producer_config(acks="all"))
    producer.produce(topic, key=b"acked", value=json.dumps(
        {"type": "OrderPlaced", "order_id": "acked", "order": order, "source": "order"}).encode())
    assert producer.flush(15) == 0
    with KafkaProxy(kafka.bootstrap) as proxy:
        service = mod.ChoreographyService(proxy.bootstrap, topic, "payment",
                                          kafka.group("payment-acked"))
        try:
            proxy.hold(PRODUCE)
            pump = harness.Pump(service)
            wait_until(lambda: bool(proxy.requests(OFFSET_COMMIT) or pump.waiting_in_producer()
                                    or pump.done()),
                       "pump() to commit or to wait for its reaction's ack")
            early = [r.name for r in proxy.requests(PRODUCE, OFFSET_COMMIT)]
            proxy.release(PRODUCE)
            outcome = pump.join(30)
        finally:
            proxy.release(PRODUCE)
            service.close()
        answered = [API_NAMES[e.request.api_key] for e in proxy.events()
                    if e.kind == "answer" and e.request.api_key in (PRODUCE, OFFSET_COMMIT)]
    assert "OffsetCommit" not in early, (
        f"payment committed its input offset while its reaction was not yet acknowledged: "
        f"an OffsetCommit reached the broker while the test held the reaction's Produce "
        f"request (requests so far: {early}) - a crash right there loses PaymentCharged for "
        f"good: the restarted service resumes after the OrderPlaced it committed. Publish the "
        f"reactions, flush() until the broker acknowledged them, THEN commit the offset")
    assert outcome is not None and outcome.startswith("returned"), (
        f"pump() with one OrderPlaced to handle {outcome or 'did not finish within 30 s'}")
    assert answered[-1:] == ["OffsetCommit"] and "Produce" in answered, (
        f"payment's pump() returned, but the broker answered {answered}: expected its "
        "reaction acknowledged (Produce), then its offset committed (OffsetCommit)")
