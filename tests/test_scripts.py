"""The authoring scripts a lab's wrong solutions are kept with: wrong-to-diff.py turns a
folder of changed files into a diff against solution/, rebase-wrongs.py carries a change of
the reference into the diffs it left unappliable. Run on a real git repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

REFERENCE = """def total(items):
    return sum(items)


def parse(text):
    return int(text)
"""


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True)


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                   check=True, capture_output=True)


def make_lab(tmp_path: Path) -> Path:
    lab = tmp_path / "labs" / "ph9" / "01-demo"
    (lab / "solution").mkdir(parents=True)
    (lab / "wrong").mkdir()
    (lab / "solution" / "mod.py").write_text(REFERENCE)
    return lab


def wrong_file(lab: Path, name: str, text: str) -> None:
    (lab / "wrong" / name).mkdir()
    (lab / "wrong" / name / "mod.py").write_text(text)
    done = run(sys.executable, str(SCRIPTS / "wrong-to-diff.py"), str(lab), cwd=lab)
    assert done.returncode == 0, done.stderr


def applied(lab: Path, name: str, tmp_path: Path) -> str:
    out = tmp_path / f"applied-{name}"
    subprocess.run(["cp", "-r", str(lab / "solution"), str(out)], check=True)
    subprocess.run(["patch", "-s", "-p1", "-d", str(out), "-i",
                    str(lab / "wrong" / f"{name}.diff")], check=True)
    return (out / "mod.py").read_text()


def test_a_wrong_folder_becomes_a_diff_that_gives_it_back(tmp_path: Path) -> None:
    lab = make_lab(tmp_path)
    mistaken = REFERENCE.replace("sum(items)", "sum(items[1:])")
    wrong_file(lab, "skips_first", mistaken)
    assert not (lab / "wrong" / "skips_first").exists()
    assert applied(lab, "skips_first", tmp_path) == mistaken


def test_a_diff_the_reference_change_broke_is_left_with_both_sides(tmp_path: Path) -> None:
    lab = make_lab(tmp_path)
    wrong_file(lab, "skips_first", REFERENCE.replace("sum(items)", "sum(items[1:])"))
    wrong_file(lab, "parse_float", REFERENCE.replace("int(text)", "int(float(text))"))
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "lab")
    # The reference changes the very line one diff touches, and nothing near the other.
    fixed = REFERENCE.replace("return int(text)", "return int(text.strip())")
    (lab / "solution" / "mod.py").write_text(fixed)
    done = run(sys.executable, str(SCRIPTS / "rebase-wrongs.py"), str(lab), cwd=tmp_path)
    assert done.returncode == 1, "a conflict must be reported as a failure"
    assert "parse_float: the reference's change meets the mistake" in done.stdout, done.stdout
    assert "skips_first" not in done.stdout, "a diff that still applies is left alone"
    both = (lab / "wrong" / "parse_float" / "mod.py").read_text()
    assert "<<<<<<<" in both and "int(float(text))" in both and "int(text.strip())" in both
    assert applied(lab, "skips_first", tmp_path) == fixed.replace("sum(items)",
                                                                  "sum(items[1:])")
    # Left unresolved, it is refused, naming the file and line; nothing of the lab is turned.
    other_folder = lab / "wrong" / "other"
    other_folder.mkdir()
    (other_folder / "mod.py").write_text(fixed.replace("sum(items)", "sum(items[2:])"))
    refused = run(sys.executable, str(SCRIPTS / "wrong-to-diff.py"), str(lab), cwd=tmp_path)
    assert refused.returncode != 0 and "parse_float/mod.py:" in refused.stderr, refused.stderr
    assert "conflict marker" in refused.stderr and other_folder.is_dir()
    assert not (lab / "wrong" / "other.diff").exists()
    other_folder.joinpath("mod.py").unlink()
    other_folder.rmdir()
    # Resolved by hand: the mistake kept, the fix taken; wrong-to-diff makes it a diff again.
    (lab / "wrong" / "parse_float" / "mod.py").write_text(
        fixed.replace("int(text.strip())", "int(float(text.strip()))"))
    again = run(sys.executable, str(SCRIPTS / "wrong-to-diff.py"), str(lab), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert applied(lab, "parse_float", tmp_path) == fixed.replace("int(text.strip())",
                                                                  "int(float(text.strip()))")


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_labs" name="test_lab_expectation[ph2.5-solution]" time="12.5"/>
<testcase classname="tests.test_labs" name="test_lab_expectation[ph2.5-wrong/a]" time="1.5"/>
<testcase classname="tests.test_labs"
          name="test_lab_expectation_with_learner_code_apart[ph1.2-solution-apart]" time="30"/>
<testcase classname="tests.test_cli" name="test_run" time="4"/>
</testsuite></testsuites>"""


def test_suite_times_sums_per_lab_and_file(tmp_path: Path) -> None:
    """suite-times.py reads a CI run's JUnit XML: a lab's checks (reference, wrong solutions,
    apart) add up to the lab's total, a test file's tests to the file's."""
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT)
    done = run(sys.executable, str(SCRIPTS / "suite-times.py"), str(junit), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [" ".join(line.split()) for line in done.stdout.splitlines()]
    assert "4 tests, 0.8 test-minutes in all" in lines
    assert "44 3 91.7% tests/test_labs.py" in lines
    assert "30 1 62.5% ph1.2" in lines and "14 2 29.2% ph2.5" in lines
    missing = run(sys.executable, str(SCRIPTS / "suite-times.py"), str(tmp_path / "no.xml"),
                  cwd=tmp_path)
    assert missing.returncode != 0 and "no.xml: no such file" in missing.stderr
