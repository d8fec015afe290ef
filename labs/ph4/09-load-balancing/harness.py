"""Runs where the learner's balancer runs (in its process when grading): two threads call
LeastConnections.acquire() at once, and the first is held INSIDE its choice - while it
looks a backend's count up - until the second has either come inside the choice too (the
choice is not guarded: both may pick the same backend) or is seen blocked waiting (a lock
guards the choice and the +1 together). Nothing depends on how the threads are scheduled:
the held thread is released only after one of the two was observed."""

from __future__ import annotations

import functools
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from labrunner.slow_steps import learner_folder, step_tracer


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


def _blocked_in(thread_id: int, folder: str) -> bool:
    """Whether that thread's innermost Python frame is the learner's code (it called into
    something that blocks, such as a Lock's acquire) and its OS thread sleeps."""
    frame = sys._current_frames().get(thread_id)
    if frame is None or not frame.f_code.co_filename.startswith(folder):
        return False
    native = _natives.get(thread_id)
    try:
        stat = Path(f"/proc/self/task/{native}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "S"


_natives: dict[int, int] = {}


def racing_acquires(module: ModuleType, names: list[str]) -> dict[str, Any]:
    folder = learner_folder(module)
    cond = threading.Condition()
    _Gate.state = {"armed": False, "holder": None, "released": False, "second_inside": False,
                   "cond": cond}
    lb = module.LeastConnections([_Gate(n) for n in names])
    got: dict[str, str] = {}
    errors: list[str] = []

    def call(label: str) -> None:
        _natives[threading.get_ident()] = threading.get_native_id()
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
            if _blocked_in(second.ident or 0, folder):
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
    lines = [0]
    sys.settrace(step_tracer(folder, lambda frame: lines.__setitem__(0, lines[0] + 1)))
    try:
        module.LeastConnections(list(names)).acquire()
    finally:
        sys.settrace(None)
    for k in range(1, lines[0] + 1):
        out = _held_before_line(module, names, folder, k)
        if out.get("errors") or out.get("line") is not None:
            return out
    return {"line": None, "errors": []}


def _hold_first_at_step(folder: str, k: int, make_tracer: Any, first: Any,
                        second: Any, poll: float) -> tuple[str, int] | None:
    """Run ``first()`` on a thread traced by ``make_tracer(folder, hold)`` and hold it at its
    k-th step; then run ``second()`` until it returns or sleeps in the learner's code; let
    the first go on; return where it was held (file, line), or None if it never got there."""
    cond = threading.Condition()
    state: dict[str, Any] = {"seen": 0, "held_at": None, "go": False}

    def hold(frame: Any) -> None:
        state["seen"] += 1
        if state["seen"] == k:
            with cond:
                state["held_at"] = (frame.f_code.co_filename, frame.f_lineno)
                cond.notify_all()
                cond.wait_for(lambda: state["go"], timeout=30)

    def run(body: Any, traced: bool) -> None:
        _natives[threading.get_ident()] = threading.get_native_id()
        if traced:
            sys.settrace(make_tracer(folder, hold))
        try:
            body()
        finally:
            sys.settrace(None)

    held = threading.Thread(target=run, args=(first, True), daemon=True)
    held.start()
    with cond:
        cond.wait_for(lambda: state["held_at"] is not None or not held.is_alive(), timeout=30)
    other = threading.Thread(target=run, args=(second, False), daemon=True)
    other.start()
    blocked = 0
    while other.is_alive() and blocked < 3:  # done, or asleep in the learner's code
        blocked = blocked + 1 if _blocked_in(other.ident or 0, folder) else 0
        other.join(poll)
    with cond:
        state["go"] = True
        cond.notify_all()
    held.join(10)
    other.join(10)
    return state["held_at"]


def _held_before_line(module: ModuleType, names: list[str], folder: str,
                      k: int) -> dict[str, Any]:
    import linecache

    lb = module.LeastConnections(list(names))
    got: dict[str, str] = {}
    errors: list[str] = []

    def call(label: str) -> Any:
        def body() -> None:
            try:
                got[label] = str(lb.acquire())
            except Exception as exc:  # noqa: BLE001 - reported to the test
                errors.append(f"{type(exc).__name__}: {exc}")
        return body

    held_at = _hold_first_at_step(folder, k, step_tracer, call("first"), call("second"), 0.02)
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
OPCODE_TRACER = functools.partial(step_tracer, opcodes=True)


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
    ops = [0]
    lb = module.LeastConnections([backend])
    lb.acquire()
    sys.settrace(OPCODE_TRACER(folder, lambda frame: ops.__setitem__(0, ops[0] + 1)))
    try:
        _count_call(lb, name, backend)
    finally:
        sys.settrace(None)
    return ops[0]


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

    held_at = _hold_first_at_step(folder, k, OPCODE_TRACER, call(held), call(other), 0.01)
    if errors:
        return {"errors": errors}
    return {"count": dict(lb.active()).get(backend), "held_at": held_at}
