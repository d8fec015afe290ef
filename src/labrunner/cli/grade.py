"""Grading (instructors): grade SUBMISSIONS..., grade merge DIR...."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click

from ..report import console
from .base import (
    UsageFailure,
    _catalog,
    _labs_to,
    main,
)

# --------------------------------------------------------------------------------------
# grade (instructors)


class _GradeGroup(click.Group):
    """``grade SUBMISSIONS...`` grades; ``grade merge DIR...`` merges shard outputs."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or args[0] not in self.commands:
            args = ["cohort", *args]
        return super().parse_args(ctx, args)


@main.group(cls=_GradeGroup)
def grade() -> None:
    """Grade submissions (labrunner grade SUBMISSIONS... --select ph2), or merge shard
    outputs (labrunner grade merge DIR... --out OUT). See docs/GRADING.md."""


@grade.command("cohort", hidden=True)
@click.argument("submissions", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@click.option("--select", "selectors", multiple=True, required=True,
              help="What to grade: a phase (ph2), concepts (ph2.5), slugs; repeatable.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("grades"),
              show_default=True, help="Output folder (results/, grades.csv, grades.json, "
              "feedback/).")
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Submissions graded at once.")
@click.option("--timeout", type=click.FloatRange(1, None), default=None,
              help="Wall-clock seconds per submission and lab (default: from the lab).")
@click.option("--memory", "memory_mb", type=click.IntRange(64, None), default=1024,
              show_default=True, help="Address-space limit per graded process, in MB.")
@click.option("--hidden-tests", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Instructor's extra tests: DIR/<concept id>/test_*.py.")
@click.option("--shard", help="Grade only slice I of N (1-based), e.g. 2/4.")
@click.option("--force", is_flag=True, help="Re-grade submissions already graded.")
@click.option("--feedback", "feedback_format", type=click.Choice(["md", "html"]),
              default="md", show_default=True)
@click.option("--backend", type=click.Choice(["auto", "local", "docker", "external"]),
              default=None, help="Who runs the services (default: auto).")
def grade_cohort_cmd(submissions: Sequence[Path], selectors: Sequence[str], out: Path,
                     jobs: int, timeout: float | None, memory_mb: int,
                     hidden_tests: Path | None, shard: str | None, force: bool,
                     feedback_format: str, backend: str | None) -> None:
    """Grade SUBMISSIONS (workspace folders, .zip/.tar.gz of one, or folders of those)."""
    from ..grading import (
        GradeConfig,
        GradingError,
        Limits,
        grade_with_services,
        parse_shard,
        print_summary,
    )
    from ..services.manager import resolve_backend_name

    catalog = _catalog()
    labs = _labs_to("grade", "not graded", catalog, selectors)
    try:
        config = GradeConfig(
            labs=labs, out=out.resolve(), backend=resolve_backend_name(backend), jobs=jobs,
            limits=Limits(timeout=timeout, memory_mb=memory_mb),
            hidden=hidden_tests.resolve() if hidden_tests else None, force=force,
            shard=parse_shard(shard) if shard else None, feedback_format=feedback_format,
            selectors=tuple(selectors))
        outcome = grade_with_services(config, [Path(p) for p in submissions])
    except GradingError as exc:
        raise UsageFailure(str(exc)) from exc
    print_summary(outcome, labs)
    console.print(f"{len(outcome.graded)} graded, {len(outcome.skipped)} unchanged (kept) in "
                  f"{outcome.duration:.1f}s; gradebook in {out}")


@grade.command("merge")
@click.argument("dirs", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for the merged gradebook.")
@click.option("--feedback", "feedback_format", type=click.Choice(["md", "html"]),
              default="md", show_default=True)
def grade_merge_cmd(dirs: Sequence[Path], out: Path, feedback_format: str) -> None:
    """Merge the outputs of sharded 'labrunner grade --shard I/N' runs into one gradebook."""
    from ..grading import GradingError, merge

    try:
        document = merge(list(dirs), out, feedback_format)
    except GradingError as exc:
        raise UsageFailure(str(exc)) from exc
    console.print(f"merged {document['summary']['students']} students from {len(dirs)} "
                  f"folders into {out}")
