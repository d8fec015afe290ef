#!/usr/bin/env bash
# Install what is missing, then run the whole test suite: lint and types, unit tests,
# integration tests on real local services, every lab's reference (must pass), starter and
# wrong solutions (must fail), and the C examples. Then the two CI stages (each skippable):
# the docker backend against a real engine, and set-up from a pristine Debian 12 root.
set -euo pipefail
cd "$(dirname "$0")/.."
# Each stage's time, printed as it ends and summed up at the end: what to shorten next.
STAGE_START=$SECONDS
STAGES=()
stage_done() {
  local took=$(( SECONDS - STAGE_START ))
  STAGES+=("$1 $(( took / 60 ))m$(( took % 60 ))s")
  echo "test: stage '$1' took $(( took / 60 ))m$(( took % 60 ))s" >&2
  STAGE_START=$SECONDS
}
trap 'echo "test: stages: ${STAGES[*]:-none}" >&2' EXIT
bash scripts/setup.sh --tests
stage_done setup
.venv/bin/ruff check src tests benchmarks
.venv/bin/mypy
stage_done lint
.venv/bin/python -m pytest tests -p no:cacheprovider --durations=25 "$@"
stage_done pytest
status=0
# The two CI stages below run side by side: the pristine root works in a chroot of its own
# (its own dpkg database and apt locks) while the docker stage talks to a private daemon, and
# each of them waits on downloads, dpkg and containers more than it computes. Together they
# take a few minutes less than one after the other. The pristine stage's output goes to its
# log and is printed when it ends.
# The README's first command from a pristine Debian 12 (nothing installed), as root and as a
# sudoer, and a broken install step must fail. Needs root. Skip with LABRUNNER_SKIP_PRISTINE=1.
PRISTINE_PID=""
PRISTINE_LOG=out/pristine-stage.log
PRISTINE_START=$(date +%s)
if [ "${LABRUNNER_SKIP_PRISTINE:-0}" != 1 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    mkdir -p out
    # Its own time is written when it ends: the docker stage may end later.
    ( rc=0; bash scripts/ci-pristine-root.sh || rc=$?; date +%s >out/.pristine-end; exit $rc ) \
      >"$PRISTINE_LOG" 2>&1 &
    PRISTINE_PID=$!
    # Stopped if we end early (its own traps unmount and clean up on TERM).
    trap '[ -z "$PRISTINE_PID" ] || kill "$PRISTINE_PID" 2>/dev/null || true
          echo "test: stages: ${STAGES[*]:-none}" >&2' EXIT
  else
    echo "test: the pristine-root stage needs root: skipped (LABRUNNER_SKIP_PRISTINE=1 to silence)" >&2
  fi
fi
# The docker backend, proven against a real Docker engine: a private dockerd, locally built
# stand-in images, Phase 2 and Phase 5 with --backend docker, labrunner's own image.
# Skip with LABRUNNER_SKIP_DOCKER=1 (e.g. on a laptop whose Docker you do not want touched).
if [ "${LABRUNNER_SKIP_DOCKER:-0}" != 1 ]; then
  PATH="$PWD/.venv/bin:$PATH" LABRUNNER_DOCKER_BENCH=${LABRUNNER_DOCKER_BENCH:-0} \
    bash docker/ci-docker.sh || status=1
  stage_done docker
fi
if [ -n "$PRISTINE_PID" ]; then
  pristine_status=0
  wait "$PRISTINE_PID" || pristine_status=$?
  PRISTINE_PID=""
  cat "$PRISTINE_LOG" >&2
  [ "$pristine_status" -eq 0 ] || status=1
  took=$(( $(cat out/.pristine-end 2>/dev/null || date +%s) - PRISTINE_START ))
  STAGES+=("pristine-root $(( took / 60 ))m$(( took % 60 ))s (beside docker)")
  echo "test: stage 'pristine-root' took $(( took / 60 ))m$(( took % 60 ))s, beside docker" >&2
fi
exit $status
