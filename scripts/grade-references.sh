#!/usr/bin/env bash
# Issue 13's "done when": every lab's reference grades at full marks the way a cohort is
# graded (as root: a sandbox uid per run, the learner's code in a process of its own,
# private services). Builds one submission of every lab's reference (its learner files from
# solution/) and grades it. Arguments go to `labrunner grade` (default: every phase).
#   sudo bash scripts/grade-references.sh --out /tmp/refs-grades
#   sudo bash scripts/grade-references.sh --select ph2 --select ph5 --out /tmp/refs-25
set -euo pipefail
cd "$(dirname "$0")/.."
cohort=$(mktemp -d /tmp/lr-references-XXXXXX)
trap 'rm -rf "$cohort"' EXIT
chmod 755 "$cohort"
.venv/bin/python - "$cohort/references" <<'PY'
import shutil, sys
from pathlib import Path

from labrunner.catalog import load_lab

root = Path(sys.argv[1])
root.mkdir()
(root / "labrunner.toml").write_text('labrunner_version = "0.1.0"\n')
for toml in sorted([*Path("labs").glob("ph*/*/lab.toml"), *Path("c_examples").glob("*/lab.toml")]):
    lab = load_lab(toml.parent)
    for name in lab.learner_files:
        target = root / lab.workspace_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(lab.path / "solution" / name, target)
PY
args=("$@")
if [[ " $* " != *" --select "* ]]; then
  for phase in ph0 ph1 ph2 ph3 ph4 ph5 ph6 ph7; do args+=(--select "$phase"); done
fi
.venv/bin/labrunner grade "$cohort" --backend local "${args[@]}"
