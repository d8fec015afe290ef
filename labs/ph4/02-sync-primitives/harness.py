"""Runs where the learner's primitives run (in their process when grading): two calls, one
right after the other, in one thread that keeps the interpreter (a long switch interval)
from the first call's wake-up until the second call has looked at the state - so a thread
woken by the first has not run yet when the second decides whether to wait. The
interleaving is then the same every time, not only when the scheduler says so.

- put_two_at_once: a consumer woken by the first put has not taken its item when the
  second put finds the queue full;
- leave_write_then_read: a writer leaves and a reader arrives at that very moment, before
  the writer that was waiting (and is now woken) gets to run;
- leave_then_enter: a limiter's permit is given back and taken again at once, before the
  caller woken by it gets to run."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from labrunner.slow_steps import threading_waits_in

_normal = sys.getswitchinterval()


def _keep_the_interpreter() -> None:
    """A long switch interval; then a moment asleep, so that a thread already waiting for
    the interpreter (with the short interval it began waiting with) runs now rather than
    between the two calls."""
    sys.setswitchinterval(2.0)
    time.sleep(0.005)


def leave_write_then_read(lock: Any) -> None:
    """release_write() and at once acquire_read(), with no other thread running between
    them: returns when the read lock is held (the caller releases it). The interval is put
    back by restore_switch_interval() once the test has seen where the reader is."""
    _keep_the_interpreter()
    lock.release_write()
    lock.acquire_read()


def leave_then_enter(limiter: Any) -> bool:
    """limiter.__exit__() and at once limiter.__enter__() again, with no other thread running
    between them: a waiter woken by the exit finds the permit taken again (the interval is
    put back here: the test looks at nothing in between). False if the permit went to the
    waiter after all (this enter then timed out)."""
    _keep_the_interpreter()
    try:
        limiter.__exit__(None, None, None)
        limiter.__enter__()
    except TimeoutError:
        return False
    finally:
        sys.setswitchinterval(_normal)
    return True


def put_two_at_once(queue: Any, first: Any, second: Any) -> threading.Event:
    """Starts the two puts on a thread of their own; the Event is set once both returned."""
    done = threading.Event()

    def run() -> None:
        _keep_the_interpreter()
        try:
            queue.put(first)
            queue.put(second)
        finally:
            sys.setswitchinterval(_normal)
            done.set()

    threading.Thread(target=run, daemon=True, name="producer").start()
    return done


def restore_switch_interval() -> None:
    sys.setswitchinterval(_normal)


def acquire_interrupted(lock: Any, method: str) -> str:
    """Calls lock.<method>() in this thread with the first threading.Condition wait it makes
    raising KeyboardInterrupt (Ctrl-C, or a signal handler's exception, arriving while it
    waits; a real wait re-takes the lock before raising, and so does this one: it never
    let go). Other threads wait as usual. Returns "interrupted" when the interrupt came out
    of the call, "swallowed" when the call returned after it, "never waited" when the call
    returned without a Condition wait."""
    return _first_wait_interrupted(lock, method, lambda cond: None)


def _first_wait_interrupted(lock: Any, method: str,
                            meanwhile: Callable[[threading.Condition], None]) -> str:
    """lock.<method>() in this thread, its first Condition wait replaced by
    ``meanwhile(cond)`` and then a KeyboardInterrupt; as acquire_interrupted returns."""
    me = threading.get_ident()
    real = threading.Condition.wait
    waited: list[bool] = []

    def wait(cond: threading.Condition, timeout: float | None = None) -> bool:
        if threading.get_ident() == me and not waited:
            waited.append(True)
            meanwhile(cond)
            raise KeyboardInterrupt("interrupted by the test while waiting")
        return real(cond, timeout)

    # patching a method on the class, which mypy refuses (method-assign) and whose type it
    # does not match with a plain function of the same arguments (assignment)
    threading.Condition.wait = wait  # type: ignore[method-assign, assignment]
    try:
        getattr(lock, method)()
    except KeyboardInterrupt:
        return "interrupted"
    finally:
        threading.Condition.wait = real  # type: ignore[method-assign]
    return "swallowed" if waited else "never waited"


def untimed_waits(module: Any, function: str) -> int:
    """Threads blocked right now in a threading.Condition wait WITHOUT a timeout (a
    Semaphore's acquire waits in one too) that ``function`` of the learner's module called,
    directly or not: a caller given a timeout that waits in one will wait for ever."""
    source = module.__file__
    wait_code = threading.Condition.wait.__code__
    count = 0
    for frame in sys._current_frames().values():
        learners = untimed = False
        f: Any = frame
        while f is not None:
            if f.f_code.co_filename == source and f.f_code.co_name == function:
                learners = True
            elif f.f_code is wait_code and f.f_locals.get("timeout") is None:
                untimed = True
            f = f.f_back
        count += learners and untimed
    return count


_cue = threading.Event()


def acquire_interrupted_on_cue(lock: Any, method: str) -> str:
    """Like acquire_interrupted, but the first Condition wait of lock.<method>() really waits
    - the Condition's lock let go, as a real wait does - until interrupt_now(), then re-takes
    that lock and raises KeyboardInterrupt: the interrupt arrives while other threads wait
    behind this one. Returns as acquire_interrupted does."""
    _cue.clear()

    def until_cued(cond: threading.Condition) -> None:
        # Condition's own way to let go of its lock and take it back (as its wait does)
        state = cond._release_save()  # type: ignore[attr-defined]
        try:
            _cue.wait()
        finally:
            cond._acquire_restore(state)  # type: ignore[attr-defined]

    return _first_wait_interrupted(lock, method, until_cued)


def interrupt_now() -> None:
    _cue.set()


def unwoken_waits(folder: str) -> int:
    """Threads in a Condition wait in the learner's code that nobody has notified: CPython's
    notify takes a waiter off its Condition's queue at once, so a thread notified but not yet
    run is not counted - only one left waiting for a wake-up that never came."""
    unwoken = 0
    for frame in threading_waits_in(folder).values():
        cond, waiter = frame.f_locals.get("self"), frame.f_locals.get("waiter")
        if isinstance(cond, threading.Condition) and waiter in getattr(cond, "_waiters", ()):
            unwoken += 1
    return unwoken
