#!/usr/bin/env python3
"""Turn wrong solutions kept as whole folders (labs/*/*/wrong/<name>/) into patches against
the reference solution (wrong/<name>.diff): the mistake, and nothing else, is what a reader
sees, and the reference is not copied once per mistake.

    python3 scripts/wrong-to-diff.py [LAB_DIR...]     (default: every lab)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What patch leaves beside a file it changed (a backup, the hunks it could not apply): never
# a file of the wrong solution. Ten diffs once created a resolver.py.orig in the learner's folder.
LEFTOVERS = {".orig", ".rej"}


# What rebase-wrongs.py leaves where the reference's change met a mistake: a file still
# holding one is half resolved, and as a diff it would fail on its own syntax, not on the
# mistake (every folder is turned at once, so one unresolved would slip in with the rest).
CONFLICT = re.compile(r"^(<{7}|={7}|>{7})( |$)", re.MULTILINE)


def to_diff(lab: Path, wrong: Path) -> str:
    solution = lab / "solution"
    chunks = []
    for file in sorted(p for p in wrong.rglob("*") if p.is_file() and "__pycache__" not in
                       p.parts and p.suffix not in LEFTOVERS):
        rel = file.relative_to(wrong)
        text = file.read_text(encoding="utf-8", errors="replace")
        if marker := CONFLICT.search(text):
            line = text.count("\n", 0, marker.start()) + 1
            raise SystemExit(f"{file}:{line}: a conflict marker ({marker.group(1)}): resolve it "
                             "(keep the mistake, take the reference's change), then run this "
                             "again; nothing was turned")
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
        wrongs = sorted(p for p in (lab / "wrong").glob("*") if p.is_dir())
        diffs = {wrong: to_diff(lab, wrong) for wrong in wrongs}  # every folder checked first
        for wrong in wrongs:
            diff = diffs[wrong]
            if not diff:
                raise SystemExit(f"{wrong}: identical to the reference: not a wrong solution")
            (lab / "wrong" / f"{wrong.name}.diff").write_text(diff, encoding="utf-8")
            shutil.rmtree(wrong)
            shown = wrong.relative_to(ROOT) if wrong.is_relative_to(ROOT) else wrong
            print(f"{shown} -> {wrong.name}.diff")


if __name__ == "__main__":
    main()
