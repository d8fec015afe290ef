"""Runs where the learner's balancer runs (in its process when grading): two threads call
LeastConnections.acquire() at once, and the first is held INSIDE its choice - while it
looks a backend's count up - until the second has either come inside the choice too (the
choice is not guarded: both may pick the same backend) or is seen blocked waiting (a lock
guards the choice and the +1 together). Nothing depends on how the threads are scheduled:
the held thread is released only after one of the two was observed."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any


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
    folder = str(Path(module.__file__ or "").parent).rstrip("/") + "/"
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




def _tracer(folder: str, on_line: Any) -> Any:
    """A sys.settrace function calling ``on_line(frame)`` before each line of code under
    ``folder`` (the learner's) runs."""
    def trace(frame: Any, event: str, arg: Any) -> Any:
        if not frame.f_code.co_filename.startswith(folder):
            return None

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "line":
                on_line(frame)
            return local
        return local
    return trace


def stepped_acquires(module: ModuleType, names: list[str]) -> dict[str, Any]:
    """For a choice the gate cannot hold (counts kept in a list, or on backend objects: no
    name is hashed), every interleaving is tried instead, one line at a time: an acquire()
    is traced and held before its k-th line (k = 1, 2, ... up to the number of lines one
    call runs) while a second acquire() runs to its end or is seen blocked; then the first
    goes on. Guarded, the second either waits for the first or runs wholly before its
    choice: the two always get different idle backends. Unguarded, holding the first
    between its choice and its +1 gives both the same one. Returns the first line where
    that happened (its number and text) and what the two got."""
    folder = str(Path(module.__file__ or "").parent).rstrip("/") + "/"
    lines = [0]
    sys.settrace(_tracer(folder, lambda frame: lines.__setitem__(0, lines[0] + 1)))
    try:
        module.LeastConnections(list(names)).acquire()
    finally:
        sys.settrace(None)
    for k in range(1, lines[0] + 1):
        out = _held_before_line(module, names, folder, k)
        if out.get("errors") or out.get("line") is not None:
            return out
    return {"line": None, "errors": []}


def _held_before_line(module: ModuleType, names: list[str], folder: str,
                      k: int) -> dict[str, Any]:
    import linecache

    lb = module.LeastConnections(list(names))
    cond = threading.Condition()
    state: dict[str, Any] = {"seen": 0, "held_at": None, "go": False}
    got: dict[str, str] = {}
    errors: list[str] = []

    def hold(frame: Any) -> None:
        state["seen"] += 1
        if state["seen"] == k:
            with cond:
                state["held_at"] = (frame.f_code.co_filename, frame.f_lineno)
                cond.notify_all()
                cond.wait_for(lambda: state["go"], timeout=30)

    def call(label: str, traced: bool) -> None:
        _natives[threading.get_ident()] = threading.get_native_id()
        if traced:
            sys.settrace(_tracer(folder, hold))
        try:
            got[label] = str(lb.acquire())
        except Exception as exc:  # noqa: BLE001 - reported to the test
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            sys.settrace(None)

    first = threading.Thread(target=call, args=("first", True), daemon=True)
    first.start()
    with cond:
        cond.wait_for(lambda: state["held_at"] is not None or not first.is_alive(), timeout=30)
    second = threading.Thread(target=call, args=("second", False), daemon=True)
    second.start()
    blocked = 0
    while second.is_alive() and blocked < 3:  # done, or asleep in the learner's code
        blocked = blocked + 1 if _blocked_in(second.ident or 0, folder) else 0
        second.join(0.02)
    with cond:
        state["go"] = True
        cond.notify_all()
    first.join(10)
    second.join(10)
    if errors:
        return {"errors": errors}
    if state["held_at"] and got.get("first") is not None and got["first"] == got.get("second"):
        file, number = state["held_at"]
        return {"line": number, "text": linecache.getline(file, number).strip(), "got": got,
                "errors": []}
    return {"line": None, "errors": []}
