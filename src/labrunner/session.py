"""One ``labrunner run``: pick the labs, bring up the services they need, verify, record.

Kept out of the CLI so that grading, benchmarks and tests drive the same path."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .catalog import Lab
from .report import err_console
from .runner import LabResult, RunPlan, Sandbox, run_all
from .services import SERVICE_NAMES
from .services.base import Endpoint
from .services.isolation import new_run_id
from .services.manager import ServiceSet, read_state, warm_state_file
from .store import Attempt, ProgressStore, files_hash


@dataclass
class RunOutcome:
    results: list[LabResult]
    started_at: float
    duration: float
    backend: str


def needed_services(labs: Sequence[Lab]) -> list[str]:
    wanted = {s for lab in labs for s in lab.services}
    return [s for s in SERVICE_NAMES if s in wanted]


def syntax_problem(lab: Lab, source: Path) -> str | None:
    """``file:line: syntax error: ...`` for the first learner Python file that does not
    parse, else None (a missing file is the verification's to report)."""
    for name in lab.learner_files:
        path = source / name
        if path.suffix != ".py" or not path.is_file():
            continue
        try:
            compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
        except SyntaxError as exc:
            return f"{path}:{exc.lineno}: syntax error: {exc.msg}"
        except ValueError as exc:  # NUL bytes
            return f"{path}: cannot be read as Python source: {exc}"
    return None


@contextlib.contextmanager
def services_for(labs: Sequence[Lab], backend: str, quiet: bool = False) -> Iterator[ServiceSet]:
    """The services ``labs`` need: reused from the warm set where it has them, the rest
    started for this run and stopped when it ends, also on Ctrl-C or SIGTERM."""
    run_set = ServiceSet.ephemeral(backend)
    warm = {name: ep for name, ep in read_state(warm_state_file(backend)).items()}
    reused: dict[str, Endpoint] = {}
    for name in needed_services(labs):
        if name in warm and run_set.backend.alive(warm[name]):
            reused[name] = warm[name]
    run_set.endpoints.update(reused)

    def announce(name: str) -> None:
        if not quiet:
            err_console.print(f"[dim]starting {name} ({backend})…[/]")

    try:
        with _terminate_as_interrupt():
            run_set.ensure(needed_services(labs), on_start=announce)
            yield run_set
    finally:
        # Forget the warm services before stopping: they belong to the warm set.
        for name in reused:
            run_set.endpoints.pop(name, None)
        run_set.stop()


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a CI cancel, a kill) takes the same clean path as Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _progress_bar(show: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("{task.fields[current]}"),
        console=err_console, transient=True, disable=not show,
    )


def verify(
    labs: Sequence[Lab],
    sources: dict[str, Path],
    backend: str,
    jobs: int = 1,
    store: ProgressStore | None = None,
    show_progress: bool = True,
    sandbox: Sandbox | None = None,
    on_result: Callable[[LabResult], None] | None = None,
    services: ServiceSet | None = None,
) -> RunOutcome:
    """Verify ``labs`` against ``sources`` (lab id → learner folder). With a store, each
    finished lab is recorded as it finishes, so an interrupted run keeps what it did."""
    started = time.time()
    results: list[LabResult] = []
    selected = list(labs)

    def settle(result: LabResult) -> None:
        """A lab is done: hash the files it ran, record the attempt, show its line."""
        result.files_hash = files_hash(sources[result.lab.id], result.lab.learner_files)
        if store is not None:
            store.record(Attempt(result.lab.id, result.started_at, result.outcome,
                                 result.duration, result.files_hash, result.message))
        results.append(result)
        if on_result is not None:
            on_result(result)  # printed above the bar as soon as the lab is done

    # A file that does not even parse fails at once, before any service starts for it.
    unparsable = {lab.id: problem for lab in labs
                  if (problem := syntax_problem(lab, sources[lab.id])) is not None}
    for lab in labs:
        if lab.id in unparsable:
            settle(LabResult(lab, "failed", 0.0, unparsable[lab.id], started_at=time.time()))
    labs = [lab for lab in labs if lab.id not in unparsable]
    if not labs:
        return RunOutcome(results, started, time.time() - started, backend)
    # A caller that keeps services up across runs (``labrunner watch``) passes its set.
    scope: contextlib.AbstractContextManager[ServiceSet] = (
        contextlib.nullcontext(services) if services is not None
        else services_for(labs, backend, quiet=not show_progress))
    with scope as service_set:
        state = service_set.state_file if service_set.endpoints else None
        plan = RunPlan(labs, sources, state, new_run_id(), jobs, sandbox)
        progress = _progress_bar(show_progress)
        with progress:
            task = progress.add_task("verifying", total=len(labs), current="")

            def started_lab(lab: Lab) -> None:
                progress.update(task, current=f"{lab.id} {lab.slug}")

            def finished(result: LabResult) -> None:
                settle(result)
                progress.advance(task)

            run_all(plan, finished, started_lab)
    order = {lab.id: n for n, lab in enumerate(selected)}
    results.sort(key=lambda r: order[r.lab.id])
    return RunOutcome(results, started, time.time() - started, backend)
