"""Tools for lab authors: dev check (and its --strength report)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from ..report import console, err_console
from .base import (
    EXIT_FAIL,
    _catalog,
    _selected_labs,
    main,
)


@main.group()
def dev() -> None:
    """Tools for lab authors."""


@dev.command("check")
@click.argument("selectors", nargs=-1)
@click.option("--backend", type=click.Choice(["auto", "local", "docker", "external"]),
              default=None)
@click.option("--json", "json_path", type=click.Path(path_type=Path),
              help="Write every check's outcome to this file.")
@click.option("--learner-process", is_flag=True,
              help="Run the learner's code in a process of its own, as grading does.")
@click.option("--strength", is_flag=True,
              help="Only the wrong/ solutions: per lab, which it kills and the first line "
                   "of each message.")
@click.option("--record-failed-by", is_flag=True,
              help="Write each lab's wrong/failed_by.tsv: the test that failed each wrong "
                   "solution, run first by later checks of it.")
def dev_check(selectors: Sequence[str], backend: str | None, json_path: Path | None,
              learner_process: bool, strength: bool, record_failed_by: bool) -> None:
    """Every reference passes, every starter and wrong/ solution fails (default: all)."""
    from rich.table import Table

    from ..devcheck import check, checks_json, expectations, strength_expectations
    from ..report import mark
    from ..services.isolation import new_run_id
    from ..services.manager import resolve_backend_name
    from ..session import services_for, warm_owner

    labs, _ = _selected_labs(_catalog(), selectors or ["all"])
    todo = list(strength_expectations(labs) if strength else expectations(labs))
    outcomes = []
    with services_for(labs, resolve_backend_name(backend), owner=warm_owner()) as service_set:
        state = service_set.state_file if service_set.endpoints else None
        run_id = new_run_id()
        with err_console.status("checking…") as status:
            for n, expectation in enumerate(todo, 1):
                status.update(f"[{n}/{len(todo)}] {expectation.lab.id} {expectation.variant}")
                outcomes.append(check(expectation, state, run_id, learner_process,
                                      service_set.workdir))
    if record_failed_by:
        from ..devcheck import record_failed_by as record

        for path in record(outcomes):
            err_console.print(f"wrote {path}")
    if strength:
        _strength_report(outcomes, json_path)
        return
    table = Table(title="dev check", title_justify="left")
    for column in ("", "lab", "variant", "expected", "got", "first line"):
        table.add_column(column, overflow="fold")
    for outcome in outcomes:
        exp = outcome.expectation
        table.add_row(mark("passed" if outcome.met else "failed"), exp.lab.id, exp.variant,
                      "pass" if exp.must_pass else "fail", outcome.result.outcome,
                      outcome.result.first_line)
    console.print(table)
    unmet = [o for o in outcomes if not o.met]
    console.print(f"{len(outcomes) - len(unmet)} of {len(outcomes)} expectations met")
    if json_path:
        from ..results import write_json

        write_json(json_path, checks_json(outcomes))
    sys.exit(EXIT_FAIL if unmet else 0)


def _strength_report(outcomes: Sequence[Any], json_path: Path | None) -> None:
    """``dev check --strength``: a row per wrong solution; exit 1 if one is not killed."""
    from rich.markup import escape
    from rich.table import Table

    from ..devcheck import strength_rows, strength_summary

    rows = strength_rows(outcomes)
    table = Table(title="dev check --strength", title_justify="left")
    for column in ("lab", "wrong solution", "killed", "first line"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row.lab, row.wrong, "[green]yes[/]" if row.killed else
                      f"[red]no[/] ({row.outcome})", escape(row.first_line))
    console.print(table)
    summary = strength_summary(rows)
    for lab, counts in summary.items():
        console.print(f"{lab}: kills {counts['killed']} of {counts['wrong']} wrong solutions")
    if json_path:
        from ..results import write_json

        write_json(json_path, {"version": 1, "strength": [r.as_json() for r in rows],
                               "labs": summary})
    sys.exit(EXIT_FAIL if any(not r.killed for r in rows) else 0)
