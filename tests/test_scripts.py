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
    # Resolved by hand: the mistake kept, the fix taken; wrong-to-diff makes it a diff again.
    (lab / "wrong" / "parse_float" / "mod.py").write_text(
        fixed.replace("int(text.strip())", "int(float(text.strip()))"))
    again = run(sys.executable, str(SCRIPTS / "wrong-to-diff.py"), str(lab), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert applied(lab, "parse_float", tmp_path) == fixed.replace("int(text.strip())",
                                                                  "int(float(text.strip()))")
