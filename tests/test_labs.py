"""rustlings' `dev check` for this course: every reference solution passes its verification,
every starter fails it, and every plausible wrong solution kept in `wrong/` fails it, all
through the real runner against real services."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from labrunner.catalog import Lab, load_catalog
from labrunner.runner import run_lab
from labrunner.services.manager import ServiceSet

LABS = load_catalog().labs
REPO = Path(__file__).resolve().parents[1]


def _state(local_services: ServiceSet, lab: Lab) -> Path | None:
    if not lab.services:
        return None
    local_services.ensure(lab.services)
    return local_services.state_file


def _explain(result: object) -> str:
    tests = getattr(result, "tests", [])
    lines = [f"{t.outcome}: {t.name}: {t.message.splitlines()[0] if t.message else ''}"
             for t in tests]
    return "\n".join(lines) or getattr(result, "message", "") + getattr(result, "output", "")


@pytest.mark.parametrize("lab", LABS, ids=[lab.id for lab in LABS])
def test_reference_solution_passes(lab: Lab, local_services: ServiceSet) -> None:
    result = run_lab(lab, lab.solution_dir, _state(local_services, lab), "refs")
    assert result.outcome == "passed", f"{lab.id} reference: {_explain(result)}"


@pytest.mark.parametrize("lab", LABS, ids=[lab.id for lab in LABS])
def test_starter_fails_and_says_why(lab: Lab, local_services: ServiceSet) -> None:
    result = run_lab(lab, lab.starter_dir, _state(local_services, lab), "starters")
    assert result.outcome in ("failed", "timeout"), f"{lab.id} starter: {result.outcome}"
    assert result.first_line, f"{lab.id} starter fails without a message"


WRONG = [(lab, folder) for lab in LABS for folder in sorted((lab.path / "wrong").glob("*"))
         if folder.is_dir()]


@pytest.mark.parametrize(("lab", "wrong"), WRONG,
                         ids=[f"{lab.id}-{folder.name}" for lab, folder in WRONG])
def test_wrong_solution_fails(lab: Lab, wrong: Path, local_services: ServiceSet) -> None:
    # A wrong solution may hold only the file it changes: the rest comes from the reference.
    result = run_lab(lab, _complete(lab, wrong), _state(local_services, lab), "wrong")
    assert result.outcome in ("failed", "timeout"), (
        f"{lab.id}: the wrong solution {wrong.name!r} passed its verification")


def _complete(lab: Lab, wrong: Path) -> Path:
    missing = [name for name in lab.learner_files if not (wrong / name).exists()]
    if not missing:
        return wrong
    import shutil
    import tempfile

    merged = Path(tempfile.mkdtemp(prefix=f"lrwrong-{lab.slug}-"))
    shutil.copytree(lab.solution_dir, merged, dirs_exist_ok=True)
    shutil.copytree(wrong, merged, dirs_exist_ok=True)
    return merged


def test_every_c_reference_builds_warning_free(tmp_path: Path) -> None:
    done = subprocess.run(["make", "-C", str(REPO / "c_examples"), f"OUT={tmp_path}"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "warning" not in (done.stdout + done.stderr).lower()
