"""The runner against a real lab and real Postgres, with the learner failure modes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from labrunner.catalog import Lab, load_lab
from labrunner.runner import LabResult, run_lab
from labrunner.services.isolation import new_run_id

from .conftest import FIXTURE_PROJECT

LAB_DIR = FIXTURE_PROJECT / "labs" / "ph2" / "05-isolation-levels"


@pytest.fixture(scope="module")
def lab() -> Lab:
    return load_lab(LAB_DIR)


@pytest.fixture
def run(lab: Lab, local_services: object, tmp_path: Path):  # type: ignore[no-untyped-def]
    local_services.ensure(["postgres"])  # type: ignore[attr-defined]
    state = local_services.state_file  # type: ignore[attr-defined]

    def go(source: str, budget: float | None = None) -> LabResult:
        (tmp_path / "answer.py").write_text(source)
        # A run id of its own: xdist runs other tests of this lab at the same time, and
        # the run id names each test's database.
        return run_lab(lab, tmp_path, state, new_run_id(), timeout=budget)

    return go


SOLUTION = (LAB_DIR / "solution" / "answer.py").read_text()


def test_reference_passes_and_starter_fails(lab: Lab, run) -> None:  # type: ignore[no-untyped-def]
    assert run(SOLUTION).outcome == "passed"
    result = run((LAB_DIR / "starter" / "answer.py").read_text())
    assert result.outcome == "failed"
    assert "must ask Postgres for 6 * 7" in result.first_line
    assert [t.outcome for t in result.tests] == ["failed", "passed", "passed"]


def test_wrong_answer_says_expected_and_seen(run) -> None:  # type: ignore[no-untyped-def]
    result = run("def answer(dsn):\n    return 41\n")
    assert result.first_line == "expected 42 from Postgres, saw 41"


def test_syntax_error_names_file_and_line(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = run("def answer(dsn)\n    return 42\n")
    assert result.outcome == "failed"
    assert f"{tmp_path / 'answer.py'}:1: syntax error" in result.first_line


def test_import_error_names_the_line(run) -> None:  # type: ignore[no-untyped-def]
    result = run("import nonexistent_module_xyz\n")
    assert "answer.py:1" in result.first_line
    assert "ModuleNotFoundError" in result.first_line


def test_missing_function_says_what_to_define(run) -> None:  # type: ignore[no-untyped-def]
    assert "define a function answer()" in run("x = 1\n").first_line


def test_infinite_loop_times_out_and_the_lab_still_reports(run) -> None:  # type: ignore[no-untyped-def]
    result = run("def answer(dsn):\n    while True:\n        pass\n")
    assert result.outcome == "timeout"
    assert result.first_line.startswith("timed out after 10.0 s (at answer.py:")
    # The lab stops at its first timeout: later tests are not run, each saying why.
    timed_out = [t for t in result.tests if t.outcome == "timeout"]
    assert sum(1 for t in timed_out if t.message.startswith("not run: ")) == len(timed_out) - 1
    assert result.duration < 30


@pytest.mark.parametrize("trick", [
    "import os\nos._exit(0)\n",
    "import sys\nsys.exit(0)\n",
    "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "print('2 passed in 0.01s')\nimport os\nos._exit(0)\n",
    # Writing fake outcomes to every inherited descriptor: unsigned, so ignored.
    "import os, json\n"
    "for fd in range(3, 64):\n"
    "    try:\n"
    "        os.write(fd, (json.dumps({'body': json.dumps({'nodeid': 'x', 'outcome': "
    "'passed'}), 'mac': '0'}) + '\\n').encode())\n"
    "    except OSError:\n"
    "        pass\n"
    "os._exit(0)\n",
])
def test_early_exit_and_fake_reports_score_failed(run, trick: str) -> None:  # type: ignore[no-untyped-def]
    result = run(trick)
    # A tests process killed by a signal is an error; one that exits early, a failure:
    # never a pass, whatever it reported before.
    assert result.outcome == ("error" if "SIGKILL" in trick else "failed"), result
    assert not any(t.outcome == "passed" and "answer_comes" in t.nodeid for t in result.tests)


def test_a_client_that_crashes_when_freed_at_exit_does_not_cost_the_lab(run) -> None:  # type: ignore[no-untyped-def]
    # A client of a C library kept for the life of the process (a librdkafka producer per
    # cluster, as ph5.1's reference keeps one) can crash the interpreter as it is freed
    # during finalization: SIGSEGV after the session had finished, seen once in CI. The
    # tests process ends without freeing what is left (tests_main), so such an object,
    # here one whose destructor crashes for certain, never runs its destructor.
    result = run(SOLUTION + "\nimport json, os, signal\n"
                 "class CrashesWhenFreed:\n"
                 # (what it calls bound now: module globals may be gone by then)
                 "    def __del__(self, kill=os.kill, me=os.getpid(), sig=signal.SIGSEGV):\n"
                 "        kill(me, sig)\n"
                 "if not hasattr(json, 'held_until_exit'):   # once: each test imports afresh\n"
                 "    json.held_until_exit = CrashesWhenFreed()\n")
    assert result.outcome == "passed", (result.first_line, result.output[-1500:])


def test_a_thread_left_running_costs_the_exit_grace_not_the_budget(run) -> None:  # type: ignore[no-untyped-def]
    # A non-daemon thread keeps the interpreter from exiting after the last test: the
    # runner waits EXIT_GRACE once the session reported its end, then dumps every thread's
    # stack into the output and stops the process. The outcomes already reported stand.
    from labrunner.lab_exit import EXIT_GRACE

    result = run(SOLUTION + "\nimport threading, time\n"
                 "def linger_forever():\n    time.sleep(3600)\n"
                 "threading.Thread(target=linger_forever).start()\n")
    assert result.outcome == "passed", (result.first_line, [t.outcome for t in result.tests],
                                        result.output[-1500:])
    assert EXIT_GRACE <= result.duration < EXIT_GRACE + 15
    assert "linger_forever" in result.output


def test_a_hang_past_the_budget_leaves_every_threads_stack(run) -> None:  # type: ignore[no-untyped-def]
    # SIGALRM blocked: pytest-timeout cannot stop the test, so only the runner's budget
    # ends it. Before it kills the process it asks for every thread's stack: the only
    # trace a CI log keeps of where a rare hang waited.
    result = run("import signal, time\n"
                 "def hang_where_no_alarm_reaches(dsn):\n"
                 "    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})\n"
                 "    time.sleep(3600)\n"
                 "def answer(dsn):\n    hang_where_no_alarm_reaches(dsn)\n", budget=8)
    assert result.outcome == "timeout", (result.first_line, result.output[-1500:])
    assert "hang_where_no_alarm_reaches" in result.output, result.output[-1500:]
    assert result.duration < 8 + 10


def test_missing_learner_folder_is_an_error(lab: Lab, tmp_path: Path) -> None:
    result = run_lab(lab, tmp_path / "nope", None, "test")
    assert result.outcome == "error" and "labrunner init" in result.message


def test_learner_copy_is_not_modified(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run(SOLUTION)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answer.py"]
    shutil.rmtree(tmp_path / "__pycache__", ignore_errors=True)


def test_an_exclusive_lab_never_runs_beside_another() -> None:
    import threading
    import time

    from labrunner.runner import _SharedOrAlone

    gate = _SharedOrAlone()
    active: list[str] = []
    overlaps: list[tuple[str, ...]] = []
    lock = threading.Lock()

    def lab(name: str, alone: bool) -> None:
        with gate.hold(alone):
            with lock:
                active.append(name)
                if alone and len(active) > 1 or any(a.startswith("X") for a in active
                                                    if a != name):
                    overlaps.append(tuple(active))
            time.sleep(0.05)
            with lock:
                active.remove(name)

    threads = [threading.Thread(target=lab, args=(f"{'X' if n % 3 == 0 else 's'}{n}",
                                                 n % 3 == 0)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert overlaps == [], f"an exclusive lab ran beside {overlaps}"
