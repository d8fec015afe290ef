"""The ``labrunner`` command: thin click commands over the library.

Exit codes: 0 all selected passed, 1 some failed, 2 usage or set-up errors, 130 interrupted.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable, Sequence
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from . import __version__
from .catalog import Catalog, CatalogError, Concept, Lab, as_lab, load_catalog
from .errors import LabrunnerError
from .report import console, err_console, progress_page, results_tables
from .services import SERVICE_NAMES
from .workspace import WorkspaceError, find_workspace, init_workspace

F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageFailure(click.ClickException):
    exit_code = EXIT_USAGE

    def show(self, file: Any = None) -> None:
        err_console.print(f"[bold red]error:[/] {self.message}")


def friendly_errors(fn: F) -> F:
    """Known failures become one clear line (exit 2); Ctrl-C exits 130 after cleanup."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LabrunnerError as exc:
            raise UsageFailure(str(exc)) from exc
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted:[/] services stopped; finished results "
                              "were kept")
            sys.exit(EXIT_INTERRUPTED)

    return wrapper  # type: ignore[return-value]


def _catalog() -> Catalog:
    return load_catalog()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="labrunner")
def main() -> None:
    """Hands-on labs for the Backend Engineering Roadmap, verified against real services."""
    # Python leaves SIGINT alone when it starts with it ignored (a background job of a
    # script, a test harness): Ctrl-C must still stop services and keep finished results.
    signal.signal(signal.SIGINT, signal.default_int_handler)


# --------------------------------------------------------------------------------------
# list / hint


@main.command("list")
@click.argument("selectors", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print the catalog as JSON.")
@friendly_errors
def list_cmd(selectors: Sequence[str], as_json: bool) -> None:
    """List phases and concepts (all, or those SELECTORS name)."""
    catalog = _catalog()
    chosen = {i.id for i in catalog.select(selectors)} if selectors else None
    if as_json:
        doc = {"version": 1, "phases": [
            {"id": p.id, "name": p.name, "requires": list(p.requires),
             "concepts": [
                 {"id": c.id, "slug": c.slug, "title": c.title, "category": c.category,
                  "lab": c.lab is not None,
                  "services": list(c.lab.services) if c.lab else [],
                  "language": c.lab.language if c.lab else None,
                  "points": c.lab.points if c.lab else None}
                 for c in p.concepts if chosen is None or c.id in chosen],
             "c_examples": [{"id": e.id, "slug": e.slug, "title": e.title}
                            for e in p.examples if chosen is None or e.id in chosen]}
            for p in catalog.phases]}
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
@friendly_errors
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
    shown = len(lab.hints)
    if not show_all:
        try:
            store = find_workspace().store()
            failures = sum(1 for a in store.attempts(lab.id) if a.outcome != "passed")
            shown = min(len(lab.hints), failures + 1)
        except WorkspaceError:
            shown = 1
    for n, text in enumerate(lab.hints[:shown], 1):
        console.print(f"[bold]Hint {n}/{len(lab.hints)}[/] for {lab.id} {lab.slug}: {text}")
    if shown < len(lab.hints):
        console.print("[dim]More hints unlock as you try (or use --all).[/]")


# --------------------------------------------------------------------------------------
# init / run / progress


@main.command()
@click.argument("directory", type=click.Path(path_type=Path), default=Path("."))
@friendly_errors
def init(directory: Path) -> None:
    """Create a workspace in DIRECTORY with every lab's starter files (never overwrites)."""
    workspace, created, kept = init_workspace(directory, _catalog())
    console.print(f"workspace ready at [bold]{workspace.root}[/]: {len(created)} files "
                  f"created, {len(kept)} of yours kept")
    console.print("next: cd into it and run [bold]labrunner run ph0[/]")


def _here_selectors(catalog: Catalog, selectors: Sequence[str]) -> list[str]:
    """``.``, a lab folder's path, or nothing at all inside a lab folder: that lab."""
    try:
        root: Path | None = find_workspace().root
    except WorkspaceError:
        root = None
    out = []
    for raw in selectors or ["."]:
        path = Path(raw)
        if raw == "." or (("/" in raw or raw.startswith(".")) and path.is_dir()):
            lab = catalog.lab_at(path, root)
            if lab is None:
                raise UsageFailure(
                    f"{path.resolve()} is not a lab folder: run from inside one, or name what "
                    "to run (a phase ph2, a concept ph2.5, a slug, or all)" if selectors else
                    "name what to run: a phase (ph2), a concept (ph2.5), a slug "
                    "(isolation-levels) or all; or run it from inside a lab folder")
            out.append(lab.id)
        else:
            out.append(raw)
    return out


def _selected_labs(catalog: Catalog, selectors: Sequence[str]) -> tuple[list[Lab], list[str]]:
    items: list[Concept | Lab] = catalog.select(_here_selectors(catalog, selectors))
    labs = [lab for lab in (as_lab(i) for i in items) if lab is not None]
    without = [i.id for i in items if as_lab(i) is None]
    return labs, without


def _labs_to(verb: str, skipped: str, catalog: Catalog, selectors: Sequence[str]) -> list[Lab]:
    """The labs ``selectors`` name; concepts without a lab are listed (``skipped``: what
    does not happen to them), and a selection with no lab at all is a usage error."""
    labs, without = _selected_labs(catalog, selectors)
    if without:
        err_console.print(f"[yellow]{len(without)} selected concepts have no lab yet "
                          f"({skipped}):[/] {', '.join(without)}")
    if not labs:
        raise UsageFailure(f"nothing to {verb}: the selected concepts have no labs yet")
    return labs


def _complete_selector(ctx: click.Context, param: click.Parameter,
                       incomplete: str) -> list[str]:
    """Shell completion: phases, concept ids and slugs that have labs."""
    try:
        catalog = _catalog()
    except CatalogError:
        return []
    words = ["all", *(p.id for p in catalog.phases)]
    for lab in catalog.labs:
        words += [lab.id, lab.slug]
    return [w for w in words if w.startswith(incomplete)]


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
@friendly_errors
def run(selectors: Sequence[str], target: str | None, workspace_dir: Path | None,
        backend: str | None, jobs: int, json_path: Path | None, junit_path: Path | None,
        expect_fail: bool, verbose: bool, keep: bool) -> None:
    """Verify SELECTORS: a phase (ph2), a concept (ph2.5), a slug, a lab folder, or all.
    Inside a lab folder, no selector (or '.') runs that lab."""
    from .report import print_result, verbose_result
    from .results import results_document, write_json, write_junit
    from .services.manager import resolve_backend_name
    from .services.warm import expire_due, idle_seconds
    from .session import verify, warm_owner

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
@friendly_errors
def watch(selectors: Sequence[str], backend: str | None) -> None:
    """Re-run a concept each time you save one of its files; its services stay up while
    you watch. Inside a lab folder no selector is needed."""
    from .services.manager import resolve_backend_name
    from .watching import watch_labs

    catalog = _catalog()
    labs = _labs_to("watch", "not watched", catalog, selectors)
    workspace = find_workspace()
    watch_labs(labs, workspace, resolve_backend_name(backend))


@main.command("next")
@click.option("--workspace", "workspace_dir", type=click.Path(path_type=Path))
@friendly_errors
def next_cmd(workspace_dir: Path | None) -> None:
    """The next concept to work on: the first not done of the earliest unlocked phase."""
    from .workspace import next_concept

    catalog = _catalog()
    workspace = find_workspace(workspace_dir)
    store = workspace.store()
    done = {cid for cid, st in store.status().items() if st.done}
    store.close()
    lab, why = next_concept(catalog, done)
    if lab is None:
        console.print(why)
        return
    readme = workspace.lab_dir(lab) / "README.md"
    console.print(f"next: [bold]{lab.id} {lab.slug}[/] · {lab.title} ({why})")
    console.print(f"  read  {readme}")
    console.print(f"  run   labrunner run {lab.id}   (or: labrunner watch {lab.id})")


@main.command()
@click.argument("selector", shell_complete=_complete_selector)
@click.option("--workspace", "workspace_dir", type=click.Path(path_type=Path))
@friendly_errors
def reset(selector: str, workspace_dir: Path | None) -> None:
    """Put a lab's starter files back; yours are kept in .labrunner/backups first."""
    from .workspace import reset_lab

    catalog = _catalog()
    labs = _labs_to("reset", "nothing to reset", catalog, [selector])
    workspace = find_workspace(workspace_dir)
    for lab in labs:
        restored, backup = reset_lab(workspace, lab)
        where = f"; your files are in {backup}" if backup else ""
        console.print(f"{lab.id}: starter restored ({', '.join(restored)}){where}")


@main.command()
@click.option("--workspace", "workspace_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print progress as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="List every concept's state.")
@click.option("--html", "html_path", is_flag=False, flag_value=".", default=None,
              type=click.Path(path_type=Path), metavar="[FILE]",
              help="Write the roadmap page (self-contained HTML) to FILE "
                   "(default: roadmap.html in the workspace).")
@friendly_errors
def progress(workspace_dir: Path | None, as_json: bool, verbose: bool,
             html_path: Path | None) -> None:
    """Show progress over all 8 phases, as the roadmap page does."""
    catalog = _catalog()
    workspace = find_workspace(workspace_dir)
    if html_path is not None:
        from .dashboard import write_page

        target = workspace.root / "roadmap.html" if str(html_path) == "." else html_path
        if target.is_dir():
            target = target / "roadmap.html"
        written = write_page(catalog, workspace, target)
        console.print(f"wrote {written} (open it in a browser; `labrunner dashboard` serves "
                      "it live)")
        return
    status = workspace.store().status()
    if as_json:
        done = [c.id for c in catalog.concepts if c.id in status and status[c.id].done]
        click.echo(json.dumps({
            "version": 1, "done": len(done), "total": len(catalog.concepts),
            "phases": [{"id": p.id, "name": p.name, "total": len(p.concepts),
                        "done": sum(1 for c in p.concepts if c.id in done)}
                       for p in catalog.phases],
            "concepts": {cid: {"state": s.state, "attempts": s.attempts}
                         for cid, s in status.items()},
        }, indent=2))
        return
    progress_page(catalog, status, verbose)


@main.command()
@click.option("--workspace", "workspace_dir", type=click.Path(path_type=Path))
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port on 127.0.0.1 (0: any free port).")
@click.option("--open/--no-open", "open_browser", default=True,
              help="Open the page in a browser when one can show a window.")
@friendly_errors
def dashboard(workspace_dir: Path | None, port: int, open_browser: bool) -> None:
    """Serve the roadmap page of your workspace on loopback; it updates as runs finish."""
    from . import dashboard as board

    workspace = find_workspace(workspace_dir)
    page = board.Dashboard(_catalog(), workspace)
    try:
        server = board.serve(page, port)
    except OSError as exc:
        page.close()
        raise UsageFailure(f"--port {port}: cannot listen on 127.0.0.1 ({exc.strerror}); "
                           "choose another port or 0 for any free one") from exc
    url = board.url_of(server)
    console.print(f"roadmap page of {workspace.root}: [bold]{url}[/] (Ctrl-C to stop)")
    if open_browser and board.browser_available():
        import webbrowser

        webbrowser.open(url)
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        board.stop(server, page)


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
@friendly_errors
def dev_check(selectors: Sequence[str], backend: str | None, json_path: Path | None,
              learner_process: bool, strength: bool) -> None:
    """Every reference passes, every starter and wrong/ solution fails (default: all)."""
    from rich.table import Table

    from .devcheck import check, expectations, strength_expectations
    from .report import mark
    from .services.isolation import new_run_id
    from .services.manager import resolve_backend_name
    from .session import services_for

    labs, _ = _selected_labs(_catalog(), selectors or ["all"])
    todo = list(strength_expectations(labs) if strength else expectations(labs))
    outcomes = []
    from .session import warm_owner

    with services_for(labs, resolve_backend_name(backend), owner=warm_owner()) as service_set:
        state = service_set.state_file if service_set.endpoints else None
        run_id = new_run_id()
        with err_console.status("checking…") as status:
            for n, expectation in enumerate(todo, 1):
                status.update(f"[{n}/{len(todo)}] {expectation.lab.id} {expectation.variant}")
                outcomes.append(check(expectation, state, run_id, learner_process))
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
        from .results import write_json

        write_json(json_path, {"version": 1, "checks": [
            {"lab": o.expectation.lab.id, "variant": o.expectation.variant,
             "must_pass": o.expectation.must_pass, "outcome": o.result.outcome,
             "met": o.met, "message": o.result.first_line} for o in outcomes]})
    sys.exit(EXIT_FAIL if unmet else 0)


def _strength_report(outcomes: Sequence[Any], json_path: Path | None) -> None:
    """``dev check --strength``: a row per wrong solution; exit 1 if one is not killed."""
    from rich.markup import escape
    from rich.table import Table

    from .devcheck import strength_rows, strength_summary

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
        from .results import write_json

        write_json(json_path, {"version": 1, "strength": [r.as_json() for r in rows],
                               "labs": summary})
    sys.exit(EXIT_FAIL if any(not r.killed for r in rows) else 0)


# --------------------------------------------------------------------------------------
# services / doctor / setup


@main.group()
def services() -> None:
    """Keep a warm set of services for faster runs (up, status, down)."""


@services.command("up")
@click.argument("names", nargs=-1, type=click.Choice(SERVICE_NAMES))
@click.option("--backend", type=click.Choice(["auto", "local", "docker"]), default=None)
@click.option("--workspace", "workspace_dir", type=click.Path(path_type=Path),
              help="Whose set (default: the workspace here or above, else this checkout).")
@friendly_errors
def services_up(names: Sequence[str], backend: str | None,
                workspace_dir: Path | None) -> None:
    """Start NAMES (default: all four) at once for this workspace and keep them running
    (no idle deadline) until 'labrunner services down'."""
    from .services.manager import ServiceSet, Startup, resolve_backend_name
    from .services.warm import WarmSet
    from .session import warm_owner

    backend_name = resolve_backend_name(backend)
    owner = warm_owner(workspace_dir)
    warm = WarmSet.of(backend_name, owner)
    with warm.locked():
        service_set = ServiceSet.warm_set(backend_name, owner)
        service_set.meta["warm"].update(pinned=True, deadline=None)
        service_set.save()
        startup = Startup(service_set, list(names or SERVICE_NAMES), keep_threads=False,
                          on_start=lambda n: err_console.print(f"[dim]starting {n}…[/]"))
        try:
            startup.begin().wait()
        except KeyboardInterrupt:
            startup.cancel()
            startup.join()
            raise
    for name in names or SERVICE_NAMES:
        if name in startup.errors:
            console.print(f"[red]✗[/] {name:<9} {startup.errors[name]}")
            continue
        endpoint = service_set.endpoints[name]
        took = (f"started in {startup.durations[name]:.1f} s" if name in startup.durations
                else "already up")
        console.print(f"[green]✓[/] {name:<9} {endpoint.host}:{endpoint.port} "
                      f"({endpoint.backend}, {took})")
    console.print(f"[dim]kept for {owner} until: labrunner services down[/]")
    if startup.errors:
        sys.exit(EXIT_FAIL)


def _status_rows() -> list[dict[str, Any]]:
    import time

    from .services.manager import leftovers, make_backend, read_state, read_state_backend
    from .services.warm import WarmSet

    rows: list[dict[str, Any]] = []
    now = time.time()
    for warm in WarmSet.all():
        meta = warm.meta()
        deadline = warm.deadline()
        backend = make_backend(warm.backend_name(), tied_to_parent=False)
        users = warm.live_users()
        for name, ep in warm.endpoints().items():
            rows.append({
                "service": name, "backend": ep.backend, "host": ep.host, "port": ep.port,
                "alive": backend.alive(ep), "kind": "warm",
                "owner": meta.get("owner"), "pinned": bool(meta.get("pinned")),
                "idle_deadline": deadline,
                "idle_left": None if deadline is None else max(0.0, round(deadline - now, 1)),
                "users": users})
    for state in leftovers():
        if state.parent.name.startswith("warm-"):
            continue
        backend = make_backend(read_state_backend(state), tied_to_parent=False)
        for name, ep in read_state(state).items():
            kind = "warm" if state.name.startswith("warm-") else "left by a crashed run"
            rows.append({"service": name, "backend": ep.backend, "host": ep.host,
                         "port": ep.port, "alive": backend.alive(ep), "kind": kind,
                         "owner": None, "pinned": kind == "warm", "idle_deadline": None,
                         "idle_left": None, "users": []})
    return rows


@services.command("status")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def services_status(as_json: bool) -> None:
    """Show the warm services: whose, whether they answer, until when they stay warm."""
    import time

    from .services.warm import expire_due

    expire_due()
    rows = _status_rows()
    if as_json:
        click.echo(json.dumps({"version": 2, "services": rows}, indent=2))
        return
    if not rows:
        console.print("no warm services (a run keeps what it starts for a while; "
                      "'labrunner services up' keeps them until 'services down')")
    for row in rows:
        status = "[green]up[/]" if row["alive"] else "[red]down[/]"
        if row["pinned"]:
            until = "until services down"
        elif row["idle_deadline"] is not None:
            stamp = time.strftime("%H:%M:%S", time.localtime(row["idle_deadline"]))
            until = f"idle deadline {stamp} (in {row['idle_left']:.0f} s)"
        else:
            until = ""
        used = f", in use by run {', '.join(map(str, row['users']))}" if row["users"] else ""
        console.print(f"{row['service']:<9} {row['host']}:{row['port']:<6} "
                      f"{row['backend']:<7} {status} [dim]{row['kind']}"
                      f"{' of ' + row['owner'] if row['owner'] else ''} {until}{used}[/]")


@services.command("down")
@friendly_errors
def services_down() -> None:
    """Stop the warm services and anything a crashed run left behind; a set a live run
    uses is kept (and said so)."""
    from .services.manager import clean

    report = clean()
    console.print(f"stopped {len(report.stopped)} service(s)" +
                  (f": {', '.join(report.stopped)}" if report.stopped else ""))
    if report.cleared:
        console.print(f"[dim]cleared the records of {len(report.cleared)} service(s) that "
                      f"had already stopped: {', '.join(report.cleared)}[/]")
    for why in report.kept:
        console.print(f"[yellow]kept[/] {why}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def doctor(as_json: bool) -> None:
    """What was found (with versions), what is missing and the command that installs it."""
    from .doctor import checks

    found = checks()
    if as_json:
        click.echo(json.dumps([c.__dict__ for c in found], indent=2))
    else:
        for check in found:
            sign = "[green]✓[/]" if check.ok else "[red]✗[/]"
            console.print(f"{sign} {check.name:<18} {check.detail}")
            if check.remedy:
                console.print(f"   [yellow]fix:[/] {check.remedy}")
        not_ready = [c.name for c in found if not c.ok]
        console.print("[green]everything ready[/]" if not not_ready
                      else f"[red]not ready:[/] {', '.join(not_ready)}")
    sys.exit(0 if all(c.ok for c in found) else EXIT_FAIL)


@main.command()
@click.option("--kafka/--no-kafka", default=True, help="Fetch the Kafka broker jars (Maven).")
@friendly_errors
def setup(kafka: bool) -> None:
    """Fetch what the local backend needs once (the Kafka 4.3.1 jars through Maven)."""
    if kafka:
        from .services.kinds import kafka as local_kafka

        with err_console.status(f"fetching Kafka {local_kafka.KAFKA_VERSION} jars via Maven…"):
            libs = local_kafka.fetch_jars()
        console.print(f"[green]✓[/] Kafka jars in {libs}")
        # Once, and again only when the jars or the JVM change: the broker then starts
        # from an AppCDS archive (a JVM start without it still works, only slower).
        with err_console.status("making the Kafka broker's AppCDS archive…"):
            try:
                archive = local_kafka.build_cds_archive()
            except LabrunnerError as exc:
                archive = None
                err_console.print(f"[yellow]no AppCDS archive:[/] {exc}")
        if archive is not None:
            console.print(f"[green]✓[/] Kafka AppCDS archive {archive}")


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
@friendly_errors
def grade_cohort_cmd(submissions: Sequence[Path], selectors: Sequence[str], out: Path,
                     jobs: int, timeout: float | None, memory_mb: int,
                     hidden_tests: Path | None, shard: str | None, force: bool,
                     feedback_format: str, backend: str | None) -> None:
    """Grade SUBMISSIONS (workspace folders, .zip/.tar.gz of one, or folders of those)."""
    from .grading import (
        GradeConfig,
        GradingError,
        Limits,
        grade_with_services,
        parse_shard,
        print_summary,
    )
    from .services.manager import resolve_backend_name

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
@friendly_errors
def grade_merge_cmd(dirs: Sequence[Path], out: Path, feedback_format: str) -> None:
    """Merge the outputs of sharded 'labrunner grade --shard I/N' runs into one gradebook."""
    from .grading import GradingError, merge

    try:
        document = merge(list(dirs), out, feedback_format)
    except GradingError as exc:
        raise UsageFailure(str(exc)) from exc
    console.print(f"merged {document['summary']['students']} students from {len(dirs)} "
                  f"folders into {out}")


def entry() -> None:  # pragma: no cover - console script
    main()


if __name__ == "__main__":  # pragma: no cover
    main()
