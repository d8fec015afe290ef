"""The command line, run as a user runs it: a real process, real services."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import FIXTURE_PROJECT, cli_env

LABRUNNER = [sys.executable, "-m", "labrunner.cli"]


def cli(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LABRUNNER, *args], capture_output=True, text=True, cwd=cwd,
                          env=cli_env(**env), timeout=300)


def test_list_json_has_80_concepts_in_8_phases() -> None:
    done = cli("list", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["version"] == 1
    assert len(doc["phases"]) == 8
    assert sum(len(p["concepts"]) for p in doc["phases"]) == 80


def test_unknown_selector_exits_2_with_suggestions() -> None:
    done = cli("run", "isolaton-levels", "--solutions")
    assert done.returncode == 2
    assert "isolation-levels" in done.stderr


def test_run_outside_a_workspace_says_how_to_make_one(tmp_path: Path) -> None:
    done = cli("run", "ph2.5", cwd=tmp_path, LABRUNNER_HOME=str(FIXTURE_PROJECT))
    assert done.returncode == 2
    assert "labrunner init" in done.stderr


def test_workspace_flow_progress_and_reports(tmp_path: Path) -> None:
    home = {"LABRUNNER_HOME": str(FIXTURE_PROJECT)}
    ws = tmp_path / "ws"
    assert cli("init", str(ws), **home).returncode == 0
    learner_file = ws / "ph2" / "05-isolation-levels" / "answer.py"
    assert "NotImplementedError" in learner_file.read_text()

    failed = cli("run", "ph2.5", "--json", str(tmp_path / "r.json"), "--junit",
                 str(tmp_path / "j.xml"), cwd=ws, **home)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    assert "must ask Postgres for 6 * 7" in doc["concepts"][0]["message"]
    assert "NotImplementedError" in failed.stdout
    assert doc["version"] == 1 and doc["status"] == "fail"
    assert doc["concepts"][0]["status"] == "failed"
    assert "<testsuites" in (tmp_path / "j.xml").read_text()

    # init again never overwrites the learner's work
    learner_file.write_text((FIXTURE_PROJECT / "labs/ph2/05-isolation-levels/solution/"
                             "answer.py").read_text())
    assert cli("init", str(ws), **home).returncode == 0
    assert "psycopg" in learner_file.read_text()

    passed = cli("run", "isolation-levels", cwd=ws, **home)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert passed.stdout.startswith("✓ ph2.5 isolation-levels")  # streamed as it finished

    progress = json.loads(cli("progress", "--json", cwd=ws, **home).stdout)
    assert progress["done"] == 1 and progress["total"] == 80
    assert progress["concepts"]["ph2.5"] == {"state": "done", "attempts": 2}

    learner_file.write_text("def answer(dsn):\n    return 0\n")
    assert cli("run", "ph2.5", cwd=ws, **home).returncode == 1
    progress = json.loads(cli("progress", "--json", cwd=ws, **home).stdout)
    assert progress["concepts"]["ph2.5"]["state"] == "regressed"
    page = cli("progress", cwd=ws, **home).stdout
    assert "regressed" in page and "0 of 3 available concepts done (80 in the roadmap)" in page

    hints = cli("hint", "ph2.5", cwd=ws, **home)
    assert "Hint 1/2" in hints.stdout and "Hint 2/2" in hints.stdout


def test_hint_unknown_concept_exits_2() -> None:
    assert cli("hint", "ph9.9").returncode == 2


def test_doctor_names_the_backend() -> None:
    done = cli("doctor")
    assert "backend (auto)" in done.stdout
    assert "local postgres" in done.stdout


def _verification_running(test_file: str, runtime: Path) -> list[str]:
    """The verification of ``test_file`` by the run in ``runtime`` (its pytest.ini is there):
    not a run of the same lab by another test at the same moment, nor by anything else."""
    return [p for p in _processes_mentioning(test_file)
            if str(FIXTURE_PROJECT) in p and str(runtime) in p]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmd:
            found.append(f"{entry.name}: {cmd[:400]}")
    return found


@pytest.mark.parametrize(("selector", "test_file"), [
    ("ph2.6", "test_deadlocks.py"),     # Postgres and Redis
    ("ph5.1", "test_why_events.py"),    # the Kafka JVM, a RabbitMQ node and its epmd
])
def test_ctrl_c_mid_run_leaves_nothing_behind(selector: str, test_file: str) -> None:
    runtime = Path(tempfile.mkdtemp(prefix="lr-ctrlc-", dir="/tmp"))
    os.chmod(runtime, 0o755)
    env = cli_env(LABRUNNER_HOME=str(FIXTURE_PROJECT), LABRUNNER_RUNTIME_DIR=str(runtime))
    proc = subprocess.Popen([*LABRUNNER, "run", selector, "--solutions", "--backend", "local"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120

        # Wait until the verification itself is running (services up, pytest in the test).
        while time.monotonic() < deadline and not _verification_running(test_file, runtime):
            time.sleep(0.2)
        assert _verification_running(test_file, runtime), "the verification never started"
        time.sleep(1.0)
        # Processes that do not name the runtime dir on their command line (our private epmd).
        state = json.loads(next(runtime.glob("run-*/state.json")).read_text())
        private = [f"-port {ep['extra']['epmd_port']} " for ep in state["services"].values()
                   if "epmd_port" in ep["extra"]]
        assert all(_processes_mentioning(p) for p in private)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, out
        assert "interrupted" in out
        time.sleep(0.5)
        assert _processes_mentioning(str(runtime)) == []
        assert _verification_running(test_file, runtime) == []
        for marker in private:
            assert _processes_mentioning(marker) == [], f"epmd ({marker}) left running"
        leftovers = [p.name for p in runtime.iterdir() if p.name.startswith("run-")]
        assert leftovers == [], leftovers
    finally:  # a failed check must not leave the run, its services or its folder
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        cli("services", "down", LABRUNNER_HOME=str(FIXTURE_PROJECT),
            LABRUNNER_RUNTIME_DIR=str(runtime))
        subprocess.run(["rm", "-rf", str(runtime)], check=False)


@pytest.mark.parametrize("selector", ["ph2.5"])
def test_solutions_and_starters_flags(selector: str) -> None:
    home = {"LABRUNNER_HOME": str(FIXTURE_PROJECT)}
    assert cli("run", selector, "--solutions", **home).returncode == 0
    starters = cli("run", selector, "--starters", **home)
    assert starters.returncode == 1
    assert cli("run", selector, "--starters", "--expect-fail", **home).returncode == 0


def _private_runtime() -> Path:
    runtime = Path(tempfile.mkdtemp(prefix="lr-warm-", dir="/tmp"))
    os.chmod(runtime, 0o755)
    return runtime


def test_warm_set_is_reused_and_down_stops_it() -> None:
    runtime = _private_runtime()
    env = {"LABRUNNER_HOME": str(FIXTURE_PROJECT), "LABRUNNER_RUNTIME_DIR": str(runtime)}
    try:
        up = cli("services", "up", "postgres", "--backend", "local", **env)
        assert up.returncode == 0, up.stderr
        status = json.loads(cli("services", "status", "--json", **env).stdout)
        [pg] = status["services"]
        assert pg["service"] == "postgres" and pg["alive"] and pg["kind"] == "warm"
        # A run reuses the warm Postgres: no "starting postgres" and it stays up afterwards.
        run = cli("run", "ph2.5", "--solutions", "--backend", "local", **env)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "starting postgres" not in run.stderr
        assert json.loads(cli("services", "status", "--json", **env).stdout)["services"][0][
            "alive"]
        down = cli("services", "down", **env)
        assert "local:postgres" in down.stdout
        assert json.loads(cli("services", "status", "--json", **env).stdout)["services"] == []
        assert _processes_mentioning(str(runtime)) == []
    finally:
        cli("services", "down", **env)
        subprocess.run(["rm", "-rf", str(runtime)], check=False)


def test_down_clears_what_a_killed_run_left() -> None:
    runtime = _private_runtime()
    env = cli_env(LABRUNNER_HOME=str(FIXTURE_PROJECT), LABRUNNER_RUNTIME_DIR=str(runtime))
    proc = subprocess.Popen([*LABRUNNER, "run", "ph2.6", "--solutions", "--backend", "local"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not _verification_running("test_deadlocks.py",
                                                                          runtime):
            time.sleep(0.2)
        # The lab's working folder and temp folder are the run's: swept with it below.
        assert list(runtime.glob("run-*/lr-deadlocks-*/tmp")), list(runtime.rglob("*"))
        os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up
        proc.wait(30)
        assert [p for p in runtime.iterdir() if p.name.startswith("run-")], "nothing left?"
        down = cli("services", "down", LABRUNNER_HOME=str(FIXTURE_PROJECT),
                   LABRUNNER_RUNTIME_DIR=str(runtime))
        assert down.returncode == 0, down.stderr
        time.sleep(0.5)
        assert [p for p in runtime.iterdir() if p.name.startswith("run-")] == []
        assert _processes_mentioning(str(runtime)) == []
    finally:
        subprocess.run(["rm", "-rf", str(runtime)], check=False)


def test_dev_check_strength_lists_each_wrong_solution(tmp_path: Path) -> None:
    """``dev check --strength``: a row per wrong solution, killed or not, with the first line
    of its message; the JSON says the same for scripts; exit 1 when one slips through."""
    import shutil

    project = tmp_path / "project"
    shutil.copytree(FIXTURE_PROJECT, project)
    lab = project / "labs" / "ph2" / "05-isolation-levels"
    (lab / "wrong" / "off_by_one").mkdir(parents=True)
    (lab / "wrong" / "off_by_one" / "answer.py").write_text(
        "def answer(dsn):\n    return 41\n")
    (lab / "wrong" / "answers_without_postgres").mkdir()
    (lab / "wrong" / "answers_without_postgres" / "answer.py").write_text(
        "def answer(dsn):\n    return 6 * 7\n")
    out = tmp_path / "strength.json"
    done = cli("dev", "check", "--strength", "ph2.5", "--json", str(out),
               LABRUNNER_HOME=str(project), COLUMNS="200")
    assert done.returncode == 1, done.stdout + done.stderr
    doc = json.loads(out.read_text())
    rows = {r["wrong"]: r for r in doc["strength"]}
    assert set(rows) == {"off_by_one", "answers_without_postgres"}, rows
    assert rows["off_by_one"]["killed"] is True
    assert "expected 42 from Postgres, saw 41" in rows["off_by_one"]["first_line"]
    assert rows["answers_without_postgres"]["killed"] is False
    assert rows["answers_without_postgres"]["outcome"] == "passed"
    assert doc["labs"] == {"ph2.5": {"wrong": 2, "killed": 1}}
    assert "off_by_one" in done.stdout and "kills 1 of 2" in done.stdout
    assert "solution" not in {r["wrong"] for r in doc["strength"]}


def test_dev_check_runs_the_test_that_failed_a_wrong_solution_first(tmp_path: Path) -> None:
    """``--record-failed-by`` writes which test failed each wrong solution; a later check
    runs that test first (it alone ends the check), and a record gone stale (the test
    passes now) costs a second run in the usual order, never a wrong verdict."""
    import shutil

    project = tmp_path / "project"
    shutil.copytree(FIXTURE_PROJECT, project)
    lab = project / "labs" / "ph2" / "05-isolation-levels"
    for name, source in (("off_by_one", "def answer(dsn):\n    return 41\n"),
                         ("empty", "")):
        (lab / "wrong" / name).mkdir(parents=True)
        (lab / "wrong" / name / "answer.py").write_text(source)

    def failed_by(*extra: str) -> dict[str, str]:
        out = tmp_path / "checks.json"
        done = cli("dev", "check", "ph2.5", "--json", str(out), *extra,
                   LABRUNNER_HOME=str(project), COLUMNS="200")
        assert done.returncode == 0, done.stdout + done.stderr
        return {c["variant"]: c["failed_by"] for c in json.loads(out.read_text())["checks"]
                if c["variant"].startswith("wrong/")}

    in_order = failed_by("--record-failed-by")
    assert in_order == {"wrong/off_by_one": "test_answer_comes_from_postgres",
                        "wrong/empty": "test_answer_comes_from_postgres"}
    table = lab / "wrong" / "failed_by.tsv"
    assert table.read_text() == ("empty\ttest_answer_comes_from_postgres\n"
                                 "off_by_one\ttest_answer_comes_from_postgres\n")
    # The empty file fails test_second_check too: named first, it is the one that ends it.
    # off_by_one passes test_second_check: that stale record falls back to the usual order.
    table.write_text("empty\ttest_second_check\noff_by_one\ttest_second_check\n")
    assert failed_by() == {"wrong/empty": "test_second_check",
                           "wrong/off_by_one": "test_answer_comes_from_postgres"}


def test_a_runtime_dir_that_is_a_file_is_named_not_a_traceback(tmp_path: Path) -> None:
    taken = tmp_path / "not-a-folder"
    taken.write_text("a file where the services' state would go\n")
    for args in (("services", "down"), ("services", "status")):
        done = cli(*args, LABRUNNER_RUNTIME_DIR=str(taken))
        assert done.returncode == 2, (args, done.returncode, done.stderr[-400:])
        assert f"LABRUNNER_RUNTIME_DIR={taken}" in done.stderr.replace("\n", ""), done.stderr
        assert "Traceback" not in done.stderr, done.stderr
    assert taken.read_text() == "a file where the services' state would go\n"


def test_a_wrong_diff_that_drifted_or_does_not_compile_is_refused(tmp_path: Path) -> None:
    """A wrong solution's diff applies exactly or not at all (a hunk moved by patch's fuzz
    can land where it makes another mistake), and a Python file it changes must compile
    (a syntax error would count as a kill that proves nothing)."""
    import difflib
    import shutil

    from labrunner.catalog import load_lab
    from labrunner.devcheck import WrongSolutionError, complete_source

    project = tmp_path / "project"
    shutil.copytree(FIXTURE_PROJECT, project)
    folder = project / "labs" / "ph2" / "05-isolation-levels"
    lab = load_lab(folder)
    reference = (folder / "solution" / "answer.py").read_text()

    def diff(name: str, before: str, after: str) -> Path:
        path = folder / "wrong" / f"{name}.diff"
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(difflib.unified_diff(
            before.splitlines(True), after.splitlines(True), "a/answer.py", "b/answer.py")))
        return path

    wrong = reference.replace("6 * 7", "6 * 6")
    source, cleanup = complete_source(lab, diff("exact", reference, wrong), tmp_path)
    assert (source / "answer.py").read_text() == wrong
    cleanup()
    # Made against a reference whose def line has since changed: patch's fuzz would apply it.
    old = "def answer(dsn: str) -> int:  # an older reference"
    drifted = diff("drifted", reference.replace("def answer(dsn: str) -> int:", old),
                   wrong.replace("def answer(dsn: str) -> int:", old))
    with pytest.raises(WrongSolutionError, match="does not apply exactly"):
        complete_source(lab, drifted, tmp_path)
    broken = diff("broken", reference, reference.replace("int(row[0])", "int(row[0]"))
    with pytest.raises(WrongSolutionError, match="answer.py does not compile once applied"):
        complete_source(lab, broken, tmp_path)
    assert not list(tmp_path.glob("lrwrong-*")), "a refused wrong left its folder behind"
