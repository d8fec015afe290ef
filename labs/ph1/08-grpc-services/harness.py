"""Runs where the learner's UserService runs (in its process when grading): makes every
line of the learner's code take a little while, in the grpc worker threads started
afterwards, so that a WatchUser and an UpdateUsers running at once interleave line by line
as on a loaded server with many cores. A WatchUser that reads the current state in one
step and registers its watcher in another then lets an update fall in between, every
time; with both in one lock section the update waits and nothing changes but the time
taken. The verdict is the test's: it compares what each watch received with what the
updates answered."""

from __future__ import annotations

import linecache
import os
import sys
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from labrunner.slow_steps import asleep_in, learner_folder, step_tracer
from labrunner.slow_steps import restore_new_threads as unstretch
from labrunner.slow_steps import slow_new_threads as stretch_lines

__all__ = ["stretch_lines", "unstretch", "trace_allocations", "retained_bytes", "stop_tracing",
           "AnswersHeld", "CreatesHeld", "handlers_open"]


# ---- UpdateUsers held between an answer and the next call into the learner's code ------

class AnswersHeld:
    """The learner's service, served as it is, except that once UpdateUsers has handed grpc
    an answer, grpc's next call into the learner's response iterator (which resumes a
    generator after its yield) waits until ``resume()``. What the learner's code does after
    answering then has not happened yet, however fast the machine: the test looks at the
    service meanwhile (GetUser, a watch)."""

    _LONGEST = 30.0  # a test that never calls resume() does not hold a thread for ever

    def __init__(self, service: Any) -> None:
        self._service = service
        self._go = threading.Event()

    def __getattr__(self, name: str) -> Any:  # GetUser, WatchUser, CreateUsers: as they are
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._service, name)

    def UpdateUsers(self, request_iterator: Any, context: Any) -> Iterator[Any]:  # noqa: N802
        answers = iter(self._service.UpdateUsers(request_iterator, context))
        while True:
            try:
                answer = next(answers)
            except StopIteration:
                return
            self._go.clear()
            yield answer  # grpc sends it, then asks for the next one: hold that
            self._go.wait(self._LONGEST)

    def resume(self) -> None:
        self._go.set()


# ---- one CreateUsers held at a line of the learner's code while another runs ------------

class CreatesHeld:
    """The learner's service, served as it is, except that the first CreateUsers call after
    ``arm(k)`` runs traced on its grpc thread and waits before its k-th line of the
    learner's code until ``release()``; any other CreateUsers meanwhile runs as it is.
    Trying k = 1, 2, ... until the held call ends before its k-th line holds it at every
    line in turn: between reading a counter and storing it back, between a batch's ids and
    its store. The test reads what both calls answered."""

    _LONGEST = 30.0  # a test that never calls release() does not hold a thread for ever

    def __init__(self, service: Any, module: ModuleType) -> None:
        self._service = service
        self._folder = learner_folder(module)
        self._cond = threading.Condition()
        self._armed = False
        self._k = self._seen = 0
        self._held_at: tuple[str, int, str] | None = None
        self._ended = self._go = False
        self._other: threading.Thread | None = None

    def __getattr__(self, name: str) -> Any:  # GetUser, WatchUser, UpdateUsers: as they are
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._service, name)

    def arm(self, k: int) -> None:
        with self._cond:
            self._armed, self._k, self._seen = True, k, 0
            self._held_at, self._ended, self._go = None, False, False

    def CreateUsers(self, request_iterator: Any, context: Any) -> Any:  # noqa: N802
        with self._cond:
            held, self._armed = self._armed, False
        if not held:
            self._other = threading.current_thread()
            return self._service.CreateUsers(request_iterator, context)
        sys.settrace(step_tracer(self._folder, self._step))
        try:
            return self._service.CreateUsers(request_iterator, context)
        finally:
            sys.settrace(None)
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def _step(self, frame: Any) -> None:
        self._seen += 1
        if self._seen != self._k:
            return
        with self._cond:
            name = frame.f_code.co_filename
            self._held_at = (os.path.basename(name), frame.f_lineno,
                             linecache.getline(name, frame.f_lineno).strip())
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._go, self._LONGEST)

    def wait_held(self, timeout: float = 10.0) -> tuple[str, int, str] | None:
        """Where the armed call is held (file, line, its text), or None once it ended
        before its k-th line."""
        with self._cond:
            self._cond.wait_for(lambda: self._held_at is not None or self._ended, timeout)
            return self._held_at

    def other_asleep(self) -> bool:
        """Whether the other CreateUsers sleeps in the learner's code (waiting for a lock
        the held call holds: it can only go on once that one is released)."""
        other = self._other
        return other is not None and asleep_in(other, self._folder)

    def release(self) -> None:
        with self._cond:
            self._go = True
            self._cond.notify_all()


# ---- what the learner's code keeps: allocations made under its frames, still alive ------

def trace_allocations() -> None:
    """Start recording, for every allocation from now on, the stack that made it."""
    import tracemalloc
    tracemalloc.start(_FRAMES)


def retained_bytes(module: ModuleType) -> int:
    """Bytes allocated since trace_allocations() with a line of the learner's folder on the
    stack, and still alive after a full garbage collection."""
    import gc
    import os
    import tracemalloc
    gc.collect()
    folder = os.path.dirname(os.path.abspath(str(module.__file__)))
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(True, os.path.join(folder, "*"), all_frames=True)])
    return sum(stat.size for stat in snapshot.statistics("filename"))


def stop_tracing() -> None:
    import tracemalloc
    tracemalloc.stop()


_FRAMES = 32  # deep enough to reach a learner's handler under grpc's and queue's own frames


def handlers_open(module: ModuleType) -> int:
    """How many calls into the learner's code have not ended yet: threads with a line of the
    learner's folder on their stack, plus generators of the learner's code (a streaming
    handler such as WatchUser) not yet finished, whether running or suspended at a yield.
    Once it is 0 after a stream's cancel, its handler has ended: what the code still holds
    then it keeps for good (the test stops waiting for it to be let go)."""
    import gc
    import os
    import sys
    import types
    folder = os.path.dirname(os.path.abspath(str(module.__file__))) + os.sep
    here = threading.get_ident()
    running = 0
    for ident, frame in sys._current_frames().items():
        if ident == here:
            continue
        walk: Any = frame
        while walk is not None:
            if walk.f_code.co_filename.startswith(folder):
                running += 1
                break
            walk = walk.f_back
    suspended = sum(1 for obj in gc.get_objects()
                    if isinstance(obj, types.GeneratorType) and obj.gi_frame is not None
                    and not obj.gi_running
                    and obj.gi_code.co_filename.startswith(folder))
    return running + suspended
