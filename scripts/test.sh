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
.venv/bin/ruff check src tests benchmarks labs c_examples
.venv/bin/mypy
bash scripts/typecheck-labs.sh
stage_done lint
status=0
# The two CI stages run beside the test suite: the pristine root works in a chroot of its own
# (its own dpkg database and apt locks), the docker stage talks to a private daemon, and both
# wait on dpkg and containers more than they compute, while the suite's lab checks leave
# about a third of the two cores idle. One after the other they added 6 to 11 minutes to the
# suite's; beside it, they end before it does. Each one's output goes to its log, printed
# when it has ended, with its own time.
mkdir -p out
side_stage() {   # name, log, command...: run in the background, its time written at its end
  local name=$1 log=$2
  shift 2
  ( start=$(date +%s); rc=0; "$@" || rc=$?
    echo "test: stage '$name' took $(( ($(date +%s) - start) / 60 ))m$(( ($(date +%s) - start) % 60 ))s, beside pytest (exit $rc)"
    exit $rc ) >"$log" 2>&1 &
}
SIDE_PIDS=()
SIDE_NAMES=()
# The README's first command from a pristine Debian 12 (nothing installed), as root and as a
# sudoer, and a broken install step must fail. Needs root. Skip with LABRUNNER_SKIP_PRISTINE=1.
if [ "${LABRUNNER_SKIP_PRISTINE:-0}" != 1 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    side_stage pristine-root out/pristine-stage.log bash scripts/ci-pristine-root.sh
    SIDE_PIDS+=($!)
    SIDE_NAMES+=(pristine-root)
  else
    echo "test: the pristine-root stage needs root: skipped (LABRUNNER_SKIP_PRISTINE=1 to silence)" >&2
  fi
fi
# The docker backend, proven against a real Docker engine: a private dockerd, locally built
# stand-in images, Phase 2 and Phase 5 with --backend docker, labrunner's own image.
# Skip with LABRUNNER_SKIP_DOCKER=1 (e.g. on a laptop whose Docker you do not want touched).
# Its runs keep their state in a runtime folder of their own and keep nothing warm: the
# suite's tests of warm sets and of what a run leaves behind look at the default one.
if [ "${LABRUNNER_SKIP_DOCKER:-0}" != 1 ]; then
  DOCKER_STAGE_RUNTIME="$(.venv/bin/python -c 'from labrunner.services.local.process import fast_temp_root; print(fast_temp_root())')/labrunner-docker-stage-$(id -u)"
  side_stage docker out/docker-stage.log env PATH="$PWD/.venv/bin:$PATH" \
    LABRUNNER_RUNTIME_DIR="$DOCKER_STAGE_RUNTIME" LABRUNNER_WARM_IDLE=0 \
    LABRUNNER_DOCKER_BENCH="${LABRUNNER_DOCKER_BENCH:-0}" bash docker/ci-docker.sh
  SIDE_PIDS+=($!)
  SIDE_NAMES+=(docker)
fi
# Stopped if we end early (their own traps unmount, stop the daemon and clean up on TERM).
trap 'for pid in "${SIDE_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
      echo "test: stages: ${STAGES[*]:-none}" >&2' EXIT
# Every test's time lands in out/pytest-junit.xml (per lab: what to make faster next;
# tests/slow_tests.txt is refreshed from it).
.venv/bin/python -m pytest tests -p no:cacheprovider --durations=25 \
  --junitxml=out/pytest-junit.xml -o junit_duration_report=total "$@" || status=1
stage_done pytest
for i in "${!SIDE_PIDS[@]}"; do
  side_status=0
  wait "${SIDE_PIDS[$i]}" || side_status=$?
  log="out/${SIDE_NAMES[$i]%-root}-stage.log"
  cat "$log" >&2
  [ "$side_status" -eq 0 ] || status=1
  STAGES+=("$(tail -1 "$log" | sed -n "s/^test: stage '\([^']*\)' took \([^,]*\),.*/\1 \2 (beside pytest)/p")")
done
SIDE_PIDS=()
[ -z "${DOCKER_STAGE_RUNTIME:-}" ] || rm -rf "$DOCKER_STAGE_RUNTIME"
stage_done side-stages
exit $status
