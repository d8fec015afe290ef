#!/usr/bin/env bash
# mypy --strict (pyproject's settings) over each lab's verification code: its test_*.py and
# the harness modules beside them, not the learner's starter/, solution/ or wrong/. One run
# per lab folder: the folders are not packages, and module names (harness.py) repeat.
# Two runs at a time share one cache: the first lab fills it, the others reuse it.
# With lab folders as arguments (labs/ph3/02-jwt-structure ...), only those are checked.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ]; then
    labs=()
    for lab in "$@"; do
        [ -d "$lab" ] || { echo "typecheck-labs: no lab folder $lab" >&2; exit 2; }
        labs+=("${lab%/}/")
    done
else
    labs=(labs/*/*/)
fi
status=0
.venv/bin/mypy --no-error-summary "${labs[0]}"*.py || status=1
printf '%s\n' "${labs[@]:1}" \
    | xargs -P 2 -I{} sh -c '.venv/bin/mypy --no-error-summary {}*.py' || status=1
[ $status = 0 ] && echo "typecheck-labs: ${#labs[@]} labs clean"
exit $status
