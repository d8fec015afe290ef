#!/usr/bin/env bash
# The main job: install what is missing, then verify every reference solution on the
# local backend (real Postgres, Redis, Kafka and RabbitMQ started and stopped by labrunner).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/labrunner run "${@:-all}" --solutions --backend local \
  --json out/results.json --junit out/junit.xml
