"""Runs where the learner's balancer runs (in its process when grading): two threads call
LeastConnections.acquire() at once, and the first is held INSIDE its choice - while it
looks a backend's count up - until the second has either come inside the choice too (the
choice is not guarded: both may pick the same backend) or is seen blocked waiting (a lock
guards the choice and the +1 together). Nothing depends on how the threads are scheduled:
the held thread is released only after one of the two was observed."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from labrunner.slow_steps import asleep_in, hold_first_at_step, learner_folder, steps_in


class _Gate(str):
    """A backend name that can hold the first thread that hashes it (a dict lookup of the
    backend's count) and notes any other thread that comes to hash it meanwhile."""

    __slots__ = ()
    state: dict[str, Any] = {}

    def __hash__(self) -> int:
        st = _Gate.state
        if st.get("armed"):
            me = threading.get_ident()
            with st["cond"]:
                if st["holder"] is None:
                    st["holder"] = me
                    st["cond"].notify_all()
                    st["cond"].wait_for(lambda: st["released"], timeout=30)
                elif st["holder"] != me:
                    st["second_inside"] = True
                    st["cond"].notify_all()
        return str.__hash__(self)

    def __eq__(self, other: object) -> bool:
        return str.__eq__(self, other)




def racing_acquires(module: ModuleType, names: list[str]) -> dict[str, Any]:
    folder = learner_folder(module)
    cond = threading.Condition()
    _Gate.state = {"armed": False, "holder": None, "released": False, "second_inside": False,
                   "cond": cond}
    lb = module.LeastConnections([_Gate(n) for n in names])
    got: dict[str, str] = {}
    errors: list[str] = []

    def call(label: str) -> None:
        try:
            got[label] = str(lb.acquire())
        except Exception as exc:  # noqa: BLE001 - reported to the test
            errors.append(f"{type(exc).__name__}: {exc}")

    _Gate.state["armed"] = True
    first = threading.Thread(target=call, args=("first",), daemon=True)
    first.start()
    with cond:
        held = cond.wait_for(lambda: _Gate.state["holder"] is not None or not first.is_alive(),
                             timeout=30)
    if _Gate.state["holder"] is None:  # the choice never looks a backend up: cannot judge
        _Gate.state["armed"] = False
        first.join(10)
        return {"judged": False, "got": got, "errors": errors}
    second = threading.Thread(target=call, args=("second",), daemon=True)
    second.start()
    seen_blocked = 0
    with cond:
        while not _Gate.state["second_inside"] and second.is_alive():
            if asleep_in(second, folder):
                seen_blocked += 1
                if seen_blocked >= 3:  # asleep in the learner's code three looks in a row
                    break
            else:
                seen_blocked = 0
            cond.wait(0.02)
        second_inside = _Gate.state["second_inside"]
        _Gate.state["released"] = True
        _Gate.state["armed"] = False
        cond.notify_all()
    first.join(10)
    second.join(10)
    return {"judged": held, "second_inside": second_inside, "got": got, "errors": errors,
            "active": {str(k): v for k, v in dict(lb.active()).items()}}




def stepped_acquires(module: ModuleType, names: list[str]) -> dict[str, Any]:
    """For a choice the gate cannot hold (counts kept in a list, or on backend objects: no
    name is hashed), every interleaving is tried instead, one line at a time: an acquire()
    is traced and held before its k-th line (k = 1, 2, ... up to the number of lines one
    call runs) while a second acquire() runs to its end or is seen blocked; then the first
    goes on. Guarded, the second either waits for the first or runs wholly before its
    choice: the two always get different idle backends. Unguarded, holding the first
    between its choice and its +1 gives both the same one. Returns the first line where
    that happened (its number and text) and what the two got."""
    folder = learner_folder(module)
    lines = steps_in(folder, module.LeastConnections(list(names)).acquire)
    for k in range(1, lines + 1):
        out = _held_before_line(module, names, folder, k)
        if out.get("errors") or out.get("line") is not None:
            return out
    return {"line": None, "errors": []}


def recorded(call: Callable[[], Any], label: str, got: dict[str, str],
             errors: list[str]) -> Callable[[], None]:
    """``call`` as a thread's body: what it returns lands in ``got[label]``, what it raises
    in ``errors`` (reported to the test, not lost on the thread)."""
    def body() -> None:
        try:
            got[label] = str(call())
        except Exception as exc:  # noqa: BLE001 - reported to the test
            errors.append(f"{type(exc).__name__}: {exc}")
    return body


def _held_before_line(module: ModuleType, names: list[str], folder: str,
                      k: int) -> dict[str, Any]:
    import linecache

    lb = module.LeastConnections(list(names))
    got: dict[str, str] = {}
    errors: list[str] = []

    def call(label: str) -> Callable[[], None]:
        return recorded(lb.acquire, label, got, errors)

    held_at = hold_first_at_step(folder, k, call("first"), call("second"), poll=0.02)
    if errors:
        return {"errors": errors}
    if held_at and got.get("first") is not None and got["first"] == got.get("second"):
        file, number = held_at
        return {"line": number, "text": linecache.getline(file, number).strip(), "got": got,
                "errors": []}
    return {"line": None, "errors": []}


COUNT_RACES = (("release", "acquire"), ("acquire", "release"))
# A statement such as ``counts[b] -= 1`` is several bytecodes (load, subtract, store), and
# another thread can run between them: the count races are held per bytecode.


def stepped_count_updates(module: ModuleType, backend: str) -> dict[str, Any]:
    """Every update of the in-flight counts must be one step under the lock. On a
    LeastConnections([backend]) with one request in flight, a release(backend) and an
    acquire() race: one of them is traced and held before its k-th bytecode instruction
    (k = 1, 2, ... up to the number one call runs) while the other runs to its end or is
    seen blocked; then the held one goes on. In any order the count ends at 1; a count
    updated outside the lock (read, preempted, then stored) loses the other's update.
    Returns the first hold that did: which call was held, its line and text, the count."""
    import linecache

    folder = learner_folder(module)
    for held, other in COUNT_RACES:
        for k in range(1, _ops_in(module, folder, held, backend) + 1):
            out = _held_before_op(module, backend, folder, held, other, k)
            if out.get("errors"):
                return out
            if out["count"] != 1:
                file, number = out["held_at"]
                return {"held": held, "other": other, "line": number,
                        "text": linecache.getline(file, number).strip(),
                        "count": out["count"], "errors": []}
    return {"line": None, "errors": []}


def _ops_in(module: ModuleType, folder: str, name: str, backend: str) -> int:
    """How many bytecode instructions of the learner's code one such call runs."""
    lb = module.LeastConnections([backend])
    lb.acquire()
    return steps_in(folder, lambda: _count_call(lb, name, backend), opcodes=True)


def _count_call(lb: Any, name: str, backend: str) -> None:
    if name == "release":
        lb.release(backend)
    else:
        lb.acquire()


def _held_before_op(module: ModuleType, backend: str, folder: str, held: str, other: str,
                    k: int) -> dict[str, Any]:
    lb = module.LeastConnections([backend])
    lb.acquire()
    errors: list[str] = []

    def call(name: str) -> Any:
        def body() -> None:
            try:
                _count_call(lb, name, backend)
            except Exception as exc:  # noqa: BLE001 - reported to the test
                errors.append(f"{name}(): {type(exc).__name__}: {exc}")
        return body

    held_at = hold_first_at_step(folder, k, call(held), call(other), opcodes=True,
                                 poll=0.01)
    if errors:
        return {"errors": errors}
    return {"count": dict(lb.active()).get(backend), "held_at": held_at}


def stepped_picks(module: ModuleType, names: list[str]) -> dict[str, Any]:
    """RoundRobin.pick() from two threads, every interleaving: one pick() is held before
    its k-th bytecode instruction (k = 1, 2, ... up to the number one call runs) while a
    second runs to its end or is seen blocked; then the held one goes on and a third pick()
    follows. Over idle backends a, b, c the three picks are a, b, c in some order whatever
    the interleaving, if the read of the index and its advance are one step under a lock;
    otherwise both threads read the same index (the same backend twice) or one advance is
    lost. Returns the first hold that broke it: its line and text, and the three picks."""
    folder = learner_folder(module)
    # pick()'s own steps: a balancer made outside the count, as each round's is
    ops = steps_in(folder, module.RoundRobin(list(names)).pick, opcodes=True)
    for held_at, got, _after, errors in _three_picks(
            folder, ops, lambda: module.RoundRobin(list(names)), opcodes=True, then=0):
        if errors:
            return {"errors": errors}
        if held_at and sorted(got.values()) != sorted(names):
            return {**_where(held_at), "got": got, "errors": []}
    return {"line": None, "errors": []}


def stepped_weighted_picks(module: ModuleType, weights: dict[str, int]) -> dict[str, Any]:
    """SmoothWeightedRoundRobin.pick() from two threads, every interleaving a line apart:
    one pick() is held before its k-th line while a second runs to its end or is seen
    blocked, then the held one goes on, a third pick() follows and then one more period.
    With equal weights the three picks are each backend once, in some order, and the
    period after them is the sequence from the start (every current value is back at 0) -
    if the adds, the choice and the subtraction are one step under a lock. Returns the
    first hold that broke it: its line and text, the three picks and the period after."""
    folder = learner_folder(module)
    lines = steps_in(folder, module.SmoothWeightedRoundRobin(dict(weights)).pick)
    names = list(weights)
    for held_at, got, after, errors in _three_picks(
            folder, lines, lambda: module.SmoothWeightedRoundRobin(dict(weights)),
            opcodes=False, then=len(names)):
        if errors:
            return {"errors": errors}
        if held_at and (sorted(got.values()) != sorted(names) or after != names):
            return {**_where(held_at), "got": got, "after": after, "errors": []}
    return {"line": None, "errors": []}


def _where(held_at: tuple[str, int]) -> dict[str, Any]:
    import linecache

    file, number = held_at
    return {"line": number, "text": linecache.getline(file, number).strip()}


def _three_picks(folder: str, steps: int, make: Callable[[], Any], *, opcodes: bool,
                 then: int) -> Iterator[tuple[Any, dict[str, str], list[str], list[str]]]:
    """For k = 1 .. steps, on a balancer of its own: a first pick() held before its k-th
    step while a second runs, then a third pick() and ``then`` more. Yields where the first
    was held, the three picks, the ones after and what any pick raised."""
    for k in range(1, steps + 1):
        lb = make()
        got: dict[str, str] = {}
        errors: list[str] = []
        first, second, third = (recorded(lb.pick, label, got, errors)
                                for label in ("first", "second", "third"))
        held_at = hold_first_at_step(folder, k, first, second, opcodes=opcodes, poll=0.01)
        third()
        later: dict[str, str] = {}
        for i in range(then if not errors else 0):
            recorded(lb.pick, str(i), later, errors)()
        yield held_at, got, [later.get(str(i), "?") for i in range(then)], errors
