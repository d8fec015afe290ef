"""hold_first_at_step, the one-interleaving-at-a-time driver of ph4.9's races: it holds the
first call at its k-th step while the second runs, and returns at once when the first call
ends before it ever reaches step k."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path
from types import ModuleType

from labrunner.slow_steps import hold_first_at_step, learner_folder, steps_in

COUNTER = """import threading


class Counter:
    def __init__(self):
        self.lock = threading.Lock()
        self.value = 0

    def bump(self):
        with self.lock:
            seen = self.value
            self.value = seen + 1
            return seen
"""


def counter_module(tmp_path: Path) -> ModuleType:
    folder = tmp_path / "learner"
    folder.mkdir()
    (folder / "counter.py").write_text(COUNTER)
    spec = importlib.util.spec_from_file_location("learner_counter", folder / "counter.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_call_held_inside_its_lock_makes_the_other_wait(tmp_path: Path) -> None:
    module = counter_module(tmp_path)
    folder = learner_folder(module)
    counter = module.Counter()
    steps = steps_in(folder, counter.bump)
    got: dict[str, int] = {}
    second_started = threading.Event()

    def first() -> None:
        got["first"] = counter.bump()

    def second() -> None:
        second_started.set()
        got["second"] = counter.bump()

    held_at = hold_first_at_step(folder, steps, first, second, poll=0.01)
    assert held_at is not None and held_at[0].endswith("counter.py")
    assert second_started.is_set() and got == {"first": 1, "second": 2}, got


def test_a_call_that_ends_before_step_k_is_not_waited_for(tmp_path: Path) -> None:
    """k past the call's last step: the first call ends unheld, and the driver goes on at
    once - not after 2 x patience, as it did when the first call ended after the driver
    had begun to wait for it to be held (a first() that takes 0.2 s forces that order)."""
    module = counter_module(tmp_path)
    folder = learner_folder(module)
    ran: list[str] = []
    started = time.monotonic()
    held_at = hold_first_at_step(folder, 1, lambda: time.sleep(0.2),
                                 lambda: ran.append("second"), poll=0.01, patience=10)
    took = time.monotonic() - started
    assert held_at is None and ran == ["second"]
    assert took < 5, f"the driver waited {took:.1f} s for a call that had already ended"
