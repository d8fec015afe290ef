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
