"""One ``labrunner run``: pick the labs, bring up the services they need, verify, record.

Kept out of the CLI so that grading, benchmarks and tests drive the same path."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from .catalog import Lab
from .report import err_console
from .runner import LabResult, RunPlan, Sandbox, run_all
from .services import SERVICE_NAMES
from .services.base import Endpoint, ServiceError
from .services.isolation import new_run_id
from .services.manager import ServiceSet, Startup
from .services.warm import WarmSet
from .services.warm_admin import stop_some
from .store import Attempt, ProgressStore, files_hash

if TYPE_CHECKING:
    from rich.progress import Progress


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


def warm_owner(workspace_dir: Path | None = None) -> Path:
    """Whose warm set a command uses: the workspace (``workspace_dir`` or the one here or
    above), else the labrunner checkout (``--solutions``/``--starters`` runs, dev check)."""
    from .catalog import find_project_root
    from .workspace import WorkspaceError, find_workspace

    try:
        return find_workspace(workspace_dir).root.resolve()
    except WorkspaceError:
        return (find_project_root() or Path.cwd()).resolve()


def _sigint_ignored() -> contextlib.AbstractContextManager[None]:
    """Clean-up that a second and third Ctrl-C must not cut short (they used to leave a
    ``run-<pid>-*`` folder and services behind)."""
    return _signal_handled(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _signal_handled(signum: int, handler: Any) -> Iterator[None]:
    """``handler`` for ``signum`` while the block runs (only the main thread may set one:
    elsewhere the block runs as it is)."""
    try:
        previous = signal.signal(signum, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signum, previous)


@contextlib.contextmanager
def services_for(labs: Sequence[Lab], backend: str, quiet: bool = False,
                 keep: float = 0.0, owner: Path | None = None,
                 wait_all: bool = True,
                 on_event: Callable[[str, str], None] | None = None) -> Iterator[ServiceSet]:
    """The services ``labs`` need, all started at once (one thread each).

    Reused from ``owner``'s warm set where it has them (the run counts as one of its users,
    so ``labrunner services down`` keeps the set while the run lasts). With ``keep`` (idle
    seconds), the missing ones are started into that warm set and left running for ``keep``
    seconds after the run (a detached reaper stops them then); without, they belong to this
    run and stop when it ends. On Ctrl-C or SIGTERM every start still going gives up, what
    this run started is stopped and nothing of the run is left.

    With ``wait_all`` the set is yielded once every service is ready (a service that failed
    raises); without, at once: ``service_set.startup`` tells which are ready (the runner
    starts each lab when its own services are). ``on_event(kind, name)`` hears "start",
    "ready" and "failed" (tests and benchmarks order labs against them)."""
    names = needed_services(labs)
    run_set = ServiceSet.ephemeral(backend)
    warm = WarmSet.of(backend, owner) if owner is not None and backend != "external" else None
    warm_set: ServiceSet | None = None
    lock_released = threading.Event()
    lock_released.set()
    startup: Startup | None = None
    interrupted = False
    me = os.getpid()
    news = _StartNews(run_set, backend, quiet, on_event)
    try:
        with _terminate_as_interrupt():
            lock: Any = None
            reused: dict[str, Endpoint] = {}
            if warm is not None:
                assert owner is not None
                lock_released.clear()
                lock, warm_set, reused = _join_warm(warm, backend, owner, names, keep, me)
            run_set.endpoints.update(reused)
            run_set.save()
            target = warm_set if (warm_set is not None and keep > 0) else run_set
            startup = Startup(target, [n for n in names if n not in reused],
                              on_start=news.announce, on_ready=news.ready,
                              on_failed=news.failed, keep_threads=target is run_set)
            news.startup = run_set.startup = startup
            startup.begin()
            if warm is not None:
                _release_warm(warm, lock, startup, lock_released,
                              kept=target is warm_set)
            if wait_all:
                startup.wait()
                problem = startup.problem(names)
                if problem:
                    raise ServiceError(problem)
            yield run_set
    except BaseException:
        interrupted = True
        raise
    finally:
        with _sigint_ignored():
            _finish(run_set, warm, warm_set, startup, keep, interrupted, lock_released, me)


class _StartNews:
    """What a run says (and tells ``on_event``) as its services start: starting, ready,
    failed; nothing more once Ctrl-C cancelled the start."""

    def __init__(self, run_set: ServiceSet, backend: str, quiet: bool,
                 on_event: Callable[[str, str], None] | None) -> None:
        self.run_set, self.backend, self.quiet, self.on_event = run_set, backend, quiet, on_event
        self.startup: Startup | None = None
        self.guard = threading.Lock()

    def _event(self, kind: str, name: str) -> None:
        if self.on_event is not None:
            self.on_event(kind, name)

    def _say(self, text: str) -> None:
        if not self.quiet and not (self.startup is not None
                                   and self.startup.cancelled.is_set()):
            err_console.print(f"[dim]{text}[/]")

    def announce(self, name: str) -> None:
        self._event("start", name)
        self._say(f"starting {name} ({self.backend})…")

    def ready(self, name: str, endpoint: Endpoint, took: float) -> None:
        with self.guard:
            if self.run_set.workdir.is_dir():
                self.run_set.endpoints[name] = endpoint
                self.run_set.save()
        self._event("ready", name)
        self._say(f"{name} ready in {took:.1f} s")

    def failed(self, name: str, message: str) -> None:
        self._event("failed", name)


def _join_warm(warm: WarmSet, backend: str, owner: Path, names: Sequence[str], keep: float,
               me: int) -> tuple[Any, ServiceSet, dict[str, Endpoint]]:
    """Take ``owner``'s warm set (its lock held until released): count this run as one of
    its users, push its idle deadline, and say which of ``names`` it already runs."""
    lock = warm.acquire()
    if warm.expired():
        warm.stop_all()   # its deadline passed and its reaper is gone
    warm_set = ServiceSet.warm_set(backend, owner)
    reused = {n: ep for n, ep in warm_set.endpoints.items() if n in names}
    warm.add_user(me)
    if keep > 0:
        meta = warm_set.meta["warm"]
        if not meta.get("pinned"):
            meta.update(idle=keep, deadline=time.time() + keep)
        warm_set.save()
    return lock, warm_set, reused


def _release_warm(warm: WarmSet, lock: Any, startup: Startup, lock_released: threading.Event,
                  kept: bool) -> None:
    """Let the warm set's lock go: at once when this run starts nothing into it, else once
    its starts have ended (a second run then finds them, not half of them)."""
    if not kept:
        WarmSet.release(lock)
        lock_released.set()
        return
    warm.ensure_reaper()

    def release_when_started() -> None:
        startup.wait()
        WarmSet.release(lock)
        lock_released.set()

    threading.Thread(target=release_when_started, daemon=True).start()


def _finish(run_set: ServiceSet, warm: WarmSet | None, warm_set: ServiceSet | None,
            startup: Startup | None, keep: float, interrupted: bool,
            lock_released: threading.Event, me: int) -> None:
    """A run's services at its end (see :func:`services_for`)."""
    if startup is not None:
        startup.cancel()   # no-op for the starts that finished
        startup.join()
    lock_released.wait(60)
    kept_warm = warm is not None and warm_set is not None and keep > 0
    if warm is not None:
        with warm.locked():
            if kept_warm:
                started = [n for n in (startup.names if startup else [])]
                if interrupted:
                    # Ctrl-C: what this run started goes (unless another run took it up);
                    # what was warm before stays warm.
                    if not warm.live_users(exclude=me):
                        stop_some(warm, started)
                elif not warm.pinned() and warm.read():
                    warm.write_meta(idle=keep, deadline=time.time() + keep)
                    warm.ensure_reaper()
            warm.remove_user(me)
            if warm.folder.is_dir() and not warm.read() and not warm.live_users():
                warm.stop_all()   # nothing in it (all failed, or stopped above)
    # The run's own folder: its own services (not kept) and the state the tests read.
    for name in list(run_set.endpoints):
        if name not in run_set.started_here:
            run_set.endpoints.pop(name)
    try:
        run_set.stop()
    finally:
        from .services.local.process import remove_tree

        remove_tree(run_set.workdir)
        if startup is not None:
            startup.release()


def _terminate_as_interrupt() -> contextlib.AbstractContextManager[None]:
    """SIGTERM (a CI cancel, a kill) takes the same clean path as Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    return _signal_handled(signal.SIGTERM, handler)


def _progress_bar(show: bool) -> Progress:
    # Imported here: rich's live display is only needed once a run starts.
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("{task.fields[current]}"),
        console=err_console, transient=True, disable=not show,
    )


def _fail_unparsable(labs: Sequence[Lab], sources: dict[str, Path],
                     settle: Callable[[LabResult], None]) -> list[Lab]:
    """A file that does not even parse fails at once, before any service starts for it:
    settle those; the labs left to run."""
    unparsable = {lab.id: problem for lab in labs
                  if (problem := syntax_problem(lab, sources[lab.id])) is not None}
    for lab in labs:
        if lab.id in unparsable:
            settle(LabResult(lab, "failed", 0.0, unparsable[lab.id], started_at=time.time()))
    return [lab for lab in labs if lab.id not in unparsable]


def _run_with_bar(plan: RunPlan, settle: Callable[[LabResult], None], show: bool) -> None:
    """Run the plan under a progress bar naming the lab being verified."""
    progress = _progress_bar(show)
    with progress:
        task = progress.add_task("verifying", total=len(plan.labs), current="")

        def started_lab(lab: Lab) -> None:
            progress.update(task, current=f"{lab.id} {lab.slug}")

        def finished(result: LabResult) -> None:
            settle(result)
            progress.advance(task)

        run_all(plan, finished, started_lab)


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
    keep: float = 0.0,
    owner: Path | None = None,
    on_event: Callable[[str, str], None] | None = None,
) -> RunOutcome:
    """Verify ``labs`` against ``sources`` (lab id → learner folder). With a store, each
    finished lab is recorded as it finishes, so an interrupted run keeps what it did. The
    services start together and each lab starts once its own are ready; ``keep`` and
    ``owner``: see :func:`services_for`."""
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

    labs = _fail_unparsable(labs, sources, settle)
    if not labs:
        return RunOutcome(results, started, time.time() - started, backend)
    # A caller that keeps services up across runs (``labrunner watch``) passes its set.
    scope: contextlib.AbstractContextManager[ServiceSet] = (
        contextlib.nullcontext(services) if services is not None
        else services_for(labs, backend, quiet=not show_progress, keep=keep, owner=owner,
                          wait_all=False, on_event=on_event))
    with scope as service_set:
        startup = service_set.startup
        state = (service_set.state_file
                 if service_set.endpoints or (startup is not None and startup.names) else None)
        if sandbox is None or sandbox.workdir_root is None:
            # The labs' working folders in the run's own folder: swept if the run is killed.
            sandbox = dataclasses.replace(sandbox or Sandbox(), workdir_root=service_set.workdir)
        plan = RunPlan(labs, sources, state, new_run_id(), jobs, sandbox, readiness=startup)
        _run_with_bar(plan, settle, show_progress)
    order = {lab.id: n for n, lab in enumerate(selected)}
    results.sort(key=lambda r: order[r.lab.id])
    return RunOutcome(results, started, time.time() - started, backend)
