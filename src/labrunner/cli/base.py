"""The ``labrunner`` group and what every command shares: one place where a failure the
library explains (a ``LabrunnerError``) becomes one line and exit 2, and Ctrl-C exit 130.

Exit codes: 0 all selected passed, 1 some failed, 2 usage or set-up errors, 130 interrupted.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from .. import __version__
from ..catalog import Catalog, CatalogError, Concept, Lab, as_lab, load_catalog
from ..errors import LabrunnerError
from ..report import err_console
from ..workspace import WorkspaceError, find_workspace

EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageFailure(click.ClickException):
    """One line on stderr, exit 2."""

    exit_code = EXIT_USAGE

    def show(self, file: Any = None) -> None:
        err_console.print(f"[bold red]error:[/] {self.message}")


class LabrunnerGroup(click.Group):
    """The top group: whatever command runs under it (sub-groups too: they are invoked
    inside this one's ``invoke``), a ``LabrunnerError`` becomes one line with its remedy and
    exit 2, and Ctrl-C exits 130 once the command's clean-up ran."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LabrunnerError as exc:
            raise UsageFailure(str(exc)) from exc
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted:[/] services stopped; finished results "
                              "were kept")
            sys.exit(EXIT_INTERRUPTED)


@click.group(cls=LabrunnerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="labrunner")
def main() -> None:
    """Hands-on labs for the Backend Engineering Roadmap, verified against real services."""
    # Python leaves SIGINT alone when it starts with it ignored (a background job of a
    # script, a test harness): Ctrl-C must still stop services and keep finished results.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _catalog() -> Catalog:
    return load_catalog()


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
