"""The learner's loop as a learner lives it: a real terminal (tmux) running the real
command, and the smaller paths around it (selectors from a folder, next, reset, a file that
does not parse, a workspace inside a workspace, a C lab's provided files)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from labrunner.catalog import load_catalog

from .conftest import FIXTURE_PROJECT, REPO, cli_env
from .test_cli import cli

HOME = {"LABRUNNER_HOME": str(FIXTURE_PROJECT)}
FIXTURE_LAB = FIXTURE_PROJECT / "labs" / "ph2" / "05-isolation-levels"


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    folder = tmp_path / "ws"
    assert cli("init", str(folder), **HOME).returncode == 0
    return folder


def test_unknown_phase_says_which_phases_exist() -> None:
    done = cli("run", "ph9")
    assert done.returncode == 2
    assert "the phases are ph0 to ph7" in done.stderr
    assert "ph7.9" not in done.stderr


def test_a_workspace_inside_a_workspace_is_refused(ws: Path) -> None:
    done = cli("init", str(ws / "ph2"), **HOME)
    assert done.returncode == 2
    assert f"inside the workspace {ws}" in " ".join(done.stderr.split())
    assert not (ws / "ph2" / "labrunner.toml").exists()


def test_a_file_that_does_not_parse_fails_before_any_service_starts(ws: Path) -> None:
    (ws / "ph2" / "05-isolation-levels" / "answer.py").write_text("def answer(dsn)\n")
    started = time.monotonic()
    done = cli("run", ".", cwd=ws / "ph2" / "05-isolation-levels", **HOME)
    assert done.returncode == 1
    assert "answer.py:1: syntax error" in done.stdout
    assert "starting postgres" not in done.stderr
    assert time.monotonic() - started < 20


def test_no_selector_outside_a_lab_folder_says_what_to_name(ws: Path) -> None:
    done = cli("run", cwd=ws, **HOME)
    assert done.returncode == 2
    assert "name what to run" in done.stderr


def test_folder_names_and_no_selector_inside_a_lab_folder(ws: Path) -> None:
    lab = ws / "ph2" / "05-isolation-levels"
    shutil.copy(FIXTURE_LAB / "solution" / "answer.py", lab / "answer.py")
    by_folder = cli("run", "05-isolation-levels", cwd=ws, **HOME)
    assert by_folder.returncode == 0, by_folder.stdout + by_folder.stderr
    inside = cli("run", "-v", cwd=lab, **HOME)
    assert inside.returncode == 0, inside.stdout + inside.stderr
    assert inside.stdout.startswith("✓ ph2.5")
    assert "✓ test_answer_comes_from_postgres" in inside.stdout  # -v lists every test


def test_verbose_shows_where_the_code_failed_and_what_it_printed(ws: Path,
                                                                tmp_path: Path) -> None:
    (ws / "ph2" / "05-isolation-levels" / "answer.py").write_text(
        "def answer(dsn):\n    print('checking', 'the dsn')\n    return 1 // 0\n")
    done = cli("run", "ph2.5", "-v", "--json", str(tmp_path / "r.json"), "--junit",
               str(tmp_path / "r.xml"), cwd=ws, **HOME)
    assert done.returncode == 1
    first = done.stdout.splitlines()[0]
    assert "ZeroDivisionError" in first and "(at answer.py:3 in answer)" in first, done.stdout
    assert "return 1 // 0" in done.stdout
    assert "checking the dsn" in done.stdout
    doc = json.loads((tmp_path / "r.json").read_text())
    assert any("checking the dsn" in t.get("output", "") for t in doc["concepts"][0]["tests"])
    assert "checking the dsn" in (tmp_path / "r.xml").read_text()


def test_next_and_reset(ws: Path) -> None:
    done = cli("next", cwd=ws, **HOME)
    assert done.returncode == 0, done.stderr
    assert "next: ph2.5 isolation-levels" in done.stdout
    assert str(ws / "ph2" / "05-isolation-levels" / "README.md") in "".join(done.stdout.split())

    mine = ws / "ph2" / "05-isolation-levels" / "answer.py"
    mine.write_text("# my attempt\n")
    reset = cli("reset", "ph2.5", cwd=ws, **HOME)
    assert reset.returncode == 0, reset.stderr
    assert mine.read_text() == (FIXTURE_LAB / "starter" / "answer.py").read_text()
    backups = list((ws / ".labrunner" / "backups").glob("ph2.5-*/answer.py"))
    assert [b.read_text() for b in backups] == ["# my attempt\n"]


def test_c_labs_get_the_driver_and_headers_their_readme_names(tmp_path: Path) -> None:
    catalog = load_catalog()
    assert cli("init", str(tmp_path / "real")).returncode == 0
    c_labs = [lab for lab in catalog.labs if lab.language == "c"]
    assert c_labs
    for lab in c_labs:
        folder = tmp_path / "real" / lab.workspace_dir
        readme = (lab.path / "README.md").read_text()
        for provided in lab.path.iterdir():
            if provided.suffix in (".c", ".h") and provided.name not in lab.learner_files:
                assert (folder / provided.name).is_file(), f"{lab.id}: {provided.name} missing"
                if provided.name in readme:
                    assert (folder / provided.name).read_bytes() == provided.read_bytes()


# --------------------------------------------------------------------------------------
# A real terminal


TMUX = shutil.which("tmux")


class Terminal:
    def __init__(self, name: str, cwd: Path, env: dict[str, str]) -> None:
        assert TMUX is not None
        self.name = name
        subprocess.run([TMUX, "new-session", "-d", "-s", name, "-x", "160", "-y", "50", "-c",
                        str(cwd), "bash --norc --noprofile"], check=True, env=env)

    def type(self, line: str) -> None:
        subprocess.run([TMUX, "send-keys", "-t", self.name, line, "Enter"], check=True)

    def screen(self) -> str:
        return subprocess.run([TMUX, "capture-pane", "-p", "-J", "-S", "-200", "-t", self.name],
                              capture_output=True, text=True, check=True).stdout

    def wait_for(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.3)
        raise AssertionError(f"waited {timeout:.0f} s for {text!r}; the screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run([TMUX, "kill-session", "-t", self.name], check=False)


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed (scripts/setup.sh installs it)")
def test_a_learner_session_in_a_terminal(tmp_path: Path) -> None:
    """init, cd, run (fails with file:line), fix, watch turns green on save, next."""
    bin_dir = Path(sys.executable).parent
    # Services run as an unprivileged user when we are root: their folder must be reachable.
    runtime = Path(tempfile.mkdtemp(prefix="lr-term-", dir="/tmp"))
    os.chmod(runtime, 0o755)
    # As a learner has it: the services a command started stay warm for the next one (run,
    # then watch), in this test's own runtime folder; `services down` ends them.
    env = cli_env(PATH=f"{bin_dir}:{os.environ['PATH']}", LABRUNNER_HOME=str(REPO),
                  LABRUNNER_RUNTIME_DIR=str(runtime), TERM="xterm-256color",
                  HOME=str(tmp_path), LABRUNNER_WARM_IDLE="600")
    term = Terminal(f"lr-{os.getpid()}", tmp_path, env)
    try:
        term.type("labrunner init backend-labs && cd backend-labs/ph2/05-isolation-levels")
        term.wait_for("workspace ready")
        term.type("labrunner run ph2.5")
        screen = term.wait_for("0 passed, 1 failed")
        assert "isolation.py:" in screen, "the failure must name the learner's file and line"

        term.type("clear; labrunner watch ph2.5")
        term.wait_for("waiting for a save")
        solution = REPO / "labs" / "ph2" / "05-isolation-levels" / "solution" / "isolation.py"
        target = tmp_path / "backend-labs" / "ph2" / "05-isolation-levels" / "isolation.py"
        target.write_text(solution.read_text())  # the learner saves the fix
        term.wait_for("✓ ph2.5")
        term.wait_for("1 of 1 passed")
        subprocess.run([TMUX, "send-keys", "-t", term.name, "C-c"], check=True)
        term.type("clear; labrunner next")
        screen = term.wait_for("next: ")
        assert "next: ph0.1 dns-resolution" in screen
    finally:
        term.close()
        subprocess.run([sys.executable, "-m", "labrunner.cli", "services", "down"],
                       capture_output=True, timeout=300, env=env)
        shutil.rmtree(runtime, ignore_errors=True)
