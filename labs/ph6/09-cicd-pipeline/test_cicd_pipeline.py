"""ph6.9 - a CI/CD pipeline and a canary controller.

The workflow file is linted by actionlint (the linter GitHub Actions users run: schema,
expressions, job graph), then its job graph is read and checked against the roadmap's stage
order: lint -> unit -> integration -> build -> push -> staging -> smoke -> production, each
job needing the one before it, the deployments in their environments, production never forced
to run past a failed stage. The canary controller is driven on simulated metrics: cumulative
counters of the canary's requests and errors, as a Prometheus scrape would give them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

STAGES = ("lint", "unit", "integration", "build", "push", "staging", "smoke", "production")
DEPLOYS = {"staging": "staging", "production": "production"}


def actionlint() -> str:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    for candidate in (cache / "labrunner" / "bin" / "actionlint", shutil.which("actionlint")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("actionlint is not installed: run scripts/setup.sh (it builds "
                "github.com/rhysd/actionlint/cmd/actionlint with Go into /usr/local/bin as "
                "root, else into ~/.cache/labrunner/bin)")


def workflow(learner: Any) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(learner.path("pipeline.yml").read_text())
    except yaml.YAMLError as exc:
        pytest.fail(f"pipeline.yml is not valid YAML: {exc}")
    if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), dict):
        pytest.fail("pipeline.yml has no 'jobs:' mapping: a workflow is a set of jobs")
    return doc


def needs(job: dict[str, Any]) -> list[str]:
    value = job.get("needs", [])
    return [value] if isinstance(value, str) else list(value or [])


def test_actionlint_finds_no_problem(learner: Any) -> None:
    done = subprocess.run([actionlint(), "-no-color", "-shellcheck=", "-pyflakes=",
                           str(learner.path("pipeline.yml"))],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        found = [line for line in done.stdout.splitlines() if "pipeline.yml:" in line]
        first = found[0].split("pipeline.yml:", 1)[1] if found else done.stderr.strip()
        pytest.fail(f"actionlint rejects the workflow: {first}\n"
                    f"(all it found:\n{done.stdout.strip() or done.stderr.strip()})\n"
                    "GitHub would refuse or misrun this file; fix what actionlint names.")


def test_stages_run_in_the_roadmap_order(learner: Any) -> None:
    jobs = workflow(learner)["jobs"]
    missing = [s for s in STAGES if s not in jobs]
    assert not missing, (
        f"the workflow has no job {', '.join(repr(m) for m in missing)}: expected the stages "
        f"{' -> '.join(STAGES)} as jobs of those names (it has: {', '.join(jobs)})")
    for before, stage in zip(STAGES, STAGES[1:], strict=False):
        got = needs(jobs[stage])
        assert before in got, (
            f"job {stage!r} does not need {before!r} (its needs: {got or 'none'}): expected "
            f"each stage to wait for the one before it, so {stage} runs only once {before} "
            "has passed; without it the two run side by side or in the wrong order")
    order = {s: i for i, s in enumerate(STAGES)}
    for stage in STAGES:
        later = [n for n in needs(jobs[stage]) if order.get(n, -1) > order[stage]]
        assert not later, (f"job {stage!r} needs {later}, a later stage: the pipeline would "
                           f"run {stage} after {later[0]}, against the order {' -> '.join(STAGES)}")


def test_nothing_is_deployed_past_a_failed_stage(learner: Any) -> None:
    jobs = workflow(learner)["jobs"]
    for stage in STAGES[1:]:
        cond = str(jobs.get(stage, {}).get("if", ""))
        forced = [f for f in ("always()", "failure()", "cancelled()", "!cancelled()")
                  if f in cond.replace(" ", "")]
        assert not forced, (
            f"job {stage!r} has `if: {cond}`: {forced[0]} makes it run even when a stage it "
            "needs failed - a broken build could reach production. Drop it; `needs` alone "
            "skips the job when anything before it failed.")
    for stage, env in DEPLOYS.items():
        got = jobs.get(stage, {}).get("environment")
        name = got.get("name") if isinstance(got, dict) else got
        assert name == env, (
            f"job {stage!r} deploys without `environment: {env}` (saw {got!r}): the "
            "environment carries its secrets, URL and protection rules (a reviewer's approval "
            "before production)")


# --- the canary controller ------------------------------------------------------------------

# (name, ticks of cumulative (requests, errors), decisions expected, weights set expected)
CASES = [
    ("healthy release", [(120, 0), (250, 2), (300, 2), (500, 5)],
     ["hold", "advance", "hold", "promoted"], [5, 20, 100]),
    ("errors at the 5 % step", [(250, 25), (900, 25)], ["rollback", "rolled_back"], [5, 0]),
    ("errors only once at 20 % (old good traffic must not dilute them)",
     [(1000, 10), (1300, 40), (4000, 40)], ["advance", "rollback", "rolled_back"], [5, 20, 0]),
    ("an error rate exactly at the threshold does not cross it", [(200, 10), (400, 20)],
     ["advance", "promoted"], [5, 20, 100]),
    ("too few requests to judge", [(50, 0), (199, 0), (200, 0)], ["hold", "hold", "advance"],
     [5, 20]),
    ("promoted stays promoted", [(200, 0), (400, 0), (600, 600)],
     ["advance", "promoted", "promoted"], [5, 20, 100]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_canary_controller(learner: Any, case: tuple[Any, ...]) -> None:
    name, ticks, decisions, weights = case
    mod = learner.load("canary")
    seen: list[int] = []

    def set_weight(percent: int) -> None:
        seen.append(int(percent))

    ctl = mod.CanaryController(set_weight, steps=(5, 20, 100), max_error_rate=0.05,
                               min_requests=200)
    assert seen == [5], (f"after CanaryController(...) the weights set were {seen}: expected "
                         "[5] - the canary starts by getting 5 % of the traffic")
    got = []
    for requests, errors in ticks:
        got.append(ctl.tick(requests, errors))
    story = ", ".join(f"tick({r}, {e}) -> {d!r}" for (r, e), d in zip(ticks, got, strict=True))
    want = ", ".join(f"tick({r}, {e}) -> {d!r}" for (r, e), d in
                     zip(ticks, decisions, strict=True))
    assert got == decisions and seen == weights, (
        f"{name}: the controller decided {story} and set the weights {seen}; expected {want} "
        f"and the weights {weights} (steps 5 -> 20 -> 100, rollback to 0 when the errors of "
        "the current step's window, counted since the step began, exceed 5 % of at least 200 "
        "requests; nothing moves once promoted or rolled back)")
