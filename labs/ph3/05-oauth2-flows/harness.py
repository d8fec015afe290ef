"""Harness for ph3.5: the injected clock, made where the learner's app runs (a process of
its own when grading: learner.harness()).

The app calls ``clock()`` on every request. A clock living on the test's side would be a
call back into the tests process, and such callbacks are answered one at a time: a first
request held inside ``clock()`` would hold up the second request's ``clock()`` too, and the
race the test drives (two redemptions of one code at once) would never run. Held here, the
first request waits in its own thread while the second runs to its end. The test only sets
the time and arms the hold; what it decides on (how many tokens came back) it reads from
its own HTTP replies."""

from __future__ import annotations

import threading


class HeldClock:
    """``clock()`` for the learner's app: the time the test sets, and, when armed, the next
    call stops until ``release()`` (or 30 s)."""

    def __init__(self, now: float) -> None:
        self._now = now
        self._lock = threading.Lock()
        self._armed = False
        self._skip = 0
        self._arrived = threading.Event()
        self._release = threading.Event()

    def __call__(self) -> float:
        with self._lock:
            held = self._armed and self._skip == 0
            if self._armed and self._skip:
                self._skip -= 1
            elif held:
                self._armed = False
        if held:
            self._arrived.set()
            self._release.wait(timeout=30)
        return self._now

    def read(self) -> float:
        return self._now

    def set(self, now: float) -> None:
        self._now = float(now)

    def arm(self, skip: int = 0) -> None:
        """Hold the next call, or the one after ``skip`` more calls (a request's second or
        third clock() call); until then arrived() is False."""
        self._arrived.clear()
        self._release.clear()
        with self._lock:
            self._armed, self._skip = True, skip

    def disarm(self) -> None:
        with self._lock:
            self._armed = False

    def arrived(self) -> bool:
        return self._arrived.is_set()

    def release(self) -> None:
        self.disarm()
        self._release.set()
