"""ph6.6 - circuit breaker and bulkhead, against real HTTP backends.

The backends are small HTTP services the test runs on loopback; each counts the requests that
reach it, so "an open circuit never calls the backend" is read off the backend's own counter.
Time is the test's clock (injected): no sleeps. A backend can be told to fail (500) or to hold
requests until released, which makes half-open probes and full bulkheads happen exactly when
the test wants. A call may also end with a BaseException that is not an Exception (as
gevent.Timeout does): the probe's flag and the bulkhead's slot must still be given back.
One clock starts at 0.0, a time like any other."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from labrunner.testing import http_request, serve_wsgi, wait_until


class BackendDown(Exception):
    """The test's client saw a 5xx or no answer: a failed call."""


class Backend:
    def __init__(self, name: str) -> None:
        self.name = name
        self.mode = "ok"                 # ok | fail | hold | hold_fail (hold, then 500)
        self.hits = 0
        self.lock = threading.Lock()
        self.release = threading.Event()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with self.lock:
            self.hits += 1
            mode = self.mode
        if mode in ("hold", "hold_fail"):
            self.release.wait(60)
        status = "500 Internal Server Error" if mode in ("fail", "hold_fail") else "200 OK"
        start_response(status, [("Content-Type", "text/plain")])
        return [self.name.encode()]


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def backends() -> Iterator[dict[str, tuple[Backend, str]]]:
    made = {}
    servers = []
    for name in ("payments", "search"):
        backend = Backend(name)
        server = serve_wsgi(backend)
        made[name] = (backend, server.__enter__())
        servers.append(server)
    yield made
    for backend, _ in made.values():
        backend.release.set()
    for server in servers:
        server.__exit__(None, None, None)


def caller(host: str) -> Any:
    def call() -> str:
        try:
            reply = http_request(host, "GET", "/quote", timeout=60)
        except OSError as exc:
            raise BackendDown(f"no answer: {exc}") from exc
        if reply.status >= 500:
            raise BackendDown(f"HTTP {reply.status}")
        body: str = reply.body.decode()
        return body
    return call


@pytest.fixture
def mod(learner: Any) -> Any:
    return learner.load("breaker")


def trip(mod: Any, cb: Any, call: Any, times: int) -> None:
    for _ in range(times):
        with pytest.raises(BackendDown):
            cb.call(call)


def opened(mod: Any, backends: Any, clock: Clock | None = None) -> tuple[Any, str, Any, Clock]:
    """The payments backend failing, and a breaker (threshold 3, reset_timeout 30 s) that
    three failed calls opened: the backend, its host, the breaker and its clock."""
    backend, host = backends["payments"]
    clock = clock or Clock()
    cb = mod.CircuitBreaker(failure_threshold=3, reset_timeout=30.0, clock=clock)
    backend.mode = "fail"
    trip(mod, cb, caller(host), 3)
    return backend, host, cb, clock


def never_counted(cb: Any, call: Any) -> None:
    """Still closed at the threshold: off by one, or failures of this kind never counted?
    Three more failed calls tell them apart."""
    for extra in range(1, 4):
        with pytest.raises(BackendDown):
            cb.call(call)
        if cb.state != "closed":
            pytest.fail(f"the state was still 'closed' after 3 consecutive failures (threshold "
                        f"3) and became {cb.state!r} after {3 + extra}: the failure that "
                        "reaches the threshold opens the circuit, not a later one",
                        pytrace=False)
    pytest.fail(
        f"after 6 consecutive failed calls (threshold 3) the state is still {cb.state!r}: "
        f"these failures are never counted. Each raised {BackendDown.__name__}, an Exception "
        "but not an OSError or a connection error - every exception fn raises is a failure "
        "(a bad status, a garbled body, a timeout alike), not only network errors",
        pytrace=False)


def test_opens_after_consecutive_failures_and_then_never_calls(mod: Any, backends: Any) -> None:
    backend, host = backends["payments"]
    clock = Clock()
    cb = mod.CircuitBreaker(failure_threshold=3, reset_timeout=30.0, clock=clock)
    backend.mode = "fail"
    for n in range(1, 4):
        try:
            cb.call(caller(host))
        except BackendDown:
            pass
        except mod.CircuitOpen:
            pytest.fail(f"call {n} with the circuit closed raised CircuitOpen after {n - 1} "
                        "failures: the threshold is 3 consecutive failures")
        want = "closed" if n < 3 else "open"
        if n == 3 and cb.state == "closed":
            never_counted(cb, caller(host))
        assert cb.state == want, (
            f"after {n} consecutive failures (threshold 3) the state is {cb.state!r}, expected "
            f"{want!r}: the failure that reaches the threshold opens the circuit")
    assert backend.hits == 3
    for _ in range(10):
        with pytest.raises(mod.CircuitOpen):
            cb.call(caller(host))
    assert backend.hits == 3, (
        f"10 calls with the circuit open reached the backend {backend.hits - 3} times: an open "
        "circuit fails fast with CircuitOpen without calling the dependency at all - that is "
        "what gives a struggling service room to recover")


def test_a_success_resets_the_failure_count(mod: Any, backends: Any) -> None:
    backend, host = backends["payments"]
    cb = mod.CircuitBreaker(failure_threshold=3, reset_timeout=30.0, clock=Clock())
    for n, mode in enumerate(("fail", "fail", "ok", "fail", "fail"), 1):
        backend.mode = mode
        try:
            cb.call(caller(host))
        except BackendDown:
            pass
        except mod.CircuitOpen:
            pytest.fail("after fail, fail, success, fail the circuit is open (call "
                        f"{n} raised CircuitOpen): the threshold (3) counts consecutive "
                        "failures; the success in between must reset the count")
    assert cb.state == "closed", (
        f"fail, fail, success, fail, fail opened the circuit (state {cb.state!r}): the "
        "threshold counts consecutive failures; a success in between resets the count")
    backend.mode = "fail"
    trip(mod, cb, caller(host), 1)
    assert cb.state == "open", (f"the third failure in a row left the state {cb.state!r}, "
                                "expected 'open'")


def diagnose_not_half_open(mod: Any, cb: Any, clock: Any, backend: Any, host: str,
                           state: str) -> None:
    """The state was not 'half_open' exactly reset_timeout after opening: tell a timeout
    that ends one tick late, a state that is only updated by calls, and time not read from
    the clock apart. Always fails."""
    clock.now += 1
    later = cb.state
    if later == "half_open":
        pytest.fail(
            f"exactly 30 s (reset_timeout) after opening, by the injected clock, the state is "
            f"{state!r}, and 1 s later 'half_open': the timeout ends one tick late - the "
            "circuit is half-open once clock() - opened_at >= reset_timeout (not >)",
            pytrace=False)
    backend.mode = "ok"
    try:
        cb.call(caller(host))
    except (mod.CircuitOpen, BackendDown):
        pass
    if backend.hits > 3:
        pytest.fail(
            f"31 s after opening (reset_timeout 30) the state still reads {later!r}, yet the "
            "next call went through to the backend as the probe: `state` must report "
            "'half_open' as soon as reset_timeout has passed on the clock, not only once a "
            "call has changed it", pytrace=False)
    pytest.fail(
        f"30 s (reset_timeout) after opening, by the injected clock, the state is {state!r} "
        f"(31 s: {later!r}) and a call is still refused: expected 'half_open'. Read time "
        "from the clock you were given, not from time.monotonic()", pytrace=False)


def test_the_timeout_counts_from_the_failure_that_opened(mod: Any, backends: Any) -> None:
    """Three consecutive failures 10 s apart: the circuit opens at the third, and the
    reset_timeout counts from then - not from the streak's first failure, nor an earlier one."""
    backend, host = backends["payments"]
    clock = Clock()
    cb = mod.CircuitBreaker(failure_threshold=3, reset_timeout=30.0, clock=clock)
    backend.mode = "fail"
    for _ in range(3):
        trip(mod, cb, caller(host), 1)
        clock.now += 10
    clock.now -= 10                      # the third failure, at 1020, opened the circuit
    assert cb.state == "open", f"3 consecutive failures left the state {cb.state!r}"
    clock.now += 29
    state, got = cb.state, outcome(mod, cb, host)
    assert (state, got) == ("open", "refused"), (
        f"failures at clock 1000, 1010 and 1020 (threshold 3) opened the circuit at 1020; at "
        f"1049 the state reads {state!r} and a call was {got}, expected 'open' and refused "
        "without reaching the backend: reset_timeout counts from the moment the circuit "
        "opened - the failure that reached the threshold - not from the first failure of "
        "the streak or an earlier one (a dependency that failed slowly would get its "
        "probe early, or at once)")
    clock.now += 1
    backend.mode = "ok"
    state, got = cb.state, outcome(mod, cb, host)
    assert (state, got) == ("half_open", "answered"), (
        f"30 s after the circuit opened the state read {state!r} and the call was {got}, "
        "expected 'half_open' and a probe that reaches the backend")


def test_a_closed_circuit_lets_calls_run_side_by_side(mod: Any, backends: Any) -> None:
    """Closed, the breaker only counts: two calls to a slow backend are both in flight at
    once - a breaker that runs fn under its lock turns every caller into a queue."""
    backend, host = backends["payments"]
    cb = mod.CircuitBreaker(failure_threshold=3, reset_timeout=30.0, clock=Clock())
    backend.mode = "hold"
    calls = [run_in_thread(lambda: cb.call(caller(host))) for _ in range(2)]
    try:
        for _ in range(1000):      # both at the backend at once, or 10 s gone
            if backend.hits >= 2 or not all(t.is_alive() for t, _ in calls):
                break
            calls[0][0].join(0.01)
        in_flight = backend.hits
    finally:
        backend.release.set()
        for thread, _ in calls:
            thread.join(60)
    assert in_flight >= 2, (
        f"two calls through a closed breaker to a backend that holds its answers: only "
        f"{in_flight} reached the backend while the other waited: "
        "the breaker runs fn while holding its lock, so every call waits for the one before - "
        "hold the lock only to check and to record the outcome, never around fn")


def test_half_open_lets_exactly_one_probe_through(mod: Any, backends: Any) -> None:
    backend, host, cb, clock = opened(mod, backends)
    clock.now += 29.5
    with pytest.raises(mod.CircuitOpen):
        cb.call(caller(host))
    assert backend.hits == 3, "a call 29.5 s after opening (reset_timeout 30) reached the backend"
    clock.now += 0.5
    state = cb.state
    if state != "half_open":
        diagnose_not_half_open(mod, cb, clock, backend, host, state)
    backend.mode = "hold"
    result: dict[str, Any] = {}

    def probe() -> None:
        try:
            result["value"] = cb.call(caller(host))
        except Exception as exc:  # noqa: BLE001 - reported below
            result["error"] = repr(exc)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    wait_until(lambda: backend.hits == 4, "the half-open probe to reach the backend")
    hits_during_probe = 0
    for _ in range(5):
        extra, out = run_in_thread(lambda: cb.call(caller(host)))
        for _ in range(2000):        # refused at once, or it shows up at the backend
            extra.join(0.01)
            if not extra.is_alive() or backend.hits > 4:
                break
        hits_during_probe = backend.hits - 4
        if hits_during_probe or not isinstance(out.get("error"), mod.CircuitOpen):
            break
    blocked = extra.is_alive()
    backend.release.set()
    thread.join(60)
    assert not blocked, (
        "a call made while the half-open probe was in flight was neither refused nor sent: "
        "it waited 20 s for the probe to end - the breaker holds its lock while the probe "
        "runs. Take the lock to decide (and refuse with CircuitOpen at once) and to record "
        "the outcome, never around fn itself")
    assert hits_during_probe == 0, (
        "while the half-open probe was in flight, another call reached the backend: "
        "half-open lets ONE trial call through and refuses the rest with CircuitOpen until it "
        "answers, or a recovering service gets the full load at once")
    assert isinstance(out.get("error"), mod.CircuitOpen), (
        f"a call while the half-open probe was in flight ended with {out}: expected "
        "CircuitOpen at once")
    assert result.get("value") == "payments", f"the probe itself failed: {result}"
    assert cb.state == "closed", (f"the probe succeeded, yet the state is {cb.state!r}: a "
                                  "successful probe closes the circuit")


def test_a_failed_probe_opens_for_a_full_timeout_again(mod: Any, backends: Any) -> None:
    backend, host, cb, clock = opened(mod, backends)
    clock.now += 30
    trip(mod, cb, caller(host), 1)
    assert cb.state == "open", (
        f"the half-open probe failed, yet the state is {cb.state!r}: a failed probe opens the "
        "circuit again, for a full reset_timeout counted from the probe's failure")
    clock.now += 29
    with pytest.raises(mod.CircuitOpen):
        cb.call(caller(host))
    assert backend.hits == 4, (
        f"29 s after the failed probe a call reached the backend (hits {backend.hits}, "
        "expected 4): the failed probe restarts the 30 s timeout - the circuit was opened "
        "again then, not when it first opened")
    clock.now += 1
    backend.mode = "ok"
    assert cb.call(caller(host)) == "payments"
    assert cb.state == "closed"


def test_a_clock_that_starts_at_zero_is_a_clock(mod: Any, backends: Any) -> None:
    """The injected clock reads 0.0 when the circuit opens (a simulated clock, a counter of
    ticks): 30 s later the circuit is half-open like any other."""
    backend, host, cb, clock = opened(mod, backends, Clock(0.0))
    clock.now = 30.0
    backend.mode = "ok"
    state = cb.state
    got = outcome(mod, cb, host)
    assert state == "half_open" and got == "answered", (
        f"the circuit opened at clock() == 0.0; at 30.0 (reset_timeout 30) the state reads "
        f"{state!r} and a call was {got} (backend hits {backend.hits}), expected 'half_open' "
        "and a probe that reaches the backend: 0.0 is a time like any other, but a check "
        "such as `if self._opened_at and ...` takes it for 'never opened', so this circuit "
        "never half-opens. Test for None (`is not None`), not for truth")


class CallCancelled(BaseException):
    """Ends a call the way gevent.Timeout, asyncio.CancelledError or KeyboardInterrupt
    does: a BaseException, not an Exception, so `except Exception` lets it through."""


def cancelled_after(host: str) -> Any:
    def call() -> str:
        http_request(host, "GET", "/quote", timeout=60)
        raise CallCancelled("the caller's deadline ran out (as gevent.Timeout raises it)")
    return call


def ended_by(mod: Any, guard: Any, fn: Any) -> str:
    """What came back from guard.call(fn): the exception's class name, or 'a value'."""
    try:
        guard.call(fn)
    except BaseException as exc:  # noqa: BLE001 - CallCancelled is the one expected
        return type(exc).__name__
    return "a value"


BASE_EXCEPTION_NOTE = ("CallCancelled, a BaseException but not an Exception, as gevent.Timeout, "
                       "asyncio.CancelledError and KeyboardInterrupt are")


def test_a_probe_cancelled_midway_does_not_wedge_the_circuit(mod: Any, backends: Any) -> None:
    """The half-open probe reaches the backend and is then ended by a BaseException. Whether
    that counts as a failure (open again) or not (half-open again), a full reset_timeout
    later the next call is a probe: the probe's flag went with the probe."""
    backend, host, cb, clock = opened(mod, backends)
    clock.now += 30
    backend.mode = "ok"
    ended = ended_by(mod, cb, cancelled_after(host))
    assert ended == CallCancelled.__name__, (
        f"the half-open probe was ended by {BASE_EXCEPTION_NOTE}, and the caller got "
        f"{ended}: what ends fn propagates unchanged")
    clock.now += 30
    got = outcome(mod, cb, host)
    assert got == "answered", (
        f"the half-open probe reached the backend and was then ended by "
        f"{BASE_EXCEPTION_NOTE}; a full reset_timeout later the next call was {got} "
        f"(state {cb.state!r}), expected a new probe that reaches the backend: the first "
        "probe's in-flight flag was never cleared - `except Exception` does not see a "
        "BaseException - so the circuit refuses every call for good, the dependency "
        "healthy or not. Clear it however the call ends (try/finally, or except "
        "BaseException: pybreaker counts it as a failure)")


def test_a_call_cancelled_midway_gives_its_bulkhead_slot_back(mod: Any, backends: Any) -> None:
    backend, host = backends["search"]
    pool = mod.Bulkhead(1)
    ended = ended_by(mod, pool, cancelled_after(host))
    assert ended == CallCancelled.__name__, (
        f"a call through Bulkhead(1) was ended by {BASE_EXCEPTION_NOTE}, and the caller got "
        f"{ended}: what ends fn propagates unchanged")
    got = ended_by(mod, pool, caller(host))
    assert got == "a value", (
        f"a call through Bulkhead(1) was ended by {BASE_EXCEPTION_NOTE}; the next call, "
        f"nothing else in flight, ended with {got}, expected the backend's answer: the "
        "cancelled call kept its slot - `except Exception` does not see a BaseException - "
        "and every one lost this way shrinks the pool for good. Give the slot back in "
        "`finally`")


def outcome(mod: Any, cb: Any, host: str) -> str:
    """One call through the breaker: 'answered', 'failed' (the backend's error came back)
    or 'refused' (CircuitOpen, the backend never called)."""
    try:
        cb.call(caller(host))
    except BackendDown:
        return "failed"
    except mod.CircuitOpen:
        return "refused"
    return "answered"


def test_a_recovered_circuit_starts_afresh(mod: Any, backends: Any) -> None:
    """Open, recover through a successful probe, and do it again: each time the circuit
    closes it is a new closed state - no failures counted yet, no probe in flight."""
    backend, host, cb, clock = opened(mod, backends)
    for recovery in (1, 2):
        clock.now += 30
        backend.mode = "ok"
        hits = backend.hits
        probe = outcome(mod, cb, host)
        assert probe == "answered" and backend.hits == hits + 1 and cb.state == "closed", (
            f"recovery {recovery}: 30 s after the circuit opened the probe was {probe} "
            f"({backend.hits - hits} request(s) reached the backend; state now "
            f"{cb.state!r}): expected it sent and the circuit closed"
            + (" - the first recovery's probe was left marked 'in flight' after it "
               "succeeded, so every later probe is refused and the circuit never closes "
               "again: closing clears the probe" if recovery == 2 and probe == "refused"
               else ""))
        backend.mode = "fail"
        got = [outcome(mod, cb, host) for _ in range(3)]
        assert got == ["failed", "failed", "failed"] and cb.state == "open", (
            f"after recovery {recovery} (a successful probe closed the circuit) three "
            f"failures in a row gave {got} and state {cb.state!r}: expected the first two "
            "to reach the backend and fail with the circuit still closed, the third to open "
            "it (threshold 3) - "
            + ("the failures counted before the circuit opened were kept: closing after a "
               "successful probe starts a fresh closed state with no failures counted"
               if got[:2] != ["failed", "failed"] else "the threshold is still 3"))


# Calls let in while the circuit was closed, held at the backend while three other calls
# fail and open it, then let go 10 s later: (what they end with, the backend's mode while
# they are let in, how many). Their outcome says nothing about the dependency now: only time
# moves an open circuit to half-open, only the probe closes it or opens it again (Polly's
# CircuitStateController: "only time passing governs transitioning from Open to HalfOpen";
# resilience4j's OpenState records such results without a transition).
LATE_OUTCOMES = [
    ("success", "hold", 1),
    ("failure", "hold_fail", 3),     # as many as the threshold
]


@pytest.mark.parametrize(("late", "mode", "count"), LATE_OUTCOMES,
                         ids=[case[0] for case in LATE_OUTCOMES])
def test_a_call_that_ends_after_the_circuit_opened_changes_nothing(
        mod: Any, backends: Any, late: str, mode: str, count: int) -> None:
    """A call goes through while the circuit is closed; while it waits for its answer three
    other calls fail and the circuit opens. Its answer, arriving 10 s later, must not close
    the circuit (a success) nor restart its timeout (failures): the circuit stays open, and
    reset_timeout after it opened it lets one probe through."""
    backend, host = backends["payments"]
    clock = Clock()
    cb = mod.CircuitBreaker(failure_threshold=3, reset_timeout=30.0, clock=clock)
    backend.mode, held = mode, backend.release
    late_calls = [run_in_thread(lambda: cb.call(caller(host))) for _ in range(count)]
    try:
        wait_until(lambda: backend.hits == count,
                   f"{count} call(s) through the closed circuit to reach the backend")
        backend.mode, backend.release = "fail", threading.Event()
        trip(mod, cb, caller(host), 3)
        opened = cb.state
        assert opened == "open", (
            f"with {count} call(s) still in flight, 3 consecutive failures (threshold 3) left "
            f"the state {opened!r}, expected 'open': calls in flight are not failures yet")
        clock.now += 10
    finally:
        held.set()
    for thread, _ in late_calls:
        thread.join(60)
    ended = [out.get("value", out.get("error")) for _, out in late_calls]
    assert all(e == "payments" if late == "success" else isinstance(e, BackendDown)
               for e in ended), (
        f"the call(s) let in while closed ended with {ended!r}, expected "
        f"{'the answer' if late == 'success' else 'the backend error'}: once let in, a call "
        "runs to its end - the breaker does not rewrite its outcome")
    what = ("a call let in while the circuit was closed answered 10 s after the circuit "
            "opened (3 other calls failed meanwhile)" if late == "success" else
            f"{count} calls let in while the circuit was closed failed 10 s after it opened "
            "(3 other calls had failed meanwhile and opened it)")
    state, hits = cb.state, backend.hits
    after = outcome(mod, cb, host)
    if state != "open" or after != "refused":
        pytest.fail(
            f"{what}: afterwards the state is {state!r} and the next call was {after} "
            f"({backend.hits - hits} request(s) reached the backend); expected 'open' and the "
            "call refused with CircuitOpen. The outcome of a call let in before the circuit "
            "opened says nothing about the dependency now: a success closes the circuit only "
            "when it is the half-open probe's (or the circuit is still closed) - otherwise a "
            "slow call that happened to succeed sends full load to a failing service",
            pytrace=False)
    clock.now += 20
    state = cb.state
    backend.mode, hits = "ok", backend.hits
    probe = outcome(mod, cb, host)
    assert state == "half_open" and probe == "answered" and cb.state == "closed", (
        f"{what}: 30 s (reset_timeout) after the circuit opened the state is {state!r} and "
        f"the next call was {probe} ({backend.hits - hits} request(s) reached the backend); "
        "expected 'half_open' and the probe sent - "
        + ("those late failures were counted as new ones and opened the circuit again, "
           "restarting its timeout: only time moves an open circuit to half-open, and a "
           "failure counts only while the circuit is closed (or for the probe)"
           if late == "failure" and state == "open" else
           "the circuit opened at the third failure; the late call's outcome changes nothing"))


def run_in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["value"] = fn()
        except Exception as exc:  # noqa: BLE001 - the test reads it
            out["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


def test_a_slow_dependency_does_not_starve_another(mod: Any, backends: Any) -> None:
    slow, slow_host = backends["payments"]
    fast, fast_host = backends["search"]
    pool_slow, pool_fast = mod.Bulkhead(2), mod.Bulkhead(2)
    slow.mode = "hold"
    held = [run_in_thread(lambda: pool_slow.call(caller(slow_host))) for _ in range(2)]
    wait_until(lambda: slow.hits == 2, "two calls to hang in the slow dependency")
    try:
        for i in range(5):
            thread, out = run_in_thread(lambda: pool_fast.call(caller(fast_host)))
            thread.join(10)
            assert out.get("value") == "search", (
                f"call {i + 1} to the fast dependency, while the slow one holds its two slots, "
                f"{'is still waiting' if thread.is_alive() else 'ended with ' + repr(out)}: "
                "each dependency needs a pool of its own (a bulkhead), so a slow one cannot "
                "take the capacity another needs")
        thread, out = run_in_thread(lambda: pool_slow.call(caller(slow_host)))
        for _ in range(1000):        # ends at once when refused; up to 10 s when it waits
            thread.join(0.01)
            if not thread.is_alive() or slow.hits > 2:
                break
        assert slow.hits == 2 and not thread.is_alive(), (
            f"a third call to the slow dependency (bulkhead of 2, both taken) "
            f"{'reached the backend' if slow.hits > 2 else 'is still waiting after 10 s'}: a "
            "full bulkhead refuses at once with BulkheadFull; queueing callers behind a hung "
            "dependency is how threads run out")
        assert isinstance(out.get("error"), mod.BulkheadFull) and slow.hits == 2, (
            f"a third call to the slow dependency ended with {out} (backend hits "
            f"{slow.hits}): expected BulkheadFull without reaching the backend")
    finally:
        slow.release.set()
    for thread, _ in held:
        thread.join(60)
    slow.mode = "fail"
    for n in range(1, 4):
        try:
            pool_slow.call(caller(slow_host))
        except BackendDown:
            pass
        except mod.BulkheadFull:
            pytest.fail(
                f"call {n} to a bulkhead of 2 with nothing in flight, after {n - 1} calls that "
                "raised, was refused with BulkheadFull: a slot must be given back when the call "
                "raises too (try/finally), or every failure leaks one until the pool is empty")
    slow.mode, slow.release = "hold", threading.Event()
    again = [run_in_thread(lambda: pool_slow.call(caller(slow_host))) for _ in range(2)]
    try:
        wait_until(lambda: slow.hits == 7 or any("error" in o for _, o in again),
                   "two more calls to reach the slow dependency")
        errors = [o["error"] for _, o in again if "error" in o]
        assert not errors, (
            f"after calls that raised, the slow dependency's bulkhead (2 slots, none in use) "
            f"refused a call: {errors[0]!r}. A slot must be given back when the call raises "
            "too (try/finally), or every failure leaks one until the pool is empty")
        no_slot_made_by_failures(mod, pool_slow, slow, slow_host)
    finally:
        slow.release.set()
        for thread, _ in again:
            thread.join(60)


def no_slot_made_by_failures(mod: Any, pool: Any, backend: Backend, host: str) -> None:
    """Two calls hold both slots of a Bulkhead(2) that has seen 3 calls raise: a third is
    refused at once, without reaching the backend."""
    hits = backend.hits
    thread, out = run_in_thread(lambda: pool.call(caller(host)))
    for _ in range(1000):        # refused at once, or it shows up at the backend
        thread.join(0.01)
        if not thread.is_alive() or backend.hits > hits:
            break
    assert backend.hits == hits and isinstance(out.get("error"), mod.BulkheadFull), (
        f"after 3 calls that raised, a Bulkhead(2) whose two slots are held let a third call "
        f"{'reach the backend' if backend.hits > hits else 'end with ' + repr(out)}, expected "
        "BulkheadFull at once: each failing call gave its slot back more than once (in an "
        "except and again in finally, on a plain Semaphore or counter), so every failure "
        "adds a slot and the pool grows past its size - give a slot back exactly once, in "
        "finally (a BoundedSemaphore raises on a release too many)")


BURST, STEP_DELAY = 8, 0.01     # calls into one Bulkhead(2) at once; s per bytecode of yours


def burst_at_held_backend(mod: Any, learner: Any, pool: Any, backend: Backend,
                          host: str, mode: str = "hold") -> tuple[int, list[str]]:
    """BURST calls into `pool` at the same moment (from threads where the learner's code
    runs, each step of it slowed: harness.py) while the backend holds every request: how
    many were at the backend together once each call had reached it or ended, and each
    call's outcome after the backend let them go."""
    backend.mode, backend.release = mode, threading.Event()
    before = backend.hits
    burst = learner.harness().start_burst(mod, pool, host, BURST, STEP_DELAY)
    try:
        deadline = time.monotonic() + 30   # every call at the backend or ended: at once
        while backend.hits - before + burst.ended() < BURST and time.monotonic() < deadline:
            time.sleep(0.02)
        in_flight = backend.hits - before
    finally:
        backend.release.set()
    return in_flight, burst.results(60)


def test_a_burst_takes_no_more_than_the_bulkheads_slots(mod: Any, learner: Any,
                                                         backends: Any) -> None:
    """Calls that arrive together must not all see a free slot: checking for one and
    taking it is one atomic step, and giving it back must not lose an update either."""
    backend, host = backends["payments"]
    pool = mod.Bulkhead(2)
    for burst in (1, 2):
        in_flight, outcomes = burst_at_held_backend(mod, learner, pool, backend, host)
        refused = outcomes.count("refused")
        if in_flight == 2 and refused == BURST - 2:
            continue
        seen = (f"{in_flight} were at the backend together and {refused} refused with "
                f"BulkheadFull (outcomes {sorted(outcomes)}); expected 2 in flight and "
                f"{BURST - 2} refused at once")
        if burst == 1:
            pytest.fail(
                f"{BURST} calls at the same moment into a Bulkhead(2) whose dependency holds "
                f"every request: {seen}. Checking for a free slot and taking it must be one "
                "atomic step (threading.BoundedSemaphore's acquire(blocking=False), or one "
                "lock held around both the check and the count): with a plain counter, calls "
                "that arrive together all see a slot free and all go in, and a slow "
                "dependency takes more threads than its pool", pytrace=False)
        pytest.fail(
            f"a first burst of {BURST} calls into a Bulkhead(2) got 2 through, and once they "
            f"had all returned a second burst found {in_flight} slot(s): {seen}. The count "
            "of calls in flight drifted: `in_flight -= 1` (or += 1) on a shared int is a "
            "read-modify-write, and two calls ending together lose one of the updates, "
            "leaking a slot or freeing one twice - give slots back through the semaphore, or "
            "change the count only under the lock", pytrace=False)


def test_two_calls_at_a_half_open_circuit_send_one_probe(mod: Any, learner: Any,
                                                          backends: Any) -> None:
    """Two calls into a half-open circuit, the first held before each line of the
    learner's code in turn while the second runs: at every step, exactly one of them
    reaches the backend. Deciding to probe and marking the probe taken are one step under
    the lock; checked apart, both calls can find no probe in flight and both go through."""
    backend, host = backends["payments"]
    backend.mode = "fail"
    before = backend.hits
    seen = learner.harness().probe_interleavings(mod, host)
    probes = backend.hits - before - 2 - len(seen)   # 2 to count the lines, 1 trip per step
    if probes == len(seen):
        return
    both = [s for s in seen if s.get("first") == s.get("second") == "failed"]
    where = (f"the first held at {both[0]['held_at']} while the second ran: both reached "
             f"the backend (first: {both[0]['first']}, second: {both[0]['second']})" if both
             else "the calls' outcomes: " + "; ".join(
                 f"held at {s['held_at']}: {s.get('first')}, {s.get('second')}"
                 for s in seen[:6]))
    pytest.fail(
        f"two calls into a half-open circuit (the backend failing), the first held before "
        f"each of its lines in turn while the second ran: {probes} probes reached the "
        f"backend over {len(seen)} interleavings, expected {len(seen)} (exactly 1 each) - "
        f"{where}. "
        "Checking that no probe is in flight and marking the probe taken must be one step "
        "under the breaker's lock: apart, a call that arrives between them also finds no "
        "probe, and a recovering service gets more than the one trial call", pytrace=False)


def test_failures_that_end_together_are_all_counted(mod: Any, learner: Any,
                                                    backends: Any) -> None:
    """Calls that fail at the same moment must each be counted: a failure count changed
    outside the lock loses updates, and the circuit stays closed past its threshold."""
    backend, host = backends["payments"]
    cb = mod.CircuitBreaker(failure_threshold=BURST, reset_timeout=30.0, clock=Clock())
    in_flight, outcomes = burst_at_held_backend(mod, learner, cb, backend, host,
                                                mode="hold_fail")
    assert in_flight == BURST, (
        f"{BURST} calls at the same moment into a closed circuit (threshold {BURST}): only "
        f"{in_flight} reached the dependency (outcomes {sorted(outcomes)}): a closed circuit "
        "lets every call through")
    assert outcomes.count("failed") == BURST, (
        f"{BURST} calls that all failed at the dependency ended with {sorted(outcomes)}: "
        "expected each to raise the dependency's error")
    state = cb.state
    assert state == "open", (
        f"{BURST} calls failed at the same moment through a circuit with failure_threshold "
        f"{BURST}, yet the state is {state!r}, expected 'open': some failures were never "
        "counted. `failures += 1` outside the lock is a read-modify-write, and two failures "
        "ending together lose one of the updates - count (and check the threshold) only "
        "under the breaker's lock, or a dependency failing under load never trips it")
