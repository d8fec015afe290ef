#!/usr/bin/env python3
"""Turn wrong solutions kept as whole folders (labs/*/*/wrong/<name>/) into patches against
the reference solution (wrong/<name>.diff): the mistake, and nothing else, is what a reader
sees, and the reference is not copied once per mistake.

    python3 scripts/wrong-to-diff.py [LAB_DIR...]     (default: every lab)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What patch leaves beside a file it changed (a backup, the hunks it could not apply): never
# a file of the wrong solution. Ten diffs once created a resolver.py.orig in the learner's folder.
LEFTOVERS = {".orig", ".rej"}


def to_diff(lab: Path, wrong: Path) -> str:
    solution = lab / "solution"
    chunks = []
    for file in sorted(p for p in wrong.rglob("*") if p.is_file() and "__pycache__" not in
                       p.parts and p.suffix not in LEFTOVERS):
        rel = file.relative_to(wrong)
        original = solution / rel
        done = subprocess.run(
            ["diff", "-u", "--label", f"a/{rel}", "--label", f"b/{rel}",
             str(original) if original.exists() else "/dev/null", str(file)],
            capture_output=True, text=True)
        if done.returncode > 1:
            raise SystemExit(f"diff failed for {file}: {done.stderr}")
        chunks.append(done.stdout)
    return "".join(chunks)


def main() -> None:
    labs = [Path(a).resolve() for a in sys.argv[1:]] or sorted(
        p.parent for p in (ROOT / "labs").glob("*/*/lab.toml")) + sorted(
        p.parent for p in (ROOT / "c_examples").glob("*/lab.toml"))
    for lab in labs:
        for wrong in sorted(p for p in (lab / "wrong").glob("*") if p.is_dir()):
            diff = to_diff(lab, wrong)
            if not diff:
                raise SystemExit(f"{wrong}: identical to the reference: not a wrong solution")
            (lab / "wrong" / f"{wrong.name}.diff").write_text(diff, encoding="utf-8")
            shutil.rmtree(wrong)
            shown = wrong.relative_to(ROOT) if wrong.is_relative_to(ROOT) else wrong
            print(f"{shown} -> {wrong.name}.diff")


if __name__ == "__main__":
    main()
