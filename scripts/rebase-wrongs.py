#!/usr/bin/env python3
"""Re-express a lab's wrong solutions after its reference changed.

A wrong solution is a diff against `solution/`. When the reference changes where a diff
touches, the diff no longer applies. For each such diff this takes the reference as it was
at REV (HEAD by default), applies the diff there to get the wrong file, and carries the
reference's own change into it with a three-way merge (`git merge-file`), so the wrong
keeps its mistake and gains the fix. A clean merge is written back as `<name>.diff`. A
conflict (the fix and the mistake on the same or adjacent lines) is left in
`wrong/<name>/` with git's conflict markers, the mistake on one side and the fix on the
other: resolve it by hand, then run `scripts/wrong-to-diff.py <lab>`.

    python3 scripts/rebase-wrongs.py labs/ph3/02-jwt-structure [--rev REV]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def applies(diff: Path, solution: Path) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(solution, tmp, dirs_exist_ok=True)
        # Exactly, as dev check applies it: a diff that needs fuzz is rebased too.
        return subprocess.run(["patch", "-p1", "-s", "-F0", "--dry-run", "-d", tmp, "-i",
                               str(diff.resolve())],
                              capture_output=True).returncode == 0


def old_solution(lab: Path, rev: str, into: Path) -> None:
    top = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=lab, check=True,
                              capture_output=True, text=True).stdout.strip())
    rel = (lab / "solution").resolve().relative_to(top.resolve())
    archive = subprocess.run(["git", "archive", rev, str(rel)], cwd=top, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into), f"--strip-components={len(rel.parts)}"],
                   input=archive, check=True)


def rebase(lab: Path, diff: Path, rev: str) -> str:
    """Write the re-expressed wrong into wrong/<name>/; return "" or what went wrong."""
    with tempfile.TemporaryDirectory() as tmp:
        base, wrong = Path(tmp, "base"), Path(tmp, "wrong")
        base.mkdir()
        old_solution(lab, rev, base)
        shutil.copytree(base, wrong)
        # No .orig backups when a hunk applies with an offset: wrong-to-diff would take
        # one for a file of the wrong solution.
        done = subprocess.run(["patch", "-p1", "-s", "-F0", "--no-backup-if-mismatch", "-d",
                               str(wrong), "-i", str(diff.resolve())],
                              capture_output=True, text=True)
        if done.returncode:
            return f"does not apply at {rev} either: {done.stdout.strip()}"
        out = lab / "wrong" / diff.stem
        out.mkdir()
        conflicts: list[str] = []
        for changed in wrong.rglob("*"):
            if not changed.is_file():
                continue
            rel = changed.relative_to(wrong)
            if (base / rel).is_file() and (base / rel).read_bytes() == changed.read_bytes():
                continue
            current = lab / "solution" / rel
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(changed, target)
            if current.is_file() and (base / rel).is_file():
                merged = subprocess.run(["git", "merge-file", str(target), str(base / rel),
                                         str(current)], capture_output=True)
                if merged.returncode:
                    conflicts.append(str(target))
    if conflicts:
        return ("the reference's change meets the mistake: resolve the conflict markers in "
                + ", ".join(conflicts))
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lab", type=Path)
    parser.add_argument("--rev", default="HEAD", help="where the old reference is (HEAD)")
    args = parser.parse_args()
    failed = 0
    for diff in sorted((args.lab / "wrong").glob("*.diff")):
        if applies(diff, args.lab / "solution"):
            continue
        problem = rebase(args.lab, diff, args.rev)
        print(f"{diff.stem}: {problem or 're-expressed'}")
        failed += bool(problem)
    if failed:
        print(f"{failed} wrong solution(s) to finish by hand, then: python3 "
              f"scripts/wrong-to-diff.py {args.lab}")
        return 1
    subprocess.run([sys.executable, str(Path(__file__).with_name("wrong-to-diff.py")),
                    str(args.lab)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
