"""Harness for ph5.6: what runs where the learner's code runs (a process of its own when
grading: learner.harness()).

:class:`Call` runs a learner's function (``run_saga``) on a thread of its own, and
:class:`Gate` holds a participant's ``do()`` there, before it reaches the test's side: two
orchestrators of one saga can then overlap at a point the test chooses (a hold on the
test's side would stop every callback, the other orchestrator's too).

:class:`Pump` runs a learner's ``ChoreographyService.pump()`` on a thread of its own and
follows the Kafka client calls that thread is inside (a profile hook sees each call into
the C library and its return), so the test knows when pump() is waiting in the producer
(``flush()``, ``poll()``) for acknowledgements the test is holding back at its proxy. What
decides stays on the test's side: which requests reached the proxy, in which order."""

from __future__ import annotations

import sys
import threading
from typing import Any

WAITING_CALLS = ("Producer.flush", "Producer.poll")


class Pump:
    """``service.pump()`` on a thread; :meth:`calls` are the C calls it is inside now."""

    def __init__(self, service: Any) -> None:
        self._lock = threading.Lock()
        self._stack: list[str] = []
        self.outcome: str | None = None  # "returned <n>" or "raised <Type>: <message>"
        self._thread = threading.Thread(target=self._run, args=(service,), daemon=True)
        self._thread.start()

    def _profile(self, _frame: Any, event: str, arg: Any) -> None:
        if event == "c_call":
            owner = getattr(arg, "__self__", None)
            kinds = {k.__name__ for k in type(owner).__mro__}
            kind = "Producer" if "Producer" in kinds else type(owner).__name__
            name = f"{kind}.{getattr(arg, '__name__', '?')}"
            with self._lock:
                self._stack.append(name)
        elif event in ("c_return", "c_exception"):
            with self._lock:
                if self._stack:
                    self._stack.pop()

    def _run(self, service: Any) -> None:
        sys.setprofile(self._profile)
        try:
            outcome = f"returned {service.pump()!r}"
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            outcome = f"raised {type(exc).__name__}: {exc}"
        finally:
            sys.setprofile(None)
        self.outcome = outcome

    def calls(self) -> list[str]:
        """The C calls (``Type.method``) the pump thread is inside, outermost first."""
        with self._lock:
            return list(self._stack)

    def waiting_in_producer(self) -> bool:
        """Whether pump() is inside the producer's flush() or poll() right now."""
        return any(call in WAITING_CALLS for call in self.calls())

    def done(self) -> bool:
        return self.outcome is not None

    def join(self, timeout: float) -> str | None:
        self._thread.join(timeout)
        return self.outcome


class Call:
    """``fn(*args)`` on a thread of its own; :meth:`join` gives how it ended."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.outcome: str | None = None  # "returned <value>" or "raised <Type>: <message>"
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn: Any, args: tuple[Any, ...]) -> None:
        try:
            outcome = f"returned {fn(*args)!r}"
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            outcome = f"raised {type(exc).__name__}: {exc}"
        self.outcome = outcome

    def done(self) -> bool:
        return self.outcome is not None

    def join(self, timeout: float) -> str | None:
        self._thread.join(timeout)
        return self.outcome


class Gate:
    """Holds the first ``do()`` of ``step`` made through :meth:`participants`' wrappers until
    :meth:`release`; the participant itself is called after the hold."""

    def __init__(self, step: str) -> None:
        self.step = step
        self._armed = True
        self._lock = threading.Lock()
        self._arrived = threading.Event()
        self._release = threading.Event()

    def participants(self, inner: dict[str, Any]) -> dict[str, Any]:
        return {name: _Gated(name, part, self) for name, part in inner.items()}

    def hold(self, step: str) -> None:
        with self._lock:
            taken = self._armed and step == self.step
            self._armed = self._armed and not taken
        if taken:
            self._arrived.set()
            self._release.wait(60)

    def arrived(self) -> bool:
        return self._arrived.is_set()

    def release(self) -> None:
        self._release.set()


class _Gated:
    def __init__(self, step: str, inner: Any, gate: Gate) -> None:
        self._step, self._inner, self._gate = step, inner, gate

    def do(self, saga_id: str, order: Any) -> None:
        self._gate.hold(self._step)
        self._inner.do(saga_id, order)

    def undo(self, saga_id: str, order: Any) -> None:
        self._inner.undo(saga_id, order)
