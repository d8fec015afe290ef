#!/usr/bin/env bash
# Install what is missing, then run the whole test suite: lint and types, unit tests,
# integration tests on real local services, every lab's reference (must pass), starter and
# wrong solutions (must fail), and the C examples.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/mypy
.venv/bin/python -m pytest tests -p no:cacheprovider "$@"
# The docker backend, proven against a real Docker engine: a private dockerd, locally built
# stand-in images, Phase 2 and Phase 5 with --backend docker, labrunner's own image.
# Skip with LABRUNNER_SKIP_DOCKER=1 (e.g. on a laptop whose Docker you do not want touched).
if [ "${LABRUNNER_SKIP_DOCKER:-0}" != 1 ]; then
  PATH="$PWD/.venv/bin:$PATH" LABRUNNER_DOCKER_BENCH=${LABRUNNER_DOCKER_BENCH:-0} \
    bash docker/ci-docker.sh
fi
