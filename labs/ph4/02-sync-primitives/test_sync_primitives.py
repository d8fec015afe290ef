"""ph4.2 verification: a readers-writer lock with writer preference, a limiter, a bounded
queue - each driven step by step.

Worker threads take a primitive and then hold it until the test says go (an Event). After
each step the test waits until every worker has settled - either inside (it set its
`entered` event) or blocked in a threading wait inside the learner's code (counted by
labrunner.testing.threads_waiting_in, in the process where that code runs) - and then
reads who is where. So "the second reader got in while a writer waited" is an observation,
never a race the scheduler may or may not produce.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

from labrunner.testing import threads_waiting_in, wait_until


class Worker(threading.Thread):
    """Takes a primitive (enter), holds it until go, then lets go of it (leave)."""

    def __init__(self, name: str, enter: Callable[[], Any], leave: Callable[[], Any]) -> None:
        super().__init__(daemon=True, name=name)
        self.enter, self.leave = enter, leave
        self.entered, self.go, self.done = threading.Event(), threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.result: Any = None
        self.ended_at = 0.0
        self.start()

    def run(self) -> None:
        try:
            self.result = self.enter()
            self.entered.set()
            self.go.wait(60)
            self.leave()
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.done.set()


class Stage:
    def __init__(self, learner: Any) -> None:
        self.learner = learner
        self.workers: list[Worker] = []

    def waiting(self) -> int:
        return int(self.learner.run_helper(threads_waiting_in, str(self.learner.dir)))

    def add(self, name: str, enter: Callable[[], Any], leave: Callable[[], Any] = lambda: None
            ) -> Worker:
        w = Worker(name, enter, leave)
        self.workers.append(w)
        self.settle()
        return w

    def settle(self) -> None:
        """Until every live worker is inside (holding) or blocked in the learner's code."""
        def settled() -> bool:
            busy = [w for w in self.workers if not w.done.is_set()]
            inside = sum(w.entered.is_set() for w in busy)
            return inside + self.waiting() >= len(busy)
        try:
            wait_until(settled, "every thread to be either inside or waiting", 5)
        except BaseException:
            stuck = [w.name for w in self.workers
                     if not w.done.is_set() and not w.entered.is_set()]
            pytest.fail(
                f"{', '.join(stuck)} neither got in nor waits in a threading.Condition "
                "(or Semaphore) wait\nBuild these primitives on threading.Condition: a "
                "thread that cannot go on waits in cond.wait() (a plain Lock blocks readers "
                "against each other, and its waits cannot be told apart from work).",
                pytrace=False)
        failed = [w for w in self.workers if w.error is not None]
        if failed:
            w = failed[0]
            pytest.fail(f"{w.name} raised {type(w.error).__name__}: {w.error}", pytrace=False)

    def release(self, w: Worker) -> None:
        w.go.set()
        wait_until(w.done.is_set, f"{w.name} to let go")
        self.settle()

    def inside(self) -> list[str]:
        return [w.name for w in self.workers if w.entered.is_set() and not w.done.is_set()]

    def expect(self, names: list[str], message: Callable[[], str]) -> None:
        """After a release someone must get in; wake-ups take a moment, so wait for it (a
        correct primitive gets there at once; only a wrong one runs into the timeout)."""
        try:
            wait_until(lambda: self.inside() == names, "the expected thread to get in", 5)
        except BaseException:
            pytest.fail(message(), pytrace=False)

    def finish(self) -> None:
        for w in self.workers:
            w.go.set()


@pytest.fixture
def sync(learner: Any) -> ModuleType:
    module: ModuleType = learner.load("sync")
    for name in ("RWLock", "Limiter", "BoundedQueue"):
        if not isinstance(getattr(module, name, None), type):
            pytest.fail(f"sync.py: define a class {name} (see the README)", pytrace=False)
    return module


@pytest.fixture
def stage(learner: Any) -> Any:
    s = Stage(learner)
    yield s
    s.finish()


def reader(stage: Stage, lock: Any, name: str) -> Worker:
    return stage.add(name, lock.acquire_read, lock.release_read)


def writer(stage: Stage, lock: Any, name: str) -> Worker:
    return stage.add(name, lock.acquire_write, lock.release_write)


# ---------------------------------------------------------------------------- RW lock


def test_readers_share_the_lock(sync: ModuleType, stage: Stage) -> None:
    lock = sync.RWLock()
    for i in range(3):
        reader(stage, lock, f"reader {i + 1}")
    inside = stage.inside()
    assert len(inside) == 3, (
        f"three readers asked for the read lock with no writer around; {len(inside)} got in "
        f"({', '.join(inside) or 'none'}), the others wait\nReaders only exclude writers: "
        "count the readers inside instead of holding one mutex for the whole read.")


def test_a_writer_excludes_everyone(sync: ModuleType, stage: Stage) -> None:
    lock = sync.RWLock()
    r1 = reader(stage, lock, "reader 1")
    w1 = writer(stage, lock, "writer 1")
    assert stage.inside() == ["reader 1"], (
        f"a writer got the lock while a reader held it (inside: {', '.join(stage.inside())})"
        "\nacquire_write must wait until no reader and no writer is inside.")
    stage.release(r1)
    stage.expect(["writer 1"], lambda: (
        f"when the last reader left, the waiting writer did not get in (inside: "
        f"{', '.join(stage.inside()) or 'nobody'})\nThe last release_read must wake the "
        "waiting writers (notify_all on the condition)."))
    writer(stage, lock, "writer 2")
    reader(stage, lock, "reader 2")
    assert stage.inside() == ["writer 1"], (
        f"while writer 1 held the lock, {', '.join(n for n in stage.inside() if n != 'writer 1')}"
        " got in too: a writer must be alone")
    stage.release(w1)
    stage.expect(["writer 2"], lambda: (
        f"writer 1 left with writer 2 and reader 2 waiting; inside now: "
        f"{', '.join(stage.inside()) or 'nobody'}, expected writer 2 (writer preference, "
        "and a writer alone)\nWriter 2 was waiting before reader 2 arrived: a writer waiting "
        "behind another writer counts as waiting too, so readers wait behind it."))


def test_writers_are_not_starved_by_new_readers(sync: ModuleType, stage: Stage) -> None:
    lock = sync.RWLock()
    r1 = reader(stage, lock, "reader 1")
    w = writer(stage, lock, "writer")
    reader(stage, lock, "reader 2")
    if "reader 2" in stage.inside():
        pytest.fail(
            "reader 2 arrived while a writer was already waiting, and got in ahead of it\n"
            "With readers arriving continuously, such a writer never finds zero readers: "
            "writer starvation. Writer preference: count the waiting writers, and make "
            "acquire_read wait while a writer is inside OR waiting.", pytrace=False)
    stage.release(r1)
    stage.expect(["writer"], lambda: (
        f"reader 1 left; inside now: {', '.join(stage.inside()) or 'nobody'}, expected the "
        "writer that had been waiting (before reader 2)"))
    stage.release(w)
    stage.expect(["reader 2"], lambda: (
        f"the writer left; inside now: {', '.join(stage.inside()) or 'nobody'}, expected "
        "reader 2: release_write must wake the waiting readers"))


def test_each_rwlock_has_writers_of_its_own(sync: ModuleType, stage: Stage) -> None:
    """Two RWLocks guard two different things (a cache, a config): a writer waiting for one
    must hold back only that one's new readers. A waiting-writers count kept in a module
    global or on the class makes every lock of the program wait for every writer."""
    first, second = sync.RWLock(), sync.RWLock()
    reader(stage, first, "a reader of the first")
    writer(stage, first, "a writer of the first")
    other = reader(stage, second, "a reader of the second")
    assert other.entered.is_set(), (
        "two RWLocks: with a reader inside the first and a writer waiting for it, a reader "
        "of the SECOND lock, held by nobody, waits - the locks share their state\nEach "
        "RWLock keeps its counts (readers inside, writers waiting) in attributes of its "
        "own, set in __init__ (self._writers_waiting = 0); a count in a module global or on "
        "the class (RWLock._writers_waiting += 1) is one count for every lock of the "
        "program: a writer waiting anywhere holds back readers everywhere.")


def two_writers_wait_behind_a_reader(stage: Stage, lock: Any) -> tuple[Worker, Worker, str]:
    r1 = reader(stage, lock, "reader 1")
    writers = [writer(stage, lock, "writer 1"), writer(stage, lock, "writer 2")]
    stage.release(r1)
    try:
        wait_until(lambda: len(stage.inside()) == 1, "one of the writers to get in", 5)
    except BaseException:
        pytest.fail(
            f"reader 1 left with writers 1 and 2 waiting; inside now: "
            f"{', '.join(stage.inside()) or 'nobody'}, expected one writer alone",
            pytrace=False)
    first, second = sorted(writers, key=lambda w: not w.entered.is_set())
    return first, second, (f"writers 1 and 2 both waited behind reader 1; when it left, "
                           f"{first.name} got in")


def a_writer_waits_behind_a_writer(stage: Stage, lock: Any) -> tuple[Worker, Worker, str]:
    first = writer(stage, lock, "writer 1")
    second = writer(stage, lock, "writer 2")
    return first, second, "writer 2 arrived while writer 1 held the lock, and waited"


@pytest.mark.parametrize("setup", [two_writers_wait_behind_a_reader,
                                   a_writer_waits_behind_a_writer],
                         ids=["two writers behind a reader", "a writer behind a writer"])
def test_a_reader_arriving_as_a_writer_leaves_waits_for_the_next_writer(
        learner: Any, sync: ModuleType, stage: Stage,
        setup: Callable[[Stage, Any], tuple[Worker, Worker, str]]) -> None:
    """One writer inside, another waiting. The first leaves and, in that very instant -
    before the waiting writer, woken, has run - reader 2 arrives: one thread calls
    release_write() then acquire_read() with no thread switch between (the harness). A
    writer is still waiting, so reader 2 must wait behind it."""
    lock = sync.RWLock()
    first, second, story = setup(stage, lock)
    assert stage.inside() == [first.name], (
        f"{story}; inside: {', '.join(stage.inside())}, expected {first.name} alone")
    harness = learner.harness()
    first.leave = lambda: None    # its release_write() is made by reader 2's thread
    stage.release(first)
    try:
        stage.add("reader 2", lambda: harness.leave_write_then_read(lock), lock.release_read)
    finally:
        harness.restore_switch_interval()
    if "reader 2" in stage.inside():
        pytest.fail(
            f"{first.name} left while {second.name} still waited, and reader 2, arriving "
            f"that very moment, got in ahead of {second.name} ({story})\nExpected reader 2 "
            f"to wait: a writer was waiting. With readers arriving continuously, "
            f"{second.name} never gets in (writer starvation). Writer preference must "
            "remember every waiting writer: count them (a single flag is cleared by the "
            "first writer to get in while others still wait), count a writer as waiting "
            "from the moment it arrives (whatever is in its way, a reader or a writer), and "
            "make acquire_read wait while that count is not zero.", pytrace=False)
    stage.expect([second.name], lambda: (
        f"{first.name} left with {second.name} and then reader 2 waiting; inside now: "
        f"{', '.join(stage.inside()) or 'nobody'}, expected {second.name}"))
    stage.release(second)
    stage.expect(["reader 2"], lambda: (
        f"{second.name} left with reader 2 waiting; inside now: "
        f"{', '.join(stage.inside()) or 'nobody'}, expected reader 2"))


def test_a_leaving_writer_lets_every_waiting_reader_in(sync: ModuleType, stage: Stage) -> None:
    lock = sync.RWLock()
    w = writer(stage, lock, "writer")
    for i in range(3):
        reader(stage, lock, f"reader {i + 1}")
    assert stage.inside() == ["writer"], (
        f"readers got in while a writer held the lock (inside: {', '.join(stage.inside())})")
    stage.release(w)
    stage.expect(["reader 1", "reader 2", "reader 3"], lambda: (
        f"the writer left with three readers waiting; inside now: "
        f"{', '.join(stage.inside()) or 'nobody'}, expected all three readers together\n"
        "release_write woke only one waiter (notify()): readers share the lock, so every "
        "waiting reader may enter - wake them all with notify_all(); the ones that still "
        "cannot go re-check and wait again."))


def test_an_interrupted_writer_stops_counting_as_waiting(
        learner: Any, sync: ModuleType, stage: Stage) -> None:
    """A writer waits behind reader 1 and its wait is left by an exception (Ctrl-C, a
    deadline's signal handler): raised in its cond.wait() by the harness. The writer is
    gone, so reader 2 must get in once reader 1 leaves - and a writer after that."""
    lock = sync.RWLock()
    first = reader(stage, lock, "reader 1")
    harness = learner.harness()
    gone = stage.add("writer 1", lambda: harness.acquire_interrupted(lock, "acquire_write"))
    assert gone.result == "interrupted", (
        f"writer 1's acquire_write(), waiting behind reader 1, had its cond.wait() raise "
        f"KeyboardInterrupt and {gone.result}, expected the exception to come out of "
        "acquire_write: a caller interrupted while waiting must not get the lock")
    stage.release(gone)  # its thread goes on without the lock
    stage.release(first)
    reader(stage, lock, "reader 2")
    stage.expect(["reader 2"], lambda: (
        "writer 1's wait behind reader 1 was left by an exception (KeyboardInterrupt in its "
        "cond.wait()); then reader 1 left and reader 2 arrived with no writer anywhere, "
        f"yet inside: {', '.join(stage.inside()) or 'nobody'}, expected reader 2: the "
        "waiting-writers count still counts the writer that is gone\nFrom now on every "
        "reader waits for it, for ever. Give the count back on every way out of the wait: "
        "try: ... cond.wait() ... finally: writers_waiting -= 1 (an except Exception misses "
        "KeyboardInterrupt), and only there - given back in an except as well, the count "
        "drops below 0, which is true too, and holds readers back all the same."))
    stage.release(stage.workers[-1])
    writer(stage, lock, "writer 2")
    stage.expect(["writer 2"], lambda: (
        "after writer 1's interrupted wait and reader 2's visit, writer 2 arrived at a free "
        f"lock; inside: {', '.join(stage.inside()) or 'nobody'}, expected writer 2"))


def test_a_writer_that_gives_up_lets_the_readers_behind_it_in(
        learner: Any, sync: ModuleType, stage: Stage) -> None:
    """Reader 1 inside; writer 1 waits; readers 2 and 3 arrive and wait behind writer 1
    (writer preference). Then writer 1 gives up - an exception in its wait (Ctrl-C, a
    deadline), raised by the harness on cue. Only writer 1 held readers 2 and 3 back, so
    they go in now, beside reader 1, without waiting for reader 1 to leave."""
    lock = sync.RWLock()
    harness = learner.harness()
    reader(stage, lock, "reader 1")
    gone = stage.add("writer 1",
                     lambda: harness.acquire_interrupted_on_cue(lock, "acquire_write"))
    reader(stage, lock, "reader 2")
    reader(stage, lock, "reader 3")
    assert stage.inside() == ["reader 1"], (
        f"reader 1 inside, writer 1 waiting, readers 2 and 3 arrived; inside: "
        f"{', '.join(stage.inside())}, expected reader 1 alone (writer preference)")
    harness.interrupt_now()
    wait_until(lambda: gone.entered.is_set() or gone.done.is_set(),
               "writer 1's acquire_write() to end with the interrupt")
    assert gone.result == "interrupted", (
        f"writer 1's acquire_write(), waiting behind reader 1, had its cond.wait() raise "
        f"KeyboardInterrupt and {gone.result}, expected the exception to come out of "
        "acquire_write: a caller interrupted while waiting must not get the lock")
    stage.release(gone)  # its thread goes on without the lock
    # writer 1's call has returned: whatever it was going to wake, it has notified by now
    unwoken = int(harness.unwoken_waits(str(learner.dir)))
    expected = ["reader 1", "reader 2", "reader 3"]
    problem = (
        "writer 1, waiting behind reader 1 with readers 2 and 3 queued behind it, gave up "
        "(KeyboardInterrupt in its cond.wait()); {seen} - expected readers 2 and 3 inside "
        "with reader 1 at once: only writer 1 held them back (writer preference), and it is "
        "gone. A writer that gives up must notify_all() after giving its waiting count back "
        "(on the way out by the exception), or those readers wait until reader 1 leaves, "
        "which may be never; Java's ReentrantReadWriteLock wakes the readers queued behind "
        "a cancelled writer. notify() wakes only one of them.")
    if unwoken and stage.inside() != expected:
        pytest.fail(problem.format(seen=f"{unwoken} thread(s) still wait un-notified, inside: "
                                   f"{', '.join(stage.inside())}"), pytrace=False)
    stage.expect(expected, lambda: problem.format(
        seen=f"inside: {', '.join(stage.inside()) or 'nobody'}"))


# ---------------------------------------------------------------------------- limiter


class BodyFailed(Exception):
    """What the body of a `with limiter:` raises: it must come out of the with, itself."""


def test_the_body_exception_reaches_the_caller(sync: ModuleType) -> None:
    """`with limiter: body` - if the body raises, the caller must see that very exception,
    as if the limiter were not there: the permit goes back, the error goes on. An __exit__
    that returns True swallows it (the caller believes the work was done); one that raises
    another exception hides it."""
    limiter = sync.Limiter(1)
    raised = BodyFailed("the body failed")
    seen: BaseException | None = None
    try:
        with limiter:
            raise raised
    except BaseException as exc:  # noqa: BLE001 - which one it is, is the check
        seen = exc
    if seen is None:
        pytest.fail(
            "the body of `with limiter:` raised BodyFailed('the body failed'), and the with "
            "statement ended without any exception: the limiter swallowed it, so the caller "
            "believes the work was done\n__exit__ returning a true value suppresses the "
            "exception: release the permit and return None (or False) - the limiter bounds "
            "how many run at once, it does not decide what their errors mean.", pytrace=False)
    assert seen is raised, (
        f"the body of `with limiter:` raised BodyFailed('the body failed'); the caller got "
        f"{type(seen).__name__}: {seen!r} instead: the limiter replaced the body's exception "
        "(its type is what callers catch and retry on). __exit__ releases the permit and "
        "returns None, so the body's own exception goes on unchanged.")
    with limiter:   # its permit came back
        pass


def test_each_limiter_has_permits_of_its_own(sync: ModuleType, stage: Stage) -> None:
    """Two limiters guard two different things (a database, a payment API): a caller of one
    must never wait for the other's permits. Permits kept in a class attribute or a module
    global - one semaphore per limit, made once - are shared by every limiter."""
    first, second = sync.Limiter(1), sync.Limiter(1)
    stage.add("a caller of the first", first.__enter__, lambda: first.__exit__(None, None, None))
    other = stage.add("a caller of the second", second.__enter__,
                      lambda: second.__exit__(None, None, None))
    assert other.entered.is_set(), (
        "two Limiter(1) objects: with a caller inside the first, a caller of the SECOND waits "
        "- the limiters share their permits\nEach Limiter makes its own semaphore in "
        "__init__ (self._sem = threading.Semaphore(limit)); one kept on the class or in a "
        "module global (say, one per limit, cached) makes every limiter of the program one.")


PERMIT_TIMEOUT = 10.0  # long: a permit freed during the wait is taken long before its end


def test_a_waiting_caller_takes_a_permit_freed_before_its_timeout(sync: ModuleType,
                                                                 stage: Stage) -> None:
    """A timeout bounds a caller's wait; it is not a pause to sit out. A caller waiting with
    a timeout must get in as soon as a permit frees, as one without a timeout does."""
    limiter = sync.Limiter(1, timeout=PERMIT_TIMEOUT)

    def leave() -> None:
        limiter.__exit__(None, None, None)

    holder = stage.add("caller 1", limiter.__enter__, leave)
    full = f"a full Limiter(1, timeout={PERMIT_TIMEOUT:.0f}) (caller 1 inside)"
    late = Worker("caller 2", limiter.__enter__, leave)
    stage.workers.append(late)
    deadline = time.monotonic() + 5
    while not (late.entered.is_set() or late.done.is_set() or stage.waiting()):
        if time.monotonic() > deadline:
            pytest.fail(
                f"caller 2 of {full} does not wait for a permit: 5 s on it is neither in "
                "a threading wait (a Semaphore's or Condition's) nor in nor turned away\nA "
                "caller that sleeps out its timeout (time.sleep) and then tries once stays out "
                "even when a permit frees a moment after it came: wait IN the semaphore, "
                "Semaphore.acquire(timeout=...), which hands over a freed permit at once.",
                pytrace=False)
        late.done.wait(0.01)
    stage.settle()
    assert not late.entered.is_set(), f"caller 2 of {full} went in: 2 callers in a Limiter(1)"
    stage.release(holder)
    stage.expect(["caller 2"], lambda: (
        f"caller 1 left a Limiter(1, timeout={PERMIT_TIMEOUT:.0f}) while caller 2 waited; 5 s "
        "later caller 2 is still not in, "
        f"with {PERMIT_TIMEOUT:.0f} s of its timeout to go: the freed permit did not reach "
        "the caller waiting for it\nA wait with a timeout must end when a permit frees, not "
        "only when the timeout runs out: Semaphore.acquire(timeout=...) does; a Condition "
        "wait(timeout) needs a notify() from __exit__ when it gives a permit back."))


def test_the_limiter_admits_at_most_its_limit(sync: ModuleType, stage: Stage) -> None:
    limiter = sync.Limiter(3)
    workers = [stage.add(f"caller {i + 1}", limiter.__enter__,
                         lambda: limiter.__exit__(None, None, None)) for i in range(5)]
    inside = stage.inside()
    assert len(inside) == 3, (
        f"5 callers entered a Limiter(3); {len(inside)} are inside at once, expected 3\n"
        "A counting semaphore (threading.Semaphore(limit)): acquire in __enter__, release "
        "in __exit__.")
    stage.release(workers[0])

    def one_waiter_admitted() -> bool:
        # callers 2 and 3 still inside, and ONE of the two waiters: which one is the
        # limiter's business (threading does not promise who a notify wakes first)
        now = stage.inside()
        return len(now) == 3 and now[:2] == ["caller 2", "caller 3"]
    try:
        wait_until(one_waiter_admitted, "one waiter to get in", 5)
    except BaseException:
        pytest.fail(
            f"one caller left a full Limiter(3) with two waiting; inside now: "
            f"{', '.join(stage.inside())}, expected callers 2 and 3 and one of the waiters "
            "(callers 4 and 5): one waiter admitted", pytrace=False)
    for w in workers:
        stage.release(w)
    boom = sync.Limiter(1)
    for i in range(2):
        failing = stage.add(f"failing body {i + 1}", boom.__enter__, lambda: boom.__exit__(
            ValueError, ValueError("the body failed"), None))
        if failing.entered.is_set():
            stage.release(failing)
    last = stage.add("after failures", boom.__enter__, lambda: boom.__exit__(None, None, None))
    assert last.entered.is_set(), (
        "a Limiter(1) whose body raised twice no longer admits anyone: __exit__ must release "
        "the slot whatever the body did (it is called with the exception)")


LIMIT_TIMEOUT = 0.3     # a Limiter's timeout: short, the test waits it out
GIVES_UP_WITHIN = 20.0  # a safety net: a right limiter turns the caller away at 0.3 s


def test_a_limiter_turns_away_a_caller_whose_timeout_ran_out(sync: ModuleType,
                                                              stage: Stage) -> None:
    limiter = sync.Limiter(1, timeout=LIMIT_TIMEOUT)

    def leave() -> None:
        limiter.__exit__(None, None, None)

    holder = stage.add("caller 1", limiter.__enter__, leave)
    full = f"a full Limiter(1, timeout={LIMIT_TIMEOUT}) (caller 1 inside)"
    start = time.monotonic()
    late = Worker("caller 2", limiter.__enter__, leave)
    try:
        if not wait_for_either(late, GIVES_UP_WITHIN):
            pytest.fail(f"caller 2 of {full} was still waiting {GIVES_UP_WITHIN:.0f} s later, "
                        f"expected TimeoutError once its {LIMIT_TIMEOUT} s were over: honour "
                        "the timeout (Semaphore.acquire(timeout=...))", pytrace=False)
        waited = time.monotonic() - start
        assert not late.entered.is_set(), (
            f"caller 2 of {full} went in after {waited:.2f} s: 2 callers inside a Limiter(1)"
            "\nIts wait timed out - acquire(timeout=...) returned False, no permit - and it "
            "entered anyway (and its __exit__ then releases a permit it never took, so the "
            "limit grows with every timeout). Check what a timed acquire returns: on False "
            "raise TimeoutError (the caller sheds the load), and release nothing for it.")
        assert isinstance(late.error, TimeoutError), (
            f"caller 2 of {full} raised {type(late.error).__name__}: {late.error}, expected "
            "TimeoutError once its timeout ran out")
        assert waited >= LIMIT_TIMEOUT * 0.8, (
            f"caller 2 of {full} was turned away after {waited:.2f} s, expected it to wait "
            f"its {LIMIT_TIMEOUT} s for a permit first")
    finally:
        late.go.set()
    stage.release(holder)
    # Callers 3 and 4 one after the other, each until it is in or has ended: caller 4 may
    # time out too (0.3 s behind caller 3, however slow the machine), which keeps the limit.
    for i in (3, 4):
        comer = Worker(f"caller {i}", limiter.__enter__, leave)
        stage.workers.append(comer)
        wait_for_either(comer, GIVES_UP_WITHIN)
    if stage.inside() != ["caller 3"]:
        pytest.fail(limit_after_timeout(stage.inside()), pytrace=False)


ZERO_WITHIN = 5.0  # timeout=0 answers at once; a safety net for a loaded machine


def test_a_limiter_with_timeout_zero_only_tries(learner: Any, sync: ModuleType,
                                                stage: Stage) -> None:
    """timeout=0 is a timeout like any other, the shortest: take a free permit or be turned
    away at once (a try-lock: shed the load rather than queue it). Read as false, it becomes
    'no timeout' and the caller waits for ever."""
    limiter = sync.Limiter(1, timeout=0)

    def leave() -> None:
        limiter.__exit__(None, None, None)

    holder = stage.add("caller 1", limiter.__enter__, leave)
    assert holder.entered.is_set(), "a free Limiter(1, timeout=0) did not admit its caller"
    harness = learner.harness()
    late = Worker("caller 2", limiter.__enter__, leave)
    try:
        deadline = time.monotonic() + ZERO_WITHIN
        untimed = 0
        while not (late.entered.is_set() or late.done.is_set()) and not untimed \
                and time.monotonic() < deadline:
            untimed = harness.untimed_waits(sync, "__enter__")
            late.done.wait(0.01)
        if not (late.entered.is_set() or late.done.is_set()):
            seen = ("waits in a Condition (or Semaphore) wait with NO timeout" if untimed else
                    f"still waited {ZERO_WITHIN:.0f} s later")
            pytest.fail(
                f"caller 2 of a full Limiter(1, timeout=0) (caller 1 inside) {seen}, "
                "expected TimeoutError at once: timeout=0 means "
                "try once, do not wait\n0 is false: `if self._timeout:` or `timeout or None` "
                "reads it as 'no timeout' and waits for ever. Only None means wait on: test "
                "`timeout is None`, or pass the timeout to acquire(timeout=...) as it is.",
                pytrace=False)
        assert not late.entered.is_set(), (
            "caller 2 of a full Limiter(1, timeout=0) went in: 2 callers inside a Limiter(1)")
        assert isinstance(late.error, TimeoutError), (
            f"caller 2 of a full Limiter(1, timeout=0) raised {type(late.error).__name__}: "
            f"{late.error}, expected TimeoutError")
    finally:
        late.go.set()
    stage.release(holder)


BARGE_TIMEOUT = 1.0   # caller 2's timeout: it must be turned away about this long after it came
BARGES = (0.3, 0.6, 0.9)   # when the permit is freed and taken back at once, in timeouts
TURNED_AWAY_BY = 1.5       # in timeouts: the reference at ~1.0, a restarted timeout >= 1.9


def test_a_limiter_timeout_bounds_the_whole_wait(learner: Any, sync: ModuleType,
                                                 stage: Stage) -> None:
    """A timeout bounds a caller's whole wait, from its arrival. While caller 2 waits, the
    test frees the permit and takes it back at once, three times (a busy limiter: a permit
    freed is taken by whoever asks first): each time caller 2 is woken and finds none. A
    wait that starts its timeout over on every wake-up never ends under such load."""
    harness = learner.harness()
    limiter = sync.Limiter(1, timeout=BARGE_TIMEOUT)
    limiter.__enter__()   # the test's own caller holds the permit
    held = True
    try:
        start = time.monotonic()
        late = Worker("caller 2", limiter.__enter__, lambda: limiter.__exit__(None, None, None))
        stage.workers.append(late)
        stage.settle()
        for at in BARGES:
            time.sleep(max(0.0, start + at * BARGE_TIMEOUT - time.monotonic()))
            if late.done.is_set() or late.entered.is_set():
                break
            held = harness.leave_then_enter(limiter)
            if not held:
                break   # caller 2 took the permit this time: it is in
            stage.settle()   # caller 2 is back in its wait
        if not wait_for_either(late, GIVES_UP_WITHIN):
            pytest.fail(f"caller 2 of a full Limiter(1, timeout={BARGE_TIMEOUT}) was still "
                        f"waiting {GIVES_UP_WITHIN:.0f} s later", pytrace=False)
        waited = late.ended_at - start
    finally:
        harness.restore_switch_interval()
        if held:
            limiter.__exit__(None, None, None)
    assert late.entered.is_set() or waited <= TURNED_AWAY_BY * BARGE_TIMEOUT, (
        f"caller 2 of a full Limiter(1, timeout={BARGE_TIMEOUT}) was turned away "
        f"{waited:.2f} s after it came, expected about {BARGE_TIMEOUT} s: meanwhile the "
        f"permit was freed and at once taken back {len(BARGES)} times (at "
        f"{', '.join(f'{b * BARGE_TIMEOUT:.1f}' for b in BARGES)} s), and each wake-up "
        "started its timeout over\nA timeout bounds the whole wait: fix the deadline once "
        "(time.monotonic() + timeout) and after each wake-up wait only for what is left of it "
        "(Condition.wait_for(predicate, timeout) and Semaphore.acquire(timeout=...) do). On a "
        "busy limiter a caller woken again and again would otherwise wait for ever.")


def limit_after_timeout(inside: list[str]) -> str:
    seen = (f"after caller 2 timed out and caller 1 left, callers 3 and 4 came to the "
            f"Limiter(1): inside now {', '.join(inside) or 'nobody'}, expected caller 3 alone")
    if inside:
        return (f"a permit was given back for a caller that never took one: {seen}\nA caller "
                "turned away without a permit must release nothing: the limit would grow by "
                "one with every timeout.")
    return (f"caller 1's permit was lost when it left: {seen}\nWhether a caller holds a "
            "permit belongs to that caller (a timed-out caller raises in __enter__, so its "
            "__exit__ never runs) - not to a flag on the shared Limiter that the next "
            "caller's timeout overwrites.")


def wait_for_either(w: Worker, within: float) -> bool:
    """Until the worker got in or ended (raised): False if neither within ``within`` s."""
    deadline = time.monotonic() + within
    while not (w.entered.is_set() or w.done.is_set()):
        if time.monotonic() > deadline:
            return False
        w.done.wait(0.01)
    return True


# ---------------------------------------------------------------------------- queue


def test_bounded_queue_blocks_when_full_and_when_empty(sync: ModuleType, stage: Stage) -> None:
    q = sync.BoundedQueue(2)
    q.put("a")
    q.put("b")
    producer = stage.add("producer", lambda: q.put("c"))
    assert not producer.entered.is_set(), (
        "put() into a full BoundedQueue(2) returned at once: it must block until a get() "
        "makes room (that blocking is the backpressure on producers)")
    got = q.get()
    stage.settle()
    wait_until(producer.entered.is_set, "the blocked put to finish after a get made room")
    rest = [q.get(), q.get()]
    assert [got, *rest] == ["a", "b", "c"], f"items came out as {[got, *rest]}, expected FIFO"

    consumers = [stage.add(f"consumer {i + 1}", q.get) for i in range(2)]
    early = [c.result for c in consumers if c.entered.is_set()]
    assert not early, (f"get() on an empty queue returned {early[0]!r} at once: it must "
                       "block until an item arrives")
    q.put("x")
    q.put("y")
    wait_until(lambda: all(c.done.is_set() or c.entered.is_set() for c in consumers),
               "both waiting consumers to get an item")
    stage.settle()
    assert sorted(str(c.result) for c in consumers) == ["x", "y"], (
        f"two consumers waiting, then two puts: they got {[c.result for c in consumers]}, "
        "expected 'x' and 'y' once each")


# Items a queue must carry like any other: None (the usual "stop" sentinel a producer
# sends its consumers) and falsy values.
ODD_ITEMS = [None, 0, "", False]


def test_the_queue_carries_none_and_falsy_items(sync: ModuleType, stage: Stage) -> None:
    q = sync.BoundedQueue(len(ODD_ITEMS))
    for item in ODD_ITEMS:
        q.put(item)
    size = len(q)
    got: list[Any] = []
    lesson = ("An item is whatever the producer put, None and 0 included (None is the usual "
              "'stop' a producer sends its consumers): tell empty from full by a count or the "
              "deque's length, never by a slot or an item being None or false.")
    for i, item in enumerate(ODD_ITEMS):
        consumer = stage.add(f"consumer {i + 1}", q.get)
        if not consumer.entered.is_set():
            pytest.fail(
                f"put {ODD_ITEMS!r} into a BoundedQueue({len(ODD_ITEMS)}) (len() then said "
                f"{size}); get() #{i + 1} waits as if the queue were empty, after returning "
                f"{got!r}: the queue lost an item\n{lesson}", pytrace=False)
        got.append(consumer.result)
        stage.release(consumer)
        if (type(consumer.result), consumer.result) != (type(item), item):
            pytest.fail(
                f"put {ODD_ITEMS!r} into a BoundedQueue({len(ODD_ITEMS)}); the gets returned "
                f"{got!r}, expected {ODD_ITEMS[:i + 1]!r} so far (FIFO, every item): the "
                f"queue dropped or changed {item!r}\n{lesson}", pytrace=False)
    assert size == len(ODD_ITEMS), (
        f"put {ODD_ITEMS!r} into a BoundedQueue({len(ODD_ITEMS)}): len() said {size}, "
        f"expected {len(ODD_ITEMS)}\n{lesson}")
    full = sync.BoundedQueue(1)
    full.put(None)
    producer = stage.add("producer", lambda: full.put("x"))
    assert not producer.entered.is_set(), (
        "a BoundedQueue(1) holding None took a second item at once: None is an item, the "
        "queue is full, and put() must block until a get() makes room")
    assert full.get() is None, "a BoundedQueue(1): put(None), get() did not return None"
    stage.settle()
    wait_until(producer.entered.is_set, "the blocked put to finish after a get made room")
    assert full.get() == "x"


def test_a_wake_up_reaches_the_producer(learner: Any, sync: ModuleType, stage: Stage) -> None:
    """Two consumers wait on an empty BoundedQueue(1); a producer puts 'x' and at once 'y'.
    The first put wakes a consumer; the second finds the queue full and waits; the woken
    consumer takes 'x' - and its wake-up must reach the producer, not only the other
    consumer (who finds the queue empty and waits again)."""
    q = sync.BoundedQueue(1)
    consumers = [stage.add(f"consumer {i + 1}", q.get) for i in range(2)]
    assert not any(c.entered.is_set() for c in consumers), (
        "get() on an empty queue returned at once: it must block until an item arrives")
    harness = learner.harness()
    done = harness.put_two_at_once(q, "x", "y")
    try:
        wait_until(lambda: done.is_set() and all(c.entered.is_set() for c in consumers),
                   "both puts to return and both consumers to get an item", 5)
    except BaseException:
        got = [c.result for c in consumers if c.entered.is_set()]
        pytest.fail(
            f"two consumers waited on an empty BoundedQueue(1); a producer put 'x', then at "
            f"once 'y' (the queue was full, so it waited). The consumers got {got}, and then "
            f"nothing moved: the producer still waits in put() though the queue "
            f"{'is empty' if len(q) == 0 else 'has room'}, and the other consumer still waits "
            "in get()\nA lost wake-up: the consumer's notify() woke ONE waiter - the other "
            "consumer, who went back to waiting - instead of the producer. Producers and "
            "consumers wait on the same condition, so wake them all (notify_all()), or keep "
            "two conditions (not_full, not_empty) and notify the one the change concerns.",
            pytrace=False)
    finally:
        harness.restore_switch_interval()
    stage.settle()
    assert sorted(str(c.result) for c in consumers) == ["x", "y"], (
        f"two consumers, then puts of 'x' and 'y': they got {[c.result for c in consumers]}")


def test_producers_and_consumers_lose_nothing(sync: ModuleType) -> None:
    q = sync.BoundedQueue(3)
    per, producers, consumers = 120, 3, 3
    received: list[Any] = []
    sizes: list[int] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def produce(p: int) -> None:
        try:
            for i in range(per):
                q.put(f"{p}:{i}")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def consume() -> None:
        try:
            while True:
                item = q.get()
                if item == "STOP":
                    return
                if item is None:
                    continue
                with lock:
                    received.append(item)
                    sizes.append(len(q))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    cs = [threading.Thread(target=consume, daemon=True) for _ in range(consumers)]
    ps = [threading.Thread(target=produce, args=(p,), daemon=True) for p in range(producers)]
    for t in cs + ps:
        t.start()
    for t in ps:
        t.join(60)
    for _ in cs:
        q.put("STOP")
    for t in cs:
        t.join(60)
    if errors and isinstance(errors[0], IndexError):
        pytest.fail(
            f"a consumer's get() raised {errors[0]!r} with 3 consumers and 3 producers on a "
            "BoundedQueue(3): it was woken, did not check again that an item was there, and "
            "popped an empty deque - another consumer had taken the item first. Wait in a "
            "loop: `while not self._items: cond.wait()` (and `while full` in put), never "
            "`if`.", pytrace=False)
    assert not errors, f"a producer or consumer raised {errors[0]!r}"
    over = [n for n in sizes if n > 3]
    assert not over, (
        f"a BoundedQueue(3) held {max(over)} items at once, more than its capacity: a "
        "producer woken while the queue was full did not check again before appending "
        "(another producer had filled the free slot first). Wait in a loop: `while "
        "len(items) >= capacity: cond.wait()`, never `if`.")
    want = Counter(f"{p}:{i}" for p in range(producers) for i in range(per))
    got = Counter(received)
    lost, dup = want - got, got - want
    assert not lost and not dup, (
        f"{producers} producers x {per} items through a BoundedQueue(3) with {consumers} "
        f"consumers: {sum(lost.values())} lost, {sum(dup.values())} duplicated\nEvery "
        "change of the deque must happen with the condition's lock held, and every wait "
        "must re-check its predicate in a while loop.")
