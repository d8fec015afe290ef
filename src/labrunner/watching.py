"""`labrunner watch`: verify a concept again each time the learner saves one of its files.

The services the watched labs need are started once and kept up for the whole watch, so a
save costs the verification alone. Each round clears the screen and redraws the results;
Ctrl-C stops the watch and the services it started.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from watchfiles import watch

from .catalog import Lab
from .report import console, print_result
from .services.manager import ServiceSet
from .session import services_for, verify
from .store import files_hash
from .workspace import Workspace

# Saves that land within this many milliseconds are one change (editors write in bursts).
DEBOUNCE_MS = 300


def changed_labs(labs: Sequence[Lab], workspace: Workspace,
                 paths: Iterable[str]) -> list[Lab]:
    """The labs one of whose learner files is among ``paths``."""
    touched = {Path(p).resolve() for p in paths}
    out = []
    for lab in labs:
        folder = workspace.lab_dir(lab).resolve()
        if any((folder / name).resolve() in touched for name in lab.learner_files):
            out.append(lab)
    return out


def _round(labs: Sequence[Lab], workspace: Workspace, backend: str,
           services: ServiceSet) -> None:
    console.clear()
    console.print(f"[dim]watching {', '.join(lab.id for lab in labs)} · save a file to "
                  "verify again · Ctrl-C to stop[/]")
    store = workspace.store()
    try:
        sources = {lab.id: workspace.lab_dir(lab) for lab in labs}
        outcome = verify(labs, sources, backend, store=store, services=services,
                         on_result=print_result)
    finally:
        store.close()
    passed = sum(1 for r in outcome.results if r.outcome == "passed")
    console.print(f"{passed} of {len(outcome.results)} passed · waiting for a save…")


def watch_labs(labs: Sequence[Lab], workspace: Workspace, backend: str) -> None:
    folders = [workspace.lab_dir(lab) for lab in labs]
    hashes = {lab.id: files_hash(workspace.lab_dir(lab), lab.learner_files) for lab in labs}
    from .services.warm import idle_seconds

    # The workspace's warm set: reused, and what the watch starts stays warm after it.
    with services_for(labs, backend, keep=idle_seconds(),
                      owner=workspace.root.resolve()) as services:
        _round(labs, workspace, backend, services)
        for changes in watch(*folders, debounce=DEBOUNCE_MS, raise_interrupt=True):
            candidates = changed_labs(labs, workspace, (path for _, path in changes))
            # An editor's save that leaves the bytes as they were changes nothing.
            again = []
            for lab in candidates:
                now = files_hash(workspace.lab_dir(lab), lab.learner_files)
                if now != hashes[lab.id]:
                    hashes[lab.id] = now
                    again.append(lab)
            if again:
                _round(again, workspace, backend, services)
