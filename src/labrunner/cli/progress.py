"""Where the learner stands: next, reset, progress, dashboard."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import click

from ..report import console, progress_json, progress_page
from ..workspace import find_workspace
from .base import (
    UsageFailure,
    _catalog,
    _complete_selector,
    _labs_to,
    main,
)


@main.command("next")
@click.option("--workspace", "workspace_dir", type=click.Path(path_type=Path))
def next_cmd(workspace_dir: Path | None) -> None:
    """The next concept to work on: the first not done of the earliest unlocked phase."""
    from ..workspace import next_concept

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
def reset(selector: str, workspace_dir: Path | None) -> None:
    """Put a lab's starter files back; yours are kept in .labrunner/backups first."""
    from ..workspace import reset_lab

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
def progress(workspace_dir: Path | None, as_json: bool, verbose: bool,
             html_path: Path | None) -> None:
    """Show progress over all 8 phases, as the roadmap page does."""
    catalog = _catalog()
    workspace = find_workspace(workspace_dir)
    if html_path is not None:
        from ..dashboard import write_page

        target = workspace.root / "roadmap.html" if str(html_path) == "." else html_path
        if target.is_dir():
            target = target / "roadmap.html"
        written = write_page(catalog, workspace, target)
        console.print(f"wrote {written} (open it in a browser; `labrunner dashboard` serves "
                      "it live)")
        return
    status = workspace.store().status()
    if as_json:
        click.echo(json.dumps(progress_json(catalog, status), indent=2))
        return
    progress_page(catalog, status, verbose)


@main.command()
@click.option("--workspace", "workspace_dir", type=click.Path(path_type=Path))
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port on 127.0.0.1 (0: any free port).")
@click.option("--open/--no-open", "open_browser", default=True,
              help="Open the page in a browser when one can show a window.")
def dashboard(workspace_dir: Path | None, port: int, open_browser: bool) -> None:
    """Serve the roadmap page of your workspace on loopback; it updates as runs finish."""
    from .. import dashboard as board

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
