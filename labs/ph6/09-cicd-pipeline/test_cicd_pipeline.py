"""ph6.9 - a CI/CD pipeline and a canary controller.

The workflow file is linted by actionlint (the linter GitHub Actions users run: schema,
expressions, job graph), then its job graph is read and checked against the roadmap's stage
order: lint -> unit -> integration -> build -> push -> staging -> smoke -> production, each
job needing the one before it, the deployments in their environments, production never forced
to run past a failed stage. The canary controller is driven on simulated metrics: cumulative
counters of the canary's requests and errors, as a Prometheus scrape would give them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, cast

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


def workflow(learner: Any) -> dict[Any, Any]:  # keys: str, and True for a bare `on`
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


GATES = ("lint", "unit", "integration", "smoke")             # the stages that judge
DEPLOYERS = ("push", "staging", "production")                # what must never run for a PR
SWALLOW = re.compile(r"\|\|\s*(true|:|exit\s+0)\s*$|;\s*(true|exit\s+0)\s*$|\bset\s+\+e\b", re.M)
BUILDS = re.compile(r"\bdocker\s+(buildx\s+)?build\b|\bbuildah\s+bud\b|\bpodman\s+build\b")
MAIN_GATE = re.compile(r"github\.ref\s*==\s*'refs/heads/main'|github\.ref_name\s*==\s*'main'|"
                       r"github\.event_name\s*==\s*'push'|"
                       r"github\.event_name\s*!=\s*'pull_request'")


def steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [st for st in job.get("steps") or [] if isinstance(st, dict)]


def test_a_failing_check_stops_the_pipeline(learner: Any) -> None:
    jobs = workflow(learner)["jobs"]
    for stage in GATES:
        job = jobs.get(stage) or {}
        assert str(job.get("continue-on-error", False)).lower() in ("false", ""), (
            f"job {stage!r} has `continue-on-error: {job.get('continue-on-error')}`: when it "
            "fails the run still counts it as passed, so the stages that need it go on and a "
            "failing check reaches production. Drop it: a gate must fail the pipeline")
        for st in steps(job):
            what = st.get("run") or st.get("uses") or st.get("name")
            assert str(st.get("continue-on-error", False)).lower() in ("false", ""), (
                f"a step of job {stage!r} ({what!r}) has `continue-on-error: "
                f"{st.get('continue-on-error')}`: its failure is ignored and {stage} passes "
                "anyway, so the next stages run on a failed check. Drop it")
            found = SWALLOW.search(str(st.get("run") or ""))
            assert not found, (
                f"job {stage!r} runs {str(st.get('run')).strip()!r}: `{found.group(0).strip()}` "
                "turns the check's failure into exit 0, so the job passes whatever the tests "
                "say and the stages after it go on. Let the command's exit status fail the job")


# How GitHub runs a `run:` step on Linux (docs: "jobs.<job_id>.steps[*].shell"): with no
# `shell:` it is `bash -e {0}` - WITHOUT pipefail, so `a | tee log` has tee's status.
SHELLS = {None: ["bash", "-e"], "bash": ["bash", "--noprofile", "--norc", "-eo", "pipefail"],
          "sh": ["sh", "-e"]}
# The plumbing a step may use around its check; every other command is absent, so whatever
# the step checks with (make, pytest, ./smoke.sh, curl...) fails.
PLUMBING = ("tee", "cat", "mkdir", "cp", "mv", "rm", "ls", "touch", "printf", "grep", "sed",
            "awk", "head", "tail", "tr", "cut", "wc", "sort", "uniq", "date", "sleep", "env",
            "basename", "dirname", "test", "true", "false", "tar", "gzip")
SETUP_ACTIONS = re.compile(r"^actions/(checkout|setup-[\w-]+|cache|upload-artifact|"
                           r"download-artifact)@")


def step_shell(doc: dict[str, Any], job: dict[str, Any], st: dict[str, Any]) -> list[str] | None:
    """The command GitHub would run the step's script with, or None (pwsh, python...)."""
    shell = st.get("shell")
    for defaults in (job.get("defaults"), doc.get("defaults")):
        if shell is None and isinstance(defaults, dict):
            shell = (defaults.get("run") or {}).get("shell")
    if shell in SHELLS:
        argv = list(SHELLS[shell])
    elif isinstance(shell, str) and "{0}" in shell and shell.split()[0] in ("bash", "sh"):
        argv = [a for a in shell.split() if a != "{0}"]
    else:
        return None
    return [shutil.which(argv[0]) or f"/bin/{argv[0]}", *argv[1:]]


def run_with_every_check_failing(learner: Any, argv: list[str], script: str,
                                 workdir: Path) -> int:
    """The step's script run by ``argv`` in ``workdir`` - as the learner's uid when grading
    (it is the learner's code): a folder it may write in (tee's log), a PATH of plumbing."""
    workdir.mkdir()
    os.chmod(workdir, 0o777)
    bin_dir = workdir / "bin"
    bin_dir.mkdir()
    for tool in PLUMBING:
        real = shutil.which(tool)
        if real and not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(real)
    body = re.sub(r"\$\{\{[^}]*\}\}", "expr", script)  # GitHub substitutes these first
    (workdir / "step.sh").write_text(body)
    try:
        done: subprocess.CompletedProcess[bytes] = learner.run(
            [*argv, str(workdir / "step.sh")], cwd=workdir, timeout=20,
            env={"PATH": str(bin_dir), "HOME": str(workdir)}, capture_output=True)
    except subprocess.TimeoutExpired:
        return -1
    return done.returncode


def test_a_failing_check_fails_its_job(learner: Any) -> None:
    """Each gate job's run steps are run as GitHub would run them (its shell, `-e`, pipefail
    or not) in an empty folder where every command but plumbing (tee, cat, grep...) is absent:
    whatever the step checks with fails. The job must then fail. A pipe into tee without
    pipefail, `|| echo ...`, `set +e` or a last command that always succeeds all let it
    pass."""
    doc = workflow(learner)
    shared = learner.tmp_folder(learner_writes=True)
    for stage in GATES:
        job = doc["jobs"].get(stage) or {}
        if any(st.get("uses") and not SETUP_ACTIONS.match(str(st["uses"])) for st in steps(job)):
            continue  # an action may be what judges: not simulated here
        runs = [(st, step_shell(doc, job, st)) for st in steps(job) if st.get("run")]
        if not runs or any(argv is None for _, argv in runs):
            continue
        statuses: list[int] = []
        # the casts: no argv is None here (a job with one is skipped above)
        for st, argv in cast(list[tuple[dict[str, Any], list[str]]], runs):
            workdir = shared / f"{stage}-{len(statuses)}"
            statuses.append(run_with_every_check_failing(learner, argv, str(st["run"]),
                                                         workdir))
            if statuses[-1] != 0:
                break
        if statuses[-1] != 0:
            continue
        st, argv = cast(tuple[dict[str, Any], list[str]], runs[-1])
        script = str(st["run"]).strip()
        piped = "|" in script.replace("||", "") and "pipefail" not in " ".join(argv) + script
        why = (("its status is that of the pipe's LAST command: GitHub runs a step with no "
                "`shell:` as `bash -e {0}`, without pipefail, so `a | tee log` succeeds "
                "when a fails. Set `shell: bash` (bash -eo pipefail) or `set -o pipefail`")
               if piped else
               "something after the check turns its failure into exit 0 (`|| echo`, "
               "`set +e`, a last command that always succeeds). Let the check's exit status "
               "end the step")
        pytest.fail(
            f"job {stage!r} PASSES when every check it runs fails: run as GitHub runs it "
            f"({' '.join([Path(argv[0]).name, *argv[1:]])} {{0}}) with its commands "
            f"absent, each of its run steps exited 0 - last {script!r}: {why}. Expected the "
            f"job to fail, so the stages that need it never run on a failed {stage}",
            pytrace=False)


def test_the_image_is_built_once_and_the_tested_one_deployed(learner: Any) -> None:
    jobs = workflow(learner)["jobs"]
    builders = sorted(name for name, job in jobs.items() for st in steps(job)
                      if BUILDS.search(str(st.get("run") or ""))
                      or "build-push-action" in str(st.get("uses") or ""))
    extra = [b for b in builders if b != "build"]
    assert not extra, (
        f"job(s) {extra} build the image again (docker build): what they ship is not the "
        "image that was tested and staged - a rebuild can pick up other base layers or "
        "dependencies. Build once in `build`, then push and deploy that image")
    images: dict[str, list[str]] = {}
    for stage in ("staging", "production"):
        runs = " ".join(str(st.get("run") or "") for st in steps(jobs.get(stage) or {}))
        images[stage] = re.findall(
            r"(?:\$\{?IMAGE\}?|[\w./-]+/orders):((?:\$\{\{[^}]*\}\}|[^\s\"'$])+)", runs)
        tags = set(images[stage])
        assert not tags or all("github.sha" in t for t in tags), (
            f"job {stage!r} deploys the image tag(s) {sorted(tags)}, not the commit's "
            "${{ github.sha }} pushed by `push`: a moving tag like latest deploys whatever was "
            "pushed last, which may not be what staging and smoke tested. Deploy "
            '"$IMAGE:${{ github.sha }}"')


def gated_to_main(jobs: dict[str, Any], name: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether the job (or a job it needs, whose skip it inherits) runs only on main."""
    job = jobs.get(name) or {}
    if MAIN_GATE.search(str(job.get("if", ""))):
        return True
    return any(gated_to_main(jobs, n, seen | {name}) for n in needs(job) if n not in seen)


def test_pull_requests_never_deploy(learner: Any) -> None:
    doc = workflow(learner)
    triggers = doc.get("on", doc.get(True, {}))      # YAML 1.1 reads a bare `on` as True
    names = ([triggers] if isinstance(triggers, str) else list(triggers or []))
    # pull_request_target runs in the BASE branch's context: github.ref is refs/heads/main
    # and github.event_name is not 'pull_request', so neither gate keeps a PR out, and the
    # run has the repository's secrets and a write token (GitHub's docs warn against
    # building or testing anything for a PR with it). A pipeline that builds and deploys
    # has no use for it: its PR runs are `pull_request`, read-only.
    target = [str(t) for t in names if str(t) == "pull_request_target"]
    assert not target, (
        "the workflow runs on `pull_request_target`: that event runs in the base branch's "
        "context - github.ref is refs/heads/main for it, and github.event_name is not "
        "'pull_request' - so `if: github.ref == 'refs/heads/main'` does not keep a pull "
        "request out: anyone's PR starts push and the deployments, with the repository's "
        "secrets and a write token (and its checkout is main's code, so the PR itself is "
        "never linted or tested). Use `pull_request`: read-only, on the PR's own code")
    if not any(str(t).startswith("pull_request") for t in names):
        return
    for stage in DEPLOYERS:
        assert gated_to_main(doc["jobs"], stage), (
            f"the workflow runs on pull_request and job {stage!r} has no condition (nor any job "
            "it needs) restricting it to main: every pull request - anyone's branch - would be "
            "pushed and deployed. Gate the push with "
            "`if: github.ref == 'refs/heads/main'` (the later stages inherit its skip)")


REF_GATE = re.compile(r"github\.ref\s*==\s*'refs/heads/main'|github\.ref_name\s*==\s*'main'")


def ref_gated(jobs: dict[str, Any], name: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether the job (or a job it needs) runs only when the ref is main: the event's name
    ('push') does not say which branch was pushed."""
    job = jobs.get(name) or {}
    if REF_GATE.search(str(job.get("if", ""))):
        return True
    return any(ref_gated(jobs, n, seen | {name}) for n in needs(job) if n not in seen)


def pushes_beyond_main(triggers: Any) -> str:
    """Which pushes other than to main start the workflow ('' for none): every branch's
    when `push` has no branch filter, else the filter's other patterns."""
    if isinstance(triggers, str):
        triggers = [triggers]
    if isinstance(triggers, list):
        return "a push to any branch" if "push" in triggers else ""
    if not isinstance(triggers, dict) or "push" not in triggers:
        return ""
    push = triggers["push"] or {}
    if not isinstance(push, dict):
        return ""
    if "branches-ignore" in push:
        return f"a push to any branch but {push['branches-ignore']}"
    if "branches" not in push:
        # GitHub: a push filter of tags only starts the workflow for those tags, no branch.
        return "" if ("tags" in push or "tags-ignore" in push) else "a push to any branch"
    branches = push["branches"]
    others = [b for b in ([branches] if isinstance(branches, str) else list(branches or []))
              if str(b) != "main"]
    return f"a push to a branch matching {others}" if others else ""


def test_pushes_to_other_branches_never_deploy(learner: Any) -> None:
    """A push to a branch other than main (anyone's feature branch, unreviewed) must not
    reach push and the deployments: either `on.push` is limited to main, or the deployers are
    gated on the ref. `github.event_name == 'push'` keeps pull requests out, but says
    nothing about which branch was pushed."""
    doc = workflow(learner)
    beyond = pushes_beyond_main(doc.get("on", doc.get(True, {})))
    if not beyond:
        return
    for stage in DEPLOYERS:
        if not gated_to_main(doc["jobs"], stage):
            continue  # no gate at all: test_pull_requests_never_deploy says so
        assert ref_gated(doc["jobs"], stage), (
            f"the workflow starts on {beyond}, and job {stage!r} is kept to main only by the "
            "event's name (`github.event_name == 'push'`, or `!= 'pull_request'`), which says "
            "nothing about the branch: a push to a feature branch nobody reviewed is pushed "
            "and deployed. Limit the trigger (on: push: branches: [main]) or gate on the "
            "branch: `if: github.ref == 'refs/heads/main'`")


def test_actions_pinned_and_permissions_least(learner: Any) -> None:
    doc = workflow(learner)
    for name, job in doc["jobs"].items():
        for st in steps(job):
            uses = str(st.get("uses") or "")
            if not uses or uses.startswith(("./", "docker://")):
                continue
            ref = uses.rpartition("@")[2] if "@" in uses else ""
            assert re.fullmatch(r"v\d+(\.\d+)*|[0-9a-f]{40}", ref), (
                f"job {name!r} uses {uses!r}: "
                + (f"{ref!r} is a branch, it moves" if ref else "no ref at all")
                + " - the action's code can change under the pipeline (and with it what runs "
                "with your secrets). Pin a release tag (@v4) or a commit SHA")
    for where, perms in [("the workflow", doc.get("permissions"))] + [
            (f"job {n!r}", j.get("permissions")) for n, j in doc["jobs"].items()]:
        assert perms != "write-all", (
            f"{where} has `permissions: write-all`: every job's GITHUB_TOKEN can push code, "
            "edit releases and settings. Grant only what is needed (contents: read, "
            "packages: write to push the image)")


# --- the canary controller ------------------------------------------------------------------

DEFAULTS = {"steps": (5, 20, 100), "max_error_rate": 0.05, "min_requests": 200}
# (name, ticks of cumulative (requests, errors), decisions expected, weights set expected,
#  what the case teaches, the controller's parameters)
CASES: list[tuple[str, list[tuple[int, int]], list[str], list[int], str, dict[str, Any]]] = [
    ("healthy release", [(120, 0), (250, 2), (300, 2), (500, 5)],
     ["hold", "advance", "hold", "promoted"], [5, 20, 100],
     "a window below min_requests (200) holds: 120 requests at 5 %, and at 300 only the 50 "
     "since the 20 % step began at 250. Judge each step on the requests and errors since it "
     "began",
     DEFAULTS),
    ("errors at the 5 % step", [(250, 25), (900, 25)], ["rollback", "rolled_back"], [5, 0],
     "25 errors in 250 requests is 10 %, above 5 %: set_weight(0) and 'rollback'; after it, "
     "tick() changes nothing and answers 'rolled_back'", DEFAULTS),
    ("errors only once at 20 % (old good traffic must not dilute them)",
     [(1000, 10), (1300, 40), (4000, 40)], ["advance", "rollback", "rolled_back"], [5, 20, 0],
     "the 20 % step's window is 300 requests with 30 errors (10 %): counted since the rollout "
     "began it would be 40 of 1300 (3 %), the 5 % step's good traffic hiding the failure",
     DEFAULTS),
    ("errors of the 5 % step are not counted again at 20 %", [(250, 10), (500, 13)],
     ["advance", "promoted"], [5, 20, 100],
     "the 20 % step's window is 250 requests with 3 errors (1.2 %): its errors start at the "
     "step's start too, not at the rollout's (13 of 250 would be 5.2 %)", DEFAULTS),
    ("a new step is not judged before min_requests of its own",
     [(1000, 0), (1050, 20), (1250, 20)], ["advance", "hold", "rollback"], [5, 20, 0],
     "50 requests since the 20 % step began are too few to judge, even with 20 errors: hold "
     "until the step's own window has min_requests (then 20 of 250, 8 %: rollback)", DEFAULTS),
    # before the exact-threshold case, whose first window is also exactly min_requests
    ("too few requests to judge", [(50, 0), (199, 0), (200, 0)], ["hold", "hold", "advance"],
     [5, 20], "a window of 199 requests is below min_requests (200): hold; 200 is enough "
     "(only FEWER than min_requests hold: a window of exactly min_requests is judged)",
     DEFAULTS),
    ("an error rate exactly at the threshold does not cross it", [(200, 10), (400, 20)],
     ["advance", "promoted"], [5, 20, 100],
     "10 errors of 200 is exactly 5 %: only a rate strictly above max_error_rate rolls back",
     DEFAULTS),
    ("an error rate just above the threshold (5.5 %)", [(200, 11)], ["rollback"], [5, 0],
     "11 errors of 200 is 5.5 %, above 5 %: compare the real ratio (errors / requests), not "
     "whole percents (11 * 100 // 200 = 5)", DEFAULTS),
    ("a restarted canary's counters start again from 0 (a counter reset)",
     [(1000, 0), (150, 20), (400, 40)], ["advance", "hold", "rollback"], [5, 20, 0],
     "the 20 % step began at 1000 requests, then the canary restarted and its counters began "
     "again from 0, as Prometheus counters do: 150, then 400 requests since, with 40 errors "
     "(10 %) - rollback. Taken as 400 - 1000 = -600 requests the window never fills, and a "
     "crash-looping canary holds at 20 % for ever: a total lower than the last one seen is "
     "a reset - count what comes after it on top of the window, as increase() does",
     DEFAULTS),
    ("errors before a restart stay in the step's window",
     [(1000, 0), (1150, 15), (100, 0), (300, 0)], ["advance", "hold", "rollback", "rolled_back"],
     [5, 20, 0],
     "the 20 % step began at 1000 requests; 150 requests with 15 errors later the canary "
     "restarted (its counters began again from 0) and served 100 more without an error: the "
     "step's window is 250 requests with 15 errors (6 %) - rollback. A window that starts "
     "again at the reset forgets the errors before it, so a canary that crashes - often for "
     "the very errors it serves - wipes its own record and is promoted: count what comes "
     "after a reset ON TOP of the window, as increase() does",
     DEFAULTS),
    ("a canary that restarts twice in one step (a crash loop) keeps both restarts' records",
     [(1000, 0), (1100, 20), (60, 0), (30, 0), (50, 0)],
     ["advance", "hold", "hold", "hold", "rollback"], [5, 20, 0],
     "the 20 % step began at 1000 requests; it served 100 with 20 errors, restarted, served "
     "60, restarted AGAIN (30 is below 60: a second reset) and served 50: its window is "
     "100 + 60 + 50 = 210 requests with 20 errors (9.5 %) - rollback. What the window held "
     "before the first restart must survive the second: a crash-looping canary restarts "
     "again and again, and a window that keeps only what came since the latest restart "
     "(a carry overwritten at each reset) forgets the errors that made it crash. Add each "
     "restart's totals to the window, as increase() does",
     DEFAULTS),
    ("a restart in the 5 % step is not counted again at 20 %",
     [(100, 9), (50, 0), (150, 0), (350, 10)], ["hold", "hold", "advance", "promoted"],
     [5, 20, 100],
     "the 5 % step served 100 requests with 9 errors, restarted and served 150 more: 250 "
     "with 9 errors (3.6 %) - advance at (150, 0). The 20 % step's window is then the 200 "
     "requests with 10 errors since (5 %, not above): promoted. What the 5 % step counted "
     "before its restart belongs to the 5 % step: carried on into the 20 % step's window it "
     "makes 300 requests with 19 errors (6.3 %). Start each step's window empty",
     DEFAULTS),
    ("a threshold of 0 tolerates no error", [(200, 0), (400, 1)], ["advance", "rollback"],
     [5, 20, 0], "max_error_rate=0.0 is a zero-tolerance gate, a threshold like any other in "
     "[0, 1): no error in the 5 % step's 200 requests advances, 1 error in the 20 % step's "
     "200 is above 0 - rollback",
     {"steps": (5, 20, 100), "max_error_rate": 0.0, "min_requests": 200}),
    ("promoted stays promoted", [(200, 0), (400, 0), (600, 600)],
     ["advance", "promoted", "promoted"], [5, 20, 100],
     "once at 100 % the rollout is over: later errors change nothing", DEFAULTS),
    ("the controller's own parameters (steps 1, 10, 50, 100; 1 %; 1000 requests)",
     [(999, 0), (1000, 10), (2000, 10), (3000, 21)], ["hold", "advance", "advance", "rollback"],
     [1, 10, 50, 0],
     "use the steps, max_error_rate and min_requests given to __init__, not the defaults: "
     "999 requests hold, 10 of 1000 (1 %) advances, 11 of 1000 (1.1 %) rolls back",
     {"steps": (1, 10, 50, 100), "max_error_rate": 0.01, "min_requests": 1000}),
]


def first_wrong(ticks: list[tuple[int, int]], got: list[str], want: list[str]) -> str:
    for (r, e), g, w in zip(ticks, got, want, strict=True):
        if g != w:
            return f"tick({r}, {e}) answered {g!r}, expected {w!r} - "
    return ""


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_canary_controller(learner: Any, case: tuple[Any, ...]) -> None:
    name, ticks, decisions, weights, why, params = case
    mod = learner.load("canary")
    seen: list[int] = []

    def set_weight(percent: int) -> None:
        seen.append(int(percent))

    try:
        ctl = mod.CanaryController(set_weight, **params)
    except ValueError as exc:
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
        pytest.fail(f"{name}: CanaryController(set_weight, {shown}) raised ValueError: {exc}, "
                    "expected a controller - steps rising from at least 1 to 100, "
                    "min_requests of at least 1 and max_error_rate in [0, 1) (0 included: "
                    f"a zero-tolerance gate) name a rollout: {why}", pytrace=False)
    first = params["steps"][0]
    assert seen == [first], (
        f"after CanaryController(..., steps={params['steps']}) the weights set were {seen}: "
        f"expected [{first}] - the canary starts at once with the first step's share")
    got = []
    for requests, errors in ticks:
        got.append(ctl.tick(requests, errors))
    story = ", ".join(f"tick({r}, {e}) -> {d!r}" for (r, e), d in zip(ticks, got, strict=True))
    want = ", ".join(f"tick({r}, {e}) -> {d!r}" for (r, e), d in
                     zip(ticks, decisions, strict=True))
    assert got == decisions and seen == weights, (
        f"{name}: {first_wrong(ticks, got, decisions)}{why}. The controller decided {story} "
        f"and set the weights {seen}; "
        f"expected {want} and the weights {weights}")


# Parameters that name no rollout: refused with ValueError by __init__, before set_weight is
# ever called (a controller that refuses its parameters has moved no traffic). Each case:
# the parameters, what is wrong with them.
REFUSED_PARAMETERS: list[tuple[dict[str, Any], str]] = [
    ({"min_requests": 0}, "min_requests=0: a step is then judged on a window of no requests, "
     "0 errors / 0 requests - no error rate at all (a ZeroDivisionError), and a canary that "
     "served nothing is no evidence that it works"),
    ({"steps": ()}, "no steps: there is no first weight to set"),
    ({"steps": (5, 20)}, "steps that never reach 100: after 20 % there is no next step (an "
     "IndexError at the advance) and the rollout never ends"),
    ({"steps": (50, 20, 100)}, "steps that go back (50 then 20): an advance that takes "
     "traffic away from the canary"),
    ({"max_error_rate": 5}, "max_error_rate=5, meant as 5 %: the threshold is a fraction "
     "(0.05), and errors / requests is never above 5 - a canary failing every request is "
     "promoted"),
    ({"max_error_rate": 1.0}, "max_error_rate=1.0: errors / requests is at most 1, so it is "
     "never above it - a gate that can never close"),
    ({"max_error_rate": -0.01}, "max_error_rate=-0.01: every rate is above it - even a "
     "canary without one error is rolled back"),
    ({"max_error_rate": float("nan")}, "max_error_rate=nan: NaN compares false with every "
     "number, so no error rate is ever above it (and `rate < 0 or rate >= 1` lets it "
     "through: check `not 0 <= rate < 1`)"),
]


def test_parameters_that_name_no_rollout_are_refused(learner: Any) -> None:
    mod = learner.load("canary")
    wrong = []
    for params, why in REFUSED_PARAMETERS:
        seen: list[int] = []
        call = "CanaryController(set_weight, " + ", ".join(
            f"{name}={value!r}" for name, value in params.items()) + ")"
        try:
            mod.CanaryController(seen.append, **params)
        except ValueError:
            if seen:
                wrong.append(f"{call} called set_weight({seen[0]}) before raising ValueError: "
                             "check the parameters before moving any traffic - the weight "
                             "stays set though the controller that set it is gone")
            continue
        except Exception as exc:  # noqa: BLE001 - any other outcome is the finding
            wrong.append(f"{call} raised {type(exc).__name__}: {exc}, expected ValueError "
                         f"({why})")
            continue
        wrong.append(f"{call} was accepted (set_weight got {seen}), expected ValueError: "
                     f"{why}")
    assert not wrong, "\n".join(wrong) + (
        f"\n({len(wrong)} of {len(REFUSED_PARAMETERS)} parameter sets): steps rise strictly, "
        "from at least 1, to 100, min_requests is at least 1 and max_error_rate a fraction "
        "in [0, 1) - refuse anything else in __init__ with ValueError, before set_weight is "
        "called")


def test_a_single_step_of_100_is_promoted_as_it_starts(learner: Any) -> None:
    mod = learner.load("canary")
    seen: list[int] = []
    try:
        ctl = mod.CanaryController(seen.append, steps=(100,))
    except Exception as exc:  # noqa: BLE001 - a refusal is the finding
        pytest.fail(f"CanaryController(set_weight, steps=(100,)) raised {type(exc).__name__}: "
                    f"{exc}, expected a controller: steps=(100,) rises from at least 1 to 100 "
                    "- it is a rollout, the whole of it at once (set_weight(100), then "
                    "'promoted'), not a parameter set to refuse", pytrace=False)
    got = []
    for requests, errors in ((0, 0), (1000, 900)):
        try:
            got.append(repr(ctl.tick(requests, errors)))
        except Exception as exc:  # noqa: BLE001 - a crash is the finding
            got.append(f"raised {type(exc).__name__}: {exc}")
            break
    assert (got, seen) == (["'promoted'", "'promoted'"], [100]), (
        f"CanaryController(set_weight, steps=(100,)): tick(0, 0), tick(1000, 900) answered "
        f"{', '.join(got)} and the weights set were {seen}; expected 'promoted' both times "
        "and [100]: a single step of 100 is the whole rollout at once - 100 % is set as the "
        "controller starts, so it is promoted there (as after any advance to 100), with no "
        "next step to look for and nothing left to judge")


def test_two_controllers_side_by_side(learner: Any) -> None:
    """Two services rolled out at once, each with its own controller, ticked in turn: each
    decides on its own counters and sets its own weights. Checked first alone (so a mistake
    of one controller is told apart from two controllers sharing state)."""
    mod = learner.load("canary")
    b_params = {"steps": (10, 50, 100), "max_error_rate": 0.05, "min_requests": 200}
    b_ticks, b_decisions, b_weights = [(300, 3), (600, 6)], ["advance", "promoted"], [10, 50, 100]
    alone: list[int] = []
    ctl = mod.CanaryController(alone.append, **b_params)
    got = [ctl.tick(r, e) for r, e in b_ticks]
    assert (got, alone) == (b_decisions, b_weights), (
        f"a controller with steps (10, 50, 100) answered {got} to tick(300, 3), tick(600, 6) "
        f"and set the weights {alone}; expected {b_decisions} and {b_weights}: each window "
        "of 300 requests has 3 errors (1 %)")
    a_seen: list[int] = []
    b_seen: list[int] = []
    a = mod.CanaryController(a_seen.append)
    b = mod.CanaryController(b_seen.append, **b_params)
    story = [("A", a, (1000, 0), "advance"), ("B", b, (300, 3), "advance"),
             ("A", a, (1300, 40), "rollback"), ("B", b, (600, 6), "promoted")]
    told = [(f"{who}.tick{ticks}", ctl.tick(*ticks), d) for who, ctl, ticks, d in story]
    wrong = [f"{call} -> {got!r}, expected {d!r}" for call, got, d in told if got != d]
    assert not wrong and (a_seen, b_seen) == ([5, 20, 0], b_weights), (
        f"two controllers side by side (two services rolled out at once) share state: ticked "
        f"in turn, {wrong[0] if wrong else 'every answer was right'}, and the weights went "
        f"through A's set_weight as {a_seen}, through B's as {b_seen} (expected [5, 20, 0] "
        f"and {b_weights}), though B alone decided right\nA window, a status or the "
        "set_weight callback is kept in a class attribute or a module global, where every "
        "controller reads and writes it. Keep each controller's state on the instance (self.)")
