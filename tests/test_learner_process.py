"""The learner's code in a process of its own (grading's mode): what crosses the boundary,
and what the learner's side can never reach of the verification. Real processes, real RPC."""

from __future__ import annotations

import datetime
import decimal
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labrunner.learner_process import LearnerCodeError, LearnerHost, RemoteModule

LEARNER = '''
import os
import sys
import threading


class Refused(ValueError):
    pass


class Overdrawn(Refused):
    pass


class Account:
    def __init__(self, balance):
        self.balance = balance

    def withdraw(self, amount):
        if amount > self.balance:
            raise Overdrawn(f"balance {self.balance} < {amount}")
        self.balance -= amount
        return self.balance


class AlwaysEqual(dict):
    def __eq__(self, other):
        return True


def summary(values):
    return {"n": len(values), "total": sum(values), "tags": {"a", "b"}, "pair": (1, [2])}


def typed(when, amount, where):
    return when + datetime.timedelta(days=1), amount * 2, where / "x"


def cheat():
    return AlwaysEqual(answer=41)


def call_back(fn, value):
    return fn(value) + 1


def wrap_failure(fn):
    try:
        fn()
    except KeyError as exc:
        raise Refused("wrapped") from exc


def fake_skip():
    import _pytest.outcomes
    raise _pytest.outcomes.Skipped("skip me")


def reach(obj, fn, gen):
    """Every way out of a handed-over object: each must be refused."""
    reached = {}
    for name, get in {
        "class": lambda: obj.__class__,
        "dict": lambda: obj.__dict__,
        "globals": lambda: fn.__globals__,
        "closure": lambda: fn.__closure__,
        "frame": lambda: gen.gi_frame,
        "private": lambda: obj._secret,
    }.items():
        try:
            reached[name] = repr(get())
        except Exception as exc:
            reached[name] = "refused: " + type(exc).__name__
    return reached


def set_attributes(obj):
    obj.public = "changed"              # an existing data attribute: allowed
    refused = []
    for name, value in (("new_one", 1), ("method", lambda: "forged"), ("_secret", "x")):
        try:
            setattr(obj, name, value)
        except Exception as exc:
            refused.append(name)
    return refused


def whoami():
    had_pytest = "_pytest.runner" in sys.modules
    import labrunner.plugin as plugin
    return os.getpid(), plugin._reporter is None, had_pytest


def spin():
    while True:
        pass
'''


@pytest.fixture
def module(tmp_path: Path) -> Iterator[Any]:
    (tmp_path / "mine.py").write_text("import datetime\n" + textwrap.dedent(LEARNER))
    host = LearnerHost.start("spawn")
    try:
        yield host.load(tmp_path, "mine", "learner_test_mine_0")
    finally:
        host.close()


class Holder:
    def __init__(self) -> None:
        self._secret = "key"
        self.public = "ok"

    def method(self) -> str:
        return "real"


def test_the_module_lives_in_another_process_without_the_reporter(module: Any) -> None:
    assert isinstance(module, RemoteModule)
    pid, no_reporter, has_pytest_runner = module.whoami()
    assert pid != os.getpid()
    assert no_reporter
    assert not has_pytest_runner


def test_plain_data_and_value_types_are_copied(module: Any) -> None:
    got = module.summary([1, 2, 3])
    assert type(got) is dict and type(got["tags"]) is set and type(got["pair"]) is tuple
    assert got == {"n": 3, "total": 6, "tags": {"a", "b"}, "pair": (1, [2])}
    when = datetime.datetime(2024, 5, 1, 12, tzinfo=datetime.UTC)
    later, double, path = module.typed(when, decimal.Decimal("1.25"), Path("/tmp"))
    assert later == when + datetime.timedelta(days=1)
    assert double == decimal.Decimal("2.50") and path == Path("/tmp/x")


def test_only_exact_builtin_containers_are_copied(module: Any) -> None:
    # A dict subclass (here one whose __eq__ always says yes) is the learner's object: it
    # stays over there, and a test can tell it is not data it can trust.
    assert type(module.cheat()) is not dict


def test_classes_instances_and_exceptions_cross(module: Any) -> None:
    assert isinstance(module.Account, type)
    account = module.Account(10)
    assert account.withdraw(3) == 7
    with pytest.raises(module.Overdrawn) as caught:
        account.withdraw(100)
    assert isinstance(caught.value, module.Refused)
    assert isinstance(caught.value, ValueError)         # the builtin base is kept
    assert str(caught.value) == "balance 7 < 100"
    with pytest.raises(module.Refused) as wrapped:
        module.wrap_failure(lambda: {}["missing"])
    assert isinstance(wrapped.value.__cause__, KeyError)


def test_callbacks_run_in_the_verification(module: Any) -> None:
    seen: list[int] = []

    def record(value: int) -> int:
        seen.append(value)
        return value * 10

    assert module.call_back(record, 4) == 41
    assert seen == [4]


def test_pytest_outcomes_cannot_be_raised_from_the_learner_side(module: Any) -> None:
    with pytest.raises(BaseException) as caught:
        module.fake_skip()
    # pytest names its outcome classes "builtins.Skipped"; none is found under that name, so
    # the learner's "skip" is a class of its own, which pytest scores as a failure.
    assert not isinstance(caught.value, pytest.skip.Exception)


def test_nothing_leads_from_a_handed_over_object_to_the_verification(module: Any) -> None:
    def gen() -> Iterator[int]:
        yield 1

    reached = module.reach(Holder(), test_callbacks_run_in_the_verification, gen())
    assert reached == {name: "refused: AttributeError" for name in reached}, reached


def test_the_learner_sets_existing_attributes_only(module: Any) -> None:
    holder = Holder()
    assert module.set_attributes(holder) == ["new_one", "method", "_secret"]
    assert holder.public == "changed"
    assert holder.method() == "real" and holder._secret == "key"
    assert not hasattr(holder, "new_one")


def test_an_infinite_loop_is_stopped_by_closing_the_host(tmp_path: Path) -> None:
    import signal

    (tmp_path / "mine.py").write_text("import datetime\n" + textwrap.dedent(LEARNER))
    host = LearnerHost.start("spawn")
    module = host.load(tmp_path, "mine", "learner_test_mine_1")

    def alarm(*_: Any) -> None:
        raise TimeoutError("timed out")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(1)
    try:
        with pytest.raises(TimeoutError):
            module.spin()
    finally:
        signal.signal(signal.SIGALRM, previous)
        host.close()


def test_a_broken_module_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("x = 1\ndef f(:\n")
    host = LearnerHost.start("spawn")
    try:
        with pytest.raises(LearnerCodeError, match=r"broken.py:2: syntax error"):
            host.load(tmp_path, "broken", "learner_test_broken_0")
    finally:
        host.close()
