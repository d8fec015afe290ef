"""What the terminal shows: result tables per phase, and the roadmap-style progress page."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .catalog import Catalog
from .outcome import Outcome
from .scoring import LabResult
from .store import ConceptStatus

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

MARKS = {o.value: (o.symbol, o.colour) for o in Outcome}


def mark(outcome: str) -> Text:
    symbol, style = MARKS.get(outcome, ("?", "white"))
    return Text(symbol, style=f"bold {style}")


# How many lines of a multi-line failure (a compiler's errors) the one-line view shows.
DETAIL_LINES = 8


def print_result(result: LabResult) -> None:
    """A finished concept's line, unwrapped: a terminal wraps it, a log keeps it whole."""
    console.print(result_line(result), soft_wrap=True)


def result_line(result: LabResult) -> Text:
    """One finished concept as a line: mark, id, time, and what failed."""
    line = Text.assemble(mark(result.outcome), " ", (f"{result.lab.id} ", "bold"),
                         f"{result.lab.slug} ", (f"{result.duration:.1f}s", "dim"))
    if result.outcome != "passed":
        line.append("  " + result.first_line)
        detail = _detail(result)
        if detail:
            line.append("\n" + "\n".join(f"    {d}" for d in detail), style="dim")
    return line


def _detail(result: LabResult) -> list[str]:
    """The lines under a first line that ends in ':' (a compiler's own errors): shown even
    without -v, since such a first line alone says nothing."""
    lines = [ln for ln in result.message.splitlines() if ln.strip()]
    if len(lines) < 2 or not lines[0].rstrip().endswith(":"):
        return []
    errors = [ln for ln in lines[1:] if "error" in ln or "warning" in ln]
    return (errors or lines[1:])[:DETAIL_LINES]


def verbose_result(result: LabResult) -> None:
    """Every test of a concept with its status and whole message, and what the learner's
    code printed in a failing test."""

    def show(text: Text) -> None:
        console.print(text, soft_wrap=True)

    def indented(text: str, prefix: str = "        ") -> str:
        return "\n".join(f"{prefix}{ln}" for ln in text.splitlines())

    show(result_line(result))
    for test in result.tests:
        show(Text.assemble("    ", mark(test.outcome), f" {test.name} ",
                           (f"{test.duration:.2f}s", "dim")))
        if test.outcome != "passed" and test.message:
            show(Text(indented(test.message)))
        if test.output:
            show(Text("        your code printed:", style="bold"))
            show(Text(indented(test.output, "        | "), style="dim"))
    if not result.tests and result.message:
        show(Text(indented(result.message)))


def results_tables(catalog: Catalog, results: Sequence[LabResult], target: str) -> None:
    by_phase: dict[str, list[LabResult]] = {}
    for result in results:
        by_phase.setdefault(result.lab.phase_id, []).append(result)
    for phase in catalog.phases:
        items = by_phase.get(phase.id)
        if not items:
            continue
        table = Table(title=f"Phase {phase.number} · {phase.name}", title_justify="left",
                      expand=False, show_lines=False)
        table.add_column("", width=1)
        table.add_column("concept", no_wrap=True)
        table.add_column("time", justify="right", no_wrap=True)
        table.add_column("first failure", overflow="fold")
        for result in items:
            table.add_row(mark(result.outcome), f"{result.lab.id} {result.lab.slug}",
                          f"{result.duration:.1f}s",
                          result.first_line if result.outcome != "passed" else "")
        console.print(table)
        concepts = [r for r in items if not r.lab.is_example]
        done = sum(1 for r in concepts if r.outcome == "passed")
        examples = [r for r in items if r.lab.is_example]
        available = sum(1 for c in phase.concepts if c.lab is not None)
        verb = "pass" if target != "workspace" else "done"
        if len(concepts) < available:
            noun = "selected concept" if len(concepts) == 1 else "selected concepts"
            line = f"Phase {phase.number}: {done} of {len(concepts)} {noun} {verb}"
        else:
            line = f"Phase {phase.number}: {done}/{len(concepts)} concepts {verb}"
        if examples:
            line += f", C example {'✓' if examples[0].outcome == 'passed' else '✗'}"
        missing = [c for c in phase.concepts if c.lab is None]
        if missing and len(concepts) == available:
            line += f" ({len(missing)} concepts have no lab yet)"
        console.print(line + "\n")


def progress_page(catalog: Catalog, status: dict[str, ConceptStatus],
                  verbose: bool = False) -> None:
    """All 8 phases as the roadmap page shows them: done of total, percent, overall."""
    total = len(catalog.concepts)
    available = sum(1 for c in catalog.concepts if c.lab is not None)
    done_all = sum(1 for c in catalog.concepts
                   if c.lab is not None and c.id in status and status[c.id].done)
    percent = done_all * 100 // available if available else 0
    console.print(f"[bold]Overall progress[/] {percent}% · {done_all} of {available} "
                  f"available concepts done ({total} in the roadmap)\n")
    table = Table(show_header=True, expand=False)
    table.add_column("phase")
    table.add_column("name")
    table.add_column("done", justify="right")
    table.add_column("", min_width=22)
    table.add_column("%", justify="right")
    table.add_column("notes")
    for phase in catalog.phases:
        n = len(phase.concepts)
        done = sum(1 for c in phase.concepts if c.id in status and status[c.id].done)
        regressed = sum(1 for c in phase.concepts
                        if c.id in status and status[c.id].state == "regressed")
        no_lab = sum(1 for c in phase.concepts if c.lab is None)
        filled = round(20 * done / n) if n else 0
        bar = Text("█" * filled, style="green") + Text("░" * (20 - filled), style="dim")
        notes = []
        if regressed:
            notes.append(f"[red]{regressed} regressed[/]")
        if no_lab:
            notes.append(f"[dim]{no_lab} without a lab yet[/]")
        table.add_row(phase.id, phase.name, f"{done}/{n}", bar, f"{done * 100 // n}%",
                      ", ".join(notes))
    console.print(table)
    if verbose:
        for phase in catalog.phases:
            for concept in phase.concepts:
                state = status.get(concept.id)
                label = "no lab yet" if concept.lab is None else (
                    state.state if state else "not started")
                console.print(f"  {concept.id:<6} {concept.slug:<28} {label}")


def progress_json(catalog: Catalog, status: dict[str, Any]) -> dict[str, Any]:
    """``labrunner progress --json`` (version 1): done of total, per phase, each concept's
    state and attempts."""
    done = [c.id for c in catalog.concepts if c.id in status and status[c.id].done]
    return {
        "version": 1, "done": len(done), "total": len(catalog.concepts),
        "phases": [{"id": p.id, "name": p.name, "total": len(p.concepts),
                    "done": sum(1 for c in p.concepts if c.id in done)}
                   for p in catalog.phases],
        "concepts": {cid: {"state": s.state, "attempts": s.attempts}
                     for cid, s in status.items()},
    }
