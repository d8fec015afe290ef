"""A cohort: submissions prepared, graded in parallel with results written as each finishes,
the services it needs (what the CLI calls)."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import GradeConfig, GradingError, use_private_services
from .gradebook import read_result, results_dir, write_atomic, write_gradebook
from .grader import Grader, problem_document
from .sandbox import _dedupe, _Slot
from .submissions import Submission, discover, fingerprint, remove_tree, shard_of, unpack


@dataclass
class CohortOutcome:
    graded: list[str]
    skipped: list[str]
    students: list[dict[str, Any]]
    notes: list[str]
    duration: float


def prepare_submissions(submissions: list[Submission], staging: Path) -> list[Submission]:
    """Unpack archives (into root-only staging). The student id is the folder's or the
    archive's name (a ``student`` field in the submission is not trusted). A submission
    that cannot be unpacked, or whose id another one has too, keeps a ``problem``: it is
    recorded as an error, and the cohort goes on."""
    seen: dict[str, Submission] = {}
    unique: list[Submission] = []
    for sub in submissions:
        if sub.source.is_dir():
            sub.workspace = sub.source
        else:
            try:
                sub.workspace = unpack(sub.source, staging / secrets.token_hex(6))
            except GradingError as exc:
                message = str(exc)
                if sub.source.name not in message:
                    message = f"{sub.source.name}: {message}"
                sub.problem = message
            except (OSError, ValueError, RecursionError, MemoryError) as exc:
                sub.problem = f"{sub.source.name}: could not be unpacked ({exc})"
        if sub.student in seen:
            # Two submissions named alike (alice/ and alice.zip): neither is graded as
            # alice's, and nobody else is affected.
            first = seen[sub.student]
            conflict = (f"student id {sub.student!r} is the name of both {first.source.name} "
                        f"and {sub.source.name}: rename one and grade again")
            first.problem = sub.problem = conflict
            continue
        seen[sub.student] = sub
        unique.append(sub)
    return unique


def _triage(config: GradeConfig, submissions: list[Submission], results: Path,
            on_done: Callable[[dict[str, Any], bool], None] | None
            ) -> tuple[list[tuple[Submission, str]], list[str]]:
    """What to grade (with its fingerprint) and who is skipped, unchanged since a result was
    written; a submission that cannot be graded gets its problem document now."""
    todo: list[tuple[Submission, str]] = []
    skipped: list[str] = []
    for sub in submissions:
        if sub.problem or sub.workspace is None:
            doc = problem_document(config.labs, sub)
            write_atomic(results / f"{sub.student}.json", json.dumps(doc, indent=2))
            if on_done:
                on_done(doc, False)
            continue
        try:
            mark = fingerprint(config, sub.workspace, sub.student)
        except (OSError, RecursionError) as exc:
            sub.problem = f"{sub.source.name}: could not be read ({exc})"
            doc = problem_document(config.labs, sub)
            write_atomic(results / f"{sub.student}.json", json.dumps(doc, indent=2))
            continue
        old = read_result(results / f"{sub.student}.json")
        if not config.force and old is not None and old.get("fingerprint") == mark:
            skipped.append(sub.student)
            if on_done:
                on_done(old, True)
            continue
        todo.append((sub, mark))
    return todo, skipped


def _grade_all(grader: Grader, todo: list[Submission], results: Path,
               on_start: Callable[[str], None] | None,
               on_done: Callable[[dict[str, Any], bool], None] | None) -> list[str]:
    """Grade ``todo`` on ``--jobs`` slots, each result written as it finishes; on an error
    or Ctrl-C every running verification is killed before it propagates."""
    graded: list[str] = []
    cancelled = threading.Event()
    slots: list[_Slot] = [_Slot(i, grader.base, grader.sandboxed)
                          for i in range(max(1, grader.config.jobs))]
    free = list(slots)
    free_lock = threading.Lock()

    def one(sub: Submission) -> None:
        if cancelled.is_set():
            return
        with free_lock:
            slot = free.pop()
        try:
            if on_start:
                on_start(sub.student)
            doc = grader.grade(sub, slot, cancelled)
            if doc is None or cancelled.is_set():
                return
            write_atomic(results / f"{sub.student}.json", json.dumps(doc, indent=2))
            graded.append(sub.student)
            if on_done:
                on_done(doc, False)
        finally:
            with free_lock:
                free.append(slot)

    pool = ThreadPoolExecutor(max_workers=len(slots))
    futures = [pool.submit(one, sub) for sub in todo]
    try:
        for future in futures:
            future.result()
    except BaseException:
        cancelled.set()
        grader.kill_all()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return graded


def grade_cohort(
    config: GradeConfig,
    paths: Sequence[Path],
    state_file: Path | None,
    on_start: Callable[[str], None] | None = None,
    on_done: Callable[[dict[str, Any], bool], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> CohortOutcome:
    started = time.time()
    staging = Path(tempfile.mkdtemp(prefix="lr-unpack-"))  # 0700, root's
    config.out.mkdir(parents=True, exist_ok=True)
    results = results_dir(config.out)
    results.mkdir(exist_ok=True)
    os.chmod(results, 0o700)
    grader: Grader | None = None
    try:
        submissions = prepare_submissions(discover(paths), staging)
        if config.shard:
            index, count = config.shard
            submissions = [s for s in submissions if shard_of(s.student, count) == index]
        if on_total:
            on_total(len(submissions))
        todo, skipped = _triage(config, submissions, results, on_done)
        hide = [*(s.source for s in submissions), config.out, staging]
        if config.hidden:
            hide.append(config.hidden)
        hide += [Path(p) for p in paths if Path(p).is_dir()]
        grader = Grader(config, state_file, _dedupe(hide))
        graded = _grade_all(grader, [sub for sub, _ in todo], results, on_start, on_done)
        students = [doc for doc in (read_result(results / f"{s.student}.json")
                                    for s in submissions) if doc is not None]
        write_gradebook(config.out, config.labs, students, config.feedback_format)
        return CohortOutcome(graded, skipped, students, grader.notes, time.time() - started)
    finally:
        if grader is not None:
            grader.close()
        remove_tree(staging)


def grade_with_services(config: GradeConfig, paths: Sequence[Path],
                        show_progress: bool = True) -> CohortOutcome:
    """Bring up the services the labs need once for the cohort, then grade it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..report import err_console
    from ..session import services_for

    shared = [] if use_private_services(config) else config.labs
    with services_for(shared, config.backend, quiet=not show_progress) as service_set:
        state = service_set.state_file if service_set.endpoints else None
        if state is not None:
            # Shared services: every sandboxed run reads their admin credentials (stated in
            # docs/GRADING.md); private services hand each run its own state instead.
            service_set.state_mode = 0o644
            os.chmod(state, 0o644)
        progress = Progress(
            TextColumn("[bold]grading"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("{task.fields[current]}"),
            console=err_console, transient=True, disable=not show_progress)
        with progress:
            task = progress.add_task("grading", total=None, current="")
            return grade_cohort(
                config, paths, state,
                on_start=lambda student: progress.update(task, current=student),
                on_done=lambda doc, kept: progress.advance(task),
                on_total=lambda n: progress.update(task, total=n))
