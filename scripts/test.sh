#!/usr/bin/env bash
# Install what is missing, then run the whole test suite: lint and types, unit tests,
# integration tests on real local services, every lab's reference (must pass), starter and
# wrong solutions (must fail), and the C examples.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests
.venv/bin/mypy
exec .venv/bin/python -m pytest tests -p no:cacheprovider "$@"
