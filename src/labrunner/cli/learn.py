"""The learner's commands: list, hint, init, run, watch."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from ..catalog import as_lab, catalog_json
from ..report import console, results_tables
from ..workspace import find_workspace, hints_unlocked, init_workspace
from .base import (
    EXIT_FAIL,
    UsageFailure,
    _catalog,
    _complete_selector,
    _labs_to,
    main,
)


@main.command("list")
@click.argument("selectors", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print the catalog as JSON.")
def list_cmd(selectors: Sequence[str], as_json: bool) -> None:
    """List phases and concepts (all, or those SELECTORS name)."""
    catalog = _catalog()
    chosen = {i.id for i in catalog.select(selectors)} if selectors else None
    if as_json:
        doc = catalog_json(catalog, chosen)
        click.echo(json.dumps(doc, indent=2))
        return
    for phase in catalog.phases:
        items = [c for c in phase.concepts if chosen is None or c.id in chosen]
        if not items:
            continue
        requires = ", ".join(phase.requires) or "none"
        console.print(f"[bold]{phase.id} · {phase.name}[/] [dim](requires {requires})[/]")
        drafts = {d.id for d in catalog.drafts}
        for concept in items:
            lab = concept.lab
            extra = (f"[dim]{', '.join(lab.services) or 'no services'}"
                     f"{' · C' if lab.language == 'c' else ''}[/]" if lab
                     else "[yellow]lab in progress[/]" if concept.id in drafts
                     else "[yellow]no lab yet[/]")
            console.print(f"  {concept.id:<6} {concept.slug:<28} {extra}")
        for example in phase.examples:
            if chosen is None or example.id in chosen:
                console.print(f"  {example.id:<6} {example.slug:<28} [dim]C example[/]")


@main.command()
@click.argument("selector")
@click.option("--all", "show_all", is_flag=True, help="Show every hint at once.")
def hint(selector: str, show_all: bool) -> None:
    """Show the next hint for a concept (hints unlock one per failed attempt)."""
    catalog = _catalog()
    items = catalog.select([selector])
    if len(items) != 1:
        raise UsageFailure(f"{selector!r} names {len(items)} concepts: name one, e.g. ph2.5")
    lab = as_lab(items[0])
    if lab is None:
        raise UsageFailure(f"{items[0].id} has no lab yet")
    if not lab.hints:
        console.print(f"{lab.id} has no hints: read {lab.path / 'README.md'}")
        return
    shown = len(lab.hints) if show_all else hints_unlocked(lab)
    for n, text in enumerate(lab.hints[:shown], 1):
        console.print(f"[bold]Hint {n}/{len(lab.hints)}[/] for {lab.id} {lab.slug}: {text}")
    if shown < len(lab.hints):
        console.print("[dim]More hints unlock as you try (or use --all).[/]")


# --------------------------------------------------------------------------------------
# init / run / progress


@main.command()
@click.argument("directory", type=click.Path(path_type=Path), default=Path("."))
def init(directory: Path) -> None:
    """Create a workspace in DIRECTORY with every lab's starter files (never overwrites)."""
    workspace, created, kept = init_workspace(directory, _catalog())
    console.print(f"workspace ready at [bold]{workspace.root}[/]: {len(created)} files "
                  f"created, {len(kept)} of yours kept")
    console.print("next: cd into it and run [bold]labrunner run ph0[/]")


@main.command()
@click.argument("selectors", nargs=-1, shell_complete=_complete_selector)
@click.option("--solutions", "target", flag_value="solution",
              help="Verify the reference solutions (progress untouched).")
@click.option("--starters", "target", flag_value="starter",
              help="Verify the starters: they must fail (progress untouched).")
@click.option("--workspace", "workspace_dir", type=click.Path(path_type=Path),
              help="The workspace to verify (default: the one here or above).")
@click.option("--backend", type=click.Choice(["auto", "local", "docker", "external"]),
              default=None, help="Who runs the services (default: auto, or $LABRUNNER_BACKEND).")
@click.option("-j", "--jobs", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Labs verified at once.")
@click.option("--json", "json_path", type=click.Path(path_type=Path),
              help="Write the versioned results document to this file.")
@click.option("--junit", "junit_path", type=click.Path(path_type=Path),
              help="Write JUnit XML to this file.")
@click.option("--expect-fail", is_flag=True,
              help="Exit 0 only if every selected lab FAILS (with --starters in CI).")
@click.option("-v", "--verbose", is_flag=True,
              help="Every test with its whole message, where your code failed, and what it "
                   "printed.")
@click.option("--keep/--no-keep", default=True, show_default=True,
              help="Leave the services this run starts running for the next run, until "
                   "they have been idle $LABRUNNER_WARM_IDLE seconds (default 300).")
def run(selectors: Sequence[str], target: str | None, workspace_dir: Path | None,
        backend: str | None, jobs: int, json_path: Path | None, junit_path: Path | None,
        expect_fail: bool, verbose: bool, keep: bool) -> None:
    """Verify SELECTORS: a phase (ph2), a concept (ph2.5), a slug, a lab folder, or all.
    Inside a lab folder, no selector (or '.') runs that lab."""
    from ..report import print_result, verbose_result
    from ..results import results_document, write_json, write_junit
    from ..services.manager import resolve_backend_name
    from ..services.warm import expire_due, idle_seconds
    from ..session import verify, warm_owner

    catalog = _catalog()
    labs = _labs_to("run", "not counted", catalog, selectors)
    expire_due()
    store = None
    if target is None:
        workspace = find_workspace(workspace_dir)
        sources = {lab.id: workspace.lab_dir(lab) for lab in labs}
        store = workspace.store()
        shown_target = "workspace"
    else:
        sources = {lab.id: lab.solution_dir if target == "solution" else lab.starter_dir
                   for lab in labs}
        shown_target = target
    backend_name = resolve_backend_name(backend)
    # The bar is drawn only on a terminal (rich's live display); service start-up lines
    # are printed either way, so a CI log shows what was started.
    on_result = verbose_result if verbose else print_result
    outcome = verify(labs, sources, backend_name, jobs=jobs, store=store, on_result=on_result,
                     keep=idle_seconds() if keep else 0.0, owner=warm_owner(workspace_dir))
    if len(outcome.results) > 1:
        results_tables(catalog, outcome.results, shown_target)
    document = results_document(outcome.results, target=shown_target, backend=backend_name,
                                started_at=outcome.started_at, duration=outcome.duration)
    if json_path:
        write_json(json_path, document)
    if junit_path:
        write_junit(junit_path, outcome.results)
    passed = sum(1 for r in outcome.results if r.outcome == "passed")
    console.print(f"{passed} passed, {len(outcome.results) - passed} failed "
                  f"in {outcome.duration:.1f}s ({backend_name} backend)")
    if expect_fail:
        sys.exit(0 if passed == 0 else EXIT_FAIL)
    if any(r.outcome == "error" for r in outcome.results) and passed == 0:
        sys.exit(EXIT_FAIL)
    sys.exit(0 if passed == len(outcome.results) else EXIT_FAIL)


@main.command()
@click.argument("selectors", nargs=-1, shell_complete=_complete_selector)
@click.option("--backend", type=click.Choice(["auto", "local", "docker", "external"]),
              default=None, help="Who runs the services (default: auto, or $LABRUNNER_BACKEND).")
def watch(selectors: Sequence[str], backend: str | None) -> None:
    """Re-run a concept each time you save one of its files; its services stay up while
    you watch. Inside a lab folder no selector is needed."""
    from ..services.manager import resolve_backend_name
    from ..watching import watch_labs

    catalog = _catalog()
    labs = _labs_to("watch", "not watched", catalog, selectors)
    workspace = find_workspace()
    watch_labs(labs, workspace, resolve_backend_name(backend))
