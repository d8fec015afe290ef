"""The terminal's summary of a graded cohort."""

from __future__ import annotations

from collections.abc import Sequence

from ..catalog import Lab
from .cohort import CohortOutcome


def print_summary(outcome: CohortOutcome, labs: Sequence[Lab]) -> None:
    """A row per student: a column per concept, or per phase when the concepts would not
    fit the terminal (grades.csv always has them all)."""
    from rich.table import Table

    from ..report import console, err_console

    colours = {"pass": "green", "fail": "red", "error": "yellow", "timeout": "magenta"}
    ids = [lab.id for lab in labs]
    per_concept = len(ids) * 10 + 30 <= console.width
    phases = list(dict.fromkeys(lab.id.split(".")[0] for lab in labs))
    table = Table(title="Gradebook")
    table.add_column("student")
    for column in ids if per_concept else phases:
        table.add_column(column, justify="left" if per_concept else "right")
    table.add_column("total", justify="right")
    for doc in sorted(outcome.students, key=lambda d: d["student"]):
        by_id = {c["id"]: c for c in doc["concepts"]}
        cells = []
        if per_concept:
            for lab_id in ids:
                c = by_id.get(lab_id)
                if c is not None and c.get("attempted") is False:
                    cells.append("[dim]-[/]")   # not attempted: nothing of theirs was run
                    continue
                cells.append("" if c is None else
                             f"[{colours.get(c['status'], 'white')}]{c['status']}[/] "
                             f"{c['points']}")
        else:
            for phase in phases:
                mine = [c for c in doc["concepts"] if c["id"].split(".")[0] == phase]
                passed = sum(c["status"] == "pass" for c in mine)
                colour = "green" if passed == len(mine) else "red" if not passed else "yellow"
                cells.append(f"[{colour}]{passed}/{len(mine)}[/]")
        table.add_row(doc["student"], *cells, f"{doc['total']}/{doc['max_total']}")
    console.print(table)
    for note in outcome.notes:
        err_console.print(f"[yellow]note:[/] {note}")
